"""One assistant turn: drives engine.generate, parses the sampled tokens and yields what the client sees.

The HTTP layer talks to the engine only through its public interface (`engine.context_length`,
`engine.generate(prompt_tokens, SamplingParams) -> async iterator of TokenOutput`, `engine.stats()`), so tests can
pass a scripted engine. The sampled tokens go through the tolerant HarmonyStreamParser: analysis -> reasoning;
final channel and recipient-less preambles -> content; `functions.NAME` messages -> tool calls. Malformed output
never fails a request: whatever was parsed is returned.

logprobs cover the content tokens (the tokens whose text is returned as content, one entry each: also a token
holding half of a UTF-8 character, and the tokens of a header that turned out to be plain text), in OpenAI's
choices[].logprobs.content format. usage: prompt_tokens = rendered prompt (+ prefill) tokens, completion_tokens =
tokens the engine generated.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio

from gptoss.errors import ContextLengthError, GptOssError
from gptoss.harmony_parser import (
    ContentDelta,
    Done,
    HarmonyStreamParser,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallStart,
)
from gptoss.server.errors import APIError
from gptoss.server.stop_strings import StopStringMatcher
from gptoss.tokenizer import get_tokenizer


@dataclass
class ContentChunk:
    """A content delta after stop-string processing, with the logprob entries of its tokens."""
    text: str
    logprobs: list[dict] = field(default_factory=list)


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.
    return x if math.isfinite(x) else -9999.0


class AssistantTurn:
    """events() yields ReasoningDelta, ContentChunk, ToolCallStart, ToolCallArgsDelta and ToolCallEnd; afterwards
    finish_reason, completion_tokens and the accumulated reasoning / content / tool_calls are set."""

    def __init__(self, engine, prompt: list[int], prefill: list[int], params, stop: list[str]):
        self.engine = engine
        self.prompt = prompt + prefill
        self.prefill = prefill
        self.params = params
        self.stopper = StopStringMatcher(stop)
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
        self._lp_pending: list[dict] = []  # logprob entries of content tokens whose text is not yet returned
        self._lp_header: list[dict] = []  # entries of the text tokens of the header being parsed
        self.cached_tokens = 0  # prompt tokens the engine reused from its prefix cache
        self.reasoning_tokens = 0  # generated tokens that produced analysis text

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def has_first_token(self) -> bool:
        return self._first is not None

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
            with anyio.CancelScope(shield=True):  # also when the client's disconnect cancelled us
                await agen.aclose()

    def _logprob_entry(self, tok) -> dict | None:
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
        return [ContentChunk(text, lps)]

    def _note_logprob(self, token: int, entry: dict, events: list) -> None:
        """Files a sampled token's logprob entry under the content it belongs to (events: what feeding it gave)."""
        is_text = self.parser.is_text(token)
        if any(isinstance(e, ContentDelta) for e in events):  # incl. a header that became text: its tokens too
            self._lp_pending += self._lp_header + [entry]
        elif is_text and self.parser.in_content:  # half a character: its text comes with the next token's
            self._lp_pending.append(entry)
        elif is_text and self.parser.in_header:
            self._lp_header.append(entry)
            return
        if not self.parser.in_header or not is_text:
            self._lp_header = []

    def _process(self, events: list) -> list:
        out = []
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
                for ev in self._process(self.parser.feed(t)):
                    yield ev
            tok = self._first
            while tok is not None:
                self.completion_tokens += 1
                evs = self.parser.feed(tok.token)
                if tok.finish_reason is not None and not self.parser.done:
                    evs += self.parser.finish(tok.finish_reason)
                if any(isinstance(e, ReasoningDelta) for e in evs):
                    self.reasoning_tokens += 1
                entry = self._logprob_entry(tok)
                if entry is not None:
                    self._note_logprob(tok.token, entry, evs)
                for ev in self._process(evs):
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
            for ev in self._process(self.parser.finish("length")):
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
