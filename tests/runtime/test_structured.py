"""Structured output (runtime/structured.py): replies constrained to JSON that a schema accepts, token by token,
with llguidance. Every walk below is checked with jsonschema (mistral-common's dependency) as the oracle: the text
parses and the schema accepts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import GenerationConfig, Generator

pytest.importorskip("llguidance", reason="structured output needs mixtrt[structured]")
jsonschema = pytest.importorskip("jsonschema", reason="the oracle: jsonschema comes with mixtrt[mistral]")
from mixtrt.runtime.structured import Guide, check_schema, response_format_schema  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b\"c", "é"]}, "maxItems": 3},
                         "home": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
                                  "additionalProperties": False}}}
SCHEMAS = {"person": PERSON, "enum": {"enum": ["yes", "no", 3]}, "list": {"type": "array", "items": {"type": "boolean"},
                                                                          "minItems": 1, "maxItems": 4}}


def tokenizers():
    import mistral_common

    from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer
    from mixtrt.runtime.tokenizer import Tokenizer

    data = Path(mistral_common.__file__).parent / "data"
    return {"v1": Tokenizer.load(), "v3": MistralCommonTokenizer(data / "mistral_instruct_tokenizer_240323.model.v3"),
            "tekken": MistralCommonTokenizer(data / "tekken_240911.json")}


@pytest.fixture(scope="module")
def toks():
    return tokenizers()


@pytest.mark.parametrize("kind", ["v1", "v3", "tekken"])
@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_random_walks_write_what_the_schema_accepts(toks, kind, schema):
    """Random logits masked by the guide, 10 seeds: every walk ends (the eos allowed only once the document is
    complete) with text the schema accepts."""
    for seed in range(10):
        jsonschema.validate(walk(toks[kind], SCHEMAS[schema], seed, 400), SCHEMAS[schema])


def walk(tok, schema, seed: int, budget: int):
    """The JSON value of one walk of random logits (seed) masked by the schema's guide; fails unless the walk ends
    (eos, allowed only once the document is complete) within `budget` tokens."""
    guide, rng, ids = Guide(tok, ("json_schema", check_schema(schema)), [tok.eos_id]), np.random.default_rng(seed), []
    for _ in range(budget):
        allowed = guide.allowed()
        logits = rng.standard_normal(allowed.size).astype(np.float32) * 3
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        guide.consume(token)
        if token == tok.eos_id:
            return json.loads(tok.decode(ids))
        ids.append(token)
    pytest.fail(f"seed {seed}: no end in {budget} tokens: {tok.decode(ids)[:200]!r}")


FEATURES = {
    "order": {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "boolean"}},
              "required": ["z", "a"], "additionalProperties": False},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]},
    "ref": {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                            "additionalProperties": False}}, "type": "array", "items": {"$ref": "#/$defs/p"},
            "maxItems": 2},
    "pattern": {"type": "string", "pattern": "^[A-Z][a-z]{2,5}$"},
    "date": {"type": "string", "format": "date"},
    "const": {"const": {"k": [1, "two"]}},
    "bounds": {"type": "number", "minimum": -3, "maximum": 2.5},
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_schema_features_readme_names(toks, feature):
    """The JSON Schema features README lists (anyOf, $ref, pattern, format, const, number bounds, key order): every
    walk is accepted by the schema; an object's keys come in the schema's order."""
    tok, schema = toks["v1"], FEATURES[feature]
    for seed in range(6):
        guide = Guide(tok, ("json_schema", check_schema(schema)), [tok.eos_id])
        rng, ids = np.random.default_rng(seed), []
        while len(ids) < 300:
            allowed = guide.allowed()
            token = int(np.argmax(np.where(allowed, rng.standard_normal(allowed.size), -np.inf)))
            guide.consume(token)
            if token == tok.eos_id:
                break
            ids.append(token)
        value = json.loads(tok.decode(ids))
        jsonschema.validate(value, schema)
        if feature == "order":
            assert list(value) == ["z", "a"]


def test_schema_forms_and_errors():
    # the order of keys is kept: a schema's properties are written in the order it gives them
    assert check_schema({"b": 1, "a": 2}) == check_schema('{"b": 1, "a": 2}') == '{"b": 1, "a": 2}'
    assert check_schema(True) == "{}"
    assert response_format_schema({"type": "text"}) is None
    assert json.loads(response_format_schema({"type": "json_object"})) == {"type": "object"}
    assert json.loads(response_format_schema({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                                       "strict": True}})) == PERSON
    for value, message in [("{", r"^json_schema: not valid JSON"),
                           ([1], r"^json_schema: a JSON schema must be an object"),
                           ({"type": "nonsense"}, r"^json_schema: the schema cannot be enforced")]:
        with pytest.raises(ConfigError, match=message):
            check_schema(value)
    for value, message in [({"type": "xml"}, r"^response_format\.type: must be"),
                           ({"type": "json_schema"}, r"^response_format\.json_schema: must be an object with a name"),
                           ("json", r"^response_format: must be an object with a type")]:
        with pytest.raises(ConfigError, match=message):
            response_format_schema(value)
    with pytest.raises(ConfigError, match=r"^json_schema: the schema cannot be enforced"):
        GenerationConfig(json_schema={"type": "integer", "minimum": "x"})
    assert GenerationConfig(json_schema=PERSON) == GenerationConfig(json_schema=json.dumps(PERSON))


@pytest.fixture(scope="module")
def gen(exported) -> Generator:
    return Generator.load(exported["mixtral-window"][1], threads=1)


def test_generation_follows_the_schema_and_rows_beside_it_are_unchanged(gen):
    """A real (random) model: greedy and sampled replies follow the schema and end with eos; a greedy row without a
    schema in the same batch gets the tokens it gets alone (the guide is per row)."""
    schema = check_schema(PERSON)
    prompts = [gen.tokenizer.encode("Describe a person:"), gen.tokenizer.encode("Hello there")]
    alone = gen.generate(prompts[1], max_new_tokens=12)[0].token_ids
    for cfg in (GenerationConfig(max_new_tokens=300, json_schema=schema),
                GenerationConfig(max_new_tokens=300, json_schema=schema, do_sample=True, temperature=1.5, seed=3)):
        out = gen.generate(prompts[0], cfg)[0]
        assert out.finish_reason == "eos", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    outs = [gen.generate([prompts[0]], max_new_tokens=300, json_schema=schema)[0]]
    engine_outs = gen.generate(prompts, max_new_tokens=12)  # both plain: the reference batch
    assert engine_outs[1].token_ids == alone
    from mixtrt.runtime.generation import Engine

    engine = Engine(gen.backend, gen.tokenizer, max_batch=2)
    rows = [engine.add(prompts[0], gen.config(max_new_tokens=300, json_schema=schema)),
            engine.add(prompts[1], gen.config(max_new_tokens=12))]
    done = {}
    while engine.busy:
        for event in engine.step():
            if event.output is not None:
                done[event.row.id] = event.output
    assert done[rows[1].id].token_ids == alone
    assert done[rows[0].id].token_ids == outs[0].token_ids  # the guided row as it runs alone


def test_the_command_line_takes_a_schema(exported, tmp_path):
    """`mixtrt generate -j SCHEMA` / `--json-schema-file FILE` (llama.cpp's -j / -jf): the printed reply follows
    the schema; a bad schema is one line naming the flag."""
    import subprocess
    import sys

    art = exported["mixtral-window"][1]
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    base = [sys.executable, "-m", "mixtrt", "generate", str(art), "--prompt", "A person:", "--max-new-tokens", "100",
            "--threads", "1", "--json"]
    for extra in (["-j", json.dumps(PERSON)], ["--json-schema-file", str(tmp_path / "person.json")]):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        jsonschema.validate(json.loads(out["text"]), PERSON)
    r = subprocess.run(base + ["-j", '{"type": "integer", "minimum": "x"}'], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "--json-schema: the schema cannot be enforced" in r.stderr, r.stderr
    (tmp_path / "bad.json").write_text("{")
    r = subprocess.run(base + ["--json-schema-file", str(tmp_path / "bad.json")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and f"--json-schema-file {tmp_path / 'bad.json'}: not valid JSON" in r.stderr, r.stderr


def test_a_complete_document_ends_even_while_min_new_tokens_holds_eos(gen):
    """min_new_tokens holds eos back, and a complete document allows nothing but eos: the schema wins (the row ends
    with eos, not with a token outside the schema)."""
    ids = gen.tokenizer.encode("A:")
    for extra in ({}, {"do_sample": True, "seed": 1, "top_k": 5}):
        out = gen.generate(ids, json_schema={"enum": [1]}, min_new_tokens=10, max_new_tokens=20, **extra)[0]
        assert (out.finish_reason, json.loads(out.text)) == ("eos", 1)


def test_the_rows_own_eos_ends_the_document_and_extreme_settings_keep_it_valid(gen):
    """Only the row's eos ids end a document (llguidance's eos is the tokenizer's): a row ending on id 5 never
    writes the tokenizer's </s>; a row with no eos id is refused; a penalty that overflows every allowed score, or
    a ban of every allowed token, still gives a document (the schema wins, on the raw logits)."""
    ids = gen.tokenizer.encode("A:")
    out = gen.generate(ids, json_schema={"enum": [1]}, eos_token_id=(5,), max_new_tokens=20)[0]
    assert out.finish_reason == "eos" and out.token_ids[-1] == 5 and gen.tokenizer.eos_id not in out.token_ids
    with pytest.raises(ConfigError, match=r"^json_schema: the reply ends with an eos id .* leaves none"):
        gen.generate(ids, json_schema={"enum": [1]}, eos_token_id=())
    schema = {"type": "array", "items": {"enum": ["yes", "no"]}, "minItems": 3, "maxItems": 3}
    for extra in ({"repetition_penalty": 1e38}, {"logit_bias": {i: -100 for i in range(0, 32000, 7)}},
                  {"repetition_penalty": 1e38, "do_sample": True, "seed": 0, "top_p": 0.5}):
        out = gen.generate(ids, json_schema=schema, max_new_tokens=60, **extra)[0]
        assert out.finish_reason == "eos", (extra, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_schemas_that_are_not_json_are_refused():
    for value, message in [({"type": "string", "x-guidance": 5}, r"^json_schema: x-guidance is not taken"),
                           ({"enum": [float("nan")]}, r"^json_schema: the schema is not JSON"),
                           ({"enum": [{1, 2}]}, r"^json_schema: the schema is not JSON")]:
        with pytest.raises(ConfigError, match=message):
            check_schema(value)


def test_a_schema_past_llguidances_limits_fails_its_row_only(gen):
    """A schema with an object of 600 optional properties compiles, then goes past llguidance's limits where that
    object opens: that row is cancelled with a RowError naming it (and nothing of the schema), the row beside it
    goes on unchanged."""
    from mixtrt.runtime.errors import RowError
    from mixtrt.runtime.generation import Engine

    # past the limits after a short string (a schema that fails at its very first token is refused when compiled)
    wide = {"type": "object", "required": ["a", "b"], "additionalProperties": False, "properties": {
        "a": {"type": "string", "maxLength": 3},
        "b": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}}}
    prompts = [gen.tokenizer.encode("A:"), gen.tokenizer.encode("Hello there")]
    alone = gen.generate(prompts[1], max_new_tokens=12)[0].token_ids
    engine = Engine(gen.backend, gen.tokenizer, max_batch=2)
    rows = [engine.add(prompts[0], gen.config(max_new_tokens=50, json_schema=wide)),
            engine.add(prompts[1], gen.config(max_new_tokens=12))]
    done, errors = {}, []
    while engine.busy:
        try:
            events = engine.step()
        except RowError as e:
            events = e.events
            errors.append(str(e))
            assert list(e.rows) == [rows[0].id]  # the failed row's own message, for its request alone
        for event in events:
            if event.output is not None:
                done[event.row.id] = event.output
    assert done[rows[1].id].token_ids == alone and rows[0].id not in done
    assert len(errors) == 1 and errors[0].startswith("row 0: structured output cannot go on after")
    assert "p599" not in errors[0] and "%json" not in errors[0]


LOOSE = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}, "n": {"type": "integer", "maximum": 9},
                                          "sub": {"type": "object", "properties": {"z": {"type": "boolean"}}}},
         "required": ["k"]}


def test_a_schema_is_closed_to_keys_and_items_it_does_not_name():
    """closed(): additionalProperties false where an object names properties and says nothing of others, items false
    after prefixItems; explicit words kept; allOf members, $ref siblings and anyOf beside own properties left open."""
    from mixtrt.runtime.structured import closed

    c = closed(LOOSE)
    assert c["additionalProperties"] is False and c["properties"]["sub"]["additionalProperties"] is False
    assert "additionalProperties" not in c["properties"]["n"] and LOOSE.get("additionalProperties") is None  # a copy
    assert closed({"type": "object"}) == {"type": "object"}  # any object stays any object
    assert closed({"properties": {"a": {}}, "additionalProperties": True})["additionalProperties"] is True
    assert closed({"properties": {"a": {}}, "additionalProperties": {"type": "integer"}})["additionalProperties"] == {
        "type": "integer"}
    assert closed({"prefixItems": [{"type": "integer"}]})["items"] is False
    assert closed({"prefixItems": [{}], "items": {"type": "string"}})["items"] == {"type": "string"}
    joined = closed({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]})
    assert all("additionalProperties" not in m for m in joined["allOf"])
    mixed = closed({"properties": {"kind": {}}, "oneOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]})
    assert "additionalProperties" not in mixed and all("additionalProperties" not in m for m in mixed["oneOf"])
    alone = closed({"anyOf": [{"properties": {"x": {}}}, {"type": "integer"}]})
    assert alone["anyOf"][0]["additionalProperties"] is False
    refs = closed({"$defs": {"p": {"properties": {"x": {}}}}, "items": {"$ref": "#/$defs/p"}})
    assert refs["$defs"]["p"]["additionalProperties"] is False and refs["items"] == {"$ref": "#/$defs/p"}
    assert closed({"enum": [{"properties": 1}]}) == {"enum": [{"properties": 1}]}  # values are not schemas
    # closing never makes a schema unsatisfiable: a required key it does not name, more keys than it names
    for schema in ({"properties": {"a": {}}, "required": ["a", "b"]}, {"properties": {"a": {}}, "minProperties": 2}):
        assert "additionalProperties" not in closed(schema)
    check_schema({"properties": {"a": {}}, "required": ["a", "b"]})  # llguidance takes it (not minProperties so)


JOINED = {  # joined schemas closing must leave as written: (schema, a document it accepts)
    "allOf of a $ref and more": ({"$defs": {"Base": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                     "required": ["a"]}},
                                  "allOf": [{"$ref": "#/$defs/Base"},
                                            {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
                                 '{"a": 1, "b": 2}'),
    "anyOf of a $ref beside properties": ({"$defs": {"X": {"properties": {"x": {"type": "integer"}}}},
                                           "properties": {"kind": {"type": "string"}}, "required": ["kind"],
                                           "anyOf": [{"$ref": "#/$defs/X"}]}, '{"kind": "k", "x": 1}'),
    "$ref beside properties": ({"$defs": {"B": {"properties": {"a": {"type": "integer"}}}},
                                "$ref": "#/$defs/B", "properties": {"b": {"type": "integer"}}, "required": ["b"]},
                               '{"a": 1, "b": 2}'),
    "allOf members naming one nested object": ({"allOf": [
        {"properties": {"sub": {"properties": {"z": {"type": "integer"}}}}, "required": ["sub"]},
        {"properties": {"sub": {"properties": {"w": {"type": "integer"}}, "required": ["w"]}}}]},
        '{"sub": {"z": 1, "w": 2}}'),
}


@pytest.mark.parametrize("name", sorted(JOINED))
def test_joined_schemas_are_left_as_written(toks, name):
    """allOf, a $ref beside keywords of its own, anyOf beside own properties: left as written (their $defs too), so
    they compile and take a document that names keys from several parts (closing every part refused them)."""
    from mixtrt.runtime.structured import closed

    schema, document = JOINED[name]
    assert closed(schema) == schema
    jsonschema.validate(json.loads(document), schema)
    tok = toks["v1"]
    guide = Guide(tok, ("json_schema", check_schema(schema)), [tok.eos_id])  # a new message's ids, as encoded
    for token in tok.encode(document, bos=False):
        assert guide.allowed()[token], (name, tok.decode([token]))
        guide.consume(token)
    assert guide.allowed()[tok.eos_id]


@pytest.mark.parametrize("kind", ["v1", "tekken"])
def test_random_walks_on_a_loose_schema_write_only_the_keys_it_names(toks, kind):
    """A schema with no additionalProperties (as clients and LangChain's tools write them): random logits, 8 seeds,
    every document ends within the budget, is accepted, and has no key the schema does not name (a random walk
    wrote made-up keys until its length ran out before)."""
    for seed in range(8):
        value = walk(toks[kind], LOOSE, seed, 300)
        jsonschema.validate(value, LOOSE)
        assert set(value) <= {"k", "n", "sub"} and set(value.get("sub", {})) <= {"z"}, value


def test_an_output_says_whether_its_constrained_text_is_complete(gen):
    """constraint_complete: None without a constraint; True where the text the reply ended with is one the
    constraint accepts whole (an eos, or a length cut after "aa" for [ab]+), False where it is not (a JSON object
    cut open)."""
    ids = gen.tokenizer.encode("A:")
    assert gen.generate(ids, max_new_tokens=2)[0].constraint_complete is None
    out = gen.generate(ids, json_schema={"enum": [1]}, max_new_tokens=20)[0]
    assert (out.finish_reason, out.constraint_complete) == ("eos", True)
    out = gen.generate(ids, regex="[ab]+", min_new_tokens=3, max_new_tokens=3)[0]  # eos held back: a length end
    assert out.finish_reason == "length" and out.text and set(out.text) <= {"a", "b"} and out.constraint_complete
    out = gen.generate(ids, json_schema=PERSON, max_new_tokens=2)[0]
    assert out.finish_reason == "length" and out.constraint_complete is False, out.text


def test_a_grammar_engine_panic_is_said_without_its_backtrace():
    """llguidance's Rust panic (a grammar past its symbol limit) carries a backtrace with the build's file paths: the
    message keeps the assertion (it went to clients and logs whole)."""
    from mixtrt.runtime.structured import _said

    said = _said("panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10 <backtrace> 0: <unknown>"
                 "\n 16: type_call at /tmp/python-build.2026/Python-3.11.7/Objects/typeobject.c:1091:11")
    assert said == "llguidance's limit: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10"
