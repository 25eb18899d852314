"""POST /v1/chat/completions: one choice, as a chat.completion object or a stream of chat.completion.chunk events.

analysis -> `reasoning_content`, final channel and preambles -> `content`, function calls -> `tool_calls`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import Any

from fastapi import Request

from gptoss.harmony_parser import ReasoningDelta, ToolCallArgsDelta, ToolCallStart
from gptoss.server.disconnects import open_turn, run_turn
from gptoss.server.errors import APIError, client_disconnected_response, error_body
from gptoss.server.prompting import prepare_prompt, sampling_params
from gptoss.server.request_models import ChatCompletionRequest, ChatNamedToolChoice, check_tools
from gptoss.server.sse import SSE_HEADERS, EventStreamResponse, sse_event
from gptoss.server.state import ServerState
from gptoss.server.turn import AssistantTurn, ContentChunk

log = logging.getLogger(__name__)


async def create_chat_completion(server: ServerState, request: Request, req: ChatCompletionRequest):
    if req.n is not None and req.n > 1:
        raise APIError(400, "n: only n=1 is supported", param="n")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    tools = [t.function.model_dump() for t in req.tools or []]
    check_tools(tools, "tools[{i}].function")
    choice = req.tool_choice.function.name if isinstance(req.tool_choice, ChatNamedToolChoice) else req.tool_choice
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    prompt, prefill, max_tokens = prepare_prompt(server, messages, tools, choice, req.reasoning_effort, None,
                                                 max_tokens, max_param)
    params = sampling_params(max_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.logprobs,
                             req.top_logprobs)
    turn = AssistantTurn(server.engine, prompt, prefill, params, stop)
    if not await open_turn(request, turn):
        return client_disconnected_response()
    base = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": server.model_name,
            "system_fingerprint": None}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStreamResponse(_chunk_stream(turn, base, include_usage, bool(req.logprobs)),
                                   headers=SSE_HEADERS)
    if not await run_turn(request, turn):
        return client_disconnected_response()
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": _message(turn), "finish_reason": turn.finish_reason,
                         "logprobs": {"content": turn.content_logprobs} if req.logprobs else None}],
            "usage": _usage(turn)}


def _message(turn: AssistantTurn) -> dict[str, Any]:
    """The finished turn as the choice's assistant message (content is null for a tool-call-only turn)."""
    message: dict[str, Any] = {"role": "assistant",
                               "content": turn.content if turn.content or not turn.tool_calls else None}
    if turn.reasoning:
        message["reasoning_content"] = turn.reasoning
    if turn.tool_calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for c in turn.tool_calls]
    return message


def _usage(turn: AssistantTurn) -> dict:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
            "total_tokens": turn.prompt_tokens + turn.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": turn.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": turn.reasoning_tokens}}


def _delta(ev) -> tuple[dict, dict | None] | None:
    """A turn event -> (the chunk's delta, its logprobs if asked for) or None for events the client does not see."""
    if isinstance(ev, ContentChunk):
        return {"content": ev.text}, {"content": ev.logprobs}
    if isinstance(ev, ReasoningDelta):
        return {"reasoning_content": ev.text}, None
    if isinstance(ev, ToolCallStart):
        return {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                "function": {"name": ev.name, "arguments": ""}}]}, None
    if isinstance(ev, ToolCallArgsDelta):
        return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}, None
    return None


async def _chunk_stream(turn: AssistantTurn, base: dict, include_usage: bool, logprobs: bool):
    def chunk(delta: dict, finish_reason=None, lps=None) -> str:
        data = {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}]}
        if include_usage:  # OpenAI sends "usage": null on every chunk but the last when usage is asked for
            data["usage"] = None
        return sse_event(data)

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async with contextlib.aclosing(turn.events()) as events:
                async for ev in events:
                    delta = _delta(ev)
                    if delta is not None:
                        yield chunk(delta[0], lps=delta[1] if logprobs else None)
        except Exception as e:  # the engine failed mid-stream: tell the client in-band
            log.exception("chat completion stream failed")
            yield sse_event(error_body(f"generation failed: {e}", "server_error"))
            yield sse_event("[DONE]")
            return
        yield chunk({}, turn.finish_reason)
        if include_usage:
            yield sse_event({**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(turn)})
        yield sse_event("[DONE]")
    finally:
        await turn.close()
