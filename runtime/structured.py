"""Structured output: a reply constrained to JSON, or to JSON that a JSON schema accepts, token by token.

llguidance (the `structured` extra; vLLM's and SGLang's grammar engine) compiles the schema and, at each step,
gives the set of tokens that keep the text a prefix of an accepted document; the sampler sets every other score
to -inf before it chooses, so greedy and sampled rows alike write what the schema accepts (until a length limit or
a stop string cuts them). JSON is written without free whitespace, with json.dumps' separators (", " and ": "):
the form models read most, and a model cannot run off into whitespace.

    >>> from mixtrt.runtime.tokenizer import Tokenizer
    >>> schema = check_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    >>> guide = JsonGuide(Tokenizer.load(), schema, eos_ids=[2])        # needs `pip install 'mixtrt[structured]'`
    >>> pieces = {Tokenizer.load().id_to_piece(i) for i in np.nonzero(guide.allowed())[0]}   # the first token
    >>> "{" in pieces, "▁the" in pieces
    (True, False)

The token table: each id's bytes as its text is decoded (sentencepiece: "▁" as a space, `<0xNN>` pieces as that
byte; tekken: its byte piece), control tokens marked special (b"\\xff" + name, llguidance's convention), so they
are never allowed inside the JSON. A sentencepiece reply's first piece carries a "▁" the decoded text drops (the
dummy prefix): one space before the document is allowed for those tokenizers (JSON parsers skip it).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.extras import require

# the JSON compiler's options: json.dumps' separators, no free whitespace
_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = {"type": "object"}


def check_schema(schema: Any, where: str = "json_schema") -> str:
    """A JSON schema (a mapping, or its JSON text; True / {} = any JSON value) as canonical JSON text, checked to
    compile; the one-line error names `where`."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise ConfigError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    text = json.dumps(schema, ensure_ascii=False)  # key order kept: properties come in the order given
    _llguidance(where)
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(_grammar(text, lead_space=False))
    if problem:  # its first line says what; the grammar it quotes after that is ours, not the client's
        first = problem.strip().splitlines()[0] if problem.strip() else problem
        raise ConfigError(f"{where}: the schema cannot be enforced: {' '.join(first.split())[:300]}")
    return text


def response_format_schema(value: Any, where: str = "response_format") -> str | None:
    """OpenAI's response_format as a schema's text: {"type": "text"} -> None; {"type": "json_object"} -> any JSON
    object; {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}} -> its schema."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise ConfigError(f"{where}: must be an object with a type (\"text\", \"json_object\" or \"json_schema\")")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return check_schema(_ANY_OBJECT, where)
    if kind != "json_schema":
        raise ConfigError(f"{where}.type: must be \"text\", \"json_object\" or \"json_schema\", got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{where}.json_schema: must be an object with a name and a schema")
    return check_schema(spec.get("schema") if spec.get("schema") is not None else {}, f"{where}.json_schema.schema")


def _grammar(schema_text: str, lead_space: bool) -> str:
    """llguidance's grammar of the schema (a Lark grammar embedding the JSON), with an optional leading space."""
    schema = json.loads(schema_text)
    schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **_OPTIONS}}
    body = f"%json {json.dumps(schema)}"
    return f'start: " "? json_value\njson_value: {body}' if lead_space else f"start: {body}"


def _llguidance(what: str) -> None:
    require("structured", what)


class _Table:
    """A tokenizer as llguidance reads it (TokenizerWrapper's fields): each id's bytes, the special ids, and a
    tokenize callable whose tokens' bytes join to exactly its input (no dummy prefix)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokens, self.special_token_ids, self._encode, self.lead_space = _token_table(tokenizer)
        self.eos_token_id = int(getattr(tokenizer, "eos_id", 2))
        self.bos_token_id = int(getattr(tokenizer, "bos_id", 1))

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._encode(text)


def _token_table(tokenizer: Any) -> tuple[list[bytes], list[int], Any, bool]:
    """(bytes per id, special ids, tokenize without a dummy prefix, whether the tokenizer has a dummy prefix)."""
    from mixtrt.runtime.tokenizer import Tokenizer

    raw = getattr(tokenizer, "_raw", None)
    if getattr(tokenizer, "tekken", False) and raw is not None:  # mistral-common's tekken
        specials = list(range(int(raw.num_special_tokens)))
        tokens = [b"\xff" + raw.id_to_piece(i).encode() if i < len(specials) else bytes(raw.id_to_byte_piece(i))
                  for i in range(int(tokenizer.vocab_size))]
        return tokens, specials, lambda s: [int(i) for i in raw.encode(s, bos=False, eos=False)], False
    text = getattr(tokenizer, "_text", None) or getattr(tokenizer, "text", None) or tokenizer
    if not isinstance(text, Tokenizer):
        raise ConfigError(f"structured output: {type(tokenizer).__name__} is not a tokenizer mixtrt can constrain")
    from mixtrt.runtime.jinja_tokenizer import _without_dummy_prefix

    plain, _, dummy_prefix = _without_dummy_prefix(text.path)
    tokens, specials = [], []
    for i in range(plain.get_piece_size()):
        piece = plain.id_to_piece(i)
        if plain.is_control(i) or plain.is_unknown(i) or plain.is_unused(i):
            tokens.append(b"\xff" + piece.encode())
            specials.append(i)
        elif plain.is_byte(i):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    for token in getattr(tokenizer, "added_tokens", ()):  # a template's added tokens: single special ids
        while len(tokens) <= token.id:
            tokens.append(b"")
        if token.id not in specials:
            tokens[token.id] = b"\xff" + token.content.encode()
            specials.append(token.id)
    while len(tokens) < int(getattr(tokenizer, "vocab_size", len(tokens))):
        tokens.append(b"")
    return tokens, specials, lambda s: [int(i) for i in plain.encode(s)], dummy_prefix


_TABLES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _tokenizer(tokenizer: Any) -> tuple[Any, bool]:
    """llguidance's tokenizer for ours (built once per tokenizer object: ~0.1-0.6 s), and its lead-space rule."""
    with _LOCK:
        found = _TABLES.get(tokenizer)
        if found is None:
            import llguidance

            table = _Table(tokenizer)
            found = (llguidance.LLTokenizer(llguidance.TokenizerWrapper(table)), table.lead_space)
            _TABLES[tokenizer] = found
        return found


class JsonGuide:
    """One row's constraint: `allowed()` the tokens the schema allows next (a bool mask [V]; the eos ids once the
    document is complete), `consume(token)` after each choice."""

    def __init__(self, tokenizer: Any, schema_text: str, eos_ids: Iterable[int], vocab_size: int | None = None
                 ) -> None:
        _llguidance("structured output")
        import llguidance

        lltok, lead_space = _tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(lltok, _grammar(schema_text, lead_space), log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"json_schema: the schema cannot be enforced: {self.matcher.get_error()}")
        self.vocab = int(vocab_size if vocab_size is not None else lltok.vocab_size)
        self.eos_ids = frozenset(int(t) for t in eos_ids if 0 <= int(t) < self.vocab)
        self.eos = np.array(sorted(self.eos_ids), np.int64)
        self.ended = False

    def allowed(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        mask = np.unpackbits(bits, bitorder="little", count=min(self.vocab, bits.size * 8)).astype(bool)
        if mask.size < self.vocab:  # ids past the tokenizer's (a padded vocabulary) are never allowed
            mask = np.concatenate([mask, np.zeros(self.vocab - mask.size, bool)])
        if self.matcher.is_accepting() and self.eos.size:
            mask[self.eos] = True  # the document is complete: the row's own eos ids end it
        return mask

    def consume(self, token: int) -> None:
        if self.ended or int(token) in self.eos_ids:
            self.ended = True
            return
        if not self.matcher.consume_token(int(token)):
            raise ConfigError(f"structured output: token {token} is not one the schema allows "
                              f"({self.matcher.get_error()})")
