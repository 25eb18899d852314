"""The Response object of /v1/responses, built item by item from a turn's events.

Each turn event updates the output items (reasoning, message, function_call) and queues the matching streaming
events (response.output_item.added, response.output_text.delta, ...); the non-streaming handler just drops them.
"""

from __future__ import annotations

import json
import secrets
import time

from pydantic import BaseModel

from gptoss.harmony_parser import ReasoningDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
from gptoss.server.prompting import normalize_effort
from gptoss.server.request_models import ResponsesRequest
from gptoss.server.sse import sse_event
from gptoss.server.state import ServerState
from gptoss.server.turn import AssistantTurn, ContentChunk


def _snapshot(obj):
    """A deep copy, so that objects already sent (or stored) do not change as the open item keeps growing."""
    return json.loads(json.dumps(obj))


class ResponseBuilder:
    """Builds the Response object's output items from turn events, producing the streaming events on the way."""

    def __init__(self, server: ServerState, req: ResponsesRequest, turn: AssistantTurn, items: list[dict]):
        self.server, self.req, self.turn, self.items = server, req, turn, items
        self.id = "resp_" + secrets.token_hex(12)
        self.created_at = int(time.time())
        self.output: list[dict] = []
        self.current: dict | None = None  # the open item
        self.seq = 0
        self.pending: list[str] = []  # SSE events produced since the last drain()
        self.failed: str | None = None
        self.final: dict | None = None  # the finished Response; finish() is idempotent

    def event(self, type: str, **fields) -> str:
        data = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse_event(data, event=type)

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
            "model": self.server.model_name, "output": _snapshot(self.output),
            "usage": usage, "error": {"code": "server_error", "message": self.failed} if self.failed else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": True, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": normalize_effort(req.reasoning.effort if req.reasoning else None), "summary": None},
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
        self._emit("response.output_item.done", output_index=index, item=_snapshot(item))

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
        if isinstance(ev, ContentChunk):
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
            self._close("completed" if ev.complete else "incomplete")
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
            self.server.responses.put(self.final, self.items + _snapshot(self.output))
        return self.final
