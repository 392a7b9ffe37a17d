"""Tool calls end to end: OpenAI's `tools` through Generator.chat / stream_chat and the server (the official
`openai` client, streaming and not), on a tiny model with Mistral's v3 tokenizer whose replies are scripted (a
random model never writes a call): the scripted backend runs the real model and then makes the reply's next token
the script's, so everything from the prompt's ids to the response's JSON is the real code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixtrt.runtime.generation import Generator
from mixtrt.runtime.tool_calls import CALL_ID
from tests.checkpoints import make_checkpoint
from tests.serve.conftest import Server

mistral_common = pytest.importorskip("mistral_common", reason="the v3 format needs mixtrt[mistral]")

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "Weather and time in Paris?"}]
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]


class Scripted:
    """The real backend, whose logits then pick the script's token wherever the script has one for the next
    position (script: position -> token id); prompt chunks run as passes of their own."""

    mixed_steps = False

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.script: dict[int, int] = {}
        self.boost: float | None = None  # a number: the script's token gets this much more logit, the rest kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def step(self, cache: Any, input_ids: np.ndarray, start_row: int = 0, last_only: bool = False) -> np.ndarray:
        b, s = input_ids.shape
        before = np.array(cache.lengths[start_row:start_row + b])
        logits = np.array(self._backend.step(cache, input_ids, start_row, last_only))
        for r in range(b):
            for j in range(logits.shape[1]):
                token = self.script.get(int(before[r]) + (s - 1 if last_only else j) + 1)
                if token is not None and self.boost is not None:
                    logits[r, j, token] += self.boost
                elif token is not None:
                    logits[r, j] = -1e4
                    logits[r, j, token] = 1e4
        return logits


def scripted_generator(root: Path, vocab_size: int, max_positions: int, files: dict[str, Path | str]) -> Generator:
    """A tiny exported one-layer model whose checkpoint has `files` (name -> a file to copy, or text to write) as
    its tokenizer files, its replies scripted (Scripted)."""
    from mixtrt.export import export_onnx

    ck = make_checkpoint(root / "ck", "mistral", tokenizer=False, vocab_size=vocab_size, sliding_window=8,
                         max_position_embeddings=max_positions, num_hidden_layers=1, hidden_size=32,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=48)
    for name, source in files.items():
        if isinstance(source, Path):
            shutil.copy(source, ck / name)
        else:
            (ck / name).write_text(source)
    gen = Generator.load(export_onnx(ck, root / "art", progress=None), threads=1)
    return Generator(Scripted(gen.backend), gen.tokenizer, gen.defaults)


@pytest.fixture(scope="module")
def tool_gen(tmp_path_factory) -> Generator:
    return scripted_generator(tmp_path_factory.mktemp("tools"), 32768, 512, {"tokenizer.model.v3": V3})


def reply_ids(gen: Generator, text: str = "I'll check.", calls: list[dict[str, Any]] | None = CALLS) -> list[int]:
    tok = gen.tokenizer
    ids = tok.encode(text, bos=False) if text else []
    if calls is not None:
        ids += [tok.tool_tokens().calls] + tok.encode(json.dumps(calls), bos=False)
    return ids + [tok.eos_id]


def script(gen: Generator, messages: list[dict[str, Any]], reply: list[int], tools: Any = TOOLS, forced: int = 0
           ) -> int:
    """The reply scripted after the prompt the messages (and tools) make, and `forced` ids a tool_choice put after
    it; returns the prompt's length."""
    n = len(gen.tokenizer.apply_chat_template(messages, tools=tools)) + forced
    gen.backend.script = {n + k: t for k, t in enumerate(reply)}
    return n


def test_generator_chat_reads_the_calls(tool_gen):
    script(tool_gen, MESSAGES, reply_ids(tool_gen))
    out = tool_gen.chat(MESSAGES, tools=TOOLS, max_new_tokens=200)
    assert out.finish_reason == "eos" and out.text == "I'll check."
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [(c["name"], c["arguments"]) for c in CALLS]
    assert all(CALL_ID.fullmatch(c.id) for c in out.tool_calls)
    # streamed: the text before the call, nothing of the call's JSON, and the calls with the output
    events = list(tool_gen.stream_chat(MESSAGES, tools=TOOLS, max_new_tokens=200))
    assert "".join(e.text for e in events) == "I'll check."
    assert [c.name for c in events[-1].output.tool_calls] == ["get_weather", "get_time"]
    # without tools the same reply is text (the call token hidden, its JSON shown) and no calls are read
    script(tool_gen, MESSAGES, reply_ids(tool_gen), tools=None)
    out = tool_gen.chat(MESSAGES, max_new_tokens=200)
    assert out.tool_calls is None and out.text.startswith("I'll check.") and '"get_weather"' in out.text
    # cut by its length inside the call: text, streamed whole
    script(tool_gen, MESSAGES, reply_ids(tool_gen))
    out = tool_gen.chat(MESSAGES, tools=TOOLS, max_new_tokens=12)
    assert out.finish_reason == "length" and out.tool_calls is None and '[{"name' in out.text
    events = list(tool_gen.stream_chat(MESSAGES, tools=TOOLS, max_new_tokens=12))
    assert "".join(e.text for e in events) == out.text


def test_an_eos_that_is_text_is_not_text_after_the_calls(tool_gen):
    """An eos id that decodes to text (generation_config.json may list a text piece) ends the reply and is not read
    as text after its calls, as it is not text in a reply without tools."""
    tok = tool_gen.tokenizer
    bang = tok.encode("!", bos=False)[-1]
    script(tool_gen, MESSAGES, reply_ids(tool_gen)[:-1] + [bang])
    out = tool_gen.chat(MESSAGES, tools=TOOLS, max_new_tokens=200, eos_token_id=(tok.eos_id, bang))
    assert out.finish_reason == "eos" and out.token_ids[-1] == bang and out.text == "I'll check."
    assert [c.name for c in out.tool_calls] == ["get_weather", "get_time"]
    events = list(tool_gen.stream_chat(MESSAGES, tools=TOOLS, max_new_tokens=200, eos_token_id=(tok.eos_id, bang)))
    assert "".join(e.text for e in events) == "I'll check." and events[-1].output.text == "I'll check."


# the tools of the forced calls on v1 (the random model's JSON held to them; an enum keeps its strings short)
ENUM_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"]}}},
              TOOLS[1]]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_tools_need_a_format_with_tool_calls(generator):
    """The shared tiny model has the v1 tokenizer: it has no [TOOL_CALLS], so "auto" is refused by name."""
    from mixtrt.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^tools: the model's chat format has no tool-call token"):
        generator.chat(MESSAGES, tools=TOOLS)
    with pytest.raises(ConfigError, match=r"tools\[0\]\.function\.name"):
        generator.chat(MESSAGES, tools=[{"type": "function", "function": {"name": "a b"}}])


@pytest.fixture(scope="module")
def tool_server(tool_gen, tmp_path_factory):
    s = Server(tool_gen, tmp_path_factory.mktemp("unused"), max_batch=4, max_queue=8)
    yield s
    s.close()


def test_server_returns_tool_calls(tool_server, tool_gen):
    n = script(tool_gen, MESSAGES, reply_ids(tool_gen))
    r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, n=2)
    assert r.usage.prompt_tokens == n
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content == "I'll check."
        calls = choice.message.tool_calls
        assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            [("function", c["name"], c["arguments"]) for c in CALLS]
        assert all(CALL_ID.fullmatch(c.id) for c in calls)
    # the calls and their results go back as the conversation goes on: rendered, and answered in text
    calls = r.choices[0].message.tool_calls
    results = {"get_weather": "22C", "get_time": "noon"}
    messages = [*MESSAGES, r.choices[0].message.model_dump(exclude_none=True),
                *[{"role": "tool", "tool_call_id": c.id, "content": results[c.function.name]} for c in calls]]
    script(tool_gen, messages, reply_ids(tool_gen, "22C at noon.", calls=None))
    r2 = tool_server.openai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
    assert (r2.choices[0].finish_reason, r2.choices[0].message.content, r2.choices[0].message.tool_calls) == \
        ("stop", "22C at noon.", None)
    # a reply without a call needs no content-less form either: no content, only a call
    script(tool_gen, MESSAGES, reply_ids(tool_gen, ""))
    r3 = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                                    parallel_tool_calls=False)
    assert r3.choices[0].message.content is None
    assert [c.function.name for c in r3.choices[0].message.tool_calls] == ["get_weather"]


def test_server_streams_tool_calls(tool_server, tool_gen):
    script(tool_gen, MESSAGES, reply_ids(tool_gen))
    stream = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, stream=True,
                                                        stream_options={"include_usage": True})
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:  # joined by index, as OpenAI's clients join them
                got = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                got["id"] += call.id or ""
                got["name"] += call.function.name or ""
                got["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert content == "I'll check." and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [(c["name"], c["arguments"])
                                                                                 for c in CALLS]
    assert all(CALL_ID.fullmatch(c["id"]) for c in calls.values())
    # cut by max_tokens inside the call: the held text comes out as content, finish "length"
    stream = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, stream=True,
                                                        max_tokens=12)
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(not c.choices[0].delta.tool_calls for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("I'll check.") and '[{"name' in text


def test_tool_choice_none_shows_the_tools_and_bans_the_call(tool_server, tool_gen):
    """"none": the prompt shows the tools (OpenAI's and vLLM's), and the call token is suppressed (never chosen,
    whatever the caller's logit_bias for it): a reply scripted to call, its tokens 2e4 logits ahead, writes another
    token there instead."""
    calls = tool_gen.tokenizer.tool_tokens().calls
    n = script(tool_gen, MESSAGES, reply_ids(tool_gen))
    try:
        out = tool_gen.chat(MESSAGES, tools=TOOLS, max_new_tokens=60)  # "auto": the scripted call
        assert [c.name for c in out.tool_calls] == ["get_weather", "get_time"]
        for bias in ({}, {calls: 100}):
            out = tool_gen.chat(MESSAGES, tools=TOOLS, tool_choice="none", max_new_tokens=60, logit_bias=bias)
            assert out.stats.prompt_tokens == n and out.tool_calls is None and calls not in out.token_ids
            assert out.text.startswith("I'll check.") and '"get_weather"' in out.text  # the rest as scripted
        r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                                       tool_choice="none", logit_bias={str(calls): 100}, temperature=0)
        assert r.usage.prompt_tokens == n and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == out.text  # banned there too
        [unbanned] = tool_gen.generate([tool_gen.tokenizer.apply_chat_template(MESSAGES, tools=TOOLS)],
                                       max_new_tokens=60)  # the same prompt, no ban: the scripted call token
        assert calls in unbanned.token_ids and out.text != unbanned.text
        chunks = list(tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                                                 max_tokens=60, tool_choice="none", stream=True,
                                                                 temperature=0))
        assert all(not c.choices[0].delta.tool_calls for c in chunks if c.choices)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    finally:
        tool_gen.backend.boost = None
    # /tokenize shows the tools as the chat endpoint does, its tool_choice too: "none" the same ids, a forced
    # choice's start after them
    tok = tool_gen.tokenizer
    for choice in (None, "none"):
        body = {"messages": MESSAGES, "tools": TOOLS, **({"tool_choice": choice} if choice else {})}
        got = tool_server.http.post("/tokenize", json=body).json()
        assert got["tokens"] == tok.apply_chat_template(MESSAGES, tools=TOOLS) and got["count"] == n
    got = tool_server.http.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"})
    assert got.json()["tokens"] == tok.apply_chat_template(MESSAGES, tools=TOOLS) + [calls]
    r = tool_server.http.post("/tokenize", json={"prompt": "Hi", "tool_choice": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_the_artifacts_suppress_tokens_stay_beside_the_none_ban(tool_gen, tmp_path):
    """An artifact's own suppress_tokens (generation_config.json) apply to every reply, and under tool_choice "none"
    beside the call token: neither is chosen, through Generator.chat and the server, though the script puts both."""
    import dataclasses

    tok = tool_gen.tokenizer
    text = tok.encode("I'll check!", bos=False)
    calls, bang = tok.tool_tokens().calls, text[-1]  # the "!" piece
    gen = Generator(tool_gen.backend, tok, dataclasses.replace(tool_gen.defaults, suppress_tokens=(bang,)))
    reply = text + [calls] + tok.encode(json.dumps(CALLS), bos=False) + [tok.eos_id]
    script(tool_gen, MESSAGES, reply)
    out = gen.chat(MESSAGES, tools=TOOLS, tool_choice="none", max_new_tokens=60)
    assert calls not in out.token_ids and bang not in out.token_ids and out.text.startswith("I'll check")
    plain = gen.generate([tok.apply_chat_template(MESSAGES, tools=TOOLS)], max_new_tokens=60)[0]  # no tools asked
    assert bang not in plain.token_ids and calls in plain.token_ids
    server = Server(gen, tmp_path, max_batch=2, max_queue=2)
    try:
        r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none",
                                                           "max_tokens": 60, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == out.text
    finally:
        server.close()


def test_tool_choice_forces_a_call(tool_server, tool_gen):
    """"required" starts the reply with [TOOL_CALLS]; a named function also writes the call up to its arguments
    (as mistral-common writes a call: the rest of the reply tokenizes as the whole call would)."""
    tok = tool_gen.tokenizer
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    whole = tok.encode(call, bos=False)
    start = tok.encode('[{"name": "get_weather", "arguments":', bos=False)
    assert whole[:len(start)] == start  # the forced start is a prefix of the call's own tokens
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, forced in (("required", 1), (named, 1 + len(start))):
        rest = ([tok.tool_tokens().calls] + whole)[forced:] + [tok.eos_id]
        n = script(tool_gen, MESSAGES, rest, forced=forced)
        out = tool_gen.chat(MESSAGES, tools=TOOLS, tool_choice=choice, max_new_tokens=100)
        assert out.text == "" and [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == \
            [("get_weather", {"city": "Paris"})]
        r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice)
        assert r.usage.prompt_tokens == n and r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
        chunks = list(tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                                                 tool_choice=choice, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == ""
        assert [json.loads(t.function.arguments) for d in deltas for t in d.tool_calls or []] == [{"city": "Paris"}]


def test_a_forced_call_refuses_a_reply_of_another_form(tool_server, tool_gen):
    """tool_choice "required" makes the reply a call: a regex / choice / grammar for the reply is refused naming it,
    in Python and in the server (a JSON response format yields to the call: OpenAI's rule)."""
    from mixtrt.runtime.errors import ConfigError

    pytest.importorskip("llguidance", reason="forced calls and structured output need mixtrt[structured]")
    for name, value in (("regex", "[a-z]+"), ("choice", ("a", "b")), ("grammar", 'start: "x"')):
        with pytest.raises(ConfigError, match=rf"asks for a call, and {name} for a reply of its own form"):
            tool_gen.chat(MESSAGES, tools=TOOLS, tool_choice="required", max_new_tokens=5, **{name: value})
    for extra, param in (({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs"),
                         ({"guided_choice": ["a", "b"]}, "guided_choice"), ({"grammar": 'root ::= "x"'}, "grammar")):
        r = tool_server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS,
                                                                "tool_choice": "required", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "asks for a call" in r.json()["error"]["message"]
    # a forced call ends with eos: ignore_eos leaves none, named as the tool_choice (not a field never sent)
    for extra in ({}, {"response_format": {"type": "json_object"}}):
        r = tool_server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, **extra,
                                                                "tool_choice": "required", "ignore_eos": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
        assert r.json()["error"]["message"].startswith("tool_choice: the reply ends with an eos id"), r.text


@pytest.mark.parametrize("body, param, message", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice",
     "the function 'get_news' is not one of the tools given"),
    ({"tool_choice": "any"}, "tool_choice", 'tool_choice: must be "auto", "none", "required" or'),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", 'tool_choice: "required" needs tools'),
    ({"tool_choice": "required", "messages": [*MESSAGES, {"role": "assistant", "content": "Sure"}],
      "add_generation_prompt": False, "continue_final_message": True}, "tool_choice", "starts the assistant's reply"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools",
     r"tools[0].function.name: must be 1-64"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools", 'tools[0].type: only "function" tools'),
    ({"tools": "get_weather"}, "tools", "tools: Input should be a valid list"),
])
def test_bad_tools_are_400s_naming_the_field(tool_server, body, param, message):
    r = tool_server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_forced_calls_where_the_format_has_no_call_tokens(generator):
    """v1 cannot write a call of its own: a forced tool_choice is served as vLLM forces it, the whole reply held to
    the call's JSON (a named function's arguments, "required"'s list of calls) and read as the call; the prompt is
    the conversation's (v1 cannot show tools)."""
    plain = generator.chat(MESSAGES, max_new_tokens=1, do_sample=False)
    for choice, names in ((NAMED, {"get_weather"}), ("required", {"get_weather", "get_time"})):
        out = generator.chat(MESSAGES, tools=ENUM_TOOLS, tool_choice=choice, parallel_tool_calls=False,
                             max_new_tokens=48, do_sample=False)
        assert out.text == "" and out.stats.prompt_tokens == plain.stats.prompt_tokens, choice
        [call] = out.tool_calls
        assert call.name in names and CALL_ID.fullmatch(call.id)
        arguments = json.loads(call.arguments)
        assert arguments == {} if call.name == "get_time" else arguments["city"] in ("Paris", "Rome")
        # streamed: no text (the reply is the call), the same call
        events = list(generator.stream_chat(MESSAGES, tools=ENUM_TOOLS, tool_choice=choice, parallel_tool_calls=False,
                                            max_new_tokens=48, do_sample=False))
        assert "".join(e.text for e in events) == ""
        [again] = events[-1].output.tool_calls
        assert (again.name, again.arguments) == (call.name, call.arguments)
    # the raw reply of "required" is a JSON list of {"name", "arguments"} objects: cut by its length, it is text
    out = generator.chat(MESSAGES, tools=ENUM_TOOLS, tool_choice="required", max_new_tokens=6, seed=3)
    assert out.tool_calls is None and out.finish_reason == "length" and len(out.text) > 4
    assert '[{"name": "get_weather", "arguments": '.startswith(out.text) or '[{"name": "get_time"'.startswith(out.text)


def test_tools_refused_where_the_format_has_no_calls(server):
    r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "no tool-call token ([TOOL_CALLS])" in r.json()["error"]["message"]
    # with tool_choice "none" a format that cannot call tools shows none: served, and tokenized
    r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none",
                                                       "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = server.http.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"})
    assert r.status_code == 200 and r.json()["tokens"] == \
        server.http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    # a forced choice is served, the reply held to the call's JSON (whole and streamed, as the openai client reads it)
    for choice in (NAMED, "required"):
        kw = dict(model="tiny", messages=MESSAGES, tools=ENUM_TOOLS, tool_choice=choice, parallel_tool_calls=False,
                  max_tokens=48, temperature=0)
        whole = server.openai.chat.completions.create(**kw).choices[0]
        assert whole.finish_reason == "tool_calls" and not whole.message.content
        [call] = whole.message.tool_calls
        assert call.function.name in ("get_weather", "get_time") and CALL_ID.fullmatch(call.id)
        chunks = list(server.openai.chat.completions.create(stream=True, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not "".join(d.content or "" for d in deltas)
        [streamed] = [t for d in deltas for t in d.tool_calls or ()]
        assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
        last = [c.choices[0] for c in chunks if c.choices][-1]  # the finish in a chunk of its own, as OpenAI's
        assert last.finish_reason == "tool_calls" and not last.delta.tool_calls and not last.delta.content
        with server.openai.chat.completions.stream(**kw) as stream:  # the SDK's helper: every call is done
            events = [e.type for e in stream]
        assert events.count("tool_calls.function.arguments.done") == 1, events


def test_a_forced_call_over_too_many_tools_is_a_400(server):
    """A forced call's grammar is compiled on the request's thread, after the checks that cost nothing (a prompt too
    long is refused first), its refusal a 400 naming tools (it was the engine loop's, a 500 logged as finished). v1
    does not show tools, so 2,100 of them leave the prompt short."""
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
             for i in range(2100)]
    r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": tools, "tool_choice": "required",
                                                       "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert "cannot be enforced over these tools" in r.json()["error"]["message"]
    assert server.openai.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2


def test_streams_and_replies_agree(tool_server, tool_gen):
    """Streamed and whole replies say the same: text a stop string held back before the call (it comes out only
    after the call token), whitespace before a call, a forced start's text when the call does not parse."""
    cases = [("I'll check Paris", {"stop": ["Paris!"]}, "I'll check Paris", "tool_calls"),
             ("\n\n", {}, "\n\n", "tool_calls")]
    for text, extra, content, finish in cases:
        script(tool_gen, MESSAGES, reply_ids(tool_gen, text, CALLS[:1]))
        kw = {"stop_strings": tuple(extra["stop"])} if "stop" in extra else {}
        out = tool_gen.chat(MESSAGES, tools=TOOLS, max_new_tokens=200, **kw)
        streamed = list(tool_gen.stream_chat(MESSAGES, tools=TOOLS, max_new_tokens=200, **kw))
        r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, **extra)
        chunks = [c.choices[0] for c in tool_server.openai.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, stream=True, **extra) if c.choices]
        assert out.text == "".join(e.text for e in streamed) == content, text
        assert r.choices[0].message.content == "".join(c.delta.content or "" for c in chunks) == content, text
        assert r.choices[0].finish_reason == chunks[-1].finish_reason == finish
    # a named call cut by max_tokens: the text is the call's JSON from its start, the forced part included
    tok = tool_gen.tokenizer
    whole = tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', bos=False)
    start = tok.encode('[{"name": "get_weather", "arguments":', bos=False)
    named = {"type": "function", "function": {"name": "get_weather"}}
    script(tool_gen, MESSAGES, whole[len(start):] + [tok.eos_id], forced=1 + len(start))
    cut = '[{"name": "get_weather", "arguments": {"city":'
    assert tool_gen.chat(MESSAGES, tools=TOOLS, tool_choice=named, max_new_tokens=3).text == cut
    assert "".join(e.text for e in tool_gen.stream_chat(MESSAGES, tools=TOOLS, tool_choice=named,
                                                        max_new_tokens=3)) == cut
    r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                                   max_tokens=3)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "length")
    chunks = [c.choices[0] for c in tool_server.openai.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=named, max_tokens=3, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == cut


def test_parallel_tool_calls_false_in_python(tool_gen):
    script(tool_gen, MESSAGES, reply_ids(tool_gen))
    out = tool_gen.chat(MESSAGES, tools=TOOLS, parallel_tool_calls=False)
    assert [c.name for c in out.tool_calls] == ["get_weather"]
    events = list(tool_gen.stream_chat(MESSAGES, tools=TOOLS, parallel_tool_calls=False))
    assert [c.name for c in events[-1].output.tool_calls] == ["get_weather"]


def test_tokenize_and_null_tool_fields(tool_server, tool_gen):
    r = tool_server.http.post("/tokenize", json={"prompt": "Hi", "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    # null is a field left out, inside a tool as in the request
    bare = [{"type": "function", "function": {"name": "get_time", "description": None, "parameters": None}}]
    script(tool_gen, MESSAGES, reply_ids(tool_gen, "", CALLS[1:]), tools=[
        {"type": "function", "function": {"name": "get_time"}}])
    r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=bare)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]


def test_a_named_choice_is_one_call_and_unknown_functions_are_text(tool_server, tool_gen):
    """tool_choice naming a function returns that one call (OpenAI's), even when the model goes on to call
    another; a reply calling a function that was not offered is text, never a call."""
    tok = tool_gen.tokenizer
    whole = tok.encode(json.dumps(CALLS), bos=False)
    start = tok.encode('[{"name": "get_weather", "arguments":', bos=False)
    assert whole[:len(start)] == start
    named = {"type": "function", "function": {"name": "get_weather"}}
    script(tool_gen, MESSAGES, whole[len(start):] + [tok.eos_id], forced=1 + len(start))
    out = tool_gen.chat(MESSAGES, tools=TOOLS, tool_choice=named)
    assert [c.name for c in out.tool_calls] == ["get_weather"]
    r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=named)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    script(tool_gen, MESSAGES, reply_ids(tool_gen, "", [{"name": "launch", "arguments": {}}]))
    out = tool_gen.chat(MESSAGES, tools=TOOLS)
    assert out.tool_calls is None and '"launch"' in out.text
    r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
    assert r.choices[0].finish_reason == "stop" and '"launch"' in r.choices[0].message.content


def test_a_forced_call_wins_over_a_response_format(tool_server, tool_gen):
    """A forced tool_choice makes the reply a call, which has no content for a response format to shape (OpenAI's
    rule; openai-agents sends both): the call is made, in Python and in the server."""
    pytest.importorskip("llguidance")
    tok = tool_gen.tokenizer
    script(tool_gen, MESSAGES, tok.encode(json.dumps(CALLS[:1]), bos=False) + [tok.eos_id], forced=1)
    out = tool_gen.chat(MESSAGES, tools=TOOLS, tool_choice="required", json_schema={"type": "object"})
    assert [c.name for c in out.tool_calls] == ["get_weather"]
    r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                                   response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "tool_calls"


def test_forced_calls_hold_arguments_to_objects_and_name_only_the_chosen_tool():
    """parameters without a type are objects (their keywords apply to objects); a schema of other types only is
    refused for a forced choice, naming the tool; a named choice reads only the chosen tool's schema."""
    pytest.importorskip("llguidance")
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer
    from mixtrt.runtime.tool_calls import tool_use

    tok = MistralCommonTokenizer(V3)
    untyped = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "integer"}},
                                                                           "required": ["x"]}}}
    text = {"type": "function", "function": {"name": "g", "parameters": {"type": "string"}}}
    broken = {"type": "function", "function": {"name": "h", "parameters": {"type": "string", "pattern": "(?=a)"}}}
    assert '"type": "object"' in tool_use(tok, [untyped], "required")[1].grammar
    with pytest.raises(ConfigError, match=r"^tools\[1\]\.function\.parameters: a call's arguments are a JSON object"):
        tool_use(tok, [untyped, text], "required")
    named = {"type": "function", "function": {"name": "f"}}
    assert tool_use(tok, [untyped, broken], named)[1].grammar is not None


def test_forced_calls_are_held_to_the_functions_parameters(tool_server, tool_gen):
    """tool_choice "required" / a named function on the model's own (random) logits, no script: every reply is a
    call of an offered function whose arguments the function's `parameters` schema accepts (the JSON-list form is
    held to a grammar), as vLLM's guided decoding gives; jsonschema is the oracle."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    strict = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                   "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
                   "minimum": 1, "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}}},
              {"type": "function", "function": {"name": "get_time", "parameters": {
                   "type": "object", "properties": {}, "additionalProperties": False}}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in strict}
    tool_gen.backend.script = {}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        for seed in range(3):
            out = tool_gen.chat(MESSAGES, tools=strict, tool_choice=choice, max_new_tokens=120, do_sample=True,
                                seed=seed, temperature=1.5)
            assert out.tool_calls, (choice, seed, out.text)
            for call in out.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            assert choice == "required" or [c.name for c in out.tool_calls] == ["get_weather"]
        r = tool_server.openai.chat.completions.create(model="tiny", messages=MESSAGES, tools=strict,
                                                       tool_choice=choice, n=2, temperature=1.2, seed=5, max_tokens=120)
        for c in r.choices:
            assert c.finish_reason == "tool_calls", c.message
            for call in c.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_responses_route_reads_calls_and_takes_them_back(tool_server, tool_gen):
    """/v1/responses on a format with calls: a reply of text then calls is a message item and a function_call item
    per call (streamed: the text's events, then each call's), and an agent's next turn, the output fed back as input
    with the results, is served as the chat route serves the same conversation."""
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    script(tool_gen, MESSAGES, reply_ids(tool_gen))
    r = tool_server.openai.responses.create(model="tiny", input=MESSAGES, tools=tools, max_output_tokens=200)
    assert [item.type for item in r.output] == ["message", "function_call", "function_call"]
    assert r.output_text == "I'll check." and r.status == "completed"
    assert [(c.name, json.loads(c.arguments)) for c in r.output[1:]] == [(c["name"], c["arguments"]) for c in CALLS]
    with tool_server.openai.responses.stream(model="tiny", input=MESSAGES, tools=tools, max_output_tokens=200) as s:
        events = list(s)
        final = s.get_final_response()
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    kinds = [e.type for e in events]
    assert kinds.index("response.output_text.done") < kinds.index("response.function_call_arguments.done")
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == [0, 1, 2]
    # the next turn: the output as input, each call's result after it
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny" if n == 0 else "noon"}
               for n, c in enumerate(r.output[1:])]
    turn = [*MESSAGES, *[item.to_dict() for item in r.output], *results]
    script(tool_gen, MESSAGES, [])
    again = tool_server.openai.responses.create(model="tiny", input=turn, tools=tools, max_output_tokens=3)
    chat = tool_server.openai.chat.completions.create(model="tiny", max_tokens=3, tools=TOOLS, messages=[
        *MESSAGES, {"role": "assistant", "content": "I'll check.", "tool_calls": [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in r.output[1:]]},
        *[{"role": "tool", "tool_call_id": x["call_id"], "content": x["output"]} for x in results]])
    assert again.usage.input_tokens == chat.usage.prompt_tokens and again.status in ("completed", "incomplete")
