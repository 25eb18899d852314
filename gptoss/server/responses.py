"""POST /v1/responses: one assistant turn as a Response object or a stream of response.* events.

analysis -> a reasoning item, final channel and preambles -> a message item, function calls -> function_call items.
Unless store is false, the response and its conversation are kept (in memory) for GET /v1/responses/{id} and
previous_response_id.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import Request

from gptoss.server.disconnects import open_turn, run_turn
from gptoss.server.errors import APIError, client_disconnected_response
from gptoss.server.prompting import prepare_prompt, sampling_params
from gptoss.server.request_models import ResponsesNamedToolChoice, ResponsesRequest, check_tools
from gptoss.server.response_builder import ResponseBuilder
from gptoss.server.response_items import items_to_messages
from gptoss.server.sse import SSE_HEADERS, EventStreamResponse
from gptoss.server.state import ServerState
from gptoss.server.turn import AssistantTurn

log = logging.getLogger(__name__)

_FINAL_EVENT = {"completed": "response.completed", "incomplete": "response.incomplete"}  # else response.failed


def _previous_items(server: ServerState, previous_response_id: str | None) -> list[dict]:
    if previous_response_id is None:
        return []
    stored = server.responses.get(previous_response_id)
    if stored is None:
        raise APIError(404, f"previous response {previous_response_id!r} not found (responses are "
                       "kept in memory only when store is not false)", param="previous_response_id",
                       code="previous_response_not_found")
    return list(stored["items"])


async def create_response(server: ServerState, request: Request, req: ResponsesRequest):
    history = _previous_items(server, req.previous_response_id)
    input_items = ([{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str)
                   else list(req.input))
    messages = items_to_messages(history, input_items)
    if not any(m["role"] in ("user", "assistant", "tool") for m in messages):
        raise APIError(400, "input: expected at least one message", param="input")
    tools = [t.model_dump(include={"name", "description", "parameters"}) for t in req.tools or []]
    check_tools(tools, "tools[{i}]")
    choice = req.tool_choice.name if isinstance(req.tool_choice, ResponsesNamedToolChoice) else req.tool_choice
    effort = req.reasoning.effort if req.reasoning else None
    prompt, prefill, max_tokens = prepare_prompt(server, messages, tools, choice, effort, req.instructions,
                                                 req.max_output_tokens, "max_output_tokens", "input")
    params = sampling_params(max_tokens, req.temperature, req.top_p, req.top_k, req.seed)
    turn = AssistantTurn(server.engine, prompt, prefill, params, [])
    if not await open_turn(request, turn):
        return client_disconnected_response()
    builder = ResponseBuilder(server, req, turn, history + input_items)
    if req.stream:
        return EventStreamResponse(_event_stream(builder), headers=SSE_HEADERS)
    if not await run_turn(request, turn, builder.on_event):
        return client_disconnected_response()
    builder.drain()  # the streaming events, unused here
    return builder.finish()


async def _event_stream(builder: ResponseBuilder):
    turn: AssistantTurn = builder.turn
    try:
        for ev in builder.start():
            yield ev
        try:
            async with contextlib.aclosing(turn.events()) as events:
                async for ev in events:
                    for out in builder.on_event(ev):
                        yield out
        except Exception as e:  # the engine failed mid-stream: end with response.failed
            log.exception("responses stream failed")
            builder.failed = str(e)
        final = builder.finish()
        for out in builder.drain():
            yield out
        yield builder.event(_FINAL_EVENT.get(final["status"], "response.failed"), response=final)
    finally:
        await turn.close()
