"""Mistral's sentencepiece tokenizer, streaming decode and the v1 instruct chat format (torch-free).

    >>> tok = Tokenizer.load()                     # the Mistral v1 tokenizer shipped in mistral-common
    >>> tok.encode("Hello world")
    [1, 22557, 1526]
    >>> tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
    ...                  {"role": "user", "content": "Bye"}])
    '<s>[INST] Hi [/INST] Yo</s>[INST] Bye [/INST]'

Token ids follow sentencepiece (what the model was trained with and what mistral-common produces).
transformers 5.x rebuilds the same vocabulary as a `tokenizers` BPE that differs on runs of spaces;
see DESIGN.md "Tokenizer".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.prompts import check_continue, check_flags, check_messages_text, check_text, decode_ids

TOKENIZER_FILE = "tokenizer.model"
_SPACE = "\u2581"  # sentencepiece's "▁": a space in the text
_REPLACEMENT = "\ufffd"


def shipped_tokenizer_path() -> Path:
    """The Mistral v1 `tokenizer.model` that mistral-common ships (32000 pieces, byte fallback)."""
    try:
        import mistral_common
    except ImportError:
        raise ConfigError(
            "no tokenizer.model given and mistral-common is not installed to supply the Mistral v1 one "
            "(pip install mistral-common, or pass a tokenizer.model)"
        ) from None
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _resolve(path: str | Path | None) -> Path:
    """The file to load: `path`, `path`/tokenizer.model, or (path None only) the shipped Mistral v1 one."""
    if path is None:
        shipped = shipped_tokenizer_path()
        if not shipped.is_file():
            raise ConfigError(f"mistral-common's Mistral v1 tokenizer is missing at {shipped}")
        return shipped
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"{path}: no such tokenizer file or directory")
    if (path / TOKENIZER_FILE).is_file():
        return path / TOKENIZER_FILE
    # never another vocabulary in its place: a model's ids only mean something with its own tokenizer
    raise ConfigError(f"{path}: no {TOKENIZER_FILE} in this directory (a missing file or a dangling link); "
                      "Tokenizer.load() without a path gives the Mistral v1 one explicitly")


def _text(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a str, got {type(text).__name__}")
    return check_text(text, what)


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 character that starts with `lead`; 0 for a byte no character starts with."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _is_utf8_prefix(buf: bytes) -> bool:
    """True when `buf` is a proper prefix of some valid UTF-8 character (so more bytes may complete it).

    >>> _is_utf8_prefix(b"\\xf0\\x9f"), _is_utf8_prefix(b"\\xed\\xa0")  # emoji start; surrogate: never valid
    (True, False)
    """
    n = _utf8_length(buf[0])
    if not 0 < len(buf) < n:
        return False
    lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
        buf[0], (0x80, 0xBF)
    )
    return all(lo <= b <= hi if i == 1 else 0x80 <= b <= 0xBF for i, b in enumerate(buf) if i)


def _decode_bytes(buf: bytes, final: bool, shown: int = 0) -> tuple[str, bytes]:
    """Byte-fallback bytes -> (text, bytes held back), as sentencepiece decodes a run of byte pieces.

    Each valid character is decoded; each byte that does not start one becomes one U+FFFD (not
    Python's maximal-subpart rule). Unless `final`, an incomplete character at the end is held back.
    The first `shown` bytes were already shown as U+FFFD (a prompt's end): no U+FFFD again for those.

    >>> _decode_bytes(b"A\\xe2\\x82", final=False), _decode_bytes(b"A\\xe2\\x82", final=True)
    (('A', b'\\xe2\\x82'), ('A\\ufffd\\ufffd', b''))
    """
    out: list[str] = []
    i = 0
    while i < len(buf):
        n = _utf8_length(buf[i])
        if n and i + n <= len(buf):
            try:
                out.append(buf[i : i + n].decode("utf-8"))
                i += n
                continue
            except UnicodeDecodeError:
                pass
        elif not final and _is_utf8_prefix(buf[i:]):
            return "".join(out), buf[i:]
        if i >= shown:
            out.append(_REPLACEMENT)
        i += 1
    return "".join(out), b""


_PLAIN, _CONTROL, _UNKNOWN = 0, 1, 2  # what a piece is to the stream decoder (Tokenizer._piece_kind)


class StreamDecoder:
    """Incremental decode: the concatenation of every `put()` and the final `flush()` equals
    `Tokenizer.decode(all ids)` exactly, and no chunk ends inside a UTF-8 character.

    It replays sentencepiece's decoder piece by piece: control tokens are invisible, byte-fallback
    pieces are gathered until their character is complete, and the "▁" of the first visible piece
    is dropped (the dummy prefix), which is why a window of recent ids re-decoded would not do.

        >>> tok = Tokenizer.load()
        >>> s = tok.stream()
        >>> [s.put(i) for i in tok.encode("a🧬", bos=False)] + [s.flush()]  # ▁a, then 4 byte pieces
        ['a', '', '', '', '🧬', '']
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self.skip_special = skip_special
        self._pending = b""  # byte-fallback bytes of a character not yet complete
        self._shown = 0  # how many of them the text before this stream's showed already (mark_shown)
        self._is_bos_ws = True  # the next "▁"-led piece is the dummy prefix to drop
        self._bos_ws_seen = False
        self._visible = False  # any text (control tokens aside) emitted yet

    def put(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often "", never a partial character)."""
        tok = self._tok
        token_id = int(token_id)
        if token_id >= tok.vocab_size:  # a model row past the tokenizer's pieces (a padded vocabulary): no text,
            return ""  # and no break either: decode drops such ids, so bytes around one still join
        byte = tok._byte_of(token_id)
        if byte is not None:
            buf = self._pending + bytes([byte])
            text, self._pending = _decode_bytes(buf, final=False, shown=self._shown)
            self._shown = max(0, self._shown - (len(buf) - len(self._pending)))
            self._visible |= bool(text)
            return text
        text = self.flush()
        if self._bos_ws_seen or self._visible:
            self._is_bos_ws = False
        self._bos_ws_seen = False
        kind, piece = tok._piece_kind(token_id)
        if kind == _CONTROL:
            return text if self.skip_special else text + piece
        if kind == _UNKNOWN:
            surface = tok._unk_surface
        else:
            if self._is_bos_ws and tok._strip_bos_ws and piece.startswith(_SPACE):
                piece = piece[1:]
                self._bos_ws_seen = not tok._strip_all_leading_ws
            surface = piece.replace(_SPACE, " ")
        self._visible |= bool(surface)
        return text + surface

    def flush(self) -> str:
        """Whatever is held back; an incomplete character becomes U+FFFD per byte, as decode does."""
        if not self._pending:  # the common case, once per token (nothing held: nothing shown either)
            return ""
        text, self._pending = _decode_bytes(self._pending, final=True, shown=self._shown)
        self._shown = 0
        self._visible |= bool(text)
        return text

    def mark_shown(self) -> None:
        """The bytes held back now ended a text already shown (a prompt ending inside a character, its decode
        showing U+FFFD for them): if what follows completes the character, the character is returned; if not,
        they are not shown as U+FFFD a second time."""
        self._shown = len(self._pending)
        self._visible |= bool(self._pending)  # shown or completed, they are text before what follows

    def put_text(self, text: str) -> str:
        """Text of a token from outside the sentencepiece model (an added token written as its content):
        what is held back, then `text`. Visible text makes a later piece's "▁" a space, not the dummy prefix.

            >>> s = Tokenizer.load().stream()
            >>> s.put_text("<|im_end|>") + s.put(22557)          # "▁Hello" after visible text keeps its space
            '<|im_end|> Hello'
        """
        out = self.flush() + text
        self._visible |= bool(text)
        return out


def sp_offsets(sp: spm.SentencePieceProcessor, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """sentencepiece's ids of `text` and each token's [start, end) character span in it."""
    from sentencepiece import sentencepiece_pb2  # needs protobuf (an onnxruntime dependency)

    proto = sentencepiece_pb2.SentencePieceText()  # type: ignore[attr-defined]  # generated code
    proto.ParseFromString(sp.encode(text, out_type="serialized_proto"))
    char_at = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]  # byte offset -> char
    pieces = [(p.id, p.begin, p.end) for p in proto.pieces]
    # sentencepiece gives an empty span to all but the last byte-fallback piece of a character and to a lone
    # dummy-prefix "▁" before text; each takes the span of the piece after it (the character's, as
    # transformers' offsets have it), so no label or answer cuts a character; the lone "▁" then keeps only that
    # span's first character, as transformers aligns the prefix it inserts (" x": "▁" (0, 1), "▁x" (0, 2))
    space = sp.piece_to_id(_SPACE)
    prefix = [p.begin == p.end and p.id == space for p in proto.pieces]
    for i in range(len(pieces) - 2, -1, -1):
        piece, begin, end = pieces[i]
        if begin == end and pieces[i + 1][1] == begin:
            pieces[i] = (piece, begin, pieces[i + 1][2])
    spans = [(char_at[b], char_at[e]) for _, b, e in pieces]
    spans = [(a, min(b, a + 1)) if lone else (a, b) for (a, b), lone in zip(spans, prefix, strict=True)]
    return [i for i, _, _ in pieces], spans


class Tokenizer:
    """A sentencepiece `tokenizer.model` (Mistral: byte-fallback BPE, BOS 1, EOS 2, no pad)."""

    # chat takes OpenAI's text-part lists as content and joins them as mistral-common's v1 does (the server passes
    # them on instead of joining them itself)
    takes_text_parts = True

    def __init__(self, sp: spm.SentencePieceProcessor, path: Path) -> None:
        self._sp = sp
        self._plain: spm.SentencePieceProcessor | None = None  # load(prefix_first=True)
        self.path = path
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int | None = sp.pad_id() if sp.pad_id() >= 0 else None
        self._bytes = {i: int(sp.id_to_piece(i)[3:5], 16) for i in range(self.vocab_size) if sp.is_byte(i)}
        self._unk_surface = sp.decode([sp.unk_id()])
        self._kinds = bytearray(b"\xff" * self.vocab_size)  # each id's kind, filled as ids are decoded (0xff: not yet)
        # How decode treats leading "▁" (normalizer add_dummy_prefix / remove_extra_whitespaces),
        # read off the model by decoding the bare "▁" piece once and twice.
        ws = sp.piece_to_id(_SPACE)
        plain = ws != sp.unk_id() and not sp.is_control(ws) and not sp.is_byte(ws)
        self._strip_bos_ws = plain and sp.decode([ws]) == ""
        self._strip_all_leading_ws = plain and sp.decode([ws, ws]) == ""

    @classmethod
    def load(cls, path: str | Path | None = None, prefix_first: bool = False) -> Tokenizer:
        """A `tokenizer.model` file, or a directory holding one (an error without one); None gives the
        Mistral v1 tokenizer shipped in mistral-common. prefix_first: plain text that starts with a space (or "▁")
        gets no dummy-prefix "▁" before it, as transformers' tokenizer(text) under tokenizer_config.json's
        `legacy: false` (ChatFormat.text_prefix); the chat format's own ids are unchanged (mistral-common's)."""
        file = _resolve(path)
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(file))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{file}: not a sentencepiece tokenizer model ({e})") from None
        if sp.get_piece_size() == 0 or sp.bos_id() < 0 or sp.eos_id() < 0:
            raise ConfigError(f"{file}: sentencepiece model without pieces or without BOS/EOS ids")
        tok = cls(sp, file)
        if prefix_first:
            from mixtrt.runtime.jinja_tokenizer import _without_dummy_prefix

            plain, _, dummy_prefix = _without_dummy_prefix(file)
            tok._plain = plain if dummy_prefix else None  # a model without the dummy prefix never adds one
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def _byte_of(self, token_id: int) -> int | None:
        return self._bytes.get(token_id)

    def _piece_kind(self, token_id: int) -> tuple[int, str]:
        """(_CONTROL / _UNKNOWN / _PLAIN, piece) of an id inside the pieces; the kind kept once asked (one byte an
        id: a streamed token costs one sentencepiece call instead of three)."""
        sp = self._sp
        piece = sp.id_to_piece(token_id)  # first: an id outside the pieces (negative) is sentencepiece's IndexError
        kind = self._kinds[token_id]
        if kind == 0xFF:
            kind = _CONTROL if sp.is_control(token_id) else _UNKNOWN if sp.is_unknown(token_id) else _PLAIN
            self._kinds[token_id] = kind
        return kind, piece

    def _text_sp(self, text: str) -> spm.SentencePieceProcessor:
        """The processor for a plain text: without the dummy prefix where `load(prefix_first=True)` says so."""
        return self._plain if self._plain is not None and text.startswith((" ", "\u2581")) else self._sp

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Text -> ids; sentencepiece adds the dummy-prefix space ("Hi" -> "▁Hi"; see `load` for prefix_first).
        Text that is not valid Unicode (a lone surrogate) is a ConfigError."""
        text = _text(text, "text")
        return [self.bos_id] * bos + self._text_sp(text).encode(text) + [self.eos_id] * eos

    def encode_with_offsets(self, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each token's [start, end) character span in `text` ((0, 0) for BOS); a token's
        span holds the space its piece starts with ("▁Paris" in "in Paris": " Paris").

        >>> Tokenizer.load().encode_with_offsets("Élise lit")
        ([1, 4926, 28714, 864, 8724], [(0, 0), (0, 1), (1, 2), (2, 5), (5, 9)])
        """
        ids, spans = sp_offsets(self._text_sp(text), text)
        return [self.bos_id] * bos + ids, [(0, 0)] * bos + spans

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        texts = [_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        encoded = self._sp.encode(texts) if self._plain is None else [self._text_sp(t).encode(t) for t in texts]
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in encoded]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids -> text. skip_special=False writes control tokens as their pieces ("<s>", "</s>") in
        place, without changing the text between them; <unk> is always sentencepiece's " ⁇ "."""
        ids = decode_ids(ids)
        # ids past the tokenizer's pieces (a model whose embedding is padded beyond them) have no text
        ids = [i for i in ids if i < self.vocab_size]
        if skip_special:
            return self._sp.decode(ids)
        stream = StreamDecoder(self, skip_special=False)
        return "".join(stream.put(i) for i in ids) + stream.flush()

    def id_to_piece(self, i: int) -> str:
        """The piece of id i; "" for an id past the tokenizer's pieces (a padded model vocabulary)."""
        return self._sp.id_to_piece(int(i)) if int(i) < self.vocab_size else ""

    def piece_id(self, piece: str) -> int | None:
        """The id of `piece` ("</s>", "[INST]", "▁Hello"), None when the model has no such piece."""
        i = self._sp.piece_to_id(piece)
        return None if i == self._sp.unk_id() and piece != self.id_to_piece(i) else i

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None, *, continue_final_message: bool = False,
    ) -> list[int]:
        """The conversation as ids, equal to mistral-common's v1 instruct tokenizer.

        BOS, then each user turn encoded alone as "[INST] {content} [/INST]", each assistant turn
        as "{content}" + EOS (both with sentencepiece's dummy-prefix space). A leading system
        message is prepended to the first user message as "{system}\\n\\n{user}". continue_final_message:
        the last (assistant) turn without its EOS, for the model to continue (mistral-common's `prefix`).
        tools: the v1 format has no way to show them (mistral-common's v1 drops them): any is refused.
        """
        _no_tools(tools)
        ids = [self.bos_id]
        for role, content, closed in _turns(messages, add_generation_prompt, continue_final_message):
            if role == "user":
                ids += self._sp.encode(f"[INST] {content} [/INST]")
            else:
                ids += self._sp.encode(content) + [self.eos_id] * closed
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, *, continue_final_message: bool = False) -> str:
        """The same conversation as text: '<s>[INST] user [/INST] answer</s>[INST] user2 [/INST]'."""
        _no_tools(tools)
        bos, eos = self.id_to_piece(self.bos_id), self.id_to_piece(self.eos_id)
        parts = [bos]
        for role, content, closed in _turns(messages, add_generation_prompt, continue_final_message):
            parts.append(f"[INST] {content} [/INST]" if role == "user" else f" {content}{eos * closed}")
        return "".join(parts)


def _no_tools(tools: Any) -> None:
    if tools:  # None or [] (what clients send by default) is no tools
        raise ConfigError("chat: the Mistral v1 format has no way to show tools to the model (mistral-common's v1 "
                          "drops them): a checkpoint with a v3 or later tokenizer, or a chat template that renders "
                          "tools, takes them")


def _turns(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, continue_final_message: bool = False
           ) -> list[tuple[str, str, bool]]:
    """Validated (role, content, closed) turns, normalised as mistral-common's v1 normaliser does; closed: an
    assistant turn that ends with EOS (all of them, but the last one with continue_final_message).

    - a message's content is a string or a list of OpenAI text parts (`{"type": "text", "text": ...}`), whose
      non-empty texts join with a blank line; the `developer` role is `system` (mistral-common's OpenAI reading);
    - the system messages' texts (empty ones dropped) join with a blank line into one system prompt, which
      goes before the first user turn's text ("{system}\\n\\n{user}"); a system message may not follow an
      assistant message directly;
    - consecutive user (or assistant) messages join into one turn, their non-empty texts separated by a blank
      line (a system message between them keeps them apart);
    - a conversation of one message is a user or a system message; one that does not start with a user turn gets
      an empty one first;
    - with add_generation_prompt the last turn must be the user's (the model answers next); without it the
      conversation may end with an assistant turn, closed by EOS (left open with continue_final_message).
    """
    check_flags(add_generation_prompt, continue_final_message)
    check_messages_text(messages)
    if not messages:
        raise ConfigError("chat: no messages; a conversation needs at least one user message")
    if continue_final_message:
        check_continue(messages, add_generation_prompt)
    plain: list[tuple[str, str]] = []
    for n, m in enumerate(messages):
        plain.append(_message(m, n))
        role, content = plain[-1]
        if role == "assistant" and not content:
            raise ConfigError(f"chat: message {n} is an empty assistant message")
        if role == "system" and n and plain[n - 1][0] == "assistant":
            raise ConfigError(f"chat: message {n} has role 'system' right after an assistant message, which the "
                              "Mistral v1 format (mistral-common) refuses")
    if len(plain) == 1 and plain[0][0] == "assistant":
        raise ConfigError("chat: a conversation of one message must be a user or system message, not the "
                          "assistant's (mistral-common)")
    system = "\n\n".join(content for role, content in plain if role == "system" and content)
    turns: list[tuple[str, str]] = []
    previous = None
    for role, content in plain:
        if role != "system":
            if role == previous:  # joined as mistral-common joins them: empty texts add nothing
                turns[-1] = (role, "\n\n".join(t for t in (turns[-1][1], content) if t))
            else:
                turns.append((role, content))
        previous = role
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    if add_generation_prompt and turns[-1][0] != "user":
        raise ConfigError(
            "chat: the last message must be the user's when add_generation_prompt=True "
            "(the model writes the next assistant turn)"
        )
    if system:
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    last = len(turns) - 1
    return [(role, content, role == "assistant" and not (continue_final_message and n == last))
            for n, (role, content) in enumerate(turns)]


def _message(m: Any, n: int) -> tuple[str, str]:
    """(role, text) of message n in the v1 format, or a ConfigError naming what is wrong with it."""
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
        raise ConfigError(f"chat: message {n} must be a mapping with a string 'role', got {m!r}")
    role = "system" if m["role"] == "developer" else m["role"]
    if role not in ("system", "user", "assistant") or m.get("tool_calls"):
        tools = role == "tool" or (role == "assistant" and m.get("tool_calls"))  # only these are about tools
        raise ConfigError(f"chat: message {n} has {'tool calls' if role == 'assistant' else f'role {role!r}'}: the "
                          "Mistral v1 format takes system, user and assistant text messages"
                          + (" (mistral-common has no tools for v1)" if tools else ""))
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "\n\n".join(p["text"] for p in content if p["text"])  # mistral-common's join of text chunks
    if not isinstance(content, str):
        what = "no content" if content is None else f"content of type {type(content).__name__}"
        raise ConfigError(f"chat: message {n} ({m['role']}) has {what}: the Mistral v1 format takes a string or a "
                          "list of text parts")
    return role, content

