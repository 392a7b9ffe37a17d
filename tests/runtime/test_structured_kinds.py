"""Structured output beyond JSON schemas (runtime/structured.py): a regular expression, a choice of strings and a
grammar (llama.cpp's GBNF or llguidance's Lark), on sentencepiece and tekken tokenizers, for a new message (a
dummy-prefix space allowed in front) and for a continuation (the text starts at once). The oracle is Python's re
on languages both regex dialects read alike."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import GenerationConfig, Generator

pytest.importorskip("llguidance", reason="structured output needs mixtrt[structured]")
from mixtrt.runtime.structured import Guide, check_choice, check_grammar, check_regex  # noqa: E402
from tests.runtime.test_structured import tokenizers  # noqa: E402

ITEM = r"(yes|no|[0-9]{1,3})"
GBNF = 'root ::= item ("," item)*\nitem ::= "yes" | "no" | [0-9] | [0-9] [0-9] | [0-9] [0-9] [0-9]\n'
LARK = 'start: item ("," item)*\nitem: "yes" | "no" | /[0-9]{1,3}/\n'
CHOICES = ["positive", "negative", "neutral", "très bien", "a\"b\\c", "neg"]
CASES = {  # kind -> (constraint text, what Python's re accepts of the whole text)
    "regex": (r"[0-9]{3}-[A-Z][a-z]{1,5}( [a-z]{1,8})?", r"[0-9]{3}-[A-Z][a-z]{1,5}( [a-z]{1,8})?"),
    "choice": (json.dumps(CHOICES), "|".join(re.escape(c) for c in CHOICES)),
    "spaced": (json.dumps([" A", "  B", "C d", " "]), r" A|  B|C d| "),  # a space in front is text too
    "spaced_regex": (r" [a-z]{2,4}( [0-9])?", r" [a-z]{2,4}( [0-9])?"),
    "gbnf": (None, rf"{ITEM}(,{ITEM})*"),
    "lark": (None, rf"{ITEM}(,{ITEM})*"),
}


@pytest.fixture(scope="module")
def toks():
    return tokenizers()


def _constraint(kind):
    if kind == "gbnf":
        return "grammar", check_grammar(GBNF)
    if kind == "lark":
        return "grammar", check_grammar(LARK)
    return {"spaced": "choice", "spaced_regex": "regex"}.get(kind, kind), CASES[kind][0]


def _walk(tok, constraint, new_message, seed, steps=80):
    guide, rng, ids = Guide(tok, constraint, [tok.eos_id], new_message=new_message), np.random.default_rng(seed), []
    for _ in range(steps):
        allowed = guide.allowed()
        token = int(np.argmax(np.where(allowed, rng.standard_normal(allowed.size) * 3, -np.inf)))
        guide.consume(token)
        if token == tok.eos_id:
            return ids
        ids.append(token)
    pytest.fail(f"seed {seed}: no end in {steps} tokens: {tok.decode(ids)!r}")


def _text(tok, ids, new_message):
    """A new message's text (the decode of its ids alone), or a continuation's (what the ids add to a prompt's)."""
    if new_message:
        return tok.decode(ids)
    before = tok.encode("Say:", bos=False)
    return tok.decode(before + ids)[len(tok.decode(before)):]


@pytest.mark.parametrize("kind", ["v1", "v3", "tekken"])
@pytest.mark.parametrize("what", sorted(CASES))
@pytest.mark.parametrize("new_message", [True, False])
def test_random_walks_write_what_the_constraint_accepts(toks, kind, what, new_message):
    """Random logits masked by the guide, 8 seeds: every walk ends with text the constraint accepts whole. A new
    message on a sentencepiece tokenizer may start with a "▁" piece (the decode drops that space: a constraint that
    starts with a space needs one more); a continuation never does, and tekken has no dummy prefix."""
    tok, constraint = toks[kind], _constraint(what)
    for seed in range(8):
        ids = _walk(tok, constraint, new_message, seed)
        text = _text(tok, ids, new_message)
        assert re.fullmatch(CASES[what][1], text), (seed, text, [tok.id_to_piece(i) for i in ids])


def test_the_lead_space_is_allowed_only_where_the_decode_drops_it(toks):
    """choice ["yes", "no"]: a new message on a sentencepiece tokenizer may start with "▁yes" (its natural first
    piece); a continuation (a completion's text, which keeps that space) may not; tekken never (no dummy prefix)."""
    for kind in ("v1", "v3"):
        tok = toks[kind]
        spaced = tok.piece_id("▁yes") if hasattr(tok, "piece_id") else tok.encode("yes", bos=False)[0]
        assert tok.id_to_piece(spaced) == "▁yes"
        assert Guide(tok, ("choice", '["yes", "no"]'), [tok.eos_id], new_message=True).allowed()[spaced]
        assert not Guide(tok, ("choice", '["yes", "no"]'), [tok.eos_id], new_message=False).allowed()[spaced]
    tok = toks["tekken"]
    for new_message in (True, False):
        mask = Guide(tok, ("choice", '["yes", "no"]'), [tok.eos_id], new_message=new_message).allowed()
        assert all(not tok.decode([int(i)]).startswith(" ") for i in np.nonzero(mask)[0])


def test_checks_and_their_one_line_errors():
    assert check_choice(["a", "b"]) == ("a", "b")
    assert check_regex(r"\d+") == r"\d+"
    assert check_grammar(LARK) == LARK  # Lark is kept as it is; GBNF is converted
    assert check_grammar(GBNF).lstrip().startswith("%llguidance")
    for call, message in [
        (lambda: check_regex("("), r"^regex: the regular expression cannot be enforced: .*unclosed group"),
        (lambda: check_regex(""), r"^regex: a regular expression must be non-empty text"),
        (lambda: check_regex(5), r"^regex: a regular expression must be non-empty text"),
        (lambda: check_choice([]), r"^choice: must be a non-empty list of non-empty strings"),
        (lambda: check_choice("yes"), r"^choice: must be a non-empty list"),
        (lambda: check_choice(["a", 1]), r"^choice: must be a non-empty list"),
        (lambda: check_choice(["a", ""]), r"^choice: must be a non-empty list"),
        (lambda: check_choice(["a\udcff"]), r"^choice\[0\] is not valid text"),
        (lambda: check_grammar("root ::= ("), r"^grammar: neither Lark \(no start rule\) nor GBNF: Expected '\)'"),
        (lambda: check_grammar("start: undefined_rule"), r"^grammar: the grammar cannot be enforced"),
        (lambda: check_grammar("  "), r"^grammar: a grammar must be non-empty text"),
        (lambda: GenerationConfig(regex="a", choice=("b",)), r"^regex and choice: give one of them"),
        (lambda: GenerationConfig(json_schema={}, grammar=LARK), r"^json_schema and grammar: give one of them"),
        (lambda: GenerationConfig(regex="[a-"), r"^regex: the regular expression cannot be enforced"),
    ]:
        with pytest.raises(ConfigError, match=message):
            call()
    assert GenerationConfig(choice=["x", "y"]).choice == ("x", "y")
    assert GenerationConfig(choice=("x",)).constraint() == ("choice", '["x"]')
    assert GenerationConfig(grammar=GBNF).grammar == check_grammar(GBNF)


@pytest.fixture(scope="module")
def gen(exported) -> Generator:
    return Generator.load(exported["mixtral-window"][1], threads=1)


@pytest.mark.parametrize("continuation", [False, True])
def test_generation_follows_each_kind(gen, continuation):
    """A real (random) model, greedy and sampled, as a new message and as a completion's continuation: the text is
    exactly what the constraint accepts and the row ends with eos."""
    ids = gen.tokenizer.encode("The answer is")
    for what, (_, pattern) in CASES.items():
        kind, text = _constraint(what)
        value = tuple(json.loads(text)) if kind == "choice" else text
        for extra in ({}, {"do_sample": True, "temperature": 1.3, "seed": 5}):
            out = gen.generate(ids, max_new_tokens=60, continuation=continuation, **{kind: value}, **extra)[0]
            assert out.finish_reason == "eos" and re.fullmatch(pattern, out.text), (what, extra, out.text)


def test_the_command_line_takes_each_kind(exported, tmp_path):
    """`mixtrt generate --choice A --choice B` / `--regex RE` / `--grammar G` / `--grammar-file FILE` (GBNF, as
    llama.cpp's): the printed text is accepted whole; two at once, or a bad one, is one line naming the flags."""
    import subprocess
    import sys

    art = exported["mixtral-window"][1]
    (tmp_path / "list.gbnf").write_text(GBNF)
    base = [sys.executable, "-m", "mixtrt", "generate", str(art), "--prompt", "Answer:", "--max-new-tokens", "40",
            "--threads", "1", "--json"]
    for extra, pattern in ((["--choice", "yes", "--choice", "no way"], r"yes|no way"),
                           (["--regex", CASES["regex"][0]], CASES["regex"][1]),
                           (["--grammar", LARK], CASES["lark"][1]),
                           (["--grammar-file", str(tmp_path / "list.gbnf")], CASES["gbnf"][1])):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["finish_reason"] == "eos" and re.fullmatch(pattern, out["text"]), (extra, out["text"])
    for extra, message in ((["--regex", "a", "--choice", "b"], "--regex and --choice: give one of them"),
                           (["--regex", "(a"], "--regex: the regular expression cannot be enforced"),
                           (["--grammar-file", str(tmp_path / "none.gbnf")], "--grammar-file"),
                           (["-j", "{}", "--grammar", LARK], "--json-schema and --grammar: give one of them")):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_forced_tool_calls_get_one_space_in_front(toks):
    """The JSON-list call grammars on a sentencepiece tokenizer: "required" (after [TOOL_CALLS]) may open with the
    "▁[" piece (the lead space), and a named choice (after the forced `"arguments":`) writes its own one space, so
    neither allows a second."""
    from mixtrt.runtime.tool_calls import tool_use

    tok = toks["v3"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    brace, bracket = (tok.encode(t, bos=False)[0] for t in ("{", "["))
    assert tok.id_to_piece(brace) == "▁{" and tok.id_to_piece(bracket) == "▁["
    lone = [i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "▁"][0]
    for choice, opener in (("required", bracket), ({"type": "function", "function": {"name": "f"}}, brace)):
        _, use = tool_use(tok, tools, choice)
        guide = Guide(tok, ("grammar", use.grammar), [tok.eos_id], new_message=True)
        assert guide.allowed()[opener]
        if choice == "required":  # "[" without the space, as tekken writes it, is the text after a lone space
            assert guide.allowed()[tok.piece_id("[") if hasattr(tok, "piece_id") else tok.encode("[", bos=False)[-1]]
        if guide.allowed()[lone]:
            guide.consume(lone)
            assert not guide.allowed()[opener]  # " " + " {": two spaces


def test_thousands_of_choices_and_a_grammar_past_llguidances_limits(toks):
    """5,000 choices (one regex) are served; a grammar of 5,000 alternatives, past llguidance's 2,000 items a row,
    is one error naming it when its matcher is made (a server's 400), not a failure at the first token."""
    tok = toks["v1"]
    many = [f"option number {i}" for i in range(5000)]
    text = tok.decode(_walk(tok, ("choice", json.dumps(many)), True, 0))
    assert text in many
    wide = check_grammar("root ::= " + " | ".join(f'"w{i}"' for i in range(5000)))
    with pytest.raises(ConfigError, match=r"^grammar: the grammar cannot be enforced: .*max is 2000"):
        Guide(tok, ("grammar", wide), [tok.eos_id])


@pytest.mark.parametrize("kind", ["v1", "v3", "tekken"])
def test_constraints_that_accept_no_text_are_refused_when_made(toks, kind):
    """A regex that matches nothing, a rule that recurses with no end: one error naming the field when the row's
    matcher is made (a server's 400), not an empty "complete" reply or a failure at the first token."""
    tok = toks[kind]
    for constraint, message in ((("regex", check_regex(r"[^\s\S]")), "it accepts no text"),
                                (("regex", check_regex(r" [^\s\S]")), "it accepts no text"),
                                (("grammar", check_grammar('root ::= "a" root')), "Too many items")):
        for new_message in (True, False):
            with pytest.raises(ConfigError, match=rf"^{constraint[0]}: the .* cannot be enforced: .*{message}"):
                Guide(tok, constraint, [tok.eos_id], new_message=new_message)


def test_a_constraint_given_for_a_call_replaces_the_configs(gen, exported):
    """A session (or a config) holding a regex, asked for a choice on one turn: that turn follows the choice (two
    constraints at once stay an error only when both are given for the call); `mixtrt chat` says when a reply is cut
    before its constrained text is complete."""
    import subprocess
    import sys

    session = gen.chat_session(config=GenerationConfig(regex=r" x[0-9]", max_new_tokens=20))
    assert re.fullmatch(r" x[0-9]", session.send("hi").text)
    assert session.send("again", choice=(" A", "B")).text in (" A", "B")
    assert re.fullmatch(r" x[0-9]", session.send("and again").text)  # the session's own again
    out = gen.generate("Hi", GenerationConfig(regex="[a-z]+", max_new_tokens=20), choice=("yes", "no"))[0]
    assert out.text in ("yes", "no")
    with pytest.raises(ConfigError, match="regex and choice: give one of them"):
        gen.generate("Hi", GenerationConfig(max_new_tokens=5), regex="a", choice=("b",))
    art = exported["mixtral-window"][1]
    r = subprocess.run([sys.executable, "-m", "mixtrt", "chat", str(art), "--regex", "[a-z]{60}", "--max-new-tokens",
                        "3", "--threads", "1"], input="hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "the reply was cut by --max-new-tokens before its text was complete (--regex)" \
        in r.stderr, r.stderr
