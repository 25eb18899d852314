"""The tolerant streaming harmony parser and the chat-history -> harmony conversion (CPU, fast)."""

import json
import random

import pytest

from gptoss.errors import GptOssError
from gptoss.harmony_history import build_conversation, render_prompt
from gptoss.harmony_parser import (
    ContentDelta,
    Done,
    HarmonyStreamParser,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    event_text,
)
from gptoss.tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START, get_tokenizer


def toks(s: str) -> list[int]:
    return get_tokenizer().encode(s, allowed_special="all")


def parse(tokens, finish=True):
    ids = iter(f"call_{i}" for i in range(1000))
    p = HarmonyStreamParser(call_id_factory=lambda: next(ids), raise_internal_errors=True)
    events = []
    for t in tokens:
        events += p.feed(t)
    if finish:
        events += p.finish()
    return p.result, events


def check_consistent(result, events):
    """The events stream exactly what the result accumulates."""
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == result.reasoning
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == result.content
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(e.id, e.name) for e in starts] == [(c.id, c.name) for c in result.tool_calls]
    for i, call in enumerate(result.tool_calls):
        assert "".join(e.text for e in events if isinstance(e, ToolCallArgsDelta) and e.index == i) == call.arguments
    assert [e.index for e in events if isinstance(e, ToolCallEnd)] == list(range(len(result.tool_calls)))
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and events[-1] == done[0] and done[0].reason == result.finish_reason


ANALYSIS_FINAL = ("<|channel|>analysis<|message|>User says hi. Reply.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>")
TOOL_CALL = ('<|channel|>analysis<|message|>Need weather.<|end|>'
             '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
             '<|message|>{"city": "Oslo"}<|call|>')
TO_BEFORE_CHANNEL = ('<|channel|>analysis<|message|>Call it.<|end|>'
                     '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city":"Oslo"}<|call|>')
PREAMBLE_THEN_CALL = ('<|channel|>commentary<|message|>Let me look that up.<|end|>'
                      '<|start|>assistant to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>{"q":"x"}<|call|>')
VALID_EXAMPLES = [ANALYSIS_FINAL, TOOL_CALL, TO_BEFORE_CHANNEL, PREAMBLE_THEN_CALL,
                  "<|channel|>final<|message|>多言語 テキスト 😀🎉 ok<|return|>"]


def test_analysis_then_final():
    result, events = parse(toks(ANALYSIS_FINAL))
    assert result.reasoning == "User says hi. Reply."
    assert result.content == "Hello! How can I help?"
    assert result.tool_calls == [] and result.finish_reason == "stop"
    check_consistent(result, events)
    # deltas stream per token, not at the end
    assert sum(isinstance(e, ContentDelta) for e in events) > 3


def test_tool_call_with_constrain_json():
    result, events = parse(toks(TOOL_CALL))
    assert result.reasoning == "Need weather."
    assert result.content == ""
    assert [(c.id, c.name, json.loads(c.arguments)) for c in result.tool_calls] == [
        ("call_0", "get_weather", {"city": "Oslo"})]
    assert result.finish_reason == "tool_calls"
    check_consistent(result, events)
    assert sum(isinstance(e, ToolCallArgsDelta) for e in events) > 1  # arguments stream


def test_recipient_before_channel():
    result, events = parse(toks(TO_BEFORE_CHANNEL))
    assert result.reasoning == "Call it."
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", '{"city":"Oslo"}')]
    assert result.finish_reason == "tool_calls"
    check_consistent(result, events)


def test_recipient_at_turn_start():
    # the prompt ends with "<|start|>assistant", so " to=..." may be the very first tokens
    result, _ = parse(toks(' to=functions.f<|channel|>commentary <|constrain|>json<|message|>{"a":1}<|call|>'))
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("f", '{"a":1}')]


def test_preamble_without_recipient_is_content_then_tool_call():
    result, events = parse(toks(PREAMBLE_THEN_CALL))
    assert result.content == "Let me look that up."
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("lookup", '{"q":"x"}')]
    assert result.finish_reason == "tool_calls"
    check_consistent(result, events)
    kinds = [type(e) for e in events if not isinstance(e, ToolCallArgsDelta)]
    assert kinds.index(ToolCallStart) > kinds.index(ContentDelta)


def test_two_tool_calls():
    s = ('<|channel|>commentary to=functions.a <|constrain|>json<|message|>{}<|end|>'
         '<|start|>assistant<|channel|>commentary to=functions.b json<|message|>{"x":2}<|call|>')
    result, events = parse(toks(s))
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [("call_0", "a", "{}"), ("call_1", "b", '{"x":2}')]
    check_consistent(result, events)


@pytest.mark.parametrize("s", ["<|start|>assistant<|message|>hi there<|end|><|return|>",
                               "<|message|>hi there<|return|>"])
def test_missing_channel_is_content(s):
    result, events = parse(toks(s))
    assert (result.reasoning, result.content, result.finish_reason) == ("", "hi there", "stop")
    check_consistent(result, events)


def test_missing_message_yields_header_text_as_content():
    result, _ = parse(toks("<|start|>assistant Hello world<|end|><|return|>"))
    assert (result.content, result.finish_reason) == ("Hello world", "stop")
    result, _ = parse(toks("<|channel|>final The answer is 4.<|end|><|return|>"))
    assert result.content == "The answer is 4."
    # a header with nothing but syntax adds nothing
    result, events = parse(toks("<|channel|>analysis<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"))
    assert (result.reasoning, result.content) == ("", "ok")
    check_consistent(result, events)


def test_text_before_any_header_is_content():
    result, events = parse(toks("Sure! The answer is 42.\nAnything else?<|return|>"))
    assert (result.content, result.finish_reason) == ("Sure! The answer is 42.\nAnything else?", "stop")
    check_consistent(result, events)
    # it starts streaming before the end of the turn
    p = HarmonyStreamParser(raise_internal_errors=True)
    streamed = [e for t in toks("Sure! The answer is 42") for e in p.feed(t)]
    assert "".join(map(event_text, streamed)).startswith("Sure!")


@pytest.mark.parametrize("stray,reason", [("<|return|>", "stop"), ("<|call|>", "stop")])
def test_stray_stop_token_after_end(stray, reason):
    result, events = parse(toks("<|channel|>final<|message|>Done.<|end|>" + stray))
    assert (result.content, result.finish_reason) == ("Done.", reason)
    check_consistent(result, events)


def test_stray_call_after_tool_call_end():
    result, _ = parse(toks('<|channel|>commentary to=functions.f json<|message|>{}<|end|><|call|>'))
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("f", "{}")]
    assert result.finish_reason == "tool_calls"


def test_tokens_after_done_are_ignored():
    p = HarmonyStreamParser(raise_internal_errors=True)
    for t in toks("<|channel|>final<|message|>A<|return|>"):
        p.feed(t)
    assert p.done
    assert all(p.feed(t) == [] for t in toks("<|start|>assistant<|channel|>final<|message|>B"))
    assert p.finish() == [] and p.result.content == "A"


@pytest.mark.parametrize("recipient", ["browser.search", "python", "foo"])
def test_unknown_recipient_becomes_content(recipient):
    s = f'<|channel|>analysis<|message|>Search.<|end|><|start|>assistant<|channel|>analysis to={recipient} code<|message|>{{"q": 1}}<|call|>'
    result, events = parse(toks(s))
    assert result.reasoning == "Search."
    assert result.content == '{"q": 1}'
    assert result.tool_calls == [] and result.finish_reason == "stop"
    check_consistent(result, events)


def test_cut_off_mid_final_keeps_partial_text():
    tokens = toks("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>The answer is")
    result, events = parse(tokens)
    assert (result.reasoning, result.content, result.finish_reason) == ("Think.", "The answer is", "length")
    check_consistent(result, events)


def test_cut_off_mid_tool_call_and_mid_header():
    result, events = parse(toks('<|channel|>commentary to=functions.f json<|message|>{"a": '))
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("f", '{"a": ')]
    assert result.finish_reason == "length"
    check_consistent(result, events)
    result, events = parse(toks("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fin"))
    assert (result.reasoning, result.finish_reason) == ("x", "length")
    check_consistent(result, events)


def test_finish_reason_override():
    p = HarmonyStreamParser()
    for t in toks("<|channel|>final<|message|>abc"):
        p.feed(t)
    assert p.finish("stop")[-1] == Done("stop") and p.result.finish_reason == "stop"


@pytest.mark.parametrize("text", ["😀🎉👍🏽", "鬱憂 薔薇 檸檬 齉龘𠜎𠜱", "naïve café — ∑∫√", "🇳🇴🏳️‍🌈 x"])
def test_multibyte_characters_split_across_tokens(text):
    enc = get_tokenizer()
    body = enc.encode(text)
    assert any(_splits_utf8(enc.decode_single_token_bytes(t)) for t in body), "test needs a split character"
    for channel, reasoning, content in (("final", "", text + text), ("analysis", text, text)):
        tokens = (toks(f"<|channel|>{channel}<|message|>") + body + [END, START]
                  + toks("assistant<|channel|>final<|message|>") + body + [RETURN])
        result, events = parse(tokens)
        assert (result.reasoning, result.content) == (reasoning, content)
        assert "\ufffd" not in "".join(map(event_text, events))
        check_consistent(result, events)
    # tool-call arguments and plain text before any header too
    result, _ = parse(toks("<|channel|>commentary to=functions.f json<|message|>") + enc.encode(json.dumps({"s": text}, ensure_ascii=False)) + [CALL])
    assert json.loads(result.tool_calls[0].arguments) == {"s": text}
    result, _ = parse(enc.encode(text + " and more text"))
    assert result.content == text + " and more text"


def _splits_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_invalid_utf8_becomes_replacement_char():
    enc = get_tokenizer()
    lone = next(t for t in enc.encode("🎉") if _splits_utf8(enc.decode_single_token_bytes(t)))
    result, _ = parse(toks("<|channel|>final<|message|>a") + [lone] + toks("b<|end|>") + [RETURN])
    assert result.content == "a\ufffdb"  # the dangling bytes come out as U+FFFD, "b" is kept


@pytest.mark.parametrize("special", [200017, 200000, 201087, 199998, 199999, 200018])
def test_reserved_special_token_in_middle(special):
    tokens = toks(ANALYSIS_FINAL)
    for pos in range(len(tokens) + 1):
        result, events = parse(tokens[:pos] + [special] + tokens[pos:])
        assert result.reasoning == "User says hi. Reply."
        assert result.content == "Hello! How can I help?"
        check_consistent(result, events)


def test_out_of_range_and_odd_ids_do_not_crash():
    result, events = parse([-1, 10**9, 201088, 3.5, None, "x"] + toks("<|channel|>final<|message|>ok<|return|>"))
    assert result.content == "ok"


def test_channel_inside_body_starts_new_message():
    result, _ = parse(toks("<|channel|>analysis<|message|>think<|channel|>final<|message|>answer<|return|>"))
    assert (result.reasoning, result.content) == ("think", "answer")


# --- fuzz -------------------------------------------------------------------------------------------------------

SPECIALS = [RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL]


def _random_token(rng):
    r = rng.random()
    if r < 0.4:
        return rng.choice(SPECIALS)
    if r < 0.55:
        return rng.randint(199998, 201087)
    return rng.randint(0, 199997)


def _mutate(rng, tokens):
    tokens = list(tokens)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(tokens) + 1)
        if op == 0 and tokens:
            del tokens[min(pos, len(tokens) - 1)]
        elif op == 1:
            tokens.insert(pos, _random_token(rng))
        elif op == 2 and len(tokens) > 1:
            i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif op == 3 and tokens:
            i = rng.randrange(len(tokens))
            tokens[i:i] = tokens[i:i + rng.randint(1, 8)]
        else:
            tokens.insert(pos, rng.choice(SPECIALS))
    return tokens


def test_fuzz_never_raises():
    rng = random.Random(1234)
    bases = [toks(s) for s in VALID_EXAMPLES + [
        "<|start|>assistant<|message|>hi<|end|>", "<|channel|>final Hello<|end|>", "plain text\nmore",
        "<|channel|>commentary to=browser.search<|message|>{}<|call|>"]]
    n = 0
    for i in range(12_000):
        if i % 4 == 0:
            tokens = [_random_token(rng) for _ in range(rng.randint(0, 40))]
        else:
            tokens = _mutate(rng, rng.choice(bases))
        result, events = parse(tokens, finish=rng.random() < 0.9)
        text = "".join(event_text(e) for e in events)
        assert isinstance(text, str)
        if any(isinstance(e, Done) for e in events):
            check_consistent(result, events)
        n += 1
    assert n == 12_000


def test_internal_error_degrades_to_text(monkeypatch):
    p = HarmonyStreamParser()
    monkeypatch.setattr(p, "_header_bytes", lambda data: 1 / 0)
    events = [e for t in toks("Hello world") for e in p.feed(t)] + p.finish()
    assert isinstance(events[-1], Done)
    assert p.result.content == "Hello world"  # the failing token's text is kept; later ones stream as content


# --- history ----------------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def render(messages, **kw):
    return get_tokenizer().decode(render_prompt(build_conversation(messages, **kw)))


def test_history_basic_layout():
    text = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  reasoning_effort="low", tools=[WEATHER_TOOL])
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: low" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief." in text
    assert "type get_weather = " in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_history_tool_round_trip():
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need to call get_weather.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny, 20C"}]},
    ]
    text = render(messages, tools=[WEATHER_TOOL])
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny, 20C<|end|>" in text
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
            '<|message|>{"city":"Oslo"}<|call|>') in text
    # the chain is unfinished: its analysis is kept
    assert "<|channel|>analysis<|message|>Need to call get_weather.<|end|>" in text
    assert text.endswith("<|start|>assistant")

    # the parser's output for such a turn maps back to the same messages
    result, _ = parse(toks(TOOL_CALL))
    call = result.tool_calls[0]
    again = render([messages[0], {"role": "assistant", "reasoning_content": result.reasoning, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}], tools=[WEATHER_TOOL])
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>" in again


def test_history_drops_analysis_before_last_final():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "reasoning": "R2", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "reasoning": "R3", "content": "A2"},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "reasoning": "R4", "content": "Checking.", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c3", "content": "snow"},
    ]
    text = render(messages, tools=[WEATHER_TOOL])
    for dropped in ("R1", "R2", "R3"):
        assert f"<|message|>{dropped}<|end|>" not in text
    assert "<|channel|>final<|message|>A1<|end|>" in text and "<|channel|>final<|message|>A2<|end|>" in text
    assert "<|start|>assistant<|channel|>analysis<|message|>R4<|end|>" in text  # after the last final: kept
    assert "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" in text  # content + calls = preamble
    assert '<|message|>{"city": "Oslo"}<|call|>' in text
    # with no final answer at all, every analysis is kept
    text = render([messages[2]] + messages[3:5])
    assert "<|message|>R2<|end|>" in text


def test_history_reasoning_and_reasoning_content_both_accepted():
    for key in ("reasoning", "reasoning_content"):
        text = render([{"role": "user", "content": "Q"},
                       {"role": "assistant", key: "because", "tool_calls": [
                           {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                       {"role": "tool", "tool_call_id": "c", "content": "r"}])
        assert "<|channel|>analysis<|message|>because<|end|>" in text


@pytest.mark.parametrize("messages,field", [
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": ["plain"]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}],
     "messages[1].tool_call_id"),
    ([{"role": "tool", "content": "r"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 3}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "reasoning_content": ["x"]}], "messages[0].reasoning_content"),
    (["hello"], "messages[0]"),
    ("hello", "messages"),
])
def test_history_bad_messages_raise(messages, field):
    with pytest.raises(GptOssError) as err:
        build_conversation(messages)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


@pytest.mark.parametrize("kw,field", [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
])
def test_history_bad_options_raise(kw, field):
    with pytest.raises(GptOssError) as err:
        build_conversation([{"role": "user", "content": "q"}], **kw)
    assert str(err.value).startswith(field + ":")
