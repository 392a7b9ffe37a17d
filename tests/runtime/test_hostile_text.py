"""Hostile text and prompts (prompts, stop strings, chat messages; the API and the tokenizer): text that is not
valid Unicode (lone surrogates: invalid UTF-8 from a command line or stdin, half a UTF-16 pair) and malformed
prompts are one ConfigError naming the culprit, before any model work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import Generator
from mixtrt.runtime.prompts import normalize_prompts
from mixtrt.runtime.tokenizer import Tokenizer
from tests.hostile import one_line
from tests.runtime.fakes import ToyBackend, ToyTokenizer, V

ARGV_BYTES = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # what Python makes of latin-1 on a UTF-8 argv


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


# (prompts as given to generate, what the one line must name)
PROMPTS = [
    (ARGV_BYTES, ["prompt 0", "character 3", "lone surrogate"]),
    ("\ud83d", ["prompt 0", "lone surrogate"]),  # half of an emoji's UTF-16 pair
    (["ok", "fine\udc80"], ["prompt 1", "character 4"]),
    ("", ["prompt 0 is empty"]),
    (["ok", ""], ["prompt 1 is empty"]),
    ([], ["prompts is empty"]),
    ([[]], ["prompt 0 is empty"]),
    ([[1, 2], []], ["prompt 1 is empty"]),
    ([1, V], ["prompt 0", "outside the vocabulary"]),
    ([[1, -1]], ["outside the vocabulary"]),
    ([[1, 2**70]], ["outside the vocabulary"]),
    ([[1.5, 2]], ["prompt 0", "integers"]),
    ([[True, 2]], ["prompt 0", "integers"]),
    ([["a", 2]], ["prompt 0", "integers"]),
    ([None], ["prompt 0", "NoneType"]),
    ([b"bytes"], ["prompt 0", "bytes"]),
    ([["nested", ["deeper"]]], ["prompt 0", "integers"]),
    (np.array([[1.0, 2.0]]), ["prompt 0", "integers"]),
    ([1.0, 5.0], ["prompt 0", "item 0 is a float (1.0)"]),  # one prompt of float ids, not two prompts
    ([True, False], ["prompt 0", "item 0 is a bool (True)"]),
    ([[1, list(range(50))]], ["prompt 0", "item 1 is a list ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11..."]),
    (None, ["prompts must be", "NoneType"]),
    (42, ["prompts must be", "int"]),
    (b"bytes", ["prompts must be", "bytes"]),
]


@pytest.mark.parametrize("prompts, culprits", PROMPTS, ids=[repr(p)[:30] for p, _ in PROMPTS])
def test_bad_prompt_is_one_line_before_any_work(prompts, culprits):
    backend = ToyBackend()
    gen = Generator(backend, ToyTokenizer())
    for call in (gen.generate, gen.stream):
        with pytest.raises(ConfigError) as e:
            call(prompts)
        one_line(e.value, *culprits)
    assert backend.calls == []


@pytest.mark.parametrize("messages, culprits", [
    ([{"role": "user", "content": ARGV_BYTES}], ["message 0", "lone surrogate"]),
    ([{"role": "system", "content": "ok"}, {"role": "user", "content": "\udfff"}], ["message 1"]),
    ([{"role": "user", "content": 5}], ["message 0", "content of type int"]),
    ([{"role": None, "content": "hi"}], ["message 0"]),
    (["hello"], ["message 0"]),
    ([], ["no messages"]),
    ([{"role": "assistant", "content": "hi"}], ["one message must be a user or system message"]),  # as mistral-common
])
def test_bad_chat_messages(tok, messages, culprits):
    with pytest.raises(ConfigError) as e:
        tok.apply_chat_template(messages)
    one_line(e.value, *culprits)


def test_tokenizer_refuses_what_sentencepiece_would_crash_on(tok):
    for bad, culprit in ((ARGV_BYTES, "text"), (b"bytes", "text"), (None, "text")):
        with pytest.raises(ConfigError) as e:
            tok.encode(bad)  # type: ignore[arg-type]
        one_line(e.value, culprit)
    with pytest.raises(ConfigError) as e:
        tok.encode_batch(["fine", "\udcff"])
    one_line(e.value, "texts[1]")
    with pytest.raises(ConfigError) as e:
        tok.decode([5, -1])
    one_line(e.value, "negative")
    # ids past the tokenizer's pieces (a model padded beyond them can produce one) have no text: no crash
    assert tok.decode([5, 32000]) == tok.decode([5, 2**40]) == tok.decode([5])


def test_unusual_but_valid_text_is_accepted(tok):
    """NUL, control characters, RTL marks, astral characters, a lone combining mark: valid Unicode, encoded."""
    for text in ("a\x00b", "\x1b[31mred", "\u202eevil", "\U0001f9ec", "\u0301", "\ufeffbom", "\r\n"):
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and len(ids) > 1
    assert normalize_prompts("a\x00b", tok, tok.vocab_size)[0] == tok.encode("a\x00b")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None), max_size=20))
def test_any_text_encodes_or_is_one_config_error(tok, text):
    """Any Python str (surrogates included): the tokenizer encodes it, or refuses it in one line. Never crashes."""
    try:
        ids = tok.encode(text)
    except ConfigError as e:
        one_line(e, "lone surrogate")
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory) -> dict:
    """The other chat formats an artifact can carry: mistral-common (v3 sentencepiece, tekken) and a Jinja
    template over tokenizer.model."""
    from mixtrt.runtime.chat_format import ChatFormat, load_chat_tokenizer
    from tests.checkpoints import mistral_tokenizer_path
    from tests.runtime.test_chat_template import _checkpoint, _ours
    from tests.runtime.test_mistral_tokenizer import DATA, FILES

    root = tmp_path_factory.mktemp("chat")
    jinja = _checkpoint(root, "jinja", mistral_tokenizer_path(), {},
                        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    out = {k: load_chat_tokenizer(DATA, ChatFormat("mistral-common", FILES[k], {})) for k in ("v3", "tekken")
           if k in FILES}
    return {**out, "jinja": _ours(jinja, root)}


@pytest.mark.parametrize("kind", ["v3", "tekken", "jinja"])
def test_every_chat_format_names_the_bad_message(chat_tokenizers, kind):
    tok = chat_tokenizers[kind]
    good = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(good)
    for messages, culprit in (([{"role": "user", "content": ARGV_BYTES}], "chat: message 0 content"),
                              ([*good, {"role": "assistant", "content": "ok"},
                                {"role": "user", "content": "x\ud800"}], "chat: message 2 content")):
        with pytest.raises(ConfigError) as e:
            tok.apply_chat_template(messages)
        one_line(e.value, culprit, "lone surrogate")


def test_text_files_are_bounded_and_devices_named(tmp_path):
    """A prompt or calibration file: a device is named as such (a calibration /dev/zero was "no such file"), and a
    stream longer than the bound (an endless pipe) is one line, not memory exhausted."""
    from mixtrt.export.quantize import Int4Options
    from mixtrt.runtime.prompts import read_text_file

    with pytest.raises(ConfigError, match="--calibration /dev/zero: not a regular file"):
        Int4Options(method="gptq", calibration=Path("/dev/zero")).check()
    big = tmp_path / "big.txt"
    big.write_text("a" * 2048)
    assert read_text_file(big, "--text", limit=4096) == "a" * 2048
    with pytest.raises(ConfigError, match=r"--text .*big.txt: over 0 MiB"):
        read_text_file(big, "--text", limit=1024)


def test_message_text_is_checked_at_any_depth_in_order():
    """Every string of a message is checked, however deep (a call's arguments as an object nest as the client
    likes; the walk stopped at 8 levels) and keys too; the first bad one in the message's order is named."""
    from mixtrt.runtime.prompts import check_messages_text

    deep: dict = {"v": "\ud800"}
    for _ in range(12):
        deep = {"k": deep}
    call = {"type": "function", "function": {"name": "f", "arguments": deep}}
    with pytest.raises(ConfigError) as e:
        check_messages_text([{"role": "assistant", "content": "", "tool_calls": [call]}])
    one_line(e.value, "chat: message 0 tool_calls[0].function.arguments" + ".k" * 12 + ".v is not valid text")
    with pytest.raises(ConfigError) as e:
        check_messages_text([{"role": "user", "content": [{"type": "text", "text": "a\udc80"},
                                                          {"type": "text", "text": "\udc81"}]}])
    one_line(e.value, "chat: message 0 content[0].text is not valid text: character 1")
    with pytest.raises(ConfigError) as e:
        check_messages_text([{"role": "user", "content": [{"\udc82": 1}]}])
    one_line(e.value, "chat: message 0 content[0] key is not valid text")
