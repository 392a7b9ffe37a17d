"""Structured output: a reply constrained, token by token, to JSON that a JSON schema accepts, to a grammar (Lark in
llguidance's dialect, or llama.cpp's GBNF), to a regular expression, or to one of a list of strings (vLLM's four).

llguidance (the `structured` extra; vLLM's and SGLang's grammar engine) compiles the constraint and, at each step,
gives the set of tokens that keep the text a prefix of an accepted one; the sampler sets every other score to -inf
before it chooses, so greedy and sampled rows alike write what the constraint accepts (until a length limit or a
stop string cuts them). JSON is written without free whitespace, with json.dumps' separators (", " and ": "): the
form models read most, and a model cannot run off into whitespace.

    >>> from mixtrt.runtime.tokenizer import Tokenizer
    >>> schema = check_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    >>> guide = Guide(Tokenizer.load(), ("json_schema", schema), eos_ids=[2])  # needs mixtrt[structured]
    >>> pieces = {Tokenizer.load().id_to_piece(i) for i in np.nonzero(guide.allowed())[0]}   # the first token
    >>> '{"' in pieces, '▁{"' in pieces, "▁the" in pieces    # the object's start, its key's quote forced
    (True, True, False)

The token table: each id's bytes as its text is decoded (sentencepiece: "▁" as a space, `<0xNN>` pieces as that
byte; tekken: its byte piece), control tokens marked special (b"\\xff" + name, llguidance's convention), so they
are never allowed inside the text. The text of a new message (chat, generate()'s default) on a sentencepiece
tokenizer is its pieces' with the first piece's "▁" dropped (the dummy prefix), so the grammar is put after one
space (`start: " " reply`) and, at the first step, a "▁" piece is matched as it is while any other token (a byte
piece, a piece without "▁") is matched after that space (a copy of the matcher fed a lone space): the model may write
its first word as it would, and the text is exactly what the constraint accepts. A row whose text continues its
prompt (a completion) keeps that space in its text, so there the constrained text starts at once.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixtrt.runtime.errors import ConfigError, GuideError
from mixtrt.runtime.extras import require
from mixtrt.runtime.prompts import check_text
from mixtrt.runtime.tool_calls import NAME, SCHEMA_LISTS, SCHEMA_MAPS, SCHEMA_ONE

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
        except RecursionError:
            raise ConfigError(f"{where}: nested too deeply to read") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise ConfigError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    if "x-guidance" in schema:  # llguidance's own options: the JSON form is fixed here (_OPTIONS)
        raise ConfigError(f"{where}: x-guidance is not taken (the JSON's form is fixed: json.dumps' separators)")
    try:
        text = json.dumps(schema, ensure_ascii=False, allow_nan=False)  # key order kept: the order keys are written
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: the schema is not JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{where}: the schema is nested too deeply") from None
    try:
        grammar = _lark("json_schema", text, lead_space=False)
    except ConfigError as e:  # closed(): too deep to walk
        raise ConfigError(f"{where}: {e}") from None
    _enforceable(grammar, where, "json_schema")
    return text


def _enforceable(grammar: str, where: str, kind: str) -> None:
    """One ConfigError naming `where` unless llguidance compiles the grammar of a constraint of `kind`."""
    _llguidance(where)
    problem = _grammar_problem(grammar)
    if problem:
        raise ConfigError(f"{where}: the {_NOUNS[kind]} cannot be enforced: {problem}")


_QUOTE = re.compile(r"^\s*\d+ \| ")  # llguidance quoting our grammar line (ours, not the client's)


def _said(problem: str) -> str:
    """llguidance's message in one line, in the schema's terms: without the position in our grammar and the quote
    of it, the caret lines dropped; its hint of an option (x-guidance, not taken here) put as what to change."""
    # a Rust panic's message carries its backtrace (frames, the build's file paths): the assertion is the message
    problem = problem.split("<backtrace>", 1)[0].split("stack backtrace:", 1)[0]
    problem = re.sub(r"^\s*panic:\s*", "llguidance's limit: ", problem)
    lines = []
    for line in problem.strip().splitlines():
        if _QUOTE.match(line):
            break
        if line.strip() and set(line.strip()) != {"^"}:
            lines.append(line.strip())
    said = re.sub(r"^at \d+\(\d+\): ", "", " ".join(lines))
    said = said.replace(". Enable 'coerce_one_of' option to approximate oneOf with anyOf",
                        " where branches can match the same value (use anyOf)")
    return said[:400]


def response_format_schema(value: Any, where: str = "response_format") -> str | None:
    """OpenAI's response_format as a schema's text: {"type": "text"} -> None; {"type": "json_object"} -> any JSON
    object; {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}} -> its schema."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise ConfigError(f"{where}: must be an object with a type (\"text\", \"json_object\" or \"json_schema\")")
    kind = value["type"]
    _known(value, {"text": {"type"}, "json_object": {"type", "schema"}}.get(kind, {"type", "json_schema"}), where)
    if kind == "text":
        return None
    if kind == "json_object":  # with "schema" (Together's and Fireworks' form): that schema
        return check_schema(value["schema"] if value.get("schema") is not None else _ANY_OBJECT, f"{where}.schema")
    if kind != "json_schema":
        raise ConfigError(f"{where}.type: must be \"text\", \"json_object\" or \"json_schema\", got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{where}.json_schema: must be an object with a name (and a schema)")
    _known(spec, {"name", "schema", "strict", "description"}, f"{where}.json_schema")
    if not NAME.fullmatch(spec["name"]):  # OpenAI's rule for a response format's name, as for a function's
        raise ConfigError(f"{where}.json_schema.name: must be 1-64 letters, digits, '_' or '-', got {spec['name']!r}")
    if spec.get("strict") not in (None, True, False):
        raise ConfigError(f"{where}.json_schema.strict: must be true or false, got {spec['strict']!r}")
    return check_schema(spec.get("schema") if spec.get("schema") is not None else {}, f"{where}.json_schema.schema")


def _known(value: Mapping[str, Any], keys: set[str], where: str) -> None:
    """A 400-style error naming the first key of `value` that is not one of `keys` (a null one counts as left out)."""
    for key in value:
        if key not in keys and value[key] is not None:
            raise ConfigError(f"{where}: unknown field {key!r}")


# the first line of a grammar that writes its own space in front (a named tool call's arguments after the forced
# `"arguments":`): no lead space is put before it
OWN_SPACE = "// its own leading space\n"


@functools.lru_cache(maxsize=64)
def _lark(kind: str, text: str, lead_space: bool) -> str:
    """llguidance's grammar of a constraint, after one space where the row's text drops one (the module's doc)."""
    if kind == "grammar":
        if not lead_space:
            return text
        # the client's grammar kept whole (its own start rule) as a named part of llguidance's multi-grammar form
        return json.dumps({"grammars": [{"lark_grammar": 'start: " " @reply'},
                                        {"name": "reply", "lark_grammar": text}]})
    if kind == "json_schema":
        body = json_rule(json.loads(text))
    elif kind == "regex":
        body = f"/{llguidance_regex(text)}/"
    elif kind == "choice":  # one regex, not Lark alternatives: llguidance's parser takes at most 2,000 of those
        body = f"/{llguidance_regex('(?:' + '|'.join(_escaped(c) for c in json.loads(text)) + ')')}/"
    else:
        raise ValueError(f"unknown structured-output kind {kind!r}")
    return f'start: " " reply\nreply: {body}' if lead_space else f"start: {body}"


def llguidance_regex(pattern: str) -> str:
    """A regex as the body of a Lark regex terminal (its slashes escaped)."""
    import llguidance

    return str(llguidance.regex_to_lark(pattern))


_META = set("\\.+*?()|[]{}^$#&-~")


def _escaped(text: str) -> str:
    """`text` as a regex (Rust's syntax) that matches it literally."""
    return "".join("\\" + c if c in _META else c for c in text)


def _llguidance(what: str) -> None:
    require("structured", what)


@dataclass(frozen=True, eq=False)
class Lead:
    """A dummy-prefix tokenizer's first step: which ids are pieces whose "▁" a new message's text drops, and the id
    of a lone space (the "▁" piece, else the space's byte piece) that the other ids are matched after."""

    spaced: np.ndarray  # bool [ids]
    space: int


class _Table:
    """A tokenizer as llguidance reads it (TokenizerWrapper's fields): each id's bytes, the special ids, and a
    tokenize callable whose tokens' bytes join to exactly its input (no dummy prefix)."""

    def __init__(self, tokenizer: Any, where: str) -> None:
        self.tokens, self.special_token_ids, self._encode, self.lead = _token_table(tokenizer, where)
        self.eos_token_id = int(getattr(tokenizer, "eos_id", 2))
        self.bos_token_id = int(getattr(tokenizer, "bos_id", 1))

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._encode(text)


def _token_table(tokenizer: Any, where: str) -> tuple[list[bytes], list[int], Any, Lead | None]:
    """(bytes per id, special ids, tokenize without a dummy prefix, the lead: None without a dummy prefix)."""
    from mixtrt.runtime.tokenizer import Tokenizer

    raw = getattr(tokenizer, "_raw", None)
    if getattr(tokenizer, "tekken", False) and raw is not None:  # mistral-common's tekken
        specials = list(range(int(raw.num_special_tokens)))
        tokens = [b"\xff" + raw.id_to_piece(i).encode() if i < len(specials) else bytes(raw.id_to_byte_piece(i))
                  for i in range(int(tokenizer.vocab_size))]
        return tokens, specials, lambda s: [int(i) for i in raw.encode(s, bos=False, eos=False)], None
    text = getattr(tokenizer, "_text", None) or getattr(tokenizer, "text", None) or tokenizer
    if not isinstance(text, Tokenizer):
        raise ConfigError(f"{where}: structured output reads the tokenizer's pieces, and {type(tokenizer).__name__} "
                          "is not a tokenizer mixtrt can read them from")
    from mixtrt.runtime.jinja_tokenizer import _SP_USER_DEFINED, _without_dummy_prefix

    plain, types, dummy_prefix = _without_dummy_prefix(text.path)
    tokens, specials, spaced, spaces = [], [], [], []
    for i in range(plain.get_piece_size()):
        piece = plain.id_to_piece(i)
        # user-defined pieces are Mistral's bracketed specials ([REFERENCE_DOC_0], [control_8], ...): never JSON text
        if plain.is_control(i) or plain.is_unknown(i) or plain.is_unused(i) or types[i] == _SP_USER_DEFINED:
            tokens.append(b"\xff" + piece.encode())
            specials.append(i)
        elif plain.is_byte(i):
            tokens.append(bytes([int(piece[3:5], 16)]))
            if tokens[-1] == b" ":
                spaces.append(i)
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
            if piece.startswith("\u2581"):
                spaced.append(i)
                if piece == "\u2581":
                    spaces.insert(0, i)
    for token in getattr(tokenizer, "added_tokens", ()):  # a template's added tokens: single special ids
        while len(tokens) <= token.id:
            tokens.append(b"")
        if token.id not in specials:
            tokens[token.id] = b"\xff" + token.content.encode()
            specials.append(token.id)
    while len(tokens) < int(getattr(tokenizer, "vocab_size", len(tokens))):
        tokens.append(b"")
    lead = None
    if dummy_prefix and spaces:  # (without a lone space's token the text simply starts at once)
        mask = np.zeros(len(tokens), bool)
        mask[spaced] = True
        lead = Lead(mask, spaces[0])
    return tokens, specials, lambda s: [int(i) for i in plain.encode(s)], lead


_TABLES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _tokenizer(tokenizer: Any, where: str = "json_schema"
               ) -> tuple[Any, Lead | None, int, dict[tuple[str, str, bool], Any]]:
    """llguidance's tokenizer for ours (built once per tokenizer object: ~0.1-0.6 s), its lead (None: no dummy
    prefix), its eos id and the compiled matchers of the constraints seen (each row gets a copy: compiling a large
    schema takes ms)."""
    with _LOCK:
        found = _TABLES.get(tokenizer)
        if found is None:
            import llguidance

            table = _Table(tokenizer, where)
            found = (llguidance.LLTokenizer(llguidance.TokenizerWrapper(table)), table.lead,
                     table.eos_token_id, {})
            _TABLES[tokenizer] = found
        return found


def prepare(tokenizer: Any, constraint: tuple[str, str], new_message: bool = True) -> None:
    """Build the tokenizer's table and the constraint's matcher now (a server does it on the request's thread, so
    the engine loop never stalls on it); Guide then copies the compiled matcher."""
    _matcher(tokenizer, constraint, new_message)


_MATCHERS_KEPT = 32  # compiled constraints kept per tokenizer
_NOUNS = {"json_schema": "schema", "grammar": "grammar", "regex": "regular expression", "choice": "choice"}


def _matcher(tokenizer: Any, constraint: tuple[str, str], new_message: bool) -> tuple[Any, int, Lead | None]:
    """A fresh matcher for the constraint (a copy of the compiled one), llguidance's eos, and the lead where the
    row's text drops a dummy-prefix space in front (new_message on such a tokenizer: the module's doc)."""
    kind, text = constraint
    _llguidance("structured output")
    import llguidance

    lltok, lead, eos, compiled = _tokenizer(tokenizer, kind)
    key = (kind, text, lead is not None and new_message and not (kind == "grammar" and text.startswith(OWN_SPACE)))
    with _LOCK:
        proto = compiled.get(key)
    if proto is None:
        proto = llguidance.LLMatcher(lltok, _lark(kind, text, key[2]), log_level=0)
        problem = proto.get_error() if proto.is_error() else _first_token_problem(proto, eos)
        if problem:
            raise ConfigError(f"{kind}: the {_NOUNS[kind]} cannot be enforced: {_said(problem)}")
        with _LOCK:
            if len(compiled) >= _MATCHERS_KEPT:
                compiled.pop(next(iter(compiled)))
            compiled[key] = proto
    return proto.deep_copy(), eos, lead if key[2] else None


def _first_token_problem(proto: Any, eos: int) -> str:
    """What stops a constraint at its first token, found by feeding copies a few allowed tokens (the first, middle
    and last ids, eos aside): llguidance's limits (thousands of alternatives in one rule: at most 2,000 parser items
    a row; a regex too big for its lexer; a rule that recurses with no end), or that it accepts no text at all (a
    regex like `[^\\s\\S]`); "" otherwise. A grammar whose other first tokens fail, fails at that token."""
    ids = _allowed_ids(proto)
    ids = ids[ids != eos]
    if not ids.size:
        return "" if proto.is_accepting() else "it accepts no text"
    dead_ends = 0
    tried = sorted({0, ids.size // 2, ids.size - 1})
    for i in tried:
        probe = proto.deep_copy()
        if not probe.consume_token(int(ids[i])):
            return str(probe.get_error().split("<state>")[0]) or "it refused its own first token"
        after = _allowed_ids(probe)
        if probe.is_error():  # nothing can follow (llguidance's NoExtensionBias), or a limit
            problem = str(probe.get_error().split("<state>")[0]).strip()
            return "it accepts no text" if problem == "NoExtensionBias" else problem
        dead_ends += not probe.is_accepting() and not after[after != eos].size
    return "it accepts no text" if dead_ends == len(tried) else ""


def _allowed_ids(matcher: Any) -> np.ndarray:
    return np.nonzero(np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little"))[0]


def check_grammar(grammar: Any, where: str = "grammar") -> str:
    """A grammar as Lark text in llguidance's dialect, checked to compile: Lark (a `start` rule; `%json {schema}`
    embeds a schema) or llama.cpp's GBNF (a `root` rule), which is converted (llguidance's converter)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise ConfigError(f"{where}: a grammar must be non-empty text (Lark with a start rule, or GBNF with a root "
                          "rule)")
    _llguidance(where)
    try:
        lark = _as_lark(grammar)
    except Exception as e:  # the converter's own error type and wording
        raise ConfigError(f"{where}: neither Lark (no start rule) nor GBNF: {_said(str(e))}") from None
    _enforceable(lark, where, "grammar")
    return lark


@functools.lru_cache(maxsize=64)
def _as_lark(grammar: str) -> str:
    """Lark text as it is, GBNF converted (remembered: a server request meets its grammar several times)."""
    from llguidance.gbnf_to_lark import any_to_lark

    return str(any_to_lark(grammar))


def check(kind: str, value: Any, where: str | None = None) -> Any:
    """The constraint of `kind` (GenerationConfig's field names: json_schema, grammar, regex, choice) checked, in its
    kept form (check_schema's, check_grammar's, check_regex's, check_choice's); errors name `where` (default: kind)."""
    checks = {"json_schema": check_schema, "grammar": check_grammar, "regex": check_regex, "choice": check_choice}
    return checks[kind](value, where or kind)


def constraint_text(kind: str, value: Any) -> str:
    """A checked constraint as Guide and prepare take it: its text, a choice's as a JSON list."""
    return json.dumps(list(value)) if kind == "choice" else str(value)


def check_regex(pattern: Any, where: str = "regex") -> str:
    """A regular expression (Rust's regex syntax, as vLLM's llguidance backend takes it; anchored: the whole reply
    matches), checked to compile."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: a regular expression must be non-empty text")
    check_text(pattern, where)
    if (len(pattern) - len(pattern.rstrip("\\"))) % 2:  # llguidance's converter would drop the lone backslash
        raise ConfigError(f"{where}: the regular expression ends with an incomplete escape (a lone backslash)")
    _enforceable(_lark("regex", pattern, lead_space=False), where, "regex")
    return pattern


def check_choice(choices: Any, where: str = "choice") -> tuple[str, ...]:
    """A list of strings, the reply exactly one of them, as a tuple."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)) or not choices or \
            any(not isinstance(c, str) or not c for c in choices):
        raise ConfigError(f"{where}: must be a non-empty list of non-empty strings, got {choices!r}"[:300])
    for i, choice in enumerate(choices):
        check_text(choice, f"{where}[{i}]")
    _enforceable(_lark("choice", json.dumps(list(choices)), lead_space=False), where, "choice")
    return tuple(choices)


@functools.lru_cache(maxsize=64)
def _grammar_problem(grammar: str) -> str:
    """What llguidance says is wrong with a grammar, "" when nothing is; remembered, since a constraint is checked
    where it is given and again in each config made from it."""
    import llguidance

    return _said(llguidance.LLMatcher.validate_grammar(grammar))


def json_rule(schema: Mapping[str, Any]) -> str:
    """A Lark rule body that is JSON the schema accepts, written in this module's form (json.dumps' separators),
    with nothing the schema does not name (closed)."""
    return f"%json {json.dumps({**closed(schema), 'x-guidance': _OPTIONS})}"


def _names_enough(schema: Mapping[str, Any]) -> bool:
    """Whether an object schema's own properties hold every key it requires and enough keys for its
    minProperties (where patternProperties do not add more): closing it must not make it unsatisfiable."""
    given, asked = schema.get("properties"), schema.get("required")
    props: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    required: list[Any] = asked if isinstance(asked, list) else []
    least = schema.get("minProperties")
    return all(name in props for name in required) and (
        "patternProperties" in schema or not isinstance(least, int) or least <= len(props))


# schema keywords whose value is one schema, a map of names to schemas, a list of schemas (tool_calls' tables)
_ONE, _MAPS = SCHEMA_ONE, SCHEMA_MAPS
_LISTS = (*SCHEMA_LISTS, "items")  # items as a list: the older drafts' tuple form
_OPEN = {"additionalProperties", "unevaluatedProperties"}
_DEFS = ("$defs", "definitions")
_NOTES = {"$ref", "title", "description", "$comment", "examples", "default"}  # beside a $ref, no join


def closed(schema: Any) -> Any:
    """The schema with no room for keys or items it does not name, as xgrammar's strict mode (vLLM's default JSON
    backend) and OpenAI's strict structured outputs have it: an object schema with `properties` or
    `patternProperties` and no `additionalProperties` / `unevaluatedProperties` of its own gets
    `additionalProperties: false` (unless it requires keys it does not name, or more keys than it names), an array
    with `prefixItems` and no `items` gets `items: false`. A schema joined with others (allOf, a $ref beside
    keywords of its own, anyOf / oneOf beside its own properties) is left as written with all it holds, and where
    the schema has one anywhere its $defs are too (a definition may be a joined part). Every text the result
    allows, the schema accepts; an explicit `additionalProperties` keeps its word."""
    if not isinstance(schema, Mapping):
        return schema
    try:
        return _closed(schema, keep_defs=_has_join(schema))
    except RecursionError:  # deeper than llguidance's own limit lets through (it refuses a few hundred levels)
        raise ConfigError("the schema is nested too deeply") from None


def _joined(schema: Mapping[str, Any]) -> bool:
    """Whether the schema is joined with others at its level (closing it, or anything in it, could shut out what
    the others name)."""
    named = "properties" in schema or "patternProperties" in schema
    return ("allOf" in schema or ("$ref" in schema and not set(schema) <= _NOTES)
            or (named and ("anyOf" in schema or "oneOf" in schema)))


def _has_join(value: Any) -> bool:
    if isinstance(value, Mapping):
        return _joined(value) or any(_has_join(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_join(v) for v in value)
    return False


def _closed(schema: Any, keep_defs: bool) -> Any:
    if not isinstance(schema, Mapping) or _joined(schema):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), Mapping):
            out[key] = _closed(out[key], keep_defs)
    for key in _MAPS:
        if isinstance(out.get(key), Mapping) and not (keep_defs and key in _DEFS):
            out[key] = {name: _closed(value, keep_defs) for name, value in out[key].items()}
    for key in _LISTS:  # anyOf / oneOf here are whole alternatives (no own properties beside them: _joined)
        if isinstance(out.get(key), list):
            out[key] = [_closed(value, keep_defs) for value in out[key]]
    if "$ref" not in out and "anyOf" not in out and "oneOf" not in out:
        if ("properties" in out or "patternProperties" in out) and not _OPEN & out.keys() and _names_enough(out):
            out["additionalProperties"] = False
        if "prefixItems" in out and not {"items", "additionalItems", "unevaluatedItems"} & out.keys():
            out["items"] = False
    return out


class Guide:
    """One row's constraint: `allowed()` the tokens the constraint allows next (a bool mask [V]; the eos ids once the
    text is complete), `consume(token)` after each choice."""

    def __init__(self, tokenizer: Any, constraint: tuple[str, str], eos_ids: Iterable[int],
                 vocab_size: int | None = None, new_message: bool = True) -> None:
        """constraint: (kind, text) as GenerationConfig.constraint gives it (json_schema, grammar, regex or choice;
        the text check's, a choice's as a JSON list: constraint_text). new_message: the row's text is a new
        message's (False: it continues the prompt's, and the constrained text starts at once)."""
        self.kind = constraint[0]
        self.matcher, tokenizer_eos, self.lead = _matcher(tokenizer, constraint, new_message)
        # with a lead, until the first token: the matcher after a lone space (the module's doc; None where the
        # constraint cannot go on after it: then only "▁" pieces, which fail on their own if it cannot go on at all)
        self.unspaced = None
        if self.lead is not None:
            self.unspaced = self.matcher.deep_copy()
            if not self.unspaced.consume_token(self.lead.space):
                self.unspaced = None
        self.vocab = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
        self.eos_ids = frozenset(int(t) for t in eos_ids if 0 <= int(t) < self.vocab)
        if not self.eos_ids:
            raise ConfigError(f"{self.kind}: the reply ends with an eos id once its text is complete, and the row "
                              "has none (eos_token_id=(), ignore_eos)")
        self.eos = np.array(sorted(self.eos_ids), np.int64)
        # llguidance ends a document with the tokenizer's eos: only the row's own eos ids may end it
        self.foreign_eos = tokenizer_eos if tokenizer_eos not in self.eos_ids and tokenizer_eos < self.vocab else None
        self.ended = False
        self.consumed = 0

    def _cannot_go_on(self, why: str = "", matcher: Any = None) -> GuideError:
        """The row's failure (the Engine cancels that row): llguidance's own words (the failed matcher's) where none
        are given, without the grammar and the parser state it quotes after them."""
        error = (matcher if matcher is not None else self.matcher).get_error()
        why = why or _said(error.split("<state>")[0])[:200] or "the grammar refused the token"
        return GuideError(f"structured output cannot go on after {self.consumed} tokens: {why}")

    def _mask(self, matcher: Any) -> np.ndarray:
        if matcher.is_error():  # never chosen from: a failed guide's row is cancelled (GuideError)
            raise self._cannot_go_on(matcher=matcher)
        try:
            bits = np.frombuffer(matcher.compute_bitmask(), np.uint8)
        except Exception as e:  # llguidance failing in its own code: this row's failure, not the batch's
            raise self._cannot_go_on(str(e)) from None
        mask = np.unpackbits(bits, bitorder="little", count=min(self.vocab, bits.size * 8)).view(bool)  # 0/1: no copy
        if mask.size < self.vocab:  # ids past the tokenizer's (a padded vocabulary) are never allowed
            mask = np.concatenate([mask, np.zeros(self.vocab - mask.size, bool)])
        return mask

    def _spaced(self) -> np.ndarray:
        assert self.lead is not None
        spaced = np.zeros(self.vocab, bool)
        n = min(self.vocab, self.lead.spaced.size)
        spaced[:n] = self.lead.spaced[:n]
        return spaced

    def complete(self) -> bool:
        """The text so far is one the constraint accepts whole (an eos ended it, or one could)."""
        return self.ended or self._accepting()

    def _accepting(self) -> bool:
        if self.lead is not None and self.consumed == 0:  # nothing written yet: the text so far is ""
            return self.unspaced is not None and bool(self.unspaced.is_accepting())
        return bool(self.matcher.is_accepting())

    def allowed(self) -> np.ndarray:
        mask = self._mask(self.matcher)
        if self.lead is not None and self.consumed == 0:  # a "▁" piece as it is, any other after a lone space
            spaced = self._spaced()
            mask &= spaced
            if self.unspaced is not None:
                mask |= self._mask(self.unspaced) & ~spaced
        if self.foreign_eos is not None:
            mask[self.foreign_eos] = False
        if self._accepting():
            mask[self.eos] = True  # the document is complete: the row's own eos ids end it
        if not mask.any():  # nothing can go on (never chosen from: a choice would break the constraint)
            raise self._cannot_go_on("no token can continue the text")
        return mask

    def consume(self, token: int) -> None:
        if self.ended or (int(token) in self.eos_ids and self._accepting()):
            self.ended = True
            return
        if self.lead is not None and self.consumed == 0:
            if not (0 <= int(token) < self.lead.spaced.size and self.lead.spaced[int(token)]):
                if self.unspaced is None:
                    raise self._cannot_go_on()
                self.matcher = self.unspaced
            self.unspaced = None
        try:
            taken = self.matcher.consume_token(int(token))
        except Exception as e:  # llguidance failing in its own code: this row's failure, not the batch's
            raise self._cannot_go_on(str(e)) from None
        if not taken:  # past llguidance's limits (a schema of many alternatives)
            raise self._cannot_go_on()
        self.consumed += 1
