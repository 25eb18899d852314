"""From a validated request to what the engine runs: the harmony prompt, the tool_choice prefill, sampling params.

Both endpoints turn their input into OpenAI chat messages first; from there on they share this module:

* The messages become a harmony conversation (gptoss.harmony_history), rendered to prompt tokens that end with
  `<|start|>assistant`.
* tool_choice: "auto" (default) offers the tools; "none" does not offer them (the developer message has no tool
  namespace; earlier tool calls and results in the history are still rendered); a named function and "required"
  with a single tool prefill the assistant header `<|channel|>commentary to=functions.N <|constrain|>json<|message|>`
  so the model writes the arguments right away; "required" with several tools prefills
  `<|channel|>commentary to=functions` so the model must call a function but picks which. Prefilled turns have
  no analysis (the header is already past it). Prefilled tokens count as prompt tokens in usage.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss.errors import GptOssError
from gptoss.harmony_history import build_conversation, render_prompt
from gptoss.server.errors import APIError
from gptoss.tokenizer import STOP_TOKENS

try:
    from gptoss.engine import SamplingParams
except ModuleNotFoundError as _e:  # the engine module is optional for the HTTP layer (scripted engines in tests)
    if _e.name not in ("gptoss.engine", "torch"):
        raise

    @dataclass
    class SamplingParams:  # type: ignore[no-redef]  # same fields as gptoss.engine.SamplingParams
        max_tokens: int
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        seed: int | None = None
        stop_token_ids: tuple[int, ...] = (200002, 200012)
        logprobs: bool = False
        top_logprobs: int = 0


_TOOL_CHOICE_MODES = (None, "auto", "none", "required")


def normalize_effort(effort: str | None) -> str:
    """OpenAI's reasoning effort -> harmony's (which has no "minimal"; medium is the default)."""
    return "low" if effort == "minimal" else (effort or "medium")


def _render(messages: list[dict], tools: list[dict] | None, effort: str | None, system_prompt: str | None) -> list[int]:
    try:
        conversation = build_conversation(messages, tools=tools, reasoning_effort=normalize_effort(effort),
                                          system_prompt=system_prompt)
        return render_prompt(conversation)
    except (GptOssError, APIError):
        raise
    except BaseException as e:  # openai_harmony rejected the input (a Rust panic is a BaseException)
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise APIError(400, f"messages: cannot render the conversation: {msg}", param="messages") from None


def _tool_choice_prefill(tokenizer, tool_choice, names: list[str]) -> list[int]:
    """The assistant-header tokens that force a tool call (see the module docstring); [] when none is forced."""
    forced = tool_choice if tool_choice not in _TOOL_CHOICE_MODES else None
    if tool_choice == "required" and len(names) == 1:
        forced = names[0]
    if forced is not None:
        return tokenizer.encode(f"<|channel|>commentary to=functions.{forced} <|constrain|>json<|message|>",
                                allowed_special="all")
    if tool_choice == "required":
        # no dot: the model writes ".name" as it was trained to tokenize it (functions | .get | _weather)
        return tokenizer.encode("<|channel|>commentary to=functions", allowed_special="all")
    return []


def _fit_max_tokens(n_prompt: int, context: int, max_tokens: int | None, max_param: str, input_param: str) -> int:
    """max_tokens, defaulting to the rest of the context; a 400 if the prompt and max_tokens do not fit."""
    if max_tokens is None:
        max_tokens = context - n_prompt
        if max_tokens < 1:
            raise APIError(400, f"the prompt has {n_prompt} tokens, which fills the context length of "
                           f"{context}", param=input_param, code="context_length_exceeded")
    elif n_prompt + max_tokens > context:
        raise APIError(400, f"the prompt of {n_prompt} tokens + {max_param} {max_tokens} = "
                       f"{n_prompt + max_tokens} exceeds the context length of {context}", param=max_param,
                       code="context_length_exceeded")
    return max_tokens


def prepare_prompt(server, messages: list[dict], tools: list[dict], tool_choice, effort: str | None,
                   system_prompt: str | None, max_tokens: int | None, max_param: str,
                   input_param: str = "messages") -> tuple[list[int], list[int], int]:
    """-> (prompt tokens, prefill tokens, max_tokens). tools are flat {"name", "description", "parameters"};
    tool_choice is "auto" | "none" | "required" | a function name; max_param and input_param name max_tokens and
    the conversation in errors."""
    names = [t["name"] for t in tools]
    if tool_choice not in _TOOL_CHOICE_MODES and tool_choice not in names:
        raise APIError(400, f"tool_choice: no tool named {tool_choice!r} in tools", param="tool_choice")
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice")
    offered = None if tool_choice == "none" or not tools else [
        {"type": "function", "function": {k: v for k, v in t.items() if v is not None}} for t in tools]
    prompt = _render(messages, offered, effort, system_prompt)
    prefill = _tool_choice_prefill(server.tokenizer, tool_choice, names)
    max_tokens = _fit_max_tokens(len(prompt) + len(prefill), int(server.engine.context_length), max_tokens,
                                 max_param, input_param)
    return prompt, prefill, max_tokens


def sampling_params(max_tokens: int, temperature, top_p, top_k, seed, logprobs=False,
                    top_logprobs=0) -> SamplingParams:
    """The engine's SamplingParams from OpenAI's options (None = OpenAI's default)."""
    temperature = 1.0 if temperature is None else float(temperature)
    top_p = 1.0 if top_p is None else float(top_p)
    if top_p <= 0:  # only the most likely token survives
        temperature, top_p = 0.0, 1.0
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                          seed=seed, stop_token_ids=tuple(STOP_TOKENS), logprobs=bool(logprobs),
                          top_logprobs=int(top_logprobs or 0) if logprobs else 0)
