"""Tolerant streaming parser for the assistant's turn in the harmony format.

Feed it the sampled token ids one at a time; it turns them into events a chat CLI or an OpenAI-compatible
server can stream: reasoning text (analysis channel), user-visible text (final channel and commentary
preambles) and function tool calls (recipient `functions.NAME`), whose arguments stream as they are sampled.

The prompt ends with `<|start|>assistant`, so the turn starts inside a message header, typically:

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>

Real model output is sometimes malformed, and the parser never raises on it. Its rules:

* Header = the text between `<|start|>` (or the turn start, or a previous `<|end|>`) and `<|message|>`, split by
  `<|channel|>` and `<|constrain|>`. A leading role word (`assistant`, ...) is skipped; the channel is the first
  word after `<|channel|>`; the recipient is the first `to=X` anywhere in the header (before or after the
  channel); the content type (`<|constrain|>json` or a bare `json` after the channel) is ignored.
* Routing: recipient `functions.NAME` -> a tool call (on any channel); else channel `analysis` -> reasoning;
  everything else -> content: the final channel, commentary preambles without a recipient, a missing or unknown
  channel, and messages to other recipients (`browser.search`, `python`, ...: not function tools, so their text is
  shown as content rather than lost).
* Text in a header that is not header syntax (plain text before any header, e.g. a turn that starts with
  "Hello") is content. A header that never reaches `<|message|>` (it meets `<|end|>`, `<|start|>`, `<|return|>`,
  `<|call|>`, `finish()`, a newline, an unknown word or 256 bytes) becomes a message anyway: the route comes from
  what was parsed so far and the leftover header text is its first text.
* `<|end|>` closes a message; `<|start|>` or `<|channel|>` inside a message also closes it (missing `<|end|>`);
  `<|return|>` / `<|call|>` end the turn (also right after `<|end|>`). finish_reason: "tool_calls" if the turn made
  any tool call, else "stop"; `finish()` before that gives "length" and keeps the partial text.
* Tokens after the turn ended are ignored. `<|message|>` / `<|constrain|>` inside a message body, and every other
  special or out-of-range id (`<|reserved_N|>`, `<|endoftext|>`, ...) are ignored.
* Text is decoded from bytes with an incremental UTF-8 decoder, so characters split across tokens come out whole;
  invalid bytes become U+FFFD.
"""

from __future__ import annotations

import codecs
import functools
import logging
import operator
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable, Union

from gptoss.tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START

log = logging.getLogger(__name__)


# --- events -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    complete: bool = True  # False: the turn ended inside the call's arguments (max tokens, a stop string)


@dataclass(frozen=True)
class Done:
    reason: str  # "stop" | "tool_calls" | "length" (or what finish() was given)


Event = Union[ReasoningDelta, ContentDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd, Done]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ParseResult:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


def event_text(event: Event) -> str:
    """The text an event carries ("" for structural events)."""
    return getattr(event, "text", "")


# --- header parsing -----------------------------------------------------------------------------------------------

KNOWN_CHANNELS = frozenset({"analysis", "commentary", "final"})
MAX_HEADER_BYTES = 256

_RECIPIENT = re.compile(rb"\s*(?<!\S)to=(\S+)")
_ROLE = re.compile(rb"^\s*(?:assistant|user|system|developer|tool|(?:functions|browser|container)\.\S+)(?=\s|$)")
_FIRST_WORD = re.compile(rb"^\s*(\S+)")
_BARE_JSON = re.compile(rb"^\s*json(?=\s|$)")
_COMPLETE_WORD = re.compile(rb"\S\s")

_ROLE_SEG, _CHANNEL_SEG, _CONSTRAIN_SEG = "role", "channel", "constrain"


def _strip_syntax(kind: str, data: bytes, known_only: bool) -> tuple[bytes, str | None]:
    """Remove header syntax from one segment; returns (leftover text, channel word or None).

    Recipients are removed by the caller. With known_only, the word after <|channel|> is taken as syntax only if
    it is a known channel (used for headers that never reached <|message|>, where it may be plain text).
    """
    channel = None
    if kind == _ROLE_SEG:
        data = _ROLE.sub(b"", data, count=1)
    elif kind == _CHANNEL_SEG:
        m = _FIRST_WORD.match(data)
        if m:
            channel = m.group(1).decode("utf-8", "replace")
            if not known_only or channel in KNOWN_CHANNELS:
                data = data[m.end():]
        data = _BARE_JSON.sub(b"", data, count=1)
    else:  # constrain: its first word is the content type
        data = _FIRST_WORD.sub(b"", data, count=1)
    return data, channel


@dataclass
class _Header:
    channel: str | None
    recipient: str | None
    prefix_text: bytes  # non-syntax text: before any <|channel|> if terminated, else all of it


def _parse_header(segments: list[tuple[str, bytearray]], terminated: bool) -> _Header:
    channel = recipient = None
    parts = []
    for kind, raw in segments:
        data = bytes(raw)
        m = _RECIPIENT.search(data)
        if m and recipient is None:
            recipient = m.group(1).decode("utf-8", "replace")
        data = _RECIPIENT.sub(b"", data)
        data, seg_channel = _strip_syntax(kind, data, known_only=not terminated)
        if channel is None:
            channel = seg_channel
        if kind == _ROLE_SEG or not terminated:
            parts.append(data)
    return _Header(channel, recipient, b"".join(parts).lstrip())


def _looks_like_text(kind: str, data: bytes) -> bool:
    """True once a header segment holds a finished word that is not header syntax (the model is writing text)."""
    data, _ = _strip_syntax(kind, _RECIPIENT.sub(b"", data), known_only=False)
    return _COMPLETE_WORD.search(data) is not None


@functools.lru_cache(maxsize=4)
def _first_special_id(encoding) -> int:
    return min(encoding.encode_single_token(name) for name in encoding.special_tokens_set)


def _default_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# --- the parser ---------------------------------------------------------------------------------------------------

_HEADER, _BODY, _DONE = "header", "body", "done"
_REASONING, _CONTENT, _TOOL = "reasoning", "content", "tool"


class HarmonyStreamParser:
    """Streaming, never-raising parser of one assistant turn; see the module docstring for the rules.

    >>> p = HarmonyStreamParser()
    >>> for tok in sampled_tokens:
    ...     for event in p.feed(tok): ...
    >>> p.finish()   # always call at the end: flushes, and gives Done("length") if no stop token came
    >>> p.result     # ParseResult(reasoning, content, tool_calls, finish_reason)

    raise_internal_errors: re-raise unexpected exceptions (tests) instead of degrading to plain text.
    """

    def __init__(self, encoding=None, *, call_id_factory: Callable[[], str] | None = None,
                 raise_internal_errors: bool = False):
        if encoding is None:
            from gptoss.tokenizer import get_tokenizer

            encoding = get_tokenizer()
        self._token_bytes = encoding.decode_single_token_bytes
        self._first_special = _first_special_id(encoding)
        self._new_call_id = call_id_factory or _default_call_id
        self.raise_internal_errors = raise_internal_errors

        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument pieces)
        self._finish_reason: str | None = None
        self._new_header()

    # -- public API --------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def in_header(self) -> bool:
        """Between messages: text tokens fed now are a header, unless it turns out to be headerless text."""
        return self._state == _HEADER

    @property
    def in_content(self) -> bool:
        """Inside a content message: text tokens fed now are content (even while a split UTF-8 character waits)."""
        return self._state == _BODY and self._route == _CONTENT

    def is_text(self, token: int) -> bool:
        return 0 <= token < self._first_special

    @property
    def result(self) -> ParseResult:
        return ParseResult(
            reasoning="".join(self._reasoning),
            content="".join(self._content),
            tool_calls=[ToolCall(cid, name, "".join(args)) for cid, name, args in self._calls],
            finish_reason=self._finish_reason,
        )

    def feed(self, token) -> list[Event]:
        """Consume one sampled token id; returns the events it completes (often none or one)."""
        if self._state == _DONE:
            return []
        try:
            token = operator.index(token)
        except TypeError:
            return []
        try:
            return self._feed(token)
        except Exception:
            if self.raise_internal_errors:
                raise
            log.exception("harmony parser: internal error on token %d; continuing as plain text", token)
            return self._recover(token)

    def finish(self, reason: str = "length") -> list[Event]:
        """End of generation without a stop token: flush partial text and give Done(reason)."""
        if self._state == _DONE:
            return []
        try:
            return self._end_turn(reason)
        except Exception:
            if self.raise_internal_errors:
                raise
            log.exception("harmony parser: internal error in finish()")
            self._state = _DONE
            self._finish_reason = self._finish_reason or reason
            return [Done(self._finish_reason)]

    # -- state machine ------------------------------------------------------------------------------------------

    def _feed(self, tok: int) -> list[Event]:
        if 0 <= tok < self._first_special:
            data = self._token_bytes(tok)
            if self._state == _BODY:
                return self._emit(self._decoder.decode(data))
            return self._header_bytes(data)
        if tok in (RETURN, CALL):
            return self._end_turn(None)
        if tok in (END, START):  # <|start|> without <|end|> closes the open message too
            return self._end_message()
        if self._state == _HEADER:
            if tok == MESSAGE:
                return self._open_body(terminated=True)
            if tok in (CHANNEL, CONSTRAIN):
                self._segments.append((_CHANNEL_SEG if tok == CHANNEL else _CONSTRAIN_SEG, bytearray()))
            return []
        if tok == CHANNEL:  # in a body: the model skipped <|end|><|start|>assistant
            out = self._end_message()
            self._segments.append((_CHANNEL_SEG, bytearray()))
            return out
        return []  # <|message|>, <|constrain|> inside a body; reserved and unknown ids

    def _new_header(self) -> None:
        self._state = _HEADER
        self._segments: list[tuple[str, bytearray]] = [(_ROLE_SEG, bytearray())]
        self._header_len = 0
        self._route = _CONTENT
        self._decoder = None

    def _header_bytes(self, data: bytes) -> list[Event]:
        kind, buf = self._segments[-1]
        buf += data
        self._header_len += len(data)
        if (b"\n" in data or self._header_len > MAX_HEADER_BYTES
                or (kind != _CONSTRAIN_SEG and _looks_like_text(kind, bytes(buf)))):
            return self._open_body(terminated=False)
        return []

    def _open_body(self, terminated: bool) -> list[Event]:
        header = _parse_header(self._segments, terminated)
        self._state = _BODY
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[Event] = []
        if terminated and header.prefix_text:  # plain text before the header proper: content
            out += self._emit_to(_CONTENT, header.prefix_text.decode("utf-8", "replace"))
        recipient = header.recipient
        if recipient is not None and recipient.startswith("functions.") and len(recipient) > len("functions."):
            self._route = _TOOL
            call_id, name = self._new_call_id(), recipient[len("functions."):]
            self._calls.append((call_id, name, []))
            out.append(ToolCallStart(len(self._calls) - 1, call_id, name))
        elif header.channel == "analysis" and recipient is None:
            self._route = _REASONING
        else:
            self._route = _CONTENT
        if not terminated and header.prefix_text:
            out += self._emit(self._decoder.decode(header.prefix_text))
        return out

    def _emit(self, text: str) -> list[Event]:
        return self._emit_to(self._route, text)

    def _emit_to(self, route: str, text: str) -> list[Event]:
        if not text:
            return []
        if route == _REASONING:
            self._reasoning.append(text)
            return [ReasoningDelta(text)]
        if route == _TOOL:
            self._calls[-1][2].append(text)
            return [ToolCallArgsDelta(len(self._calls) - 1, text)]
        self._content.append(text)
        return [ContentDelta(text)]

    def _end_message(self, complete: bool = True) -> list[Event]:
        """Close the current message (a header that never reached <|message|> becomes one) and expect a header;
        complete=False: generation stopped inside it."""
        out: list[Event] = []
        if self._state == _HEADER:
            out += self._open_body(terminated=False)
        out += self._emit(self._decoder.decode(b"", final=True))
        if self._route == _TOOL:
            out.append(ToolCallEnd(len(self._calls) - 1, complete))
        self._new_header()
        return out

    def _end_turn(self, reason: str | None) -> list[Event]:
        """End the turn; reason None (a stop token) means "tool_calls" if any tool call was made, else "stop"."""
        out = self._end_message(complete=reason is None)
        if reason is None:
            reason = "tool_calls" if self._calls else "stop"
        self._state = _DONE
        self._finish_reason = reason
        out.append(Done(reason))
        return out

    def _recover(self, tok: int) -> list[Event]:
        """Last resort after an unexpected internal error: continue as a plain content message."""
        try:
            self._new_header()
            self._state = _BODY
            self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            if 0 <= tok < self._first_special:
                return self._emit(self._decoder.decode(self._token_bytes(tok)))
        except Exception:
            log.exception("harmony parser: recovery failed")
        return []
