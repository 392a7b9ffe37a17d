"""response_format in the server: json_object and json_schema replies, streamed and not, through the official
openai client (its `parse` helper too), on the shared tiny model; jsonschema is the oracle."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance", reason="structured output needs mixtrt[structured]")
jsonschema = pytest.importorskip("jsonschema", reason="the oracle: jsonschema comes with mixtrt[mistral]")

from tests.runtime.test_structured import PERSON  # noqa: E402

ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def test_json_schema_replies(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for temperature in (0, 1.2):
        r = server.openai.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=110,
                                                  temperature=temperature, seed=1, n=2)
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON)
    chunks = list(server.openai.chat.completions.create(model="tiny", messages=ASK, response_format=fmt,
                                                        max_tokens=110, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == server.openai.chat.completions.create(model="tiny", messages=ASK, response_format=fmt,
                                                             max_tokens=110, temperature=0).choices[0].message.content
    jsonschema.validate(json.loads(streamed), PERSON)


def test_json_object_and_the_parse_helper(server, generator):
    # a random model writes keys and values on and on: a bias toward '"' and "}" lets it close them (whatever the
    # bias, the schema decides what is allowed)
    close = {str(generator.tokenizer.piece_id(piece)): 30 for piece in ('"', "}")}
    r = server.openai.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                              max_tokens=110, temperature=0, logit_bias=close)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        age: int = pydantic.Field(ge=0, le=150)

    parsed = server.openai.chat.completions.parse(model="tiny", messages=ASK, response_format=Person, max_tokens=110,
                                                  temperature=0)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 150


def test_ignore_eos_leaves_a_document_no_end(server):
    r = server.http.post("/v1/chat/completions", json={"messages": ASK, "response_format": {"type": "json_object"},
                                                       "ignore_eos": True, "max_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "leaves none" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt, message", [
    ({"type": "xml"}, "response_format.type: must be"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema: must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "integer", "minimum": "x"}}},
     "response_format.json_schema.schema: the schema cannot be enforced"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "^(a"}}},
     "regex parse error: ^(a error: unclosed group"),
    ({"type": "json_object", "scheme": {}}, "response_format: unknown field 'scheme'"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "json_schema.name: must be 1-64"),
    ({"type": "json_schema", "json_schema": {"name": "p", "strict": "yes"}}, "json_schema.strict: must be true"),
])
def test_bad_response_formats_are_400s(server, fmt, message):
    r = server.http.post("/v1/chat/completions", json={"messages": ASK, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format" and message in r.json()["error"]["message"]


def test_a_schema_that_fails_mid_reply_fails_its_request_only(server, generator):
    """A schema past llguidance's limits fails its request (an error naming no schema); a request running beside it
    gets the reply it gets alone."""
    import threading

    wide = {"type": "json_schema", "json_schema": {"name": "wide", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}}}
    plain = {"model": "tiny", "prompt": "Hello there", "max_tokens": 40, "temperature": 0}
    alone = server.http.post("/v1/completions", json=plain).json()["choices"][0]["text"]
    got = {}

    def wide_request():
        got["wide"] = server.http.post("/v1/chat/completions", json={"messages": ASK, "response_format": wide,
                                                                     "max_tokens": 40, "temperature": 0})

    thread = threading.Thread(target=wide_request)
    thread.start()
    beside = server.http.post("/v1/completions", json=plain)
    thread.join(30)
    assert beside.status_code == 200 and beside.json()["choices"][0]["text"] == alone
    r = got["wide"]
    assert r.status_code == 500 and "structured output cannot go on" in r.json()["error"]["message"], r.text
    assert "p599" not in r.text and "%json" not in r.text
    assert server.http.post("/v1/completions", json=plain).json()["choices"][0]["text"] == alone  # still serving


def test_json_object_with_a_schema_and_no_continued_message(server):
    """{"type": "json_object", "schema": ...} (Together's and Fireworks' form) follows the schema; a continued
    message (continue_final_message) cannot take a document of its own: a 400."""
    r = server.openai.chat.completions.create(model="tiny", messages=ASK, max_tokens=20, temperature=0,
                                              response_format={"type": "json_object", "schema": {"enum": [7, "x"]}})
    assert json.loads(r.choices[0].message.content) in (7, "x")
    r = server.http.post("/v1/chat/completions", json={
        "messages": [*ASK, {"role": "assistant", "content": '{"a": '}], "add_generation_prompt": False,
        "continue_final_message": True, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
