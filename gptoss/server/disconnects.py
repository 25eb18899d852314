"""Client disconnects: a client that leaves mid-request closes the engine's generator, which cancels the request
and frees its KV blocks (mid-stream, EventStreamResponse does the same by closing its body iterator)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from gptoss.server.turn import AssistantTurn


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, coro) -> bool:
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


async def open_turn(request: Request, turn: AssistantTurn) -> bool:
    """Starts the turn (waiting in the engine's queue and its prefill); False if the client left meanwhile."""
    try:
        return await run_unless_disconnected(request, turn.open())
    finally:
        if not turn.has_first_token:
            await turn.close()


async def run_turn(request: Request, turn: AssistantTurn, on_event=None) -> bool:
    """Non-streaming: generates the whole turn (passing each event to on_event); False if the client left."""
    try:
        return await run_unless_disconnected(request, turn.run(on_event))
    finally:
        await turn.close()
