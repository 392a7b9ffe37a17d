"""OpenAI's Responses API (`POST /v1/responses`) through the official openai client: the same answers as the chat
route for the same conversation, whole and streamed (the client's stream helper checks the events' order), function
calls, JSON output, and the fields it does not serve as 400s naming them."""

from __future__ import annotations

import json
import time

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from mixtrt.runtime.serve.protocol import ApiError
from mixtrt.runtime.serve.responses import ResponseEvents, to_chat

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
           "required": ["city"]}
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}]


def chat_text(server, messages, n):
    r = server.openai.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


def test_a_response_is_the_chat_reply(server):
    for kw, messages in (
        ({"input": "Tell me about Paris."}, [{"role": "user", "content": "Tell me about Paris."}]),
        ({"instructions": "Answer briefly.", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "Tell me "}, {"type": "input_text", "text": "about Rome."}]}]},
         # text parts go to the chat route as parts, which the chat format joins as it joins them
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": [
             {"type": "text", "text": "Tell me "}, {"type": "text", "text": "about Rome."}]}]),
    ):
        text, finish, usage = chat_text(server, messages, 10)
        r = server.openai.responses.create(model="tiny", max_output_tokens=10, temperature=0, **kw)
        assert r.object == "response" and r.id.startswith("resp_") and r.output_text == text
        raw = server.http.post("/v1/responses", json={"model": "tiny", "max_output_tokens": 2, **kw}).json()
        assert type(raw["created_at"]) is int  # as OpenAI sends it ("….0" failed clients typing it int64)
        Response.model_validate(r.to_dict())  # every field the API's schema requires, of its type
        [item] = r.output
        assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
        assert (r.usage.input_tokens, r.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
        assert r.usage.total_tokens == usage.total_tokens
        # cut by max_output_tokens: incomplete, saying why (the chat reply's "length")
        assert finish == "length" and r.status == "incomplete"
        assert r.incomplete_details.reason == "max_output_tokens"
        assert r.instructions == kw.get("instructions") and r.max_output_tokens == 10
        # streamed through the client's helper, which checks the events' kinds and order as it accumulates them
        # (its get_final_response wants response.completed: an incomplete one ends with response.incomplete, as
        # OpenAI's API ends it)
        with server.openai.responses.stream(model="tiny", max_output_tokens=10, temperature=0, **kw) as stream:
            events = list(stream)
        final = events[-1].response
        assert final.output_text == text and final.status == "incomplete"
        kinds = [e.type for e in events]
        assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]
        assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                              "response.incomplete"]
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
        assert [e.sequence_number for e in events] == list(range(len(events)))
        for e in events:  # each event as the API's schema has it
            EVENT.validate_python(e.to_dict())
        assert final.usage.output_tokens == usage.completion_tokens


def test_function_calls_and_json_output(server):
    """The tiny model's v1 format has no call tokens: a forced choice holds the reply to the call's JSON."""
    for choice in ({"type": "function", "name": "get_weather"}, "required"):
        kw = dict(model="tiny", input="Weather in Paris?", tools=TOOLS, tool_choice=choice, max_output_tokens=48,
                  temperature=0, parallel_tool_calls=False)
        r = server.openai.responses.create(**kw)
        assert r.status == "completed" and r.output_text == ""
        [call] = r.output
        assert call.type == "function_call" and call.id.startswith("fc_") and call.status == "completed"
        assert call.name in {t["name"] for t in TOOLS} and isinstance(json.loads(call.arguments), dict)
        if call.name == "get_weather":
            assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
        with server.openai.responses.stream(**kw) as stream:
            events = list(stream)
            final = stream.get_final_response()
        [again] = final.output
        assert (again.name, again.arguments) == (call.name, call.arguments)
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert [e.arguments for e in done] == [call.arguments] and events[-1].type == "response.completed"
        assert r.tools[0].name == "get_weather"
        assert (final.tool_choice if choice == "required" else final.tool_choice.to_dict()) == choice
    # text.format json_schema: the reply is JSON the schema accepts
    r = server.openai.responses.create(model="tiny", input="Which city?", max_output_tokens=40, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": WEATHER,
                                                        "strict": True}})
    assert json.loads(r.output_text)["city"] in ("Paris", "Rome") and r.text.format.type == "json_schema"
    # a body past 16 KiB is read on a worker thread: the same answer
    big = server.openai.responses.create(model="tiny", input="Which city?", max_output_tokens=40, temperature=0,
                                         metadata={"note": "x" * 20000}, text=r.text.to_dict())
    assert big.output_text == r.output_text and big.metadata == {"note": "x" * 20000}


def test_a_last_assistant_message_is_continued_and_the_log_names_the_route(server, caplog):
    """A reply cannot follow a reply in Mistral's formats: the last assistant message is continued, as the chat
    route's continue_final_message continues it (vLLM's Mistral path); the log line names the route."""
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once"}]
    want = server.openai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 extra_body={"continue_final_message": True,
                                                             "add_generation_prompt": False})
    with caplog.at_level("INFO", logger="mixtrt.serve"):
        r = server.openai.responses.create(model="tiny", input=messages, max_output_tokens=6, temperature=0,
                                           extra_body={"prompt_cache_retention": "24h"})
        time.sleep(0.1)
    assert r.output_text == want.choices[0].message.content and r.output[0].status == "incomplete"
    [record] = [json.loads(m.getMessage()) for m in caplog.records if '"event": "request"' in m.getMessage()][-1:]
    assert record["endpoint"] == "responses" and record["status"] == 200


@pytest.mark.parametrize("body, param, words", [
    ({"input": "Hi", "previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
     "input[0].content[0]: a part of type 'input_image' is not served"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"input": "Hi", "frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
    # inside items, parts and the format too (they were dropped unsaid), as OpenAI refuses them
    ({"input": [{"role": "user", "content": "x", "foo": 1}]}, "input", "input[0].foo: unknown field 'foo'"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x", "foo": 1}]}]}, "input",
     "input[0].content[0].foo: unknown field 'foo'"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "foo": 1}}}, "text",
     "text.format.foo: unknown field 'foo'"),
    ({"input": "Hi", "max_output_tokens": 100000}, "max_output_tokens",
     "and max_output_tokens asks for 100000 more"),
    ({"input": "Hi", "max_output_tokens": "8"}, "max_output_tokens", "max_output_tokens: Input should be"),
    ({}, "input", "input: is required"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input", "input: holds no message"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input", "'item_reference' are not served"),
    ({"input": "Hi", "tools": TOOLS}, "tools", "no tool-call token"),
    ({"input": "Hi", "max_tool_calls": 3}, "max_tool_calls", "only 1 is served"),
    ({"input": "Hi", "reasoning": {"effort": "high"}}, "reasoning", "no reasoning to configure"),
    ({"input": "Hi", "reasoning": "high"}, "reasoning", "no reasoning to configure"),
    ({"input": "Hi", "include": "x"}, "include", "cannot be included"),
    ({"input": "Hi", "metadata": [1]}, "metadata", "must be an object of strings"),
    # echoed in the Response: a lone surrogate failed its encoding after the rows were running (a stream's rows ran on
    # unseen to the end); sent as JSON's escape
    ({"input": "Hi", "metadata": {"a": "\ud800"}, "stream": True}, "metadata", "metadata.a is not valid text"),
    ({"input": "Hi", "user": "\ud800x"}, "user", "user is not valid text: character 0"),
    ({"input": "Hi", "service_tier": "flex"}, "service_tier", "service_tier"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}}, "text",
     "text.format.name: must be 1-64"),
    ({"input": "Hi", "tools": [{"type": "function", "name": "a b"}], "tool_choice": "required"}, "tools",
     "tools[0].name: must be 1-64"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "function_call_output", "call_id": "c1", "output": "x"}]},
     "input", "input[1].call_id: no function_call with call_id 'c1' comes before this output"),
])
def test_what_is_not_served_is_a_400_naming_the_field(server, body, param, words):
    r = server.http.post("/v1/responses", content=json.dumps({"model": "tiny", **body}).encode(),
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    # and the server goes on serving
    assert server.openai.responses.create(model="tiny", input="Hi", max_output_tokens=2).status == "incomplete"


def test_input_items_become_chat_messages():
    """A conversation with calls: consecutive function_call items are one assistant message's calls, each output a
    tool message; developer is system; reasoning items are dropped."""
    chat, echoed = to_chat({"input": [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": "Weather and time?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "call_c", "name": "get_time", "arguments": "{}"},
    ], "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_time"}, "max_tool_calls": 1, "store": True})
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "noon"}]},
        # a reply's text and its calls: one assistant message, as the chat route takes a reply back
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}], "tool_calls": [
            {"id": "call_c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    ]
    assert chat["tools"][0] == {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                                                 "description": "The weather in a city."}}
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert chat["parallel_tool_calls"] is False and "store" not in chat and echoed["store"] is False
    with pytest.raises(ApiError, match=r"^input\[0\]\.role: role must be"):
        to_chat({"input": [{"role": "tool", "content": "x"}]})
    # text.format is optional (verbosity alone is what some clients send)
    assert "response_format" not in to_chat({"input": "Hi", "text": {"verbosity": "low"}})[0]


def test_a_stream_cut_short_ends_failed():
    events = ResponseEvents("tiny", to_chat({"input": "Hi"})[1])
    out = events.start() + events.feed('data: {"error": {"message": "the request was cancelled (shutdown)", '
                                       '"type": "unavailable_error", "param": null, "code": null}}')
    kinds = [json.loads(e.split("data: ", 1)[1])["type"] for e in out]
    assert kinds == ["response.created", "response.in_progress", "error", "response.failed"]
    for e in out:
        EVENT.validate_python(json.loads(e.split("data: ", 1)[1]))


def test_the_chat_stream_under_a_responses_stream_is_closed_whatever_ends_it():
    """The Responses stream starts the chat stream before its own first event, and closes it however it ends: a
    response closed at its first event (its write failed, its client left) cancels the chat stream's rows (they
    generated to the end unseen: the chat stream, never started, ran no cleanup)."""
    import asyncio

    from mixtrt.runtime.serve.responses import stream_events

    closed: list[bool] = []

    async def chat():
        try:
            yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
            await asyncio.sleep(30)
            yield "data: [DONE]\n\n"
        finally:
            closed.append(True)

    async def first_event_then_close() -> str:
        events = stream_events(chat(), "tiny", to_chat({"input": "Hi"})[1])
        first = await events.__anext__()
        await events.aclose()
        return first

    first = asyncio.run(first_event_then_close())
    assert json.loads(first.split("data: ", 1)[1])["type"] == "response.created" and closed == [True]
