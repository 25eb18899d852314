"""The OpenAI-compatible server (gptoss.server) over a real uvicorn server, driven by the official openai client.

Most tests use ScriptedEngine, which implements the engine interface and replays scripted harmony token sequences
(and records prompts, params and whether each generation was closed). The last tests run the real Engine over a
tiny random model (CPU). Plus a `gptoss chat` subprocess test on the demo checkpoint.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from conftest import free_port, interrupt, wait_until_serving
from gptoss.engine import EngineError, TokenOutput
from gptoss.errors import ContextLengthError
from gptoss.server import create_app
from gptoss.tokenizer import get_tokenizer

MODEL = "gpt-oss-test"
KEY = "sk-test-123"


def toks(s: str) -> list[int]:
    return get_tokenizer().encode(s, allowed_special="all")


def detok(ids) -> str:
    return get_tokenizer().decode(list(ids))


# --- the scripted engine ------------------------------------------------------------------------------------------


class ScriptedEngine:
    """Replays scripted token sequences; records each call's prompt, params, tokens yielded and closing."""

    def __init__(self, context_length: int = 4096):
        self.context_length = context_length
        self.scripts: collections.deque = collections.deque()
        self.calls: list[dict] = []

    def script(self, text: str, *, forever: str | None = None, delay: float = 0.0, first_delay: float = 0.0,
               fail_after: int | None = None) -> None:
        """Next generation replays toks(text) (delay seconds between tokens, first_delay before the first, like a
        queued request); with forever, then repeats toks(forever) until closed; with fail_after, the engine fails
        (EngineError) after yielding that many tokens."""
        self.scripts.append({"tokens": toks(text), "forever": toks(forever) if forever else None, "delay": delay,
                             "first_delay": first_delay, "fail_after": fail_after})

    def start(self):
        pass

    def stop(self):
        pass

    def stats(self) -> dict:
        running = sum(1 for c in self.calls if not c["closed"])
        return {"running": running, "waiting": 0, "free_blocks": 100 - running, "total_blocks": 100,
                "cached_prefix_blocks": 0}

    async def generate(self, prompt_tokens, params):
        if len(prompt_tokens) + params.max_tokens > self.context_length:
            raise ContextLengthError(f"prompt {len(prompt_tokens)} + {params.max_tokens} > {self.context_length}")
        call = {"prompt": list(prompt_tokens), "params": params, "yielded": 0, "closed": False}
        self.calls.append(call)
        script = self.scripts.popleft() if self.scripts else {
            "tokens": toks("<|channel|>final<|message|>ok<|return|>"), "forever": None, "delay": 0.0,
            "first_delay": 0.0, "fail_after": None}

        def stream():
            yield from script["tokens"]
            while script["forever"]:
                yield from script["forever"]

        try:
            await asyncio.sleep(script["first_delay"])
            for i, t in enumerate(stream(), start=1):
                if i - 1 == script["fail_after"]:
                    raise EngineError("engine step failed: RuntimeError('CUDA error: an illegal memory access')")
                finish = "stop" if t in params.stop_token_ids else ("length" if i >= params.max_tokens else None)
                out = TokenOutput(t, finish_reason=finish)
                if params.logprobs:
                    out.logprob = -0.25
                    out.top_logprobs = [(t, -0.25), (t + 1, -1.5), (t + 2, -3.0)][:params.top_logprobs]
                call["yielded"] = i
                yield out
                if finish:
                    return
                await asyncio.sleep(script["delay"])
        finally:
            call["closed"] = True


# --- a real server in a thread ------------------------------------------------------------------------------------


class ServerThread:
    def __init__(self, app):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served():
    engine = ScriptedEngine()
    with ServerThread(create_app(engine, MODEL, api_key=KEY)) as srv:
        yield engine, srv


@pytest.fixture
def engine(served):
    eng, _ = served
    eng.scripts.clear()
    eng.calls.clear()
    return eng


@pytest.fixture
def client(served):
    _, srv = served
    return openai.OpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture
def http(served):
    _, srv = served
    with httpx.Client(base_url=srv.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
RESPONSES_WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "weather",
                          "parameters": WEATHER_TOOL["function"]["parameters"]}
ANSWER = "<|channel|>analysis<|message|>User asks weather.<|end|><|start|>assistant<|channel|>final<|message|>Sunny, 20 C.<|return|>"
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def collect_chat_stream(stream):
    content, reasoning, finish, usage, tools, chunks = "", "", None, None, {}, []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            reasoning += extra(d, "reasoning_content") or ""
            for tc in d.tool_calls or []:
                entry = tools.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
    return dict(content=content, reasoning=reasoning, finish=finish, usage=usage, tools=tools, chunks=chunks)


# --- basics -------------------------------------------------------------------------------------------------------


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert {"running", "waiting", "free_blocks", "total_blocks"} <= set(r.json()["engine"])


def test_chat_nonstream_reasoning_and_usage(client, engine):
    engine.script(ANSWER)
    r = client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="high", temperature=0.5,
                                       top_p=0.9, seed=7)
    msg = r.choices[0].message
    assert msg.content == "Sunny, 20 C."
    assert extra(msg, "reasoning_content") == "User asks weather."
    assert r.choices[0].finish_reason == "stop"
    call = engine.calls[-1]
    assert r.usage.prompt_tokens == len(call["prompt"])
    assert r.usage.completion_tokens == len(toks(ANSWER)) == call["yielded"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    prompt = detok(call["prompt"])
    assert "Reasoning: high" in prompt and prompt.endswith("<|start|>assistant")
    assert call["params"].temperature == 0.5 and call["params"].top_p == 0.9 and call["params"].seed == 7
    assert call["params"].max_tokens == engine.context_length - len(call["prompt"])
    assert call["closed"]


def test_chat_stream(client, engine):
    engine.script(ANSWER)
    s = collect_chat_stream(client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}, max_tokens=200))
    assert s["content"] == "Sunny, 20 C." and s["reasoning"] == "User asks weather."
    assert s["finish"] == "stop"
    assert s["chunks"][0].choices[0].delta.role == "assistant"
    assert s["chunks"][-1].choices == [] and s["usage"].completion_tokens == len(toks(ANSWER))
    assert s["usage"].prompt_tokens == len(engine.calls[-1]["prompt"])
    assert engine.calls[-1]["params"].max_tokens == 200


def test_chat_max_completion_tokens_and_length(client, engine):
    engine.script("<|channel|>final<|message|>one two three four five six seven eight<|return|>")
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=6)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.choices[0].message.content == detok(toks("<|channel|>final<|message|>one two three four five")[3:6])
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, max_completion_tokens=5)
    assert engine.calls[-1]["params"].max_tokens == 5  # the newer name wins, as in OpenAI's API


# --- tool calls -----------------------------------------------------------------------------------------------------


def test_tool_call_round_trip(client, engine):
    engine.script("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant" + TOOL_CALL)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tc,) = choice.message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert tc.id and tc.type == "function"
    assert "namespace functions" in detok(engine.calls[-1]["prompt"])

    engine.script("<|channel|>final<|message|>It is 20 C in Paris.<|return|>")
    history = USER + [
        {"role": "assistant", "content": None, "reasoning_content": extra(choice.message, "reasoning_content"),
         "tool_calls": [tc.model_dump()]},
        {"role": "tool", "tool_call_id": tc.id, "content": '{"temp": 20}'}]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == "It is 20 C in Paris."
    prompt = detok(engine.calls[-1]["prompt"])
    assert ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city":"Paris"}<|call|>') in prompt or '{"city":"Paris"}' in prompt
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>' in prompt
    assert "Need weather." in prompt  # analysis kept inside the unfinished tool-call chain


def test_tool_call_stream(client, engine):
    engine.script("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant" + TOOL_CALL)
    s = collect_chat_stream(client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL],
                                                           stream=True))
    assert s["finish"] == "tool_calls" and s["content"] == "Checking."
    assert s["tools"][0]["name"] == "get_weather" and json.loads(s["tools"][0]["arguments"]) == {"city": "Paris"}
    assert s["tools"][0]["id"].startswith("call_")


def test_tool_choice(client, engine):
    # none: tools are not offered
    engine.script("<|channel|>final<|message|>No tools.<|return|>")
    client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="none")
    assert "namespace functions" not in detok(engine.calls[-1]["prompt"])
    # named: header prefilled, the model writes only the arguments
    engine.script('{"city":"Oslo"}<|call|>')
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = engine.calls[-1]
    assert detok(call["prompt"]).endswith(
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")
    (tc,) = r.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and tc.function.arguments == '{"city":"Oslo"}'
    assert r.usage.completion_tokens == len(toks('{"city":"Oslo"}<|call|>'))
    assert r.usage.prompt_tokens == len(call["prompt"])
    # required with several tools: the model must pick the function
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    engine.script('.get_time <|constrain|>json<|message|>{}<|call|>')
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL, other],
                                       tool_choice="required")
    assert detok(engine.calls[-1]["prompt"]).endswith("<|channel|>commentary to=functions")
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    # a named tool that does not exist
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


# --- malformed model output: 200 with what was parsed ---------------------------------------------------------------


@pytest.mark.parametrize("script, content, tool, finish", [
    ("<|channel|>final<|message|>Hello<|end|><|return|>", "Hello", None, "stop"),  # stray return after end
    ("<|channel|>final<|message|>Hi<|end|><|call|>", "Hi", None, "stop"),  # stray call after end
    (' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
     "", "get_weather", "tool_calls"),  # to= before the channel
    ('<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant' + TOOL_CALL,
     "Let me look.", "get_weather", "tool_calls"),  # preamble without recipient
    ("<|channel|>final Hello there<|return|>", "Hello there", None, "stop"),  # missing <|message|>
    ('<|channel|>commentary to=browser.search<|message|>{"q":"x"}<|call|>', '{"q":"x"}', None, "stop"),
    ("<|channel|>final<|message|>" + "word " * 80 + "<|return|>", None, None, "length"),  # cut by max_tokens
])
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_output(client, engine, script, content, tool, finish, stream):
    engine.script(script)
    kwargs = dict(model=MODEL, messages=USER, tools=[WEATHER_TOOL], max_tokens=40)
    if stream:
        s = collect_chat_stream(client.chat.completions.create(stream=True, **kwargs))
        got_content, got_finish = s["content"], s["finish"]
        got_tool = s["tools"][0]["name"] if s["tools"] else None
    else:
        r = client.chat.completions.create(**kwargs)
        got_content, got_finish = r.choices[0].message.content or "", r.choices[0].finish_reason
        got_tool = r.choices[0].message.tool_calls[0].function.name if r.choices[0].message.tool_calls else None
    assert got_finish == finish
    assert got_tool == tool
    if content is None:  # partial text
        assert got_content.startswith("word word") and len(got_content) < 300
    else:
        assert got_content.strip() == content


# --- logprobs and stop strings ----------------------------------------------------------------------------------------


def test_logprobs(client, engine):
    engine.script(ANSWER)
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert "".join(e.token for e in lp) == "Sunny, 20 C."
    assert all(e.logprob == -0.25 and len(e.top_logprobs) == 2 for e in lp)
    assert engine.calls[-1]["params"].logprobs and engine.calls[-1]["params"].top_logprobs == 2
    engine.script(ANSWER)
    s = collect_chat_stream(client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, stream=True))
    tokens = [e.token for c in s["chunks"] for ch in c.choices if ch.logprobs and ch.logprobs.content
              for e in ch.logprobs.content]
    assert "".join(tokens) == "Sunny, 20 C."
    r = client.chat.completions.create(model=MODEL, messages=USER)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize("script, content", [
    ("<|channel|>final<|message|>Hi 🫠 龘!<|return|>", "Hi 🫠 龘!"),  # characters split over tokens
    ("Plain words, no header<|return|>", "Plain words, no header"),  # a header that turns out to be text
])
def test_logprobs_one_entry_per_content_token(client, engine, script, content):
    engine.script(script)
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True)
    lp = r.choices[0].logprobs.content
    assert r.choices[0].message.content == content
    assert len(lp) == len(toks(content))  # every token that made content text, none twice
    assert bytes(b for e in lp for b in e.bytes).decode() == content


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, engine, stream):
    text = "<|channel|>final<|message|>Count: one, two, three, four, five.<|return|>"
    engine.script(text)
    kwargs = dict(model=MODEL, messages=USER, stop=["three", "zzz"])
    if stream:
        s = collect_chat_stream(client.chat.completions.create(stream=True, **kwargs))
        content, finish = s["content"], s["finish"]
    else:
        r = client.chat.completions.create(**kwargs)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert content == "Count: one, two, " and finish == "stop"
    call = engine.calls[-1]
    assert call["yielded"] < len(toks(text)) and call["closed"]


# --- /v1/responses ----------------------------------------------------------------------------------------------------


def test_responses_nonstream(client, engine):
    engine.script(ANSWER)
    r = client.responses.create(model=MODEL, input="Weather in Paris?", instructions="Be brief.",
                                reasoning={"effort": "low"}, max_output_tokens=100)
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "User asks weather."
    assert r.output_text == "Sunny, 20 C."
    call = engine.calls[-1]
    assert r.usage.input_tokens == len(call["prompt"]) and r.usage.output_tokens == len(toks(ANSWER))
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    prompt = detok(call["prompt"])
    assert "Reasoning: low" in prompt and "Be brief." in prompt
    assert call["params"].max_tokens == 100


def test_responses_stream_events(client, engine):
    engine.script(ANSWER)
    events = list(client.responses.create(model=MODEL, input="Weather?", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # reasoning item, then message item, each fully opened and closed
    expected_order = ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
                      "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                      "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                      "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    it = iter(types)
    assert all(t in it for t in expected_order)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Sunny, 20 C."
    done = [e for e in events if e.type == "response.output_text.done"][0]
    assert done.text == "Sunny, 20 C."
    final = events[-1].response
    assert final.output_text == "Sunny, 20 C." and final.usage.output_tokens == len(toks(ANSWER))


def test_responses_function_call_and_previous_response(client, engine):
    tools = [RESPONSES_WEATHER_TOOL]
    engine.script(TOOL_CALL)
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", tools=tools, stream=True))
    types = [e.type for e in events]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert added[0].item.type == "function_call" and added[0].item.name == "get_weather"
    assert "response.function_call_arguments.delta" in types
    args_done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    assert json.loads(args_done.arguments) == {"city": "Paris"}
    first = events[-1].response
    (fc,) = [o for o in first.output if o.type == "function_call"]
    assert fc.call_id and fc.arguments == '{"city":"Paris"}'

    engine.script("<|channel|>final<|message|>20 C.<|return|>")
    r = client.responses.create(model=MODEL, previous_response_id=first.id, tools=tools,
                                input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "20"}])
    assert r.output_text == "20 C."
    prompt = detok(engine.calls[-1]["prompt"])
    assert "Weather in Paris?" in prompt
    assert '{"city":"Paris"}<|call|>' in prompt
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>20<|end|>" in prompt
    # a third turn through the stored chain, and the non-streaming function call shape
    engine.script(TOOL_CALL)
    r3 = client.responses.create(model=MODEL, previous_response_id=r.id, input="And tomorrow?", tools=tools,
                                 tool_choice="required")
    assert r3.output[0].type == "function_call" and r3.output[0].name == "get_weather"
    assert "20 C." in detok(engine.calls[-1]["prompt"])
    assert client.responses.retrieve(r3.id).id == r3.id
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, previous_response_id="resp_missing", input="hi")


def test_responses_input_items(client, engine):
    engine.script("<|channel|>final<|message|>Done.<|return|>")
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Think."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Nice"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    r = client.responses.create(model=MODEL, input=items, tools=tools, store=False)
    assert r.output_text == "Done."
    prompt = detok(engine.calls[-1]["prompt"])
    assert "Answer in French." in prompt and "Think." in prompt and "sunny" in prompt
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_responses_incomplete(client, engine):
    engine.script("<|channel|>final<|message|>" + "word " * 40 + "<|return|>")
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=8)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text.startswith("word") and r.usage.output_tokens == 8
    # a function call cut off inside its arguments is an incomplete item, not a completed call
    cut = TOOL_CALL.index("Paris")
    engine.script(TOOL_CALL)
    r = client.responses.create(model=MODEL, input="hi", tools=[RESPONSES_WEATHER_TOOL],
                                max_output_tokens=len(toks(TOOL_CALL[:cut])))
    (call,) = r.output
    assert call.type == "function_call" and call.status == "incomplete" and r.status == "incomplete"
    engine.script(TOOL_CALL)
    r = client.responses.create(model=MODEL, input="hi", tools=[RESPONSES_WEATHER_TOOL])
    assert r.output[0].status == "completed" and r.output[0].arguments == '{"city":"Paris"}'


# --- errors -----------------------------------------------------------------------------------------------------------


def test_api_key(served, http):
    _, srv = served
    bad = openai.OpenAI(base_url=srv.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=USER)
    r = httpx.post(srv.base + "/v1/chat/completions", json={"model": MODEL, "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        bad.responses.create(model=MODEL, input="hi")
    with pytest.raises(openai.AuthenticationError):
        bad.responses.retrieve("resp_123")
    with pytest.raises(openai.AuthenticationError):
        bad.models.retrieve(MODEL)
    assert http.get("/health").status_code == 200


def _chat(**over):
    body = {"model": MODEL, "messages": USER}
    body.update(over)
    return body


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/chat/completions", {"messages": USER}, 400),  # missing model
    ("/v1/chat/completions", {"model": MODEL}, 400),  # missing messages
    ("/v1/chat/completions", _chat(messages="hello"), 400),
    ("/v1/chat/completions", _chat(messages=[]), 400),
    ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": 5}]), 400),
    ("/v1/chat/completions", _chat(temperature="hot"), 400),
    ("/v1/chat/completions", _chat(temperature=5), 400),
    ("/v1/chat/completions", _chat(max_tokens=-1), 400),
    ("/v1/chat/completions", _chat(max_tokens=10 ** 6), 400),  # beyond the context
    ("/v1/chat/completions", _chat(model="gpt-5"), 404),
    ("/v1/chat/completions", _chat(n=2), 400),
    ("/v1/chat/completions", _chat(reasoning_effort="extreme"), 400),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]), 400),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": "bad"}}}]), 400),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "bad name"}}]), 400),
    ("/v1/chat/completions", _chat(tools=[{"type": "retrieval"}]), 400),
    ("/v1/chat/completions", _chat(tool_choice="required"), 400),  # no tools
    ("/v1/chat/completions", _chat(messages=USER + [{"role": "tool", "tool_call_id": "nope", "content": "x"}]), 400),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400),
    ("/v1/chat/completions", _chat(stop=5), 400),
    ("/v1/chat/completions", _chat(seed=2 ** 70), 400),
    ("/v1/chat/completions", _chat(tool_choice="sometimes", tools=[WEATHER_TOOL]), 400),
    ("/v1/chat/completions", _chat(messages=USER + [{"role": "assistant", "tool_calls": "x"}]), 400),
    ("/v1/chat/completions", _chat(top_logprobs=50, logprobs=True), 400),
    ("/v1/responses", {"model": MODEL}, 400),
    ("/v1/responses", {"model": MODEL, "input": 5}, 400),
    ("/v1/responses", {"model": MODEL, "input": [{"type": "web_search_call"}]}, 400),
    ("/v1/responses", {"model": MODEL, "input": [{"type": "function_call", "name": "f"}]}, 400),
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 10 ** 6}, 400),
    ("/v1/responses", {"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]}, 400),
    ("/v1/responses", {"model": MODEL, "input": "hi", "reasoning": {"effort": 3}}, 400),
    ("/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400),  # nested beyond the JSON parser's depth
    ("/v1/chat/completions", _chat(max_tokens="5"), 400),  # strict types, as OpenAI's API
    ("/v1/chat/completions", _chat(max_tokens=5.0), 400),
    ("/v1/chat/completions", _chat(stream="true"), 400),
    ("/v1/chat/completions", _chat(logprobs=1), 400),
    ("/v1/responses", {"model": MODEL, "input": [
        {"type": "function_call_output", "call_id": "call_nowhere", "output": "20 C"}]}, 400),
    ("/v1/nothing", {}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS)
def test_bad_requests(http, engine, path, body, status):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str) and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert not engine.calls  # nothing reached the engine
    assert http.get("/health").status_code == 200
    engine.script("<|channel|>final<|message|>still here<|return|>")
    ok = http.post("/v1/chat/completions", json=_chat())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "still here"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("/v1/chat/completions", _chat(stop=["a", 5]), "stop[1]"),
    ("/v1/chat/completions", _chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {}}),
     "tool_choice.function.name"),
    ("/v1/chat/completions", _chat(max_tokens=10 ** 6), "max_tokens"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "word " * 5000}]), "messages"),
    ("/v1/responses", {"model": MODEL, "input": "word " * 5000}, "input"),
    ("/v1/responses", {"model": MODEL, "input": [
        {"type": "function_call_output", "call_id": "call_nowhere", "output": "20 C"}]}, "input[0].call_id"),
])
def test_bad_request_names_the_param(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_engine_failing_mid_stream(client, engine, http):
    """A step that fails after some tokens: the chat stream ends with an in-band error (the official client raises
    it), the responses stream with response.failed (not stored), a non-streaming request with a 500 body; the
    server keeps serving."""
    engine.script(ANSWER, fail_after=8)
    stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="generation failed: engine step failed"):
        for chunk in stream:
            got.append(chunk)
    assert got and got[0].choices[0].delta.role == "assistant"
    engine.script(ANSWER, fail_after=8)
    events = list(client.responses.create(model=MODEL, input="hi", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert "engine step failed" in events[-1].response.error.message
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(events[-1].response.id)
    engine.script(ANSWER, fail_after=8)
    r = http.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert all(call["closed"] for call in engine.calls)
    engine.script(ANSWER)
    assert client.chat.completions.create(model=MODEL, messages=USER).choices[0].message.content == "Sunny, 20 C."


def test_engine_context_error_is_400(http, engine):
    engine.context_length = 10 ** 6  # the server's own check passes; the engine raises ContextLengthError
    try:
        with pytest.MonkeyPatch.context() as mp:
            async def refuse(prompt, params):
                raise ContextLengthError("too long for the cache")
                yield  # pragma: no cover

            mp.setattr(engine, "generate", refuse)
            for stream in (False, True):
                r = http.post("/v1/chat/completions", json=_chat(stream=stream))
                assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        engine.context_length = 4096


# --- disconnects --------------------------------------------------------------------------------------------------


def _wait_closed(engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.calls and engine.calls[-1]["closed"]:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", _chat(stream=True)),
    ("/v1/responses", {"model": MODEL, "input": "hi", "stream": True}),
])
def test_disconnect_mid_stream_closes_generation(served, engine, path, body):
    _, srv = served
    engine.script("<|channel|>final<|message|>", forever=" more", delay=0.01)
    with httpx.Client(base_url=srv.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            lines = 0
            for line in r.iter_lines():
                lines += bool(line)
                if lines >= 8:
                    break
    assert _wait_closed(engine), "the engine generation was not closed after the client disconnected"
    yielded = engine.calls[-1]["yielded"]
    time.sleep(0.2)
    assert engine.calls[-1]["yielded"] == yielded


def test_disconnect_nonstream_closes_generation(served, engine):
    _, srv = served
    engine.script("<|channel|>final<|message|>", forever=" more", delay=0.01)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(srv.base + "/v1/chat/completions", json=_chat(), headers={"Authorization": f"Bearer {KEY}"},
                   timeout=0.5)
    assert _wait_closed(engine)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_while_queued_closes_generation(served, engine, stream):
    _, srv = served
    engine.script("<|channel|>final<|message|>late<|return|>", first_delay=30)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(srv.base + "/v1/chat/completions", json=_chat(stream=stream),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    assert _wait_closed(engine)
    assert engine.calls[-1]["yielded"] == 0


# --- the real engine over a tiny random model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_served():
    import dataclasses

    import torch

    from gptoss.checkpoint_writer import fill_random
    from gptoss.config import preset
    from gptoss.engine import Engine
    from gptoss.model import Transformer

    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny"), vocab_size=201088)
    model = Transformer(cfg, dtype=torch.float32)
    fill_random(model, 0)
    engine = Engine(model, max_batch_size=32, context_length=512)
    engine.start()
    try:
        with ServerThread(create_app(engine, MODEL)) as srv:
            yield engine, srv
    finally:
        engine.stop()


def test_real_engine_concurrent_streams_match_solo(real_served):
    engine, srv = real_served
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0, timeout=120)

    def run(i: int):
        s = collect_chat_stream(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request number {i}: say something."}],
            temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}))
        return (s["content"], s["reasoning"], s["finish"], s["usage"].completion_tokens,
                tuple(tc["arguments"] for tc in s["tools"].values()))

    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], engine.stats()["running"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, range(32)))
    done.set()
    watcher.join()
    assert peak[0] > 1, "requests were never batched together"
    assert len(set(together)) > 1  # different prompts, different outputs
    for i in range(32):  # each alone (batch of one) gives the same greedy output
        assert run(i) == together[i], i
    for content, reasoning, finish, n, _ in together:
        assert finish in ("stop", "length", "tool_calls") and 1 <= n <= 12
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_real_engine_nonstream_responses_and_prefix_cache(real_served):
    engine, srv = real_served
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "A prompt long enough to fill a few KV blocks. " * 4}]
    a = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5)
    b = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens and 1 <= b.usage.completion_tokens <= 5
    assert b.usage.prompt_tokens_details.cached_tokens > 0
    r = client.responses.create(model=MODEL, input="hello", max_output_tokens=5, temperature=0)
    assert r.status in ("completed", "incomplete") and 1 <= r.usage.output_tokens <= 5
    with pytest.raises(openai.BadRequestError):  # beyond the engine's context length of 512
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=500)


def test_real_engine_disconnect_frees_blocks(real_served):
    engine, srv = real_served
    free_before = engine.stats()["free_blocks"]
    with httpx.Client(base_url=srv.base, timeout=60) as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
                "temperature": 1.0, "seed": 3, "max_tokens": 400}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break
            during = engine.stats()
            assert during["running"] + during["waiting"] == 1 and during["free_blocks"] < free_before
    deadline = time.time() + 20
    while time.time() < deadline:
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["free_blocks"] == free_before:
            break
        time.sleep(0.05)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_blocks"] == free_before


# --- gptoss chat ------------------------------------------------------------------------------------------------------


def test_chat_cli_two_turns(tmp_path):
    env = dict(os.environ)  # the demo checkpoint is written once into the user's cache folder
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss.cli", "chat", "--max-tokens", "4", "--reasoning", "low", "--show-reasoning",
         "--system", "Be brief.", "--device", "cpu", "--temperature", "0"],
        input="Hello there\nAnd again?\n", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2, (proc.stdout, proc.stderr)
    assert "[turn 2: prompt" in proc.stderr and "[turn 3" not in proc.stderr
    # the second turn's prompt holds the first exchange
    n1, n2 = (int(line.split("prompt ")[1].split()[0]) for line in proc.stderr.splitlines() if "[turn" in line)
    assert n2 > n1

    proc = subprocess.run([sys.executable, "-m", "gptoss.cli", "chat", "-n", "2", "--device", "cpu"],
                          input="Hi\n/exit\nnot read\n", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.count("assistant> ") == 1, proc.stderr

    # /reset starts the next turn from an empty history (with the developer message still in front)
    proc = subprocess.run([sys.executable, "-m", "gptoss.cli", "chat", "-n", "2", "--device", "cpu", "--developer",
                           "Answer in French."], input="Hello there\nAnd again?\n/reset\nHello there\n",
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "history cleared" in proc.stderr, proc.stderr
    d1, d2, d3 = (int(line.split("prompt ")[1].split()[0]) for line in proc.stderr.splitlines() if "[turn" in line)
    assert d2 > d1 == d3


def test_serve_cli_on_demo_checkpoint():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss.cli", "serve", "--port", str(port), "--api-key", "k", "--device", "cpu",
         "--context", "1024", "--max-batch-size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(proc, base, 90)
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=60)
        (model,) = client.models.list().data
        assert model.id == "demo-tiny-v1"
        r = client.chat.completions.create(model=model.id, messages=USER, max_tokens=4, temperature=0)
        assert 1 <= r.usage.completion_tokens <= 4 and r.usage.prompt_tokens > 20
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="bad", max_retries=0).models.list()
    finally:
        interrupt(proc, 20)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
