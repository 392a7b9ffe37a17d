"""Tool calls read back from a reply's ids, with mistral-common's own encoding of an assistant's calls as the
oracle (the form the models were trained on), for every Mistral format that has calls: v2, v3, v7 (sentencepiece),
tekken v3 / v7, and tekken v11 / v13 (name and [ARGS] per call)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.tool_calls import CALL_ID, ToolCall, check_tools, new_call_id, read_tool_calls, tool_tokens

mistral_common = pytest.importorskip("mistral_common", reason="the Mistral formats need mixtrt[mistral]")
from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get-time", "parameters": {"type": "object", "properties": {}}}}]
CALLS = [ToolCall("a1B2c3D4e", "get_weather", json.dumps({"city": "Zürich", "days": [1, 2]}, ensure_ascii=False)),
         ToolCall("Zz9yY8xX7", "get-time", "{}")]
QUESTION = [{"role": "user", "content": "Weather and time in Zürich?"}]


def tekken_file(tmp_path: Path, version: str) -> Path:
    """tekken_240911.json as a v11 / v13 file: those versions need their special tokens listed ([ARGS], [CALL_ID])."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads((DATA / "tekken_240911.json").read_text())
    data["config"]["version"] = version
    specials = [dict(t, token_str=str(t["token_str"])) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    specials += [{"rank": 20, "token_str": "[ARGS]", "is_control": True},
                 {"rank": 21, "token_str": "[CALL_ID]", "is_control": True}]
    data["special_tokens"] = specials
    path = tmp_path / f"tekken_{version}.json"
    path.write_text(json.dumps(data))
    return path


FILES = ["mistral_instruct_tokenizer_240216.model.v2", "mistral_instruct_tokenizer_240323.model.v3",
         "mistral_instruct_tokenizer_241114.model.v7", "tekken_240718.json", "tekken_240911.json", "v11", "v13"]


@pytest.fixture(scope="module", params=FILES)
def tokenizer(request, tmp_path_factory) -> MistralCommonTokenizer:
    name = request.param
    return MistralCommonTokenizer(tekken_file(tmp_path_factory.mktemp("tekken"), name) if name in ("v11", "v13")
                                  else DATA / name)


def encoded_reply(tok: MistralCommonTokenizer, calls: list[ToolCall], tools=TOOLS) -> list[int]:
    """The ids mistral-common gives an assistant message of `calls` after QUESTION (its eos included)."""
    prompt = tok.apply_chat_template(QUESTION, tools=tools)
    message = {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in calls]}
    whole = tok.apply_chat_template([*QUESTION, message], add_generation_prompt=False, tools=tools)
    assert whole[:len(prompt)] == prompt
    return whole[len(prompt):]


def test_the_calls_mistral_common_encodes_read_back(tokenizer):
    reply = encoded_reply(tokenizer, CALLS)
    assert reply[-1] == tokenizer.eos_id
    read = read_tool_calls(reply, tokenizer)
    assert read is not None and read.content is None
    assert [(c.name, json.loads(c.arguments)) for c in read.calls] == [(c.name, json.loads(c.arguments)) for c in CALLS]
    # every call gets a fresh id of the form the formats take back, never the one the model wrote (vLLM's rule: a
    # model repeats its ids from turn to turn, and results are matched to calls by id)
    assert all(CALL_ID.fullmatch(c.id) for c in read.calls) and not {c.id for c in read.calls} & {c.id for c in CALLS}
    assert len({c.id for c in read.calls}) == len(read.calls)
    again = read_tool_calls(reply[:-1], tokenizer)  # no eos: the same calls, new ids
    assert again is not None and [(c.name, c.arguments) for c in again.calls] == [(c.name, c.arguments)
                                                                                 for c in read.calls]
    # the read calls go back into the conversation: the next turn encodes (mistral-common takes the ids back)
    answered = read.calls[:1] if tokenizer.version == "v2" else read.calls  # v2 takes one result per turn
    answer = [{"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in read.calls]},
              *[{"role": "tool", "tool_call_id": c.id, "name": c.name, "content": "ok"} for c in answered]]
    assert tokenizer.apply_chat_template([*QUESTION, *answer], tools=TOOLS)


def test_text_before_the_calls_is_the_content(tokenizer):
    tokens = tool_tokens(tokenizer)
    assert tokens is not None
    reply = tokenizer.encode("Let me check.", bos=False) + encoded_reply(tokenizer, CALLS[:1])
    read = read_tool_calls(reply, tokenizer)
    assert read is not None and read.content == "Let me check." and [c.name for c in read.calls] == ["get_weather"]


@pytest.mark.parametrize("cut", ["length", "stop", "broken", "no-name", "args-not-object", "text-after", "empty"])
def test_a_reply_whose_calls_do_not_parse_is_text(tokenizer, cut):
    reply = encoded_reply(tokenizer, CALLS)
    tokens = tool_tokens(tokenizer)
    assert tokens is not None
    at = reply.index(tokens.calls)
    if cut == "length":  # max_tokens reached inside the first call's arguments
        reply = reply[:reply.index(tokens.args) + 3] if tokens.args is not None else reply[:at + 6]
    elif cut == "stop":  # nothing after the call token
        reply = reply[:at + 1]
    else:
        body = {"broken": '[{"name": "get_weather", "arguments": {"city": "Par',
                "no-name": '[{"arguments": {}}]', "args-not-object": '[{"name": "get_weather", "arguments": [1]}]',
                "text-after": '[{"name": "get_weather", "arguments": {}}] and more', "empty": "[]"}[cut]
        if tokens.args is not None:  # tekken v11 / v13: name[ARGS]arguments
            body = {"broken": 'get_weather\x00{"city": "Par', "no-name": '\x00{}',
                    "args-not-object": "get_weather\x00[1]", "text-after": "get_weather\x00{} and more",
                    "empty": "get_weather\x00"}[cut]
            name, _, args = body.partition("\x00")
            reply = reply[:at + 1] + tokenizer.encode(name, bos=False) + [tokens.args] + \
                tokenizer.encode(args, bos=False) + [tokenizer.eos_id]
        else:
            reply = reply[:at + 1] + tokenizer.encode(body, bos=False) + [tokenizer.eos_id]
    assert read_tool_calls(reply, tokenizer) is None


def test_v1_and_foreign_templates_have_no_tool_tokens():
    from mixtrt.runtime.tokenizer import Tokenizer

    tok = Tokenizer.load(DATA / "tokenizer.model.v1")
    assert tool_tokens(tok) is None
    assert read_tool_calls([5, 6, 7], tok) is None


def test_a_template_tokenizer_with_tool_calls_token_reads_calls():
    """A checkpoint with a Jinja template over Mistral's v3 sentencepiece model (Mistral-7B-Instruct-v0.3's
    tokenizer.model): [TOOL_CALLS] is one of its control pieces, so its replies read as the v3 file's."""
    from mixtrt.runtime.chat_template import ChatTemplate
    from mixtrt.runtime.jinja_tokenizer import JinjaChatTokenizer
    from mixtrt.runtime.tokenizer import Tokenizer

    sp = Tokenizer.load(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    tok = JinjaChatTokenizer(sp, ChatTemplate("{{ messages[0]['content'] }}", {}))
    v3 = MistralCommonTokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    assert tool_tokens(tok) == tool_tokens(v3)
    reply = encoded_reply(v3, CALLS)
    a, b = read_tool_calls(reply, tok), read_tool_calls(reply, v3)
    assert a is not None and b is not None and a.content == b.content
    assert [(c.name, c.arguments) for c in a.calls] == [(c.name, c.arguments) for c in b.calls]


def test_tools_are_checked_with_the_field_named():
    assert check_tools(None) is None and check_tools([]) is None
    assert check_tools(TOOLS) == TOOLS
    for tools, message in [
        ({"type": "function"}, r"tools: must be a list"),
        (["get_weather"], r"tools\[0\]: must be an object"),
        ([{"type": "retrieval"}], r"tools\[0\]\.type: only \"function\""),
        ([{"type": "function"}], r"tools\[0\]\.function: must be an object"),
        ([{"type": "function", "function": {"name": "get weather"}}], r"tools\[0\]\.function\.name: must be 1-64"),
        ([TOOLS[0], TOOLS[0]], r"tools\[1\]\.function\.name: 'get_weather' is offered twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], r"parameters: must be a JSON schema"),
        # lone surrogates anywhere (a description, a property's name): named, before the tokenizer fails on them
        ([{"type": "function", "function": {"name": "f", "description": "\ud800x"}}],
         r"tools\[0\]\.function\.description is not valid text: character 0"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "\udcff": {"type": "string"}}}}}], r"tools\[0\]\.function\.parameters\.properties key is not valid"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_tools(tools)


def test_call_ids_are_what_the_next_turn_takes():
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(CALL_ID.fullmatch(i) for i in ids)


@pytest.mark.parametrize("name, keeps_text", [("mistral_instruct_tokenizer_240323.model.v3", False),
                                              ("tekken_240718.json", False),
                                              ("mistral_instruct_tokenizer_241114.model.v7", True)])
def test_text_beside_calls_comes_back_where_the_format_holds_it(name, keeps_text):
    """A reply's text before its calls goes back with them from v7 on; v2 / v3 hold text or calls in an assistant
    message, never both (mistral-common refuses both), so there the text is left out."""
    tok = MistralCommonTokenizer(DATA / name)
    calls = [c.to_openai() for c in CALLS[:1]]
    result = [{"role": "tool", "tool_call_id": CALLS[0].id, "content": "ok"}]
    with_text = tok.apply_chat_template([*QUESTION, {"role": "assistant", "content": "Let me look.",
                                                     "tool_calls": calls}, *result], tools=TOOLS)
    without = tok.apply_chat_template([*QUESTION, {"role": "assistant", "content": None, "tool_calls": calls},
                                       *result], tools=TOOLS)
    assert (with_text != without) == keeps_text
    if keeps_text:
        assert "Let me look." in tok.decode(with_text)


def test_v2_results_get_their_calls_names():
    """OpenAI's tool message has the call's id only; v2 shows a result with its function's name: taken from the
    call with that id, so the ids equal mistral-common's for the message with its name given."""
    tok = MistralCommonTokenizer(DATA / "mistral_instruct_tokenizer_240216.model.v2")
    call = {"role": "assistant", "content": None, "tool_calls": [CALLS[0].to_openai()]}
    result = {"role": "tool", "tool_call_id": CALLS[0].id, "content": "22C"}
    ids = tok.apply_chat_template([*QUESTION, call, result], tools=TOOLS)
    assert ids == tok.apply_chat_template([*QUESTION, call, {**result, "name": "get_weather"}], tools=TOOLS)
    assert '"name": "get_weather", "content": "22C"' in tok.decode(ids)


def test_a_file_before_v11_writes_json_calls_whatever_tokens_it_lists(tmp_path):
    """A tekken file of v7 that lists [ARGS] (newer files list a full table) still writes calls as a JSON list:
    its tokens say so, and a named tool_choice's forced start is that list's start."""
    from mixtrt.runtime.tool_calls import tool_use

    path = tekken_file(tmp_path, "v11")
    data = json.loads(path.read_text())
    data["config"]["version"] = "v7"
    path.write_text(json.dumps(data))
    tok = MistralCommonTokenizer(path)
    tokens = tool_tokens(tok)
    assert tokens is not None and (tokens.args, tokens.call_id) == (None, None)
    _, use = tool_use(tok, TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    reply = encoded_reply(tok, CALLS[:1])
    assert reply[:len(use.forced)] == list(use.forced)  # the forced start is the start of the call as written


def test_a_template_that_does_not_show_tools_is_refused():
    from mixtrt.runtime.chat_template import ChatTemplate
    from mixtrt.runtime.jinja_tokenizer import JinjaChatTokenizer
    from mixtrt.runtime.tokenizer import Tokenizer
    from mixtrt.runtime.tool_calls import chat_prompt, tool_use

    sp = Tokenizer.load(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    blind = JinjaChatTokenizer(sp, ChatTemplate("{% for m in messages %}[INST]{{ m['content'] }}[/INST]{% endfor %}"))
    offered, use = tool_use(blind, TOOLS)
    with pytest.raises(ConfigError, match=r"^tools: the checkpoint's chat template does not show tools"):
        chat_prompt(blind, QUESTION, offered, use, add_generation_prompt=True)
    shows = JinjaChatTokenizer(sp, ChatTemplate(
        "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
        "{% for m in messages %}[INST]{{ m['content'] }}[/INST]{% endfor %}"))
    ids = chat_prompt(shows, QUESTION, *tool_use(shows, TOOLS), add_generation_prompt=True)
    assert 6 in ids  # [AVAILABLE_TOOLS] is id 6 in v3: the tools are shown


@pytest.mark.parametrize("name", ["mistral_instruct_tokenizer_240323.model.v3",
                                  "mistral_instruct_tokenizer_241114.model.v7", "tekken_240911.json"])
def test_call_ids_of_another_form_are_mapped_alike_in_call_and_result(name):
    """OpenAI's ids (`call_...`) and a client's own are refused by mistral-common from v3 on: each becomes 9
    characters from its hash, the same in the call and its result, different ids staying different."""
    from mixtrt.runtime.tool_calls import mistral_call_id

    tok = MistralCommonTokenizer(DATA / name)
    foreign = ["call_Hx8fQ2Lz0abc", "call_Hx8fQ2Lz0abd"]
    mapped = [mistral_call_id(i) for i in foreign]
    assert all(CALL_ID.fullmatch(i) for i in mapped) and mapped[0] != mapped[1]
    assert mistral_call_id("a1B2c3D4e") == "a1B2c3D4e" and mistral_call_id(mapped[0]) == mapped[0]

    def talk(ids):
        calls = [{**c.to_openai(), "id": i} for c, i in zip(CALLS, ids, strict=True)]
        return [*QUESTION, {"role": "assistant", "content": None, "tool_calls": calls},
                *[{"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids]]

    assert tok.apply_chat_template(talk(foreign), tools=TOOLS) == tok.apply_chat_template(talk(mapped), tools=TOOLS)


def test_a_forced_call_needs_parameters_it_can_hold_to():
    """"required" / a named function hold the call's arguments to each function's parameters (JSON-list formats):
    a schema llguidance cannot enforce is refused, naming the tool; "auto" shows it as it is."""
    pytest.importorskip("llguidance")
    from mixtrt.runtime.tool_calls import tool_use

    tok = MistralCommonTokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    unique = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    odd = [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": unique}}]
    assert tool_use(tok, odd, "auto")[1].grammar is None
    with pytest.raises(ConfigError, match=r"^tools\[1\]\.function\.parameters: the schema cannot be enforced"):
        tool_use(tok, odd, "required")
    with pytest.raises(ConfigError, match=r"^tools\[1\]\.function\.parameters: the schema cannot be enforced"):
        tool_use(tok, odd, {"type": "function", "function": {"name": "f"}})
    assert tool_use(tok, odd, {"type": "function", "function": {"name": "get_weather"}})[1].grammar is not None
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        assert tool_use(tok, TOOLS, choice)[1].grammar is not None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_choice_holds_every_format_to_a_call(tokenizer, choice):
    """"required" / a named function in every format (the JSON list of v2 / v3 / v7, and tekken v11 / v13's
    name[CALL_ID]id[ARGS]{...} / name[ARGS]{...}, whose control tokens the grammar writes as llguidance's <[id]>):
    random logits masked by the guide always end in a reply read as calls of the offered functions (the named one
    alone) whose arguments their parameters accept."""
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    import numpy as np

    from mixtrt.runtime.structured import Guide
    from mixtrt.runtime.tool_calls import read_tool_calls, tool_use

    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"],
            "additionalProperties": False}
    zone = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}},
             {"type": "function", "function": {"name": "get_time", "parameters": zone}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    _, use = tool_use(tokenizer, tools, choice)
    assert use.grammar is not None and use.forced[0] == use.tokens.calls
    for seed in range(6):
        guide = Guide(tokenizer, ("grammar", use.grammar), [tokenizer.eos_id])
        rng, ids = np.random.default_rng(seed), []
        for _ in range(300):
            allowed = guide.allowed()
            token = int(np.argmax(np.where(allowed, rng.standard_normal(allowed.size) * 3, -np.inf)))
            guide.consume(token)
            ids.append(token)
            if token == tokenizer.eos_id:
                break
        else:
            pytest.fail(f"seed {seed}: no end in 300 tokens")
        reply = read_tool_calls([*use.forced, *ids], tokenizer, use.tokens)
        assert reply is not None and reply.calls, (seed, tokenizer.decode([*use.forced, *ids]))
        for call in reply.calls:
            assert call.name in schemas and (choice == "required" or call.name == "get_time")
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        if choice != "required":
            assert len(reply.calls) == 1
