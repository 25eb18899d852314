"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/responses, /v1/models, /health.

    app = create_app(engine, "gpt-oss-20b", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

The HTTP layer talks to the engine only through its public interface (`engine.context_length`,
`engine.generate(prompt_tokens, SamplingParams) -> async iterator of TokenOutput`, `engine.stats()`), so tests can
pass a scripted engine. Per request:

* The OpenAI messages (or Responses input items) become a harmony conversation (gptoss.harmony_history), rendered
  to prompt tokens that end with `<|start|>assistant`.
* tool_choice: "auto" (default) offers the tools; "none" does not offer them (the developer message has no tool
  namespace; earlier tool calls and results in the history are still rendered); a named function
  ({"type": "function", "function": {"name": N}}, or Responses' {"type": "function", "name": N}) and "required"
  with a single tool prefill the assistant header `<|channel|>commentary to=functions.N <|constrain|>json<|message|>`
  so the model writes the arguments right away; "required" with several tools prefills
  `<|channel|>commentary to=functions.` so the model must call a function but picks which. Prefilled turns have
  no analysis (the header is already past it). Prefilled tokens count as prompt tokens in usage.
* The sampled tokens go through the tolerant HarmonyStreamParser: analysis -> `reasoning_content` (chat) or a
  reasoning item (responses); final channel and recipient-less preambles -> content; `functions.NAME` messages ->
  tool calls. Malformed output never fails a request: whatever was parsed is returned with status 200.
* stop strings apply to content only: generation stops at the first occurrence, the text is cut before it and
  finish_reason is "stop". While streaming, text that could be the start of a stop string is held back.
* logprobs cover the content tokens (the tokens whose text is returned as content), OpenAI's
  choices[].logprobs.content format.
* usage: prompt_tokens = rendered prompt (+ prefill) tokens, completion_tokens = tokens the engine generated.

Errors are OpenAI-style: {"error": {"message", "type", "param", "code"}}; client mistakes are 4xx, never 500.
A client that disconnects mid-stream (or mid-request) closes the engine's generator, which cancels the request and
frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss.errors import ContextLengthError, GptOssError
from gptoss.harmony_history import build_conversation, render_prompt
from gptoss.harmony_parser import (
    ContentDelta,
    Done,
    HarmonyStreamParser,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from gptoss.tokenizer import STOP_TOKENS, get_tokenizer

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


log = logging.getLogger(__name__)

MAX_STORED_RESPONSES = 1000
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


# --- errors -------------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, type, param, code), status_code=status, headers=headers)


def _loc_to_param(loc) -> str | None:
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _validation_error(errors: list[dict]) -> APIError:
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    param = _loc_to_param(err.get("loc", ()))
    # A union (e.g. str | list) reports one error per member: name the field once.
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "required field is missing"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


# --- request models -------------------------------------------------------------------------------------------------


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(_Req):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Req):
    type: Literal["function"]
    function: FunctionDef


class _NamedFunction(_Req):
    name: str


class ChatNamedToolChoice(_Req):
    type: Literal["function"]
    function: _NamedFunction


class StreamOptions(_Req):
    include_usage: bool = False


_Effort = Literal["minimal", "low", "medium", "high"]


class ChatCompletionRequest(_Req):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ChatNamedToolChoice | None = None
    reasoning_effort: _Effort | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)


class ResponsesTool(_Req):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedToolChoice(_Req):
    type: Literal["function"]
    name: str


class ReasoningOptions(_Req):
    effort: _Effort | None = None
    summary: str | None = None


class ResponsesRequest(_Req):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ResponsesNamedToolChoice | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None


# --- tool schema checks --------------------------------------------------------------------------------------------


def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """A light JSON-schema sanity check (harmony renders almost anything; malformed schemas are client bugs)."""
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}: expected a JSON schema object", param=where)
    if depth > 32:
        raise APIError(400, f"{where}: schema nested too deeply", param=where)
    typ = schema.get("type")
    if typ is not None and not isinstance(typ, str) and not (
            isinstance(typ, list) and all(isinstance(t, str) for t in typ)):
        raise APIError(400, f"{where}.type: expected a string or a list of strings", param=f"{where}.type")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise APIError(400, f"{where}.properties: expected an object", param=f"{where}.properties")
        for key, sub in props.items():
            _check_schema(sub, f"{where}.properties.{key}", depth + 1)
    req = schema.get("required")
    if req is not None and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
        raise APIError(400, f"{where}.required: expected a list of strings", param=f"{where}.required")
    items = schema.get("items")
    if items is not None and not isinstance(items, (dict, bool)):
        raise APIError(400, f"{where}.items: expected a schema object", param=f"{where}.items")
    if isinstance(items, dict):
        _check_schema(items, f"{where}.items", depth + 1)
    enum = schema.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise APIError(400, f"{where}.enum: expected a list", param=f"{where}.enum")


def _check_tools(tools: list[dict], prefix: str) -> None:
    """tools: [{"name", "description", "parameters"}] (flattened); prefix: how the request names tools[i]."""
    seen = set()
    for i, fn in enumerate(tools):
        where = prefix.format(i=i)
        if not _TOOL_NAME.match(fn["name"]):
            raise APIError(400, f"{where}.name: {fn['name']!r} must be 1-64 letters, digits, '_' or '-'",
                           param=f"{where}.name")
        if fn["name"] in seen:
            raise APIError(400, f"{where}.name: duplicate tool name {fn['name']!r}", param=f"{where}.name")
        seen.add(fn["name"])
        if fn.get("parameters") is not None:
            _check_schema(fn["parameters"], f"{where}.parameters")


# --- one generation -------------------------------------------------------------------------------------------------


@dataclass
class _Content:
    """A content delta after stop-string processing, with the logprob entries of its tokens."""
    text: str
    logprobs: list[dict] = field(default_factory=list)


class _StopMatcher:
    """Cuts content at the first stop string; holds back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.hit = self.pending[:min(found)], "", True
            return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class _Turn:
    """One assistant turn: drives engine.generate, parses its tokens, yields events.

    events() yields ReasoningDelta, _Content, ToolCallStart, ToolCallArgsDelta and ToolCallEnd; afterwards
    finish_reason, completion_tokens and the accumulated reasoning / content / tool_calls are set.
    """

    def __init__(self, engine, prompt: list[int], prefill: list[int], params, stop: list[str]):
        self.engine = engine
        self.prompt = prompt + prefill
        self.prefill = prefill
        self.params = params
        self.stopper = _StopMatcher(stop)
        self.parser = HarmonyStreamParser()
        self.tokenizer = get_tokenizer()
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.reasoning = ""
        self.content = ""
        self.content_logprobs: list[dict] = []
        self.tool_calls: list[dict] = []  # {"id", "name", "arguments"}
        self._agen = None
        self._first = None
        self._lp_pending: list[dict] = []
        self.cached_tokens = 0  # prompt tokens the engine reused from its prefix cache
        self.reasoning_tokens = 0  # generated tokens that produced analysis text

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    async def open(self) -> None:
        """Starts the generation and waits for the first token, so request errors surface before any response."""
        try:
            self._agen = self.engine.generate(list(self.prompt), self.params)
            self._first = await self._agen.__anext__()
            self.cached_tokens = int(getattr(self._first, "cached_tokens", None) or 0)
        except StopAsyncIteration:
            self._first = None
        except ContextLengthError as e:
            await self.close()
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except GptOssError as e:
            await self.close()
            raise APIError(400, str(e)) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Closes the engine's generator (cancels the request and frees its KV blocks); idempotent."""
        agen, self._agen = self._agen, None
        if agen is not None and hasattr(agen, "aclose"):
            with anyio.CancelScope(shield=True):
                await agen.aclose()

    def _entry(self, tok) -> dict | None:
        if not self.params.logprobs or tok.logprob is None:
            return None

        def one(t: int, lp: float) -> dict:
            try:
                b = self.tokenizer.decode_single_token_bytes(t)
            except Exception:
                b = f"<|{t}|>".encode()
            return {"token": b.decode("utf-8", "replace"), "logprob": _finite(float(lp)), "bytes": list(b)}

        entry = one(tok.token, tok.logprob)
        entry["top_logprobs"] = [one(t, lp) for t, lp in (tok.top_logprobs or [])[:self.params.top_logprobs]]
        return entry

    def _content(self, text: str) -> list:
        if not text:
            return []
        self.content += text
        lps, self._lp_pending = self._lp_pending, []
        self.content_logprobs += lps
        return [_Content(text, lps)]

    def _process(self, events: list, entry: dict | None) -> list:
        out = []
        if entry is not None and any(isinstance(e, ContentDelta) for e in events):
            self._lp_pending.append(entry)
        for ev in events:
            if self.stopper.hit:
                break
            if isinstance(ev, ContentDelta):
                out += self._content(self.stopper.push(ev.text))
                continue
            if isinstance(ev, Done):
                self.finish_reason = ev.reason
                continue
            out += self._content(self.stopper.flush())  # a stop string does not span messages
            if isinstance(ev, ReasoningDelta):
                self.reasoning += ev.text
            elif isinstance(ev, ToolCallStart):
                self.tool_calls.append({"id": ev.id, "name": ev.name, "arguments": ""})
            elif isinstance(ev, ToolCallArgsDelta):
                self.tool_calls[ev.index]["arguments"] += ev.text
            out.append(ev)
        return out

    async def events(self) -> AsyncIterator:
        try:
            for t in self.prefill:
                for ev in self._process(self.parser.feed(t), None):
                    yield ev
            tok = self._first
            while tok is not None:
                self.completion_tokens += 1
                evs = self.parser.feed(tok.token)
                if tok.finish_reason is not None and not self.parser.done:
                    evs += self.parser.finish(tok.finish_reason)
                if any(isinstance(e, ReasoningDelta) for e in evs):
                    self.reasoning_tokens += 1
                for ev in self._process(evs, self._entry(tok)):
                    yield ev
                if self.stopper.hit or self.parser.done or tok.finish_reason is not None:
                    break
                tok = await self._agen.__anext__() if self._agen is not None else None
        except StopAsyncIteration:
            pass
        finally:
            await self.close()
        if self.stopper.hit:
            self.finish_reason = "stop"
            return
        if not self.parser.done:
            for ev in self._process(self.parser.finish("length"), None):
                yield ev
        for ev in self._content(self.stopper.flush()):
            yield ev
        if self.finish_reason is None:
            self.finish_reason = "length"

    async def run(self, on_event=None) -> None:
        """Non-streaming: consume all events (passing each to on_event)."""
        async with contextlib.aclosing(self.events()) as events:
            async for ev in events:
                if on_event is not None:
                    on_event(ev)


# --- SSE ----------------------------------------------------------------------------------------------------------


class _EventStream(StreamingResponse):
    """A server-sent-event stream that always closes its body iterator (and so the engine generation), also when
    the client disconnects."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()


def _sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro) -> bool:
    """Runs coro unless the client goes away first (then cancels it, which closes the engine generation).
    Returns False if the client disconnected; re-raises coro's exceptions."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        return False
    work.result()
    return True


# --- the app --------------------------------------------------------------------------------------------------------


def _norm_effort(effort: str | None) -> str:
    return "low" if effort == "minimal" else (effort or "medium")


class _Server:
    def __init__(self, engine, model_name: str, api_key: str | None):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.created = int(time.time())
        self.tokenizer = get_tokenizer()
        self.responses: OrderedDict[str, dict] = OrderedDict()

    # -- helpers ------------------------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def parse(self, request: Request, model: type[BaseModel]):
        self.check_auth(request)
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e.errors(include_url=False)) from None
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return req

    def prepare(self, messages: list[dict], tools: list[dict], tool_choice, effort: str | None,
                system_prompt: str | None, max_tokens: int | None, max_param: str) -> tuple[list[int], list[int], int]:
        """-> (prompt tokens, prefill tokens, max_tokens). tools are flat {"name", "description", "parameters"};
        tool_choice is "auto" | "none" | "required" | a function name."""
        names = [t["name"] for t in tools]
        if tool_choice not in (None, "auto", "none", "required") and tool_choice not in names:
            raise APIError(400, f"tool_choice: no tool named {tool_choice!r} in tools", param="tool_choice")
        if tool_choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs at least one tool in tools", param="tool_choice")
        offered = None if tool_choice == "none" or not tools else [
            {"type": "function", "function": {k: v for k, v in t.items() if v is not None}} for t in tools]
        try:
            conversation = build_conversation(messages, tools=offered, reasoning_effort=_norm_effort(effort),
                                              system_prompt=system_prompt)
            prompt = render_prompt(conversation)
        except (GptOssError, APIError):
            raise
        except BaseException as e:  # openai_harmony rejected the input (a Rust panic is a BaseException)
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise APIError(400, f"messages: cannot render the conversation: {msg}", param="messages") from None
        prefill: list[int] = []
        forced = tool_choice if tool_choice not in (None, "auto", "none", "required") else None
        if tool_choice == "required" and len(names) == 1:
            forced = names[0]
        if forced is not None:
            prefill = self.tokenizer.encode(
                f"<|channel|>commentary to=functions.{forced} <|constrain|>json<|message|>", allowed_special="all")
        elif tool_choice == "required":
            prefill = self.tokenizer.encode("<|channel|>commentary to=functions.", allowed_special="all")
        n_prompt = len(prompt) + len(prefill)
        context = int(self.engine.context_length)
        if max_tokens is None:
            max_tokens = context - n_prompt
            if max_tokens < 1:
                raise APIError(400, f"the prompt has {n_prompt} tokens, which fills the context length of "
                               f"{context}", param="messages", code="context_length_exceeded")
        elif n_prompt + max_tokens > context:
            raise APIError(400, f"the prompt of {n_prompt} tokens + {max_param} {max_tokens} = "
                           f"{n_prompt + max_tokens} exceeds the context length of {context}", param=max_param,
                           code="context_length_exceeded")
        return prompt, prefill, max_tokens

    @staticmethod
    def params(max_tokens, temperature, top_p, top_k, seed, logprobs=False, top_logprobs=0):
        temperature = 1.0 if temperature is None else float(temperature)
        top_p = 1.0 if top_p is None else float(top_p)
        if top_p <= 0:  # only the most likely token survives
            temperature, top_p = 0.0, 1.0
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                              seed=seed, stop_token_ids=tuple(STOP_TOKENS), logprobs=bool(logprobs),
                              top_logprobs=int(top_logprobs or 0) if logprobs else 0)

    @staticmethod
    async def _open(request: Request, turn: _Turn) -> bool:
        """Starts the turn (waiting in the engine's queue and its prefill); False if the client left meanwhile."""
        try:
            return await _unless_disconnected(request, turn.open())
        finally:
            if turn._first is None:
                await turn.close()

    # -- /v1/chat/completions -----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        req: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        if req.n is not None and req.n > 1:
            raise APIError(400, "n: only n=1 is supported", param="n")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        tools = [t.function.model_dump() for t in req.tools or []]
        _check_tools(tools, "tools[{i}].function")
        choice = req.tool_choice.function.name if isinstance(req.tool_choice, ChatNamedToolChoice) else req.tool_choice
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        prompt, prefill, max_tokens = self.prepare(messages, tools, choice, req.reasoning_effort, None, max_tokens,
                                                   max_param)
        params = self.params(max_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.logprobs,
                             req.top_logprobs)
        turn = _Turn(self.engine, prompt, prefill, params, stop)
        if not await self._open(request, turn):
            return _error_response(499, "client disconnected")
        base = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": None}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EventStream(self._chat_stream(turn, base, include_usage, bool(req.logprobs)),
                                headers=_SSE_HEADERS)
        try:
            if not await _unless_disconnected(request, turn.run()):
                return _error_response(499, "client disconnected")
        finally:
            await turn.close()
        message: dict[str, Any] = {"role": "assistant", "content": turn.content if turn.content or not
                                   turn.tool_calls else None}
        if turn.reasoning:
            message["reasoning_content"] = turn.reasoning
        if turn.tool_calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in turn.tool_calls]
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": turn.finish_reason,
                             "logprobs": {"content": turn.content_logprobs} if req.logprobs else None}],
                "usage": self._chat_usage(turn)}

    @staticmethod
    def _chat_usage(turn: _Turn) -> dict:
        return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
                "total_tokens": turn.prompt_tokens + turn.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": turn.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": turn.reasoning_tokens}}

    async def _chat_stream(self, turn: _Turn, base: dict, include_usage: bool, logprobs: bool):
        def chunk(delta: dict, finish_reason=None, lps=None) -> str:
            data = {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}]}
            if include_usage:
                data["usage"] = None
            return _sse(data)

        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async with contextlib.aclosing(turn.events()) as events:
                    async for ev in events:
                        if isinstance(ev, _Content):
                            yield chunk({"content": ev.text}, lps={"content": ev.logprobs} if logprobs else None)
                        elif isinstance(ev, ReasoningDelta):
                            yield chunk({"reasoning_content": ev.text})
                        elif isinstance(ev, ToolCallStart):
                            yield chunk({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                         "function": {"name": ev.name, "arguments": ""}}]})
                        elif isinstance(ev, ToolCallArgsDelta):
                            yield chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
            except Exception as e:  # the engine failed mid-stream: tell the client in-band
                log.exception("chat completion stream failed")
                yield _sse(_error_body(f"generation failed: {e}", "server_error"))
                yield _sse("[DONE]")
                return
            yield chunk({}, turn.finish_reason)
            if include_usage:
                yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": self._chat_usage(turn)})
            yield _sse("[DONE]")
        finally:
            await turn.close()

    # -- /v1/responses ---------------------------------------------------------------------------------------------

    async def create_response(self, request: Request):
        req: ResponsesRequest = await self.parse(request, ResponsesRequest)
        history: list[dict] = []
        if req.previous_response_id is not None:
            stored = self.responses.get(req.previous_response_id)
            if stored is None:
                raise APIError(404, f"previous response {req.previous_response_id!r} not found (responses are "
                               "kept in memory only when store is not false)", param="previous_response_id",
                               code="previous_response_not_found")
            history = list(stored["items"])
        input_items = ([{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str)
                       else list(req.input))
        messages = _items_to_messages(history, input_items)
        if not any(m["role"] in ("user", "assistant", "tool") for m in messages):
            raise APIError(400, "input: expected at least one message", param="input")
        tools = [t.model_dump(include={"name", "description", "parameters"}) for t in req.tools or []]
        _check_tools(tools, "tools[{i}]")
        choice = req.tool_choice.name if isinstance(req.tool_choice, ResponsesNamedToolChoice) else req.tool_choice
        effort = req.reasoning.effort if req.reasoning else None
        prompt, prefill, max_tokens = self.prepare(messages, tools, choice, effort, req.instructions,
                                                   req.max_output_tokens, "max_output_tokens")
        params = self.params(max_tokens, req.temperature, req.top_p, req.top_k, req.seed)
        turn = _Turn(self.engine, prompt, prefill, params, [])
        if not await self._open(request, turn):
            return _error_response(499, "client disconnected")
        builder = _ResponseBuilder(self, req, turn, history + input_items)
        if req.stream:
            return _EventStream(self._response_stream(builder), headers=_SSE_HEADERS)
        try:
            if not await _unless_disconnected(request, turn.run(builder.on_event)):
                return _error_response(499, "client disconnected")
        finally:
            await turn.close()
        builder.drain()
        return builder.finish()

    async def _response_stream(self, builder: "_ResponseBuilder"):
        turn = builder.turn
        try:
            for ev in builder.start():
                yield ev
            try:
                async with contextlib.aclosing(turn.events()) as events:
                    async for ev in events:
                        for out in builder.on_event(ev):
                            yield out
            except Exception as e:
                log.exception("responses stream failed")
                builder.failed = str(e)
            final = builder.finish()
            for out in builder.drain():
                yield out
            status = final["status"]
            kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status,
                                                                                                 "response.failed")
            yield builder.event(kind, response=final)
        finally:
            await turn.close()

    def store(self, response: dict, items: list[dict]) -> None:
        self.responses[response["id"]] = {"response": response, "items": items}
        while len(self.responses) > MAX_STORED_RESPONSES:
            self.responses.popitem(last=False)


# --- Responses API: items <-> chat messages -------------------------------------------------------------------------


def _part_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str) or part.get("type") not in (
                "input_text", "output_text", "text", "reasoning_text", "summary_text"):
            raise APIError(400, f"{where}[{j}]: only text parts ({{\"type\": \"input_text\", \"text\": ...}}) are "
                           "supported", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _items_to_messages(history: list[dict], items: list[dict]) -> list[dict]:
    """Responses input items (after the stored ones) -> OpenAI chat messages for build_conversation."""
    messages: list[dict] = []
    current: dict | None = None  # the assistant message being assembled

    def flush():
        nonlocal current
        if current is not None:
            messages.append(current)
            current = None

    n_hist = len(history)
    for k, item in enumerate(history + items):
        where = f"input[{k - n_hist}]" if k >= n_hist else f"previous_response[{k}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object", param=where)
        typ = item.get("type", "message")
        if typ == "message":
            role = item.get("role")
            text = _part_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                if current is None or current.get("content") or current.get("tool_calls"):
                    flush()
                    current = {"role": "assistant"}
                current["content"] = text
            elif role in ("user", "system", "developer"):
                flush()
                messages.append({"role": role, "content": text})
            else:
                raise APIError(400, f"{where}.role: expected user, assistant, system or developer, got {role!r}",
                               param=f"{where}.role")
        elif typ == "reasoning":
            text = _part_text(item.get("content"), f"{where}.content") or _part_text(
                item.get("summary"), f"{where}.summary")
            if current is not None and (current.get("content") or current.get("tool_calls")
                                        or current.get("reasoning_content")):
                flush()
            current = current or {"role": "assistant"}
            current["reasoning_content"] = text
        elif typ == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"{where}.{key}: expected a string", param=f"{where}.{key}")
            if current is None:
                current = {"role": "assistant"}
            current.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif typ == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id: expected a string", param=f"{where}.call_id")
            output = item.get("output")
            if not isinstance(output, str):
                output = _part_text(output, f"{where}.output") if isinstance(output, list) else json.dumps(output)
            flush()
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise APIError(400, f"{where}.type: unsupported item type {typ!r} (message, reasoning, function_call, "
                           "function_call_output)", param=f"{where}.type")
    flush()
    return messages


class _ResponseBuilder:
    """Builds the Response object's output items from turn events, producing the streaming events on the way."""

    def __init__(self, server: _Server, req: ResponsesRequest, turn: _Turn, items: list[dict]):
        self.server, self.req, self.turn, self.items = server, req, turn, items
        self.id = "resp_" + secrets.token_hex(12)
        self.created_at = int(time.time())
        self.output: list[dict] = []
        self.current: dict | None = None  # the open item
        self.seq = 0
        self.pending: list[str] = []
        self.failed: str | None = None
        self.final: dict | None = None

    def event(self, type: str, **fields) -> str:
        data = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return _sse(data, event=type)

    def _emit(self, type: str, **fields) -> None:
        self.pending.append(self.event(type, **fields))

    def drain(self) -> list[str]:
        out, self.pending = self.pending, []
        return out

    def response(self, status: str, usage: dict | None = None) -> dict:
        req = self.req
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else (
            req.tool_choice or "auto")
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.server.model_name, "output": json.loads(json.dumps(self.output)),
            "usage": usage, "error": {"code": "server_error", "message": self.failed} if self.failed else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": True, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": _norm_effort(req.reasoning.effort if req.reasoning else None), "summary": None},
            "store": req.store is not False, "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "text": {"format": {"type": "text"}},
            "tool_choice": tool_choice, "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled", "metadata": req.metadata or {}, "user": None,
        }

    def start(self) -> list[str]:
        initial = self.response("in_progress")
        self._emit("response.created", response=initial)
        self._emit("response.in_progress", response=initial)
        return self.drain()

    # -- items -------------------------------------------------------------------------------------------------

    def _open(self, item: dict, part: dict | None) -> None:
        self._close()
        self.current = item
        index = len(self.output)
        self.output.append(item)
        added = dict(item, content=[]) if "content" in item else dict(item)
        self._emit("response.output_item.added", output_index=index, item=added)
        if part is not None:
            item["content"].append(part)
            self._emit("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                       part=dict(part))

    def _close(self, status: str = "completed") -> None:
        item, self.current = self.current, None
        if item is None:
            return
        index = self.output.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=[])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                       part=dict(part))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            self._emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                       part=dict(part))
        else:
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       name=item["name"], arguments=item["arguments"])
        self._emit("response.output_item.done", output_index=index, item=json.loads(json.dumps(item)))

    def _text(self, kind: str, text: str) -> None:
        if self.current is None or self.current["type"] != kind:
            if kind == "message":
                self._open({"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant",
                            "status": "in_progress", "content": []},
                           {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            else:
                self._open({"id": "rs_" + secrets.token_hex(12), "type": "reasoning", "summary": [],
                            "status": "in_progress", "content": []}, {"type": "reasoning_text", "text": ""})
        item = self.current
        item["content"][0]["text"] += text
        index = len(self.output) - 1
        if kind == "message":
            self._emit("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                       delta=text, logprobs=[])
        else:
            self._emit("response.reasoning_text.delta", item_id=item["id"], output_index=index, content_index=0,
                       delta=text)

    def on_event(self, ev) -> list[str]:
        if isinstance(ev, _Content):
            self._text("message", ev.text)
        elif isinstance(ev, ReasoningDelta):
            self._text("reasoning", ev.text)
        elif isinstance(ev, ToolCallStart):
            self._open({"id": "fc_" + secrets.token_hex(12), "type": "function_call", "status": "in_progress",
                        "call_id": ev.id, "name": ev.name, "arguments": ""}, None)
        elif isinstance(ev, ToolCallArgsDelta) and self.current is not None and self.current["type"] == "function_call":
            self.current["arguments"] += ev.text
            self._emit("response.function_call_arguments.delta", item_id=self.current["id"],
                       output_index=len(self.output) - 1, delta=ev.text)
        elif isinstance(ev, ToolCallEnd):
            self._close()
        return self.drain()

    def finish(self) -> dict:
        if self.final is not None:
            return self.final
        turn = self.turn
        status = "failed" if self.failed else ("incomplete" if turn.finish_reason == "length" else "completed")
        self._close("incomplete" if status == "incomplete" else "completed")
        usage = {"input_tokens": turn.prompt_tokens, "input_tokens_details": {"cached_tokens": turn.cached_tokens},
                 "output_tokens": turn.completion_tokens, "output_tokens_details": {"reasoning_tokens": turn.reasoning_tokens},
                 "total_tokens": turn.prompt_tokens + turn.completion_tokens}
        self.final = self.response(status, usage)
        if self.req.store is not False and not self.failed:
            self.server.store(self.final, self.items + json.loads(json.dumps(self.output)))
        return self.final


def create_app(engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`; with api_key, /v1/* needs
    `Authorization: Bearer <api_key>` (/health stays open for probes)."""
    server = _Server(engine, model_name, api_key)
    app = FastAPI(title="gptoss", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gptoss = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(GptOssError)
    async def _gptoss_error(request: Request, exc: GptOssError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return _error_response(400, str(exc), code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = _validation_error(list(exc.errors()))
        return _error_response(400, err.message, param=err.param, code=err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        try:
            stats = server.engine.stats()
        except Exception as e:  # never fail the probe on a stats bug
            stats = {"error": f"{type(e).__name__}: {e}"}
        return {"status": "ok", "model": server.model_name, "engine": stats}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                             "owned_by": "gptoss"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.check_auth(request)
        if model_id != server.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "gptoss"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat_completions(request)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await server.create_response(request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        server.check_auth(request)
        stored = server.responses.get(response_id)
        if stored is None:
            raise APIError(404, f"response {response_id!r} not found", param="response_id", code="not_found")
        return stored["response"]

    return app


def cmd_serve(args) -> int:
    """`gptoss serve`: load the checkpoint, start the engine and serve the OpenAI-compatible API with uvicorn."""
    import os
    import sys

    import uvicorn

    from gptoss.checkpoint import load_model
    from gptoss.cli import _checkpoint_or_demo, _default_device
    from gptoss.engine import Engine

    device = args.device or _default_device()
    folder = _checkpoint_or_demo(args.checkpoint)
    started = time.perf_counter()
    model = load_model(folder, device=device, dequantize=args.dequantize, progress=None)
    print(f"gptoss: loaded in {time.perf_counter() - started:.1f} s on {device}", file=sys.stderr)
    engine = Engine(model, max_batch_size=args.max_batch_size, context_length=args.context or 8192)
    name = args.model_name
    if not name:
        path = os.path.normpath(os.path.abspath(folder))
        if os.path.basename(path) == "original":
            path = os.path.dirname(path)
        name = os.path.basename(path) or "gpt-oss"
    api_key = args.api_key or os.environ.get("GPTOSS_API_KEY") or None
    app = create_app(engine, name, api_key=api_key)
    engine.start()
    print(f"gptoss: serving {name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        engine.stop()
    return 0
