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


def test_json_object_and_the_parse_helper(server):
    r = server.openai.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                              max_tokens=64, temperature=0)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        age: int = pydantic.Field(ge=0, le=150)

    parsed = server.openai.chat.completions.parse(model="tiny", messages=ASK, response_format=Person, max_tokens=110,
                                                  temperature=0)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 150


@pytest.mark.parametrize("fmt, message", [
    ({"type": "xml"}, "response_format.type: must be"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema: must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "integer", "minimum": "x"}}},
     "response_format.json_schema.schema: the schema cannot be enforced"),
])
def test_bad_response_formats_are_400s(server, fmt, message):
    r = server.http.post("/v1/chat/completions", json={"messages": ASK, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format" and message in r.json()["error"]["message"]
