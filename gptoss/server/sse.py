"""Server-sent events: the streaming response class and the `event:`/`data:` framing."""

from __future__ import annotations

import json

import anyio
from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


class EventStreamResponse(StreamingResponse):
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


def sse_event(data: dict | str, event: str | None = None) -> str:
    """One SSE message: data is JSON-encoded unless it is already a string (like "[DONE]")."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
