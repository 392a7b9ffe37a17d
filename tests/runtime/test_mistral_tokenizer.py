"""Mistral's tokenizer files (v1, v3, v7, tekken) vs mistral-common: chat ids exactly, text, streaming."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from mixtrt.runtime.chat_format import ChatFormat, load_chat_tokenizer
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer
from tests.runtime.test_tokenizer import CORPUS

mistral_common = pytest.importorskip("mistral_common")
DATA = Path(mistral_common.__file__).parent / "data"
FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": "tekken_240718.json",
}
CONTROL = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
           "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
TALK = [
    SYSTEM,
    {"role": "user", "content": "What is your favourite condiment?"},
    {"role": "assistant", "content": "Lemon juice, squeezed fresh."},
    {"role": "user", "content": "Do you have mayonnaise recipes? 🥚 Réponds en français."},
]
TOOL_TALK = [
    SYSTEM,
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 22, "sky": "sunny"}'},
    {"role": "assistant", "content": "Sunny, 22 °C."},
    {"role": "user", "content": "And in Zürich, in F?"},
]


def _request(messages, tools=None):
    """The same conversation built from mistral-common's own classes (not through our OpenAI-dict path)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            out.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m.get("name")))
        else:
            calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"],
                                                                arguments=c["function"]["arguments"]))
                     for c in m.get("tool_calls") or []]
            out.append(AssistantMessage(content=m["content"], tool_calls=calls or None))
    functions = [Tool(function=Function(**t["function"])) for t in tools] if tools else None
    return ChatCompletionRequest(messages=out, tools=functions)


@pytest.fixture(scope="module")
def reference():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return {k: MistralTokenizer.from_file(str(DATA / f)) for k, f in FILES.items()}


@pytest.fixture(scope="module")
def ours():
    """Each file loaded the way an artifact loads it (v1: the built-in format, no mistral-common)."""
    return {k: load_chat_tokenizer(DATA, ChatFormat("v1" if k == "v1" else "mistral-common", f, {}))
            for k, f in FILES.items()}


# ---------------------------------------------------------------- chat ids


@pytest.mark.parametrize("version", list(FILES))
@pytest.mark.parametrize("n", [2, 4])
def test_chat_equals_encode_chat_completion(ours, reference, version, n):
    """Multi-turn with a system prompt: ids exactly mistral-common's."""
    messages = TALK[:n]
    expected = reference[version].encode_chat_completion(_request(messages)).tokens
    assert ours[version].apply_chat_template(messages) == expected
    if version == "v7":
        assert ids_of(ours[version], "[SYSTEM_PROMPT]") in expected  # v7 has its own system-prompt tokens


def ids_of(tok, piece):
    return next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == piece)


@pytest.mark.parametrize("version", ["v3", "v7", "tekken"])
def test_tool_calls_equal_encode_chat_completion(ours, reference, version):
    expected = reference[version].encode_chat_completion(_request(TOOL_TALK, [WEATHER])).tokens
    got = ours[version].apply_chat_template(TOOL_TALK, tools=[WEATHER])
    assert got == expected
    for piece in ["[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]"]:
        assert got.count(ids_of(ours[version], piece)) == 1, piece  # each a single control id


def test_v1_refuses_tools_through_mistral_common(reference):
    with pytest.raises(Exception, match="Tools not implemented"):
        reference["v1"].encode_chat_completion(_request(TOOL_TALK, [WEATHER]))


@pytest.mark.parametrize("version", list(FILES))
def test_continue_final_message_is_mistral_commons_prefix(ours, reference, version):
    """The last assistant message left open: mistral-common's `prefix=True` (v1: the built-in format)."""
    tok = ours[version]
    messages = [*TALK[:3], {"role": "user", "content": "And salt?"}, {"role": "assistant", "content": "Salt is"}]
    request = _request(messages)
    request.messages[-1].prefix = True
    expected = reference[version].encode_chat_completion(request).tokens
    got = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == expected and got[-1] != tok.eos_id
    assert tok.render_chat(messages, add_generation_prompt=False, continue_final_message=True).endswith("Salt is")
    with pytest.raises(ConfigError, match="cannot both be set"):
        tok.apply_chat_template(messages, continue_final_message=True)
    with pytest.raises(ConfigError, match="end with the assistant's message"):
        tok.apply_chat_template(messages[:-1], add_generation_prompt=False, continue_final_message=True)


@pytest.mark.parametrize("version", ["v3", "v7"])
def test_closed_conversation_ends_with_eos(ours, reference, version):
    """add_generation_prompt=False accepts a final assistant turn, closed by EOS (mistral-common fine-tuning)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = ours[version]
    messages = TALK[:3]
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    finetuning = MistralTokenizer.from_file(str(DATA / FILES[version]), mode=ValidationMode.finetuning)
    assert closed == finetuning.encode_chat_completion(_request(messages)).tokens
    assert closed[-1] == tok.eos_id
    assert tok.apply_chat_template(TALK, add_generation_prompt=False) == tok.apply_chat_template(TALK)


def test_chat_errors_name_the_message(ours):
    tok = ours["v7"]
    u, a = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}
    cases = [
        ([u, a], "message 1 is the assistant's"),
        ([u, "hello"], "message 1 must be a mapping"),
        ([u, {"content": "x"}], "message 1 must be a mapping with a string 'role'"),
        ([u, a, {"role": "tool", "content": "r"}], r"failed at message 2 \(role 'tool'\): the message has no "
                                                    r"'tool_call_id' field"),
        ([u, a, {"role": "wizard", "content": "r"}, u], r"failed at message 2 \(role 'wizard'\)"),
        ([], "non-empty list"),
        # pydantic's refusals name the field and the value (its first line named only the message type)
        ([{"role": "user", "content": None}], r"message 0 \(role 'user'\): UserMessage: content: Input should be a "
                                               r"valid string \(got None\)$"),
        ([u, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"arguments": "{}"}}]}, u],
         r"^chat: message 1: tool_calls\[0\]\.function\.name: must be 1-64 letters, digits, '_' or '-', got None$"),
    ]
    for messages, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            tok.apply_chat_template(messages)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="tools must be a list"):
        tok.apply_chat_template([u], tools=[object()])


# ---------------------------------------------------------------- text and streaming


@pytest.mark.parametrize("version", ["v3", "v7", "tekken"])
def test_text_equals_mistral_common(ours, reference, version):
    raw = reference[version].instruct_tokenizer.tokenizer
    tok = ours[version]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (raw.n_words, raw.bos_id, raw.eos_id)
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == raw.encode(text, bos=True, eos=False), text
        assert tok.decode(ids) == raw.decode(ids) == text, text


def test_tekken_vocabulary_is_large(ours):
    assert ours["tekken"].vocab_size == 131072 and ours["v3"].vocab_size == ours["v7"].vocab_size == 32768
    with pytest.raises(ConfigError, match="32768 token ids but the model has only 32000"):
        load_chat_tokenizer(DATA, ChatFormat("mistral-common", FILES["v7"], {}), model_vocab_size=32000)
    # a model padded past the tokenizer (more embeddings than pieces): such an id decodes to no text
    tekken = ours["tekken"]
    ids = tekken.encode("Hello world")
    assert tekken.decode([*ids, 131072, *ids[1:]]) == tekken.decode([*ids, *ids[1:]])
    stream = tekken.stream()
    assert "".join(stream.put(i) for i in [*ids, 131073]) + stream.flush() == tekken.decode(ids)
    assert tekken.id_to_piece(131072) == ""
    euro = [i for i in tekken.encode("€", bos=False)]  # byte pieces, a padded id between two of them
    split = [*euro[:1], 131072, *euro[1:]]
    stream = tekken.stream()
    assert "".join(stream.put(i) for i in split) + stream.flush() == tekken.decode(split) == tekken.decode(euro)
    with pytest.raises(ConfigError, match="negative"):
        tekken.decode([-1])


@pytest.mark.parametrize("version", list(FILES))
def test_decode_never_shows_control_tokens(ours, version):
    tok = ours[version]
    messages = TOOL_TALK if version != "v1" else TALK
    ids = tok.apply_chat_template(messages, tools=[WEATHER]) if version != "v1" else tok.apply_chat_template(TALK)
    text = tok.decode(ids)
    stream = tok.stream()
    streamed = "".join(stream.put(i) for i in ids) + stream.flush()
    assert streamed == text
    for control in CONTROL if version != "v1" else ["<s>", "</s>"]:  # v1's [INST] is plain text
        assert control not in text, (control, text)
    assert "Lemon juice" in text or "Sunny" in text
    shown = tok.decode(ids, skip_special=False)
    assert shown.startswith("<s>") and "[INST]" in shown
    assert tok.render_chat(messages[:2]) == tok.decode(tok.apply_chat_template(messages[:2]), skip_special=False)


def test_tekken_stream_equals_decode_on_random_ids(ours, reference):
    """Random mixes of control ids, single bytes (split UTF-8) and ordinary tokens: the streamed chunks
    concatenate to mistral-common's decode; no chunk ends inside a character."""
    tok = ours["tekken"]
    raw = reference["tekken"].instruct_tokenizer.tokenizer
    emoji = tok.encode("🧬 ok", bos=False)
    rng = random.Random(0)
    for _ in range(1500):
        ids = [rng.choice([rng.randrange(0, 20), rng.randrange(1000, 1256), rng.randrange(1000, 131072),
                           rng.choice(emoji)]) for _ in range(rng.randrange(10))]
        stream = tok.stream()
        chunks = [stream.put(i) for i in ids] + [stream.flush()]
        assert "".join(chunks) == raw.decode(ids) == tok.decode(ids), ids
    stream = tok.stream()
    pieces = [stream.put(i) for i in tok.encode("a🧬", bos=False)]
    assert "".join(pieces) == "a🧬" and all(p in ("", "a", "🧬") for p in pieces)


# ---------------------------------------------------------------- the extra


def test_missing_mistral_common_names_the_extra(tmp_path):
    """Without mistral-common (a package of that name that fails to import stands in for it), loading a
    mistral-common tokenizer is one line naming the extra."""
    shadow = tmp_path / "shadow" / "mistral_common"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('mistral-common is not installed')\n")
    probe = (
        "from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer\n"
        "from mixtrt.runtime.errors import ConfigError\n"
        f"try:\n    MistralCommonTokenizer({str(DATA / FILES['v7'])!r})\n"
        "except ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(shadow.parent), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("is not installed (pip install 'mixtrt[mistral]')"), out.stdout
    assert out.stdout.count("\n") == 1


def test_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "tekken.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="tekken.json: mistral-common cannot load this tokenizer"):
        MistralCommonTokenizer(bad)
    with pytest.raises(ConfigError, match="no such tokenizer file"):
        MistralCommonTokenizer(tmp_path / "tokenizer.model.v3")


@pytest.mark.parametrize("version", list(FILES))
def test_a_continuation_after_a_prompt_ending_inside_a_character(ours, version):
    """primed_stream (the text continuing a prompt given as ids): cut a text of multi-byte characters at every
    id; where the prompt's decode ends in U+FFFD for bytes of a character the continuation completes, the
    continuation starts with the character (the U+FFFD the prompt showed are left out), else prompt text +
    continuation text == decode(all ids); never the prompt's U+FFFD twice."""
    from mixtrt.runtime.generation import primed_stream

    tok = ours[version]
    ids = tok.encode("a€🧬b ꙮ🇫🇷 x𝔸", bos=True)
    whole = tok.decode(ids)
    completed = 0
    for k in range(1, len(ids)):
        prompt, rest = ids[:k], ids[k:]
        stream = primed_stream(tok, prompt)
        text = "".join(stream.put(i) for i in rest) + stream.flush()
        shown = tok.decode(prompt)
        cut = len(shown) - len(shown.rstrip("\ufffd"))  # the U+FFFD the prompt's text ends with
        fits = [n for n in range(cut + 1) if shown[:len(shown) - n] + text == whole]
        assert fits, (k, shown, text, whole)
        completed += fits[0] > 0
    assert completed, "no cut fell inside a character: the test shows nothing"


@pytest.mark.parametrize("version", list(FILES))
def test_a_continuation_after_a_long_run_of_control_ids(ours, version):
    """A prompt whose tail shows no text (its last 100 ids are EOS): the continuation's first word still follows
    the prompt's text with its space, as decode(prompt + continuation) has it."""
    from mixtrt.runtime.generation import PRIME_TOKENS, primed_stream

    tok = ours[version]
    prompt = tok.encode("Hello", bos=True) + [tok.eos_id] * (PRIME_TOKENS + 36)
    rest = tok.encode("Hello world", bos=False)[-1:]  # "▁world" (or tekken's " world")
    stream = primed_stream(tok, prompt)
    text = "".join(stream.put(i) for i in rest) + stream.flush()
    assert tok.decode(prompt) + text == tok.decode(prompt + rest) and text.startswith(" "), text


@pytest.mark.parametrize("version", list(FILES))
def test_a_lone_surrogate_is_refused_by_every_file(ours, version):
    """Text that is not valid Unicode is a one-line error naming the character in every file's encode (tekken
    alone would write it as U+FFFD's bytes)."""
    with pytest.raises(ConfigError, match="lone surrogate"):
        ours[version].encode("a\ud800b")


@pytest.mark.parametrize("version", list(FILES))
def test_logprobs_token_bytes_join_to_the_text(ours, version):
    """The server's logprobs name each token by the bytes it stands for: a token holding part of a UTF-8 character
    (a tekken byte token as a sentencepiece byte piece) is "bytes:\\xf0" with that one byte, not U+FFFD's three,
    so the bytes of a message's tokens join to its text (OpenAI's `bytes`)."""
    from mixtrt.runtime.serve.logprobs import TokenTexts

    tok = ours[version]
    text = "🧬 é 漢字 ok"
    ids = tok.encode(text, bos=False)
    texts = TokenTexts(tok)
    data = [texts(i)[1] for i in ids]
    assert b"".join(data).decode("utf-8").lstrip(" ") == text
    split = [(t, d) for t, d in zip(ids, data, strict=True) if len(d) == 1 and d[0] >= 0x80]
    assert split and all(texts(t)[0] == f"bytes:\\x{d[0]:02x}" for t, d in split)
    assert texts(tok.bos_id)[1] == b"<s>"  # a control token: its name
