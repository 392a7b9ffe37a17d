"""response_format in the server: json_object and json_schema replies, streamed and not, through the official
openai client (its `parse` helper too), on the shared tiny model; jsonschema is the oracle."""

from __future__ import annotations

import json
import re

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
        "type": "object", "required": ["a", "b"], "additionalProperties": False, "properties": {
            "a": {"type": "string", "maxLength": 3},
            "b": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}}}}}
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


GBNF = 'root ::= item ("," item)*\nitem ::= "yes" | "no" | [0-9] | [0-9] [0-9]\n'
LARK = 'start: item ("," item)*\nitem: "yes" | "no" | /[0-9]{1,2}/\n'
LIST = r"(yes|no|[0-9]{1,2})(,(yes|no|[0-9]{1,2}))*"


def _person(text):
    jsonschema.validate(json.loads(text), PERSON)
    return True


@pytest.mark.parametrize("body, accepts", [
    ({"structured_outputs": {"choice": ["positive", "negative", "très bien"]}},
     lambda t: t in ("positive", "negative", "très bien")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": r"[0-9]{3}-[A-Z][a-z]{1,4}"}},
     lambda t: re.fullmatch(r"[0-9]{3}-[A-Z][a-z]{1,4}", t)),
    ({"guided_regex": r"(ab|cd){1,3}!"}, lambda t: re.fullmatch(r"(ab|cd){1,3}!", t)),
    ({"structured_outputs": {"grammar": GBNF}}, lambda t: re.fullmatch(LIST, t)),
    ({"guided_grammar": LARK}, lambda t: re.fullmatch(LIST, t)),
    ({"grammar": GBNF}, lambda t: re.fullmatch(LIST, t)),
    ({"structured_outputs": {"json": PERSON}}, _person),
    ({"structured_outputs": {"json": json.dumps(PERSON)}}, _person),
    ({"guided_json": PERSON}, _person),
    ({"json_schema": PERSON}, _person),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}, _person),
])
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_every_form_of_structured_output_on_both_routes(server, body, accepts, route):
    """vLLM's structured_outputs (json, regex, choice, grammar), its former guided_* fields, llama-server's
    json_schema / grammar and OpenAI's response_format, on /v1/completions (the text continues the prompt: no space
    in front) and /v1/chat/completions, greedy and sampled (n=2): every reply is accepted whole and ends with eos
    ("stop"); streamed text equals the whole reply."""
    if route == "chat":
        url, base = "/v1/chat/completions", {"messages": ASK}
    else:
        url, base = "/v1/completions", {"prompt": "The answer is"}
    for extra in ({"temperature": 0}, {"temperature": 1.3, "seed": 7, "n": 2}):
        r = server.http.post(url, json={**base, **body, **extra, "max_tokens": 110})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            text = choice["text"] if route == "completions" else choice["message"]["content"]
            assert choice["finish_reason"] == "stop" and accepts(text), (extra, text)
    whole = server.http.post(url, json={**base, **body, "temperature": 0, "max_tokens": 110}).json()["choices"][0]
    with server.http.stream("POST", url, json={**base, **body, "temperature": 0, "max_tokens": 110,
                                               "stream": True}) as s:
        lines = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    if route == "chat":
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in lines if c["choices"])
        assert streamed == whole["message"]["content"]
    else:
        assert "".join(c["choices"][0]["text"] for c in lines if c["choices"]) == whole["text"]


def test_json_object_through_structured_outputs(server, generator):
    close = {str(generator.tokenizer.piece_id(piece)): 30 for piece in ('"', "}")}
    r = server.http.post("/v1/completions", json={"prompt": "JSON:", "structured_outputs": {"json_object": True},
                                                  "max_tokens": 110, "temperature": 0, "logit_bias": close})
    assert r.status_code == 200 and isinstance(json.loads(r.json()["choices"][0]["text"]), dict), r.text


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("body, param, message", [
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "structured_outputs.regex and structured_outputs.choice: give one of them"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "response_format and guided_regex: give one of them"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs",
     "structured_outputs.regex: the regular expression cannot be enforced"),
    ({"guided_choice": []}, "guided_choice", "guided_choice: must be a non-empty list"),
    ({"guided_choice": "yes"}, "guided_choice", "guided_choice: Input should be a valid list"),
    ({"grammar": "root ::= ("}, "grammar", "grammar: neither Lark (no start rule) nor GBNF"),
    ({"structured_outputs": {"json": {"type": "integer", "minimum": "x"}}}, "structured_outputs",
     "structured_outputs.json: the schema cannot be enforced"),
    ({"structured_outputs": {"whitespace_pattern": " *"}}, "structured_outputs",
     "structured_outputs.whitespace_pattern is not supported"),
    ({"structured_outputs": {"regex": "a", "bogus": 1}}, "structured_outputs.bogus",
     "unknown field 'structured_outputs.bogus'"),
    ({"structured_outputs": {"disable_fallback": True}}, "structured_outputs",
     "structured_outputs: give one of json, regex, choice, grammar or json_object"),
    ({"grammar": "root ::= " + " | ".join(f'"w{i}"' for i in range(2500))}, "grammar",
     "grammar: the grammar cannot be enforced"),
    ({"guided_regex": "a\\"}, "guided_regex", "guided_regex: the regular expression ends with an incomplete escape"),
    ({"guided_json": "[" * 100000}, "guided_json", "guided_json: nested too deeply to read"),
    # deeper than llguidance's limit catches, shallower than the JSON reader's: the schema's own walk (was a 500)
    ({"structured_outputs": {"json": _nested_schema(350)}}, "structured_outputs",
     "structured_outputs.json: the schema is nested too deeply"),
    ({"guided_regex": "[^\\s\\S]"}, "guided_regex",
     "guided_regex: the regular expression cannot be enforced: it accepts no text"),
    ({"grammar": 'root ::= "a" root'}, "grammar", "grammar: the grammar cannot be enforced"),
    ({"guided_regex": "[a-z]+", "ignore_eos": True}, "guided_regex",
     "guided_regex: the reply ends with an eos id once its text is complete"),
])
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_bad_structured_outputs_are_400s_naming_the_field(server, body, param, message, route):
    base = {"messages": ASK} if route == "chat" else {"prompt": "Hi"}
    r = server.http.post(f"/v1/{'chat/' if route == 'chat' else ''}completions", json={**base, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_neutral_backend_options_are_taken(server):
    """vLLM's backend options at their neutral values (disable_additional_properties is what is always done), and a
    backend's name, are accepted (one backend here)."""
    r = server.http.post("/v1/completions", json={
        "prompt": "Hi", "max_tokens": 10, "temperature": 0, "guided_decoding_backend": "xgrammar",
        "structured_outputs": {"choice": ["a", "b"], "disable_fallback": True, "disable_any_whitespace": True,
                               "disable_additional_properties": True}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("a", "b"), r.text


def test_an_echo_without_generation_ignores_the_constraint(server):
    """echo with max_tokens 0 scores the prompt and generates nothing: a constraint has nothing to shape (it was a
    500 when the generated token's config kept it)."""
    for stream in (False, True):
        r = server.http.post("/v1/completions", json={"prompt": "Pick one", "echo": True, "max_tokens": 0,
                                                      "logprobs": 1, "guided_choice": ["a", "b"], "stream": stream})
        assert r.status_code == 200, r.text
        if not stream:
            assert r.json()["choices"][0]["text"] == "Pick one"
        else:
            assert "Pick one" in r.text and '"error"' not in r.text
