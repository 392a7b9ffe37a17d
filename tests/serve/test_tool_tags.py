"""Tool calls in the `<tool_call>` tag format of ChatML fine-tunes (Hermes 2 Pro and its kin; vLLM's `hermes`
parser): a tiny ChatML checkpoint whose tokenizer has `<tool_call>` / `</tool_call>` as added tokens and whose
Jinja template shows the tools and writes calls and results as those models were trained; replies scripted (a
random model never writes a call) through Generator.chat / stream_chat and the server."""

from __future__ import annotations

import json

import pytest

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import Generator
from tests.checkpoints import mistral_tokenizer_path
from tests.serve.conftest import Server
from tests.serve.test_tools import scripted_generator

HERMES = """{%- if tools %}<|im_start|>system
You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %} {{ tool | tojson }}{% endfor %} </tools>
For each function call return a json object with function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-dict>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls is defined %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>tool
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
ADDED = {"32000": {"content": "<|im_end|>", "special": True}, "32001": {"content": "<|im_start|>", "special": True},
         "32002": {"content": "<tool_call>", "special": False}, "32003": {"content": "</tool_call>", "special": False}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tag_gen(tmp_path_factory) -> Generator:
    config = {"chat_template": HERMES, "eos_token": "<|im_end|>", "legacy": False, "added_tokens_decoder": ADDED}
    return scripted_generator(tmp_path_factory.mktemp("tags"), 32008, 1024, {
        "tokenizer.model": mistral_tokenizer_path(), "tokenizer_config.json": json.dumps(config),
        "generation_config.json": json.dumps({"eos_token_id": 32000})})


def reply(gen: Generator, text: str, calls: list[dict]) -> list[int]:
    tok = gen.tokenizer
    ids = tok.encode(text, bos=False) if text else []
    for call in calls:
        ids += [32002] + tok.encode("\n" + json.dumps(call) + "\n", bos=False) + [32003]
    return ids + [32000]


def script(gen: Generator, messages, ids, tools=TOOLS) -> None:
    n = len(gen.tokenizer.apply_chat_template(messages, tools=tools))
    gen.backend.script = {n + k: t for k, t in enumerate(ids)}


CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {}}]


def test_calls_are_read_from_the_tags(tag_gen):
    script(tag_gen, ASK, reply(tag_gen, "Let me check.", CALLS))
    out = tag_gen.chat(ASK, tools=TOOLS, max_new_tokens=200)
    assert out.finish_reason == "eos" and out.text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("get_weather", {"city": "Paris"}),
                                                                           ("get_weather", {})]
    events = list(tag_gen.stream_chat(ASK, tools=TOOLS, max_new_tokens=200))  # the call's text held back
    assert "".join(e.text for e in events) == "Let me check." and len(events[-1].output.tool_calls) == 2
    # a call cut by its length is text; text after a closing tag is kept as content, after the text before
    script(tag_gen, ASK, reply(tag_gen, "", CALLS[:1]))
    assert tag_gen.chat(ASK, tools=TOOLS, max_new_tokens=6).tool_calls is None
    script(tag_gen, ASK, reply(tag_gen, "Hm.", CALLS[:1])[:-1] + tag_gen.tokenizer.encode(" Called it.", bos=False)
           + [32000])
    out = tag_gen.chat(ASK, tools=TOOLS, max_new_tokens=200)
    assert len(out.tool_calls) == 1 and out.text == "Hm. Called it."
    events = list(tag_gen.stream_chat(ASK, tools=TOOLS, max_new_tokens=200))
    assert "".join(e.text for e in events) == "Hm. Called it."
    # a stop string whose start is the tag's end holds ">" back: the tag's start is held too, never shown
    script(tag_gen, ASK, reply(tag_gen, "Hi", CALLS[:1]))
    events = list(tag_gen.stream_chat(ASK, tools=TOOLS, max_new_tokens=200, stop_strings=(">>",)))
    assert "".join(e.text for e in events) == "Hi" and events[-1].output.tool_calls
    # ids the model writes (the same twice here) are replaced by fresh ones (results are matched to calls by id)
    twice = [{**CALLS[0], "id": "abcdefghi"}, {**CALLS[0], "id": "abcdefghi"}]
    script(tag_gen, ASK, reply(tag_gen, "", twice))
    ids = [c.id for c in tag_gen.chat(ASK, tools=TOOLS, max_new_tokens=200).tool_calls]
    assert "abcdefghi" not in ids and ids[1] != ids[0] and all(len(i) == 9 for i in ids)


def test_tool_choice_none_shows_the_tools_and_bans_the_tag(tag_gen):
    """"none" in the tag format: the template shows the tools, `<tool_call>` is suppressed (never chosen), and a
    template that shows no tools is served (they are context there)."""
    script(tag_gen, ASK, reply(tag_gen, "Let me check.", CALLS[:1]))
    tag_gen.backend.boost = 60.0
    try:
        out = tag_gen.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=40)
        assert out.stats.prompt_tokens == len(tag_gen.tokenizer.apply_chat_template(ASK, tools=TOOLS))
        assert out.tool_calls is None and 32002 not in out.token_ids and out.text.startswith("Let me check.")
    finally:
        tag_gen.backend.boost = None
    from mixtrt.runtime.chat_template import ChatTemplate

    templates = tag_gen.tokenizer.templates
    hidden = HERMES.replace("{%- if tools %}", "{%- if false %}", 1)  # renders the same with and without tools
    tag_gen.tokenizer.templates = {"default": ChatTemplate(hidden, templates["default"].special_tokens)}
    try:
        with pytest.raises(ConfigError, match="does not show tools"):
            tag_gen.chat(ASK, tools=TOOLS, max_new_tokens=2)
        assert tag_gen.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=2).tool_calls is None
    finally:
        tag_gen.tokenizer.templates = templates


def test_the_next_turn_shows_the_call_and_its_result(tag_gen):
    """The server's reply goes back as OpenAI's client sends it (arguments as JSON text): the template writes the
    call as the model wrote it, and the result as a tool message."""
    script(tag_gen, ASK, reply(tag_gen, "", CALLS[:1]))
    out = tag_gen.chat(ASK, tools=TOOLS, max_new_tokens=200)
    [call] = out.tool_calls
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]
    text = tag_gen.tokenizer.render_chat(turn, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n22 C\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


# Hermes 2 Pro's shape: a named `tool_use` template beside a plain ChatML `default` that cannot render a call
PLAIN = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
         " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_tool_use_template_beside_a_default_one_takes_the_conversation_back(tmp_path):
    """With tools the `tool_use` template renders the conversation (its calls, content None, and results); the check
    that a template shows the tools renders it without them too, which the default cannot: that failure is no
    refusal (it was a 400 / ConfigError naming the default template at the call's message)."""
    config = {"chat_template": [{"name": "default", "template": PLAIN}, {"name": "tool_use", "template": HERMES}],
              "eos_token": "<|im_end|>", "legacy": False, "added_tokens_decoder": ADDED}
    gen = scripted_generator(tmp_path, 32008, 1024, {
        "tokenizer.model": mistral_tokenizer_path(), "tokenizer_config.json": json.dumps(config),
        "generation_config.json": json.dumps({"eos_token_id": 32000})})
    call = {"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "22 C"}]
    script(gen, turn, reply(gen, "It is 22 C.", []))
    out = gen.chat(turn, tools=TOOLS, max_new_tokens=50)
    assert out.text == "It is 22 C." and out.tool_calls is None
    with pytest.raises(ConfigError, match="default"):  # the default template alone cannot take the call back
        gen.tokenizer.apply_chat_template(turn)
    server = Server(gen, tmp_path / "unused")
    try:
        r = server.http.post("/v1/chat/completions", json={"messages": turn, "tools": TOOLS, "max_tokens": 50})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "It is 22 C.", r.text
    finally:
        server.close()


BOUNDED = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
    "additionalProperties": False}}},
           {"type": "function", "function": {"name": "get_time", "parameters": {
               "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
               "additionalProperties": False}}}]


def test_forced_choices_hold_the_model_to_tagged_calls(tag_gen):
    """"required" / a named function: the reply starts with <tool_call> and the rest is held to a grammar (the
    closing tag written as llguidance's <[id]>), so the random model's reply is a call whose arguments validate."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    tag_gen.backend.script = {}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED}
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for extra in ({}, {"do_sample": True, "seed": 3, "temperature": 1.2}):
            # one call (a random model, greedy, may call on and on where more are allowed)
            out = tag_gen.chat(ASK, tools=BOUNDED, tool_choice=choice, parallel_tool_calls=False, max_new_tokens=300,
                               **extra)
            assert out.finish_reason == "eos" and out.tool_calls, out.text
            for call in out.tool_calls:
                assert choice == "required" or call.name == "get_time"
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_the_server_answers_tagged_calls(tag_gen, tmp_path_factory):
    server = Server(tag_gen, tmp_path_factory.mktemp("unused"), max_batch=2, max_queue=4)
    try:
        script(tag_gen, ASK, reply(tag_gen, "", CALLS[:1]))
        r = server.openai.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=100)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
        script(tag_gen, ASK, reply(tag_gen, "Sure.", CALLS[:1]))
        chunks = list(server.openai.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=100,
                                                            stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "Sure."  # no tag, no call text
        assert [json.loads(t.function.arguments) for d in deltas for t in d.tool_calls or []] == [{"city": "Paris"}]
        tag_gen.backend.script = {}
        r = server.openai.chat.completions.create(model="tiny", messages=ASK, tools=BOUNDED, tool_choice="required",
                                                  parallel_tool_calls=False, max_tokens=300)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls
    finally:
        server.close()


def test_random_walks_of_parallel_tagged_calls_read_back(tag_gen):
    """"required" with parallel calls: random logits masked by the guide end in one or more tagged calls that read
    back, each after its own <tool_call>."""
    import numpy as np

    pytest.importorskip("llguidance")
    from mixtrt.runtime.structured import Guide
    from mixtrt.runtime.tool_calls import read_tool_calls, tool_use

    tok = tag_gen.tokenizer
    _, use = tool_use(tok, BOUNDED, "required")
    for seed in range(8):
        guide, rng, ids = Guide(tok, ("grammar", use.grammar), [tok.eos_id]), np.random.default_rng(seed), []
        while len(ids) < 400:
            allowed = guide.allowed()
            ids.append(int(np.argmax(np.where(allowed, rng.standard_normal(allowed.size) * 3, -np.inf))))
            guide.consume(ids[-1])
            if ids[-1] == tok.eos_id:
                break
        reply = read_tool_calls([*use.forced, *ids], tok, use.tokens)
        assert reply is not None and reply.calls and ids.count(32002) == len(reply.calls) - 1, tok.decode(ids)


def test_a_template_decides_between_the_tags_and_tool_calls_token(tag_gen):
    """A ChatML fine-tune of a v3 vocabulary has [TOOL_CALLS] too: its template writes <tool_call>, so the tags are
    read."""
    import copy

    tok = copy.copy(tag_gen.tokenizer)
    tok._by_content = {**tok._by_content, "[TOOL_CALLS]": 5}
    assert tok.tool_tokens().end == 32003


def test_arguments_nested_too_deeply_are_one_error(tag_gen):
    from mixtrt.runtime.errors import ConfigError

    call = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    for arguments in ("[" * 5000, '{"a": ' * 900 + "1" + "}" * 900):  # unreadable; read, and too deep to write
        turn = [*ASK, {"role": "assistant", "tool_calls": [{**call, "function": {**call["function"],
                                                                                "arguments": arguments}}]}]
        with pytest.raises(ConfigError, match="nested too deeply"):
            tag_gen.tokenizer.render_chat(turn, tools=TOOLS)
