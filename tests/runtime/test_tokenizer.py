"""Tokenizer vs sentencepiece, mistral-common and transformers; streaming decode; v1 chat format."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from mixtrt.runtime import tokenizer as tokenizer_module
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.tokenizer import Tokenizer
from tests.checkpoints import mistral_tokenizer_path

CORPUS = [
    "Hello world",
    "The café in Zürich serves crème brûlée; naïve coöperation.",
    "“Quotes” — dashes … ½ ° € £ ¥ ©",
    "I love 🍕 and 🧬 DNA, 👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 😀😃😄",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "Ελληνικά и русский текст, עברית, العربية",
    "Tamil தமிழ் Thai ภาษาไทย Devanagari हिन्दी",
    "rare: \U0001f9ec \U00010348 \u0d9e \U0002f9f4 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # byte fallback
    "controls \x00\x01\x7f and zero\u200bwidth \ufeff",
    "def f(x):\n    return x ** 2  # square\n",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   spaces   inside",
    "\ttab\tseparated\t",
    "line one\nline two\n\n",
    "\n\nstarts with newlines",
    "mixed \t \n whitespace \r\n end",
    "",
    " ",
    "   ",
    "\n",
]


def _space_run(text: str) -> bool:
    """transformers 5.x's tokenizers BPE splits these differently from sentencepiece (see below)."""
    return text.startswith(" ") or "  " in text


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def mistral():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(mistral_tokenizer_path()))


V01_CHAT_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's tokenizer_config.json chat_template
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}{%- endfor %}"
)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' tokenizer from the same tokenizer.model. In transformers 5.x
    `LlamaTokenizer(vocab_file=...)` ignores the file (a 3-token vocab); from_pretrained on a
    directory with a tokenizer_config.json converts the sentencepiece model."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(mistral_tokenizer_path(), d / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": V01_CHAT_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert len(hf) == 32000
    return hf


# ---------------------------------------------------------------- load


def test_load_default_and_dirs(tok, tmp_path):
    assert tok.path == mistral_tokenizer_path()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, None)
    with pytest.raises(ConfigError, match="no tokenizer.model in this directory"):  # never another vocabulary
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").symlink_to(tmp_path / "gone.model")
    with pytest.raises(ConfigError, match="a missing file or a dangling link"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    shutil.copy(mistral_tokenizer_path(), tmp_path / "tokenizer.model")
    assert Tokenizer.load(tmp_path).path == tmp_path / "tokenizer.model"
    assert Tokenizer.load(str(tmp_path / "tokenizer.model")).encode("Hi") == tok.encode("Hi")


def test_load_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(ConfigError, match="nope"):
        Tokenizer.load(missing)
    for name, data in [("garbage.model", b"\x00not a sentencepiece model\xff" * 10), ("empty.model", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=name):
            Tokenizer.load(tmp_path / name)
    gone = tmp_path / "mistral_common" / "data" / "tokenizer.model.v1"
    monkeypatch.setattr(tokenizer_module, "shipped_tokenizer_path", lambda: gone)
    with pytest.raises(ConfigError, match="tokenizer.model.v1"):
        Tokenizer.load()
    with pytest.raises(ConfigError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)


# ---------------------------------------------------------------- encode / decode


def test_encode_equals_sentencepiece_and_mistral_common(tok, mistral):
    raw = mistral.instruct_tokenizer.tokenizer
    for text in CORPUS:
        assert tok.encode(text) == raw.encode(text, bos=True, eos=False), text
        assert tok.encode(text, bos=False, eos=True) == raw.encode(text, bos=False, eos=True), text
    assert any(tok._byte_of(i) is not None for i in tok.encode(CORPUS[7])), "corpus must need byte fallback"


def test_encode_equals_transformers(tok, hf):
    compared = []
    for text in CORPUS:
        ours = tok.encode(text)
        theirs = hf(text)["input_ids"]
        if _space_run(text):  # see test_transformers_differs_on_space_runs
            continue
        assert ours == theirs, text
        compared.append(text)
    assert len(compared) >= 12


def test_transformers_differs_on_space_runs(tok, hf):
    """Pinned divergence (transformers 5.x): its Metaspace pre-tokenizer adds no dummy prefix to text
    that starts with a space (so " a" decodes back as "a"), and its BPE merges "▁▁" across words;
    sentencepiece (mistral-common, the model's training) gives ▁▁ ▁two. We follow sentencepiece."""
    assert tok.decode(tok.encode(" a")) == " a" and hf.decode(hf(" a")["input_ids"], skip_special_tokens=True) == "a"
    assert [tok.id_to_piece(i) for i in tok.encode("  two  spaces", bos=False)] == ["▁▁", "▁two", "▁", "▁spaces"]
    assert hf.convert_ids_to_tokens(hf("  two  spaces", add_special_tokens=False)["input_ids"]) != [
        "▁▁", "▁two", "▁", "▁spaces",
    ]
    # Special-token strings in user text: transformers maps "<s>" to BOS; sentencepiece keeps it text.
    assert 1 not in tok.encode("a <s> b", bos=False)
    assert 1 in hf("a <s> b", add_special_tokens=False)["input_ids"]


def test_decode_round_trip(tok, hf):
    for text in CORPUS:
        ids = tok.encode(text, eos=True)
        assert tok.decode(ids) == text, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) or _space_run(text), text
        with_special = tok.decode(ids, skip_special=False)
        assert with_special == "<s>" + text + "</s>", text


def test_encode_batch(tok):
    assert tok.encode_batch(CORPUS) == [tok.encode(t) for t in CORPUS]
    assert tok.encode_batch(CORPUS[:3], bos=False, eos=True) == [tok.encode(t, False, True) for t in CORPUS[:3]]
    assert tok.encode_batch([]) == []


def test_decode_accepts_numpy_and_rejects_bad_ids(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "Hello world"
    with pytest.raises(ConfigError, match="negative"):
        tok.decode([1, -5])
    # int() would truncate 661.7 or read "661": the ids are refused, as generate and Engine.add refuse them
    for bad, named in (([661.7, 403], "661.7 \\(float\\)"), (["661"], "'661' \\(str\\)"), ([True], "True"),
                       (None, "NoneType"), (5, "int"), ("abc", "str"), ([[1, 2]], "list")):
        with pytest.raises(ConfigError, match=named):
            tok.decode(bad)
    assert tok.decode(tuple(ids)) == tok.decode(iter(ids)) == "Hello world"
    torch = pytest.importorskip("torch")  # what converts to an integer exactly is an id: tensors, 0-d arrays
    assert tok.decode(torch.tensor(ids)) == tok.decode([np.array(i) for i in ids]) == tok.decode(
        np.array(ids, np.uint16)) == "Hello world"
    for bad, named in ((np.array(5), "ndarray of 0 dimensions"), (set(ids), "set"), (bytearray(b"ab"), "bytearray"),
                       ({1: 2}, "dict"), (torch.tensor([1.0]), r"tensor\(1\.\) \(Tensor\)")):
        with pytest.raises(ConfigError, match=named):
            tok.decode(bad)


# ---------------------------------------------------------------- streaming


def _stream(tok, ids):
    s = tok.stream()
    chunks = [s.put(i) for i in ids]
    return chunks, s.flush()


@pytest.mark.parametrize("text", CORPUS)
def test_stream_equals_decode(tok, text):
    ids = tok.encode(text, eos=True)
    chunks, tail = _stream(tok, ids)
    assert "".join(chunks) + tail == tok.decode(ids) == text
    for c in chunks + [tail]:
        assert "\ufffd" not in c and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in c), (text, c)


def test_stream_holds_back_split_emoji(tok):
    ids = tok.encode("DNA 🧬!", bos=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[-5:] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAC>", "!"], pieces
    chunks, tail = _stream(tok, ids)
    assert chunks == ["DNA", " ", "", "", "", "🧬", "!"] and tail == ""


def test_stream_incomplete_and_invalid_bytes(tok):
    b = {v: k for k, v in tok._bytes.items()}
    hello = tok.encode("Hello", bos=False)
    cases = [
        [b[0xE2], b[0x82]],  # incomplete at the end: flush gives U+FFFD per byte, as decode
        [b[0xE2], b[0x82], *hello],  # interrupted by a normal piece
        [b[0xE2], b[0x82], b[0x41]],  # interrupted by an ASCII byte
        [b[0xED], b[0xA0], b[0x80]],  # a surrogate: never valid
        [b[0xC0], b[0x80], b[0xF8]],  # bytes no character starts with
        [1, 2, *hello, 0, b[0xF0], b[0x9F], b[0x98], b[0x80], 2],  # controls, <unk>, a whole emoji
        [28705, 28705, *hello],  # the bare "▁" piece: only the first is the dummy prefix
    ]
    for ids in cases:
        chunks, tail = _stream(tok, ids)
        assert "".join(chunks) + tail == tok.decode(ids), ids
    chunks, tail = _stream(tok, cases[0])
    assert chunks == ["", ""] and tail == "\ufffd\ufffd"


def test_stream_random_ids_equal_decode(tok):
    """Random mixes of byte pieces, controls, <unk>, "▁" and ordinary pieces."""
    rng = random.Random(0)
    for _ in range(2000):
        ids = [
            rng.choice([rng.randrange(3, 259), rng.randrange(32000), rng.choice([0, 1, 2, 28705, 22557, 13])])
            for _ in range(rng.randrange(12))
        ]
        chunks, tail = _stream(tok, ids)
        assert "".join(chunks) + tail == tok.decode(ids), ids


# ---------------------------------------------------------------- chat


CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is your favourite condiment?"},
        {"role": "assistant", "content": "Lemon juice, squeezed fresh."},
        {"role": "user", "content": "Do you have mayonnaise recipes? 🥚"},
    ],
    [
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Très bien, merci !\nEt vous ?"},
        {"role": "user", "content": "日本語で答えて"},
        {"role": "assistant", "content": "はい。"},
        {"role": "user", "content": "ok"},
    ],
]


def _mistral_request(messages):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return ChatCompletionRequest(messages=[cls[m["role"]](content=m["content"]) for m in messages])


@pytest.mark.parametrize("messages", CHATS)
def test_chat_equals_mistral_common(tok, mistral, messages):
    expected = mistral.encode_chat_completion(_mistral_request(messages))
    assert tok.apply_chat_template(messages) == expected.tokens


@pytest.mark.parametrize("messages", CHATS + [CHATS[2][:4]])
def test_chat_equals_transformers_template(tok, hf, messages):
    add = messages[-1]["role"] == "user"
    text = hf.apply_chat_template(messages, tokenize=False)
    # The v0.1 template writes " [INST]" (the dummy-prefix space sentencepiece adds to each turn).
    assert text == tok.render_chat(messages, add_generation_prompt=add).replace("[INST]", " [INST]")
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.apply_chat_template(messages, add)


def _roles(spec: str) -> list[dict[str, str]]:
    """"u,a=,s": user "u0", an empty assistant message, system "s2"."""
    out = []
    for item in spec.split(","):
        role, eq, content = item.partition("=")
        role = {"u": "user", "a": "assistant", "s": "system"}[role]
        out.append({"role": role, "content": content if eq else f"{role[0]}{len(out)}"})
    return out


@pytest.mark.parametrize("spec", ["a,u", "u,u", "s", "s=,u", "u,s,u", "s,s,u", "u,a,a,u", "u,a,u,s", "s,a,u", "u=",
                                  "u,u,a,u,u"])
def test_chat_normalised_as_mistral_common(tok, mistral, spec):
    """Conversations that do not alternate, normalised as mistral-common's v1 normaliser does them: consecutive
    messages of a role join with a blank line, system messages (anywhere before an assistant's) make one system
    prompt before the first user turn, an empty user turn goes first when the conversation does not start with
    one."""
    messages = _roles(spec)
    assert tok.apply_chat_template(messages) == mistral.encode_chat_completion(_mistral_request(messages)).tokens
    text = tok.render_chat(messages)  # the same turns as text: the pieces mistral-common shows, spaces for "▁"
    want = mistral.encode_chat_completion(_mistral_request(messages)).text.replace("▁", " ").replace("<0x0A>", "\n")
    assert text.replace("[INST]", " [INST]") == want


def _text(*parts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": t} for t in parts]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": ""}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": ""}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": _text("a", "", "b")}],
    [{"role": "user", "content": _text("a")}, {"role": "user", "content": _text("", "b")}],
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "system", "content": _text("s1", "s2")}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": _text("x", "y")}, {"role": "user", "content": "b"}],
])
def test_chat_parts_empty_messages_and_developer_as_mistral_common(tok, mistral, messages):
    """OpenAI's message forms, read as mistral-common's `from_openai` reads them for v1: text parts join with a
    blank line, empty texts (a message's or a part's) add nothing where messages join, `developer` is `system`."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    expected = mistral.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens
    assert tok.apply_chat_template(messages) == expected


def test_render_chat_format(tok):
    assert tok.render_chat(CHATS[1]) == (
        "<s>[INST] You are terse.\n\nWhat is your favourite condiment? [/INST] Lemon juice, squeezed fresh.</s>"
        "[INST] Do you have mayonnaise recipes? 🥚 [/INST]"
    )
    ids = tok.apply_chat_template(CHATS[1])
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1 and ids[-1] != tok.eos_id
    closed = tok.apply_chat_template(CHATS[2][:4], add_generation_prompt=False)
    assert closed[-1] == tok.eos_id


def test_v1_takes_no_tools_as_the_other_formats_take_the_argument(tok):
    """The v1 format cannot show tools: none (None, []) renders as without; any tool is one ConfigError (a raw
    TypeError before: the argument was missing, though every other format takes it)."""
    ids = tok.apply_chat_template(CHATS[1])
    assert tok.apply_chat_template(CHATS[1], tools=None) == ids == tok.apply_chat_template(CHATS[1], True, [])
    assert tok.render_chat(CHATS[1], tools=[]) == tok.render_chat(CHATS[1])
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}
    for call in (tok.apply_chat_template, tok.render_chat):
        with pytest.raises(ConfigError, match="the Mistral v1 format has no way to show tools"):
            call(CHATS[1], tools=[tool])


def test_chat_errors(tok):
    u, a, s = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
    bad = [
        ([], "no messages"),
        ([s, u, a, s, u], "message 3 has role 'system' right after an assistant message"),
        ([u, a, s], "message 2 has role 'system' right after an assistant message"),
        ([u, {"role": "tool", "content": "x"}], r"message 1 has role 'tool'.*mistral-common has no tools for v1"),
        ([u, {"role": "bot", "content": "x"}], r"message 1 has role 'bot': .* assistant text messages$"),  # not tools
        ([u, a], "last message must be the user's"),
        ([u, {"role": "assistant", "content": ""}, u], "message 1 is an empty assistant message"),
        ([{"role": "user"}], r"message 0 \(user\) has no content"),
        ([{"content": "x"}], "message 0 must be a mapping with a string 'role'"),
        ([u, {"role": "user", "content": 3}], r"message 1 \(user\) has content of type int"),
        ([u, {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "content of type list"),
        ([u, {"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}, u], "message 1 has tool calls"),
    ]
    for messages, match in bad:
        with pytest.raises(ConfigError, match=match):
            tok.apply_chat_template(messages)
        with pytest.raises(ConfigError, match=match):
            tok.render_chat(messages)
    assert tok.apply_chat_template([u, a], add_generation_prompt=False)[-1] == tok.eos_id
    with pytest.raises(ConfigError, match="a conversation of one message must be a user or system message"):
        tok.apply_chat_template([a], add_generation_prompt=False)  # as mistral-common refuses it
    with pytest.raises(ConfigError, match="a conversation of one message"):
        tok.apply_chat_template([a], add_generation_prompt=False, continue_final_message=True)


def test_ids_past_the_tokenizer_have_no_text(tok):
    """A model whose embedding is padded past its tokenizer's pieces (32002 rows, 32000 pieces) can generate
    such an id: it decodes to no text, in decode, the stream decoder and id_to_piece, instead of an IndexError."""
    ids = tok.encode("Hello world")
    past = tok.vocab_size + 1
    assert tok.decode(ids + [past] + ids[1:]) == tok.decode(ids + ids[1:])
    stream = tok.stream()
    assert "".join(stream.put(i) for i in [*ids, past, *ids[1:]]) + stream.flush() == tok.decode(ids + ids[1:])
    assert tok.id_to_piece(past) == ""
    # one between the byte pieces of a character: dropped, as decode drops it (the character still joins)
    e_acute = [tok._sp.piece_to_id("<0xC3>"), past, tok._sp.piece_to_id("<0xA9>")]
    stream = tok.stream()
    assert "".join(stream.put(i) for i in e_acute) + stream.flush() == tok.decode(e_acute) == "é"
    with pytest.raises(ConfigError, match="negative"):
        tok.decode([-1])
