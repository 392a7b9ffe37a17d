"""Jinja chat templates: rendered text and ids equal transformers' apply_chat_template on tiny checkpoints
(tokenizer.model + tokenizer_config.json); errors name the message; decode hides control tokens."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest

from mixtrt.runtime.chat_format import ChatFormat, load_chat_tokenizer, resolve_chat_format
from mixtrt.runtime.chat_template import ChatTemplate, first_failing_message
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.jinja_tokenizer import AddedToken, JinjaChatTokenizer
from mixtrt.runtime.tokenizer import Tokenizer
from tests.runtime.test_tokenizer import V01_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")
mistral_common = pytest.importorskip("mistral_common")
DATA = Path(mistral_common.__file__).parent / "data"
V1, V3 = DATA / "tokenizer.model.v1", DATA / "mistral_instruct_tokenizer_240323.model.v3"

# Shaped like Mistral-7B-Instruct-v0.3's template: system prompt folded into the last user turn, roles
# checked with a namespace counter (tool turns skipped), tools as [AVAILABLE_TOOLS] before the last user
# turn (tojson, loop.last, selectattr), tool calls with 9-character ids, raise_exception on anything else.
MISTRAL_TOOLS_TEMPLATE = """
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace(index=0) %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.tool_calls is defined) %}
        {%- if (message.role == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, roles must alternate user/assistant") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message.role == "user" %}
        {%- if tools is not none and message == user_messages[-1] %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- tool | tojson }}
                {%- if not loop.last %}{{- ", " }}{%- endif %}
            {%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if message == user_messages[-1] and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message.content + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message.content + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined %}
        {{- "[TOOL_CALLS] [" }}
        {%- for call in message.tool_calls %}
            {%- if call.id is not defined or call.id | length != 9 %}
                {{- raise_exception("Tool call ids must be 9 characters") }}
            {%- endif %}
            {{- call.function | tojson }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message.role == "assistant" %}
        {{- " " + message.content | trim + eos_token }}
    {%- elif message.role == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content | tojson + ', "call_id": "' + message.tool_call_id }}
        {{- '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user, assistant and tool roles are supported, after an optional system message") }}
    {%- endif %}
{%- endfor %}
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_ADDED = {
    "0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
    "2": {"content": "</s>", "special": True},
    "32000": {"content": "<|im_end|>", "special": True},
    "32001": {"content": "<|im_start|>", "special": False},
}

# Loops, loop.last / loop.index, a namespace, dict(), tojson with options, a {% generation %} block,
# {% break %} from loopcontrols, tests on missing keys.
LOOPS_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(turns=0, names=[]) %}
{%- for m in messages %}
{%- set ns.turns = ns.turns + 1 %}
<{{ m.role }} n={{ loop.index }}{% if loop.last %} last{% endif %}>
{%- if m.role == "assistant" %}{% generation %}{{ m.content }}{% endgeneration %}{{ eos_token }}
{%- else %}{{ m.content }}{% endif %}
{%- if m.meta is defined %} {{ m.meta | tojson(sort_keys=true) }}{% endif %}
{%- if m.role == "stop" %}{% break %}{% endif %}
{%- endfor %}
{%- if tools %} tools={{ tools | map(attribute="function.name") | list | tojson }}{% endif %}
{{ dict(turns=ns.turns, generation=add_generation_prompt) | tojson(separators=(",", ":")) }}
{%- if add_generation_prompt %}[INST]{% endif %}"""

TALK = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is your favourite condiment?", "meta": {"lang": "en", "tags": ["é", 1]}},
    {"role": "assistant", "content": "Lemon juice, squeezed fresh."},
    {"role": "user", "content": "Do you have mayonnaise recipes? 🥚 Réponds en français."},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_TALK = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "22 C, sunny"},
    {"role": "assistant", "content": "Sunny, 22 C."},
    {"role": "user", "content": "And in Zürich?"},
]


def _checkpoint(root: Path, name: str, model: Path, config: dict, jinja: str | None = None) -> Path:
    d = root / name
    d.mkdir()
    shutil.copy(model, d / "tokenizer.model")
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False}
    (d / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    # a model config beside it, as every checkpoint has: transformers then builds the tokenizer from tokenizer.model's
    # protobuf with the checkpoint's rules (legacy by default), which are what an artifact follows; without it,
    # tokenizer_class LlamaTokenizer alone takes another path (legacy off by default, add_prefix_space read)
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja)
    return d


def _ours(checkpoint: Path, root: Path) -> JinjaChatTokenizer:
    """What an artifact would load: the resolved files copied, the record through JSON."""
    fmt = resolve_chat_format(checkpoint)
    art = root / (checkpoint.name + "-artifact")
    art.mkdir()
    for name, source in fmt.files.items():
        shutil.copyfile(source, art / name)
    tok = load_chat_tokenizer(art, ChatFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))))
    assert isinstance(tok, JinjaChatTokenizer)
    return tok


CHECKPOINTS = {  # name: (tokenizer.model, tokenizer_config.json additions, chat_template.jinja)
    "mistral-v3-tools": (V3, {"chat_template": MISTRAL_TOOLS_TEMPLATE}, None),
    "mistral-v1-tools": (V1, {"chat_template": MISTRAL_TOOLS_TEMPLATE, "legacy": True}, None),
    "v3-not-legacy": (V3, {"chat_template": MISTRAL_TOOLS_TEMPLATE, "legacy": False}, None),  # v0.3's config
    "v01-legacy": (V1, {"chat_template": V01_CHAT_TEMPLATE, "legacy": True}, None),
    "v01-no-prefix": (V1, {"chat_template": V01_CHAT_TEMPLATE, "add_prefix_space": False}, None),
    "chatml": (V1, {"chat_template": "{{ unused }}", "eos_token": "<|im_end|>",
                    "added_tokens_decoder": CHATML_ADDED}, CHATML_TEMPLATE),  # the .jinja file wins
    "loops-v3": (V3, {"chat_template": [{"name": "default", "template": LOOPS_TEMPLATE},
                                        {"name": "tool_use", "template": "[AVAILABLE_TOOLS]" + LOOPS_TEMPLATE}]},
                 None),
}
CONVERSATIONS = {
    "talk": (TALK, None),
    "short": (TALK[1:2], None),
    "closed": (TALK[:3], None),
    "tools": (TOOL_TALK, [WEATHER]),
    "stop": ([TALK[1], {"role": "stop", "content": "."}, TALK[3]], None),
}
APPLIES = {  # which conversations each checkpoint's template accepts
    "mistral-v3-tools": ["talk", "short", "closed", "tools"],
    "mistral-v1-tools": ["talk", "tools"],
    "v3-not-legacy": ["talk", "short", "tools"],
    "v01-legacy": ["talk", "short", "closed"],
    "v01-no-prefix": ["talk", "closed"],
    "chatml": ["talk", "short", "closed"],
    "loops-v3": ["talk", "closed", "tools", "stop"],
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (ours, transformers' tokenizer) for every checkpoint."""
    root = tmp_path_factory.mktemp("chat_checkpoints")
    out = {}
    for name, (model, config, jinja) in CHECKPOINTS.items():
        d = _checkpoint(root, name, model, config, jinja)
        out[name] = _ours(d, root), transformers.AutoTokenizer.from_pretrained(d)
    return out


CASES = [(c, v) for c, vs in APPLIES.items() for v in vs]


@pytest.mark.parametrize("checkpoint,conversation", CASES, ids=[f"{c}-{v}" for c, v in CASES])
def test_render_and_ids_equal_transformers(pairs, checkpoint, conversation):
    ours, hf = pairs[checkpoint]
    messages, tools = CONVERSATIONS[conversation]
    for add in (True, False):
        text = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add, tokenize=False)
        assert ours.render_chat(messages, add_generation_prompt=add, tools=tools) == text
        ids = ours.apply_chat_template(messages, add_generation_prompt=add, tools=tools)
        assert ids == hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add, return_dict=False)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("checkpoint", ["mistral-v3-tools", "v01-legacy", "v01-no-prefix", "chatml", "loops-v3"])
def test_continue_final_message_equals_transformers(pairs, checkpoint):
    """The last assistant message left open (transformers' continue_final_message), with a trailing space the
    templates strip or keep, and as content parts."""
    ours, hf = pairs[checkpoint]
    for content in ("Paris is", "Paris is ", [{"type": "text", "text": "Paris"}]):
        messages = [*TALK[:2], {"role": "assistant", "content": content}]
        if checkpoint == "v01-no-prefix" or (isinstance(content, list) and checkpoint != "loops-v3"):
            messages = [TALK[1], {"role": "assistant", "content": content}]
        try:
            text = hf.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                          tokenize=False)
        except Exception:  # a template that does not take content parts: ours refuses it too, in one line
            with pytest.raises(ConfigError, match="message 1"):
                ours.render_chat(messages, add_generation_prompt=False, continue_final_message=True)
            continue
        assert ours.render_chat(messages, add_generation_prompt=False, continue_final_message=True) == text
        assert not text.endswith(ours.id_to_piece(ours.eos_id))
        ids = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError, match="cannot both be set"):
        ours.apply_chat_template(messages, continue_final_message=True)
    with pytest.raises(ConfigError, match="end with the assistant's message"):
        ours.apply_chat_template(TALK[1:2], add_generation_prompt=False, continue_final_message=True)


def test_arguments_sent_as_text_are_written_as_objects(pairs):
    """OpenAI's clients send a call's arguments as JSON text; a template writes them with tojson, so they are
    parsed first (as vLLM does): the prompt equals the one of arguments given as an object."""
    ours, _ = pairs["mistral-v3-tools"]
    as_text = [*TOOL_TALK[:2], {"role": "assistant", "tool_calls": [
        {**TOOL_TALK[2]["tool_calls"][0], "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        *TOOL_TALK[3:]]
    assert ours.render_chat(as_text, tools=[WEATHER]) == ours.render_chat(TOOL_TALK, tools=[WEATHER])
    assert '"arguments": {"city": "Paris"}' in ours.render_chat(as_text, tools=[WEATHER])
    # OpenAI's call ids (call_...), which the template refuses, are mapped as for mistral-common, alike in the result
    openai_ids = [*as_text[:2], {"role": "assistant", "tool_calls": [{**as_text[2]["tool_calls"][0],
                                                                      "id": "call_Xy12abCD34ef"}]},
                  {**as_text[3], "tool_call_id": "call_Xy12abCD34ef"}, *as_text[4:]]
    from mixtrt.runtime.tool_calls import mistral_call_id

    mapped = mistral_call_id("call_Xy12abCD34ef")
    assert ours.render_chat(openai_ids, tools=[WEATHER]) == ours.render_chat(TOOL_TALK, tools=[WEATHER]).replace(
        "call00001", mapped)
    # "" is no arguments ({}); text that is not JSON is one error naming the message and the call
    def sent(arguments):
        return [*TOOL_TALK[:2], {"role": "assistant", "tool_calls": [
            {**TOOL_TALK[2]["tool_calls"][0], "function": {"name": "get_weather", "arguments": arguments}}]}]

    assert '"arguments": {}' in ours.render_chat(sent(""), tools=[WEATHER])
    with pytest.raises(ConfigError, match=r"^chat: message 2: tool_calls\[0\]\.function\.arguments: not JSON"):
        ours.render_chat(sent("{bad"), tools=[WEATHER])
    with pytest.raises(ConfigError, match=r"^chat: message 1 must be a mapping"):  # not an AttributeError
        ours.apply_chat_template([{"role": "user", "content": "hi"}, "oops"])


def test_control_tokens_are_single_ids(pairs):
    ours, _ = pairs["mistral-v3-tools"]
    ids = ours.apply_chat_template(TOOL_TALK, tools=[WEATHER])
    pieces = [ours.id_to_piece(i) for i in ids]
    for control in ["<s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "</s>"]:
        assert control in pieces, control
        assert ours.text._sp.is_control(ids[pieces.index(control)]), control
    chatml, _ = pairs["chatml"]
    ids = chatml.apply_chat_template(TALK)
    assert ids.count(32001) == 5 and ids.count(32000) == 4 and chatml.vocab_size == 32002
    assert chatml.eos_id == 32000 and chatml.bos_id == 1


@pytest.mark.parametrize("checkpoint", ["mistral-v3-tools", "chatml", "v01-legacy"])
def test_decode_hides_control_tokens(pairs, checkpoint):
    ours, hf = pairs[checkpoint]
    ids = ours.apply_chat_template(TALK)
    text = ours.decode(ids)
    stream = ours.stream()
    assert "".join(stream.put(i) for i in ids) + stream.flush() == text
    for control in ["<s>", "</s>", "[INST]", "[/INST]", "<|im_end|>"]:
        assert control not in text or checkpoint == "v01-legacy" and control in ("[INST]", "[/INST]"), control
    assert "Lemon juice, squeezed fresh." in text
    if checkpoint == "chatml":  # <|im_start|> is not special: it shows, as in transformers
        assert text == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special=False) == hf.decode(ids)
        answer = ours.encode("Bonjour", bos=False) + [ours.eos_id]
        stream = ours.stream()
        assert "".join(stream.put(i) for i in answer) + stream.flush() == "Bonjour"


def test_space_runs_and_stretches_that_start_with_a_space_equal_transformers(pairs):
    """Runs of spaces split as sentencepiece splits them (transformers builds a checkpoint's BPE merges from the piece
    scores, so it agrees); a legacy tokenizer (the default) prefixes "▁" to every stretch between added tokens,
    one that already starts with a space too: Mixtral-8x7B-Instruct's template writes ' [INST] ' after <s> and
    </s>, which transformers encodes as ▁ ▁[ INST ]."""
    for name, content in [("mistral-v3-tools", "two  spaces"), ("v01-legacy", "a   b  c"), ("v01-no-prefix", "x  y")]:
        ours, hf = pairs[name]
        messages = [{"role": "user", "content": content}]
        text = ours.render_chat(messages)
        assert ours.apply_chat_template(messages) == hf(text, add_special_tokens=False)["input_ids"], name
    ours, hf = pairs["v01-legacy"]
    text = "<s> [INST] Hi [/INST] Hello</s> [INST] again [/INST]"
    ids = ours.encode_special(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert [ours.id_to_piece(i) for i in ids[:3]] == ["<s>", "▁", "▁["] and ids.count(ours.text.piece_id("▁")) == 2


PLAIN_TEXTS = ["Hello", " leading", "  two leading", " ", "\u2581\u2581x", "\u2581x y", "\tTab", "\nline",
               "a  b   c", "Élise \u201cquoted\u201d", "\u4e2d\u6587 text", "x\n\n y "]


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_plain_text_ids_equal_transformers(pairs, checkpoint):
    """A prompt of plain text (no added token in it) gets the ids the checkpoint's transformers tokenizer gives it,
    prefix rule included (legacy false: text that starts with a space, or with "▁", gets no second "▁"), with
    BOS as `tokenizer(text)` adds it; offsets cover the same ids."""
    ours, hf = pairs[checkpoint]
    for text in PLAIN_TEXTS:
        assert ours.encode(text, bos=False) == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text) == hf(text)["input_ids"], text
        ids, spans = ours.encode_with_offsets(text)
        assert ids == ours.encode(text) and len(spans) == len(ids), text
        assert all(0 <= a <= b <= len(text) for a, b in spans) and spans[-1][1] == len(text), (text, spans)


@pytest.mark.parametrize("legacy", [False, True, None])
def test_plain_text_ids_without_a_template_follow_legacy_as_transformers(tmp_path, legacy):
    """A checkpoint without a chat template (the v1 format) still has transformers' tokenizer(text) for plain
    prompts: `legacy: false` in tokenizer_config.json drops the second "▁" before text that starts with a space
    (it was ignored without a template: other ids, other logits). The record says so, and only then."""
    config = {} if legacy is None else {"legacy": legacy}
    d = _checkpoint(tmp_path, f"v1-{legacy}", V1, config)
    fmt = resolve_chat_format(d)
    assert fmt.kind == "v1" and fmt.text_prefix == ("first" if legacy is False else None)
    assert ("text_prefix" in fmt.to_dict()) == (legacy is False)
    art = tmp_path / "art"
    art.mkdir()
    for name, source in fmt.files.items():
        shutil.copyfile(source, art / name)
    ours = load_chat_tokenizer(art, ChatFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for text in PLAIN_TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        ids, spans = ours.encode_with_offsets(text)
        assert ids == ours.encode(text) and len(spans) == len(ids), text
    assert ours.encode_batch(PLAIN_TEXTS) == [hf(t)["input_ids"] for t in PLAIN_TEXTS]
    chat = [{"role": "user", "content": " Hi"}]  # the chat ids stay mistral-common's v1, whatever legacy says
    assert ours.apply_chat_template(chat) == ours._sp.encode("[INST]  Hi [/INST]", add_bos=True)


# ---------------------------------------------------------------- errors


def test_raise_exception_names_the_message(pairs):
    ours, hf = pairs["v01-legacy"]
    u, a = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}
    with pytest.raises(Exception, match="must alternate") as theirs:
        hf.apply_chat_template([u, a, a, u], tokenize=False)
    with pytest.raises(ConfigError) as e:
        ours.render_chat([u, a, a, u])
    assert str(e.value) == (f"chat template (tokenizer_config.json default) failed at message 2 (role 'assistant'): "
                            f"{theirs.value}")
    with pytest.raises(ConfigError, match=r"failed at message 1 \(role 'tool'\): Only user and assistant"):
        ours.apply_chat_template([u, {"role": "tool", "content": "r"}])
    tools, _ = pairs["mistral-v3-tools"]
    bad_id = [*TOOL_TALK[:2], {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}]  # no id
    with pytest.raises(ConfigError, match=r"failed at message 2 \(role 'assistant'\): Tool call ids must be 9"):
        tools.apply_chat_template(bad_id, add_generation_prompt=False)


def test_malformed_messages_and_templates_are_one_line():
    t = ChatTemplate("{% for m in messages %}{{ m.content.upper() }}{% endfor %}", origin="chat_template.jinja")
    assert t.render([{"role": "user", "content": "hi"}]) == "HI"
    cases = [
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "failed at message 1 .*UndefinedError"),
        ([{"role": "user", "content": "hi"}, "hello"], "message 1 must be a mapping"),
        ([{"content": "hi"}], "message 0 must be a mapping with a string 'role'"),
        ([], "non-empty list"),
        ("hello", "non-empty list"),
    ]
    for messages, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            t.render(messages)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"chat_template.jinja: the chat template does not compile: .* \(line 2\)"):
        ChatTemplate("ok\n{% for m in %}", origin="chat_template.jinja")
    with pytest.raises(ConfigError, match="non-empty string"):
        ChatTemplate("")


def test_sandbox_refuses_python_internals():
    u = [{"role": "user", "content": "x"}]
    for source, match in [("{{ messages.__class__.__mro__ }}", "SecurityError|UndefinedError"),
                          ("{% set ns = namespace() %}{% set ns._x = 1 %}", "namespace attribute|SecurityError"),
                          ("{{ messages.append(1) }}", "SecurityError")]:
        with pytest.raises(ConfigError, match=match):
            ChatTemplate(source).render(u)


def test_templates_that_would_exhaust_memory_or_the_stack_are_one_line_errors():
    """`*` and `**` are bounded (and never folded at compile time, so loading a template builds nothing); deep
    recursion, huge ranges and float overflow are errors naming the message, never a traceback or a hang."""
    import time

    u = [{"role": "user", "content": "x"}]
    t0 = time.perf_counter()
    for source, match in [("{{ 'x' * 10**10 }}", "SecurityError: the template repeats a str of 1 10000000000 times"),
                          ("{{ [0] * 10**9 }}", "SecurityError: the template repeats a list"),
                          ("{{ 7 ** 100000 }}", "SecurityError: the template raises 7 to the power 100000"),
                          ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
                          ("{% for i in range(10**9) %}{{ i }}{% endfor %}", "OverflowError: Range too big"),
                          ("{{ (10**400) / 1.0 }}", "OverflowError")]:
        template = ChatTemplate(source)
        with pytest.raises(ConfigError, match=r"failed at message 0 \(role 'user'\): " + match):
            template.render(u)
    assert time.perf_counter() - t0 < 5
    assert ChatTemplate("{{ '=' * 80 }}{{ 2 ** 64 }}{{ [1] * 3 }}").render(u) == "=" * 80 + str(2 ** 64) + "[1, 1, 1]"


def test_globals_and_reasoning_fields():
    t = ChatTemplate("{{ strftime_now('%Y') }}|{{ messages[0].thinking }}|{{ messages[0].reasoning_content }}|"
                     "{{ messages[0].keys() | sort | join(',') }}|{{ tools }}|{{ documents }}|{{ extra }}")
    msg = {"role": "assistant", "content": "a", "reasoning": "why", "tool_calls": None}
    year = str(datetime.datetime.now().year)
    assert t.render([msg], extra=3) == f"{year}|why|why|content,reasoning,reasoning_content,role,thinking|None|None|3"


def test_first_failing_message():
    errors = {1: None, 2: "other", 3: "boom", 4: "boom"}
    assert first_failing_message(4, errors.get, "boom") == 2
    assert first_failing_message(4, lambda n: None, "boom") == 3  # only the whole conversation fails


def test_added_tokens_checked_against_the_vocabulary():
    tok = Tokenizer.load(V1)
    t = ChatTemplate("x")
    with pytest.raises(ConfigError, match="'<x>' has id 5, which is the piece '<0x02>'"):
        JinjaChatTokenizer(tok, t, [AddedToken(5, "<x>")])
    with pytest.raises(ConfigError, match=r"leave ids \[32000\]"):
        JinjaChatTokenizer(tok, t, [AddedToken(32001, "<x>")])
    strip = JinjaChatTokenizer(tok, t, [AddedToken(32000, "<sep>", lstrip=True, rstrip=True)])
    assert strip.encode_special("a <sep> b") == strip.encode_special("a<sep>b")
    # a model padded past the tokenizer's ids (32001 here) can generate such an id: no text, as in Tokenizer
    ids = [*strip.encode("Hello"), 32000, 32005, tok._sp.piece_to_id("<0xC3>"), 40000, tok._sp.piece_to_id("<0xA9>")]
    stream = strip.stream()
    text = "".join(stream.put(i) for i in ids) + stream.flush()
    assert text == strip.decode(ids) == strip.decode([i for i in ids if i < 32001]) and text.endswith("é")
    assert strip.id_to_piece(32005) == ""
    with pytest.raises(ConfigError, match="token id -1 is negative"):
        strip.decode([1, -1])
    word = JinjaChatTokenizer(tok, t, [AddedToken(32000, "sep", single_word=True)])
    assert 32000 in word.encode_special("a sep b") and 32000 not in word.encode_special("a separate b")


def test_legacy_prefix_equals_the_tokenizer_json_real_checkpoints_ship(pairs):
    """Mistral-7B-Instruct-v0.1/v0.2 and Mixtral-8x7B-Instruct ship a tokenizer.json whose normalizer prepends "▁"
    to each stretch and replaces spaces (no pre-tokenizer): the legacy rule gives the same ids."""
    from tokenizers import Tokenizer, normalizers

    ours, hf = pairs["v01-legacy"]
    shipped = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    shipped.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    shipped.pre_tokenizer = None
    for text in ["<s> [INST] Hi [/INST] Hello</s> [INST] more [/INST]", "<s>[INST] a  b [/INST]x</s>", " ", "\n x"]:
        assert ours.encode_special(text) == shipped.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("call, error", [
    ({"id": "abcdefghi", "type": "function", "function": {"arguments": "{}"}},
     r"tool_calls\[0\]\.function\.name: must be 1-64 letters"),
    ({"id": "abcdefghi", "type": "x", "function": {"name": "f", "arguments": "{}"}},
     r"tool_calls\[0\]\.type: only \"function\" calls are supported, got 'x'"),
    ({"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
     r"tool_calls\[0\]\.function\.arguments: must be a JSON object"),
    ({"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{tz"}},
     r"tool_calls\[0\]\.function\.arguments: not JSON"),
    ({"id": "abcdefghi", "type": "function", "function": {"name": "f"}},
     r"tool_calls\[0\]\.function\.arguments: must be a JSON object"),
])
def test_an_assistant_call_is_checked_alike_in_every_format(pairs, call, error):
    """An earlier assistant call is held to OpenAI's form whatever renders it: a Jinja template rendered a call
    without a name (or of another type, or arguments "[1]") and mistral-common took arguments that are not JSON."""
    mistral_common = pytest.importorskip("mistral_common", reason="the Mistral format needs mixtrt[mistral]")
    from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer

    tools, _ = pairs["mistral-v3-tools"]
    v3 = MistralCommonTokenizer(Path(mistral_common.__file__).parent / "data" /
                                "mistral_instruct_tokenizer_240323.model.v3")
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "x"}]
    for tok in (tools, v3):
        with pytest.raises(ConfigError, match="^chat: message 1: " + error):
            tok.apply_chat_template(talk, add_generation_prompt=False)
    fine = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}
    # what clients send goes through: OpenAI's form, a call without its type, the openai SDK's parsed call (its
    # parsed_arguments sent back), a stream's index
    for ok in (fine, {k: v for k, v in fine.items() if k != "type"}, {**fine, "index": 0},
               {**fine, "function": {**fine["function"], "parsed_arguments": {"a": 1}}}):
        for tok in (tools, v3):
            assert tok.apply_chat_template([*talk[:1], {**talk[1], "tool_calls": [ok]}, talk[2]],
                                           add_generation_prompt=False), ok


def test_a_tools_parameters_are_checked_as_a_schema_whatever_the_choice():
    """A schema that is not one is refused for "auto" and "none" too (only a forced choice compiled it), as is a
    strict that is not a boolean; a valid one a grammar cannot enforce is still offered, and fields of the client's
    own (transformers' "return") are left to the template."""
    from mixtrt.runtime.tool_calls import check_tools

    def tool(**function):
        return [{"type": "function", "function": {"name": "f", **function}}]

    for function, error in (({"parameters": {"type": "strin"}},
                             r"function\.parameters\.type: \"strin\" is not a JSON schema"),
                            ({"parameters": {"properties": {"x": {"type": ["integer", "nope"]}}}},
                             r"function\.parameters\.properties\.x\.type"),
                            ({"parameters": {"anyOf": []}}, r"function\.parameters\.anyOf: must be a non-empty list"),
                            ({"parameters": {"required": "x"}}, r"function\.parameters\.required: must be a list"),
                            ({"strict": "yes"}, r"function\.strict: must be true or false")):
        with pytest.raises(ConfigError, match=r"^tools\[0\]\." + error):
            check_tools(tool(**function))
    assert check_tools(tool(parameters={"type": "string", "pattern": "(?=a)"}, strict=True))
    assert check_tools(tool(parameters={}, **{"return": {"type": "string"}}))  # transformers' get_json_schema adds it
    assert check_tools(tool(parameters={"type": ["object", "null"], "items": [{}, True], "$defs": {"a": {}}}))
