"""What a request leaves out, as OpenAI's API and vLLM fill it in: sampling at temperature 1 (or the artifact's
generation_config temperature), chat's length from the artifact's max_new_tokens, max_completion_tokens over
max_tokens, any 64-bit seed; `usage: null` in a usage stream's chunks and vLLM's continuous usage; a log line for
every refused request."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from mixtrt.runtime.generation import Generator
from tests.serve.conftest import Server, continuation

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me about Paris."}]


def test_without_temperature_a_request_samples_at_1(server, generator):
    r = server.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, seed=3, n=3)
    solos = generator.generate([PROMPT] * 3, max_new_tokens=8, do_sample=True, temperature=1.0, seed=3)
    assert [c.text for c in r.choices] == [continuation(generator, PROMPT, s) for s in solos]
    greedy = generator.generate(PROMPT, max_new_tokens=8, do_sample=False)[0]
    assert {c.text for c in r.choices} != {continuation(generator, PROMPT, greedy)}  # not three greedy answers
    # a negative seed (vLLM takes any 64-bit integer) samples as its two's-complement unsigned value
    neg = server.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, seed=-5, temperature=0.7)
    [want] = generator.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.7, seed=2**64 - 5)
    assert neg.choices[0].text == continuation(generator, PROMPT, want)


def test_the_artifacts_temperature_and_max_new_tokens_are_the_defaults(generator, serve_artifact):
    defaults = dataclasses.replace(generator.defaults, temperature=0.5, max_new_tokens=5)
    s = Server(Generator(generator.backend, generator.tokenizer, defaults), serve_artifact[1])
    try:
        r = s.openai.chat.completions.create(model="tiny", messages=MESSAGES, seed=11,
                                             extra_body={"ignore_eos": True})
        want = generator.chat(MESSAGES, do_sample=True, temperature=0.5, seed=11, max_new_tokens=5,
                              eos_token_id=())
        assert r.choices[0].message.content == want.text and r.usage.completion_tokens == 5
        # completions keep OpenAI's 16 when max_tokens is left out
        c = s.openai.completions.create(model="tiny", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
        assert c.usage.completion_tokens == 16
    finally:
        s.close()


def test_max_completion_tokens_wins_over_max_tokens(server):
    r = server.openai.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=3,
                                              max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    too_many = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3,
                                                              "max_completion_tokens": 10**6})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_completion_tokens"
    # completions take it too (guidellm sends both names there), with the same rule
    r = server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "max_completion_tokens": 4,
                                                  "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    r = server.http.post("/v1/completions", json={"prompt": PROMPT, "max_completion_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_a_chat_streams_first_chunk_goes_out_with_its_first_token(generator, serve_artifact):
    """The role chunk is sent with the choice's first token, as vLLM sends it, not before the prefill: a load
    generator times its first chunk as the first token (vLLM's benchmark client measured mixtrt's chat TTFT 4-7x too
    low). The server's first-token time is taken there too."""
    from tests.serve.conftest import slow

    s = Server(slow(generator, 0.3), serve_artifact[1])
    try:
        body = {"messages": MESSAGES, "max_tokens": 2, "stream": True, "ignore_eos": True, "temperature": 0}
        t0 = time.perf_counter()
        with s.http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            waited = time.perf_counter() - t0
            rest = [line for line in lines if line]
        chunk = json.loads(first[len("data: "):])
        assert chunk["choices"][0]["delta"]["role"] == "assistant" and waited >= 0.3  # after the first step
        deltas = [json.loads(line[len("data: "):])["choices"][0] for line in rest[:-1]]
        assert [d["finish_reason"] for d in deltas][-1] == "length" and rest[-1] == "data: [DONE]"
        assert "role" not in deltas[0]["delta"]  # one role chunk per choice
    finally:
        s.close()


def test_usage_in_stream_chunks(server):
    def chunks(options):
        body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": options}
        with server.http.stream("POST", "/v1/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        return [json.loads(line[len("data: "):]) for line in lines[:-1]]

    plain = chunks({"include_usage": True})
    assert all("usage" in c and c["usage"] is None for c in plain[:-1])  # OpenAI: null until the last chunk
    assert plain[-1]["choices"] == [] and plain[-1]["usage"]["completion_tokens"] == 6
    running = chunks({"include_usage": True, "continuous_usage_stats": True})
    done = [c["usage"]["completion_tokens"] for c in running[:-1]]
    assert done == sorted(done) and done[-1] == 6 and running[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"]["prompt_tokens"] == plain[-1]["usage"]["prompt_tokens"] for c in running)
    assert "usage" not in chunks(None)[0]


def test_a_refused_request_has_its_log_line(server, caplog):
    before = {status: server.metric("mixtrt:request_refused_total", status=status) for status in ("400", "404")}
    with caplog.at_level("INFO", logger="mixtrt.serve"):
        assert server.http.post("/v1/completions", json={"prompt": "a", "max_tokens": "x"}).status_code == 400
        assert server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "bogus": 1}).status_code == 400
        assert server.http.get("/v1/nothing").status_code == 404
        time.sleep(0.1)
    records = [json.loads(r.getMessage()) for r in caplog.records if '"event": "refused"' in r.getMessage()]
    assert [(r["endpoint"], r["status"]) for r in records] == [("completions", 400), ("chat", 400),
                                                                ("/v1/nothing", 404)]
    assert "max_tokens" in records[0]["error"] and "bogus" in records[1]["error"]
    assert all(len(r["id"]) == 32 for r in records)
    assert server.metric("mixtrt:request_refused_total", status="400") - before["400"] == 2
    assert server.metric("mixtrt:request_refused_total", status="404") - before["404"] == 1


def test_vllm_min_p_and_min_tokens(server, generator):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, seed=5)
    [want] = generator.generate(PROMPT, min_p=0.3, min_new_tokens=3, **kw)
    assert want.token_ids != generator.generate(PROMPT, **kw)[0].token_ids  # min_p bites on this prompt
    r = server.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.5, seed=5,
                                         extra_body={"min_p": 0.3, "min_tokens": 3})
    assert r.choices[0].text == continuation(generator, PROMPT, want)


def test_presence_frequency_penalties_and_logit_bias(server, generator):
    """OpenAI's penalties through the official client, greedy and streamed: the tokens `Generator.generate` gives with
    the same penalties, which differ from the unpenalized ones on this prompt."""
    kw = dict(max_new_tokens=16, do_sample=False)
    [want] = generator.generate(PROMPT, presence_penalty=-2.0, frequency_penalty=-1.0, **kw)
    assert want.token_ids != generator.generate(PROMPT, **kw)[0].token_ids  # the penalties bite on this prompt
    stream = server.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                              presence_penalty=-2.0, frequency_penalty=-1.0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == continuation(generator, PROMPT, want)
    # logit_bias (JSON keys are strings): the greedy first token banned
    first = generator.generate(PROMPT, **kw)[0].token_ids[0]
    [banned] = generator.generate(PROMPT, logit_bias={first: -100}, **kw)
    assert banned.token_ids[0] != first
    r = server.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                         logit_bias={str(first): -100})
    assert r.choices[0].text == continuation(generator, PROMPT, banned)


def test_vllm_stop_token_ids(server, generator):
    """stop_token_ids end a choice as EOS does (finish_reason stop, the id not in the text), with ignore_eos too;
    min_tokens holds them back; an id outside the vocabulary is a 400 naming the field."""
    [greedy] = generator.generate(PROMPT, max_new_tokens=10, do_sample=False, eos_token_id=())
    k = 3
    stop = greedy.token_ids[k]
    k = greedy.token_ids.index(stop)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stop_token_ids": [stop]}
    for extra in ({}, {"ignore_eos": True}):
        r = server.http.post("/v1/completions", json={**body, **extra}).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == k + 1, r
        before = dataclasses.replace(greedy, token_ids=greedy.token_ids[:k])  # the stop id is not in the text
        assert r["choices"][0]["text"] == continuation(generator, PROMPT, before)
    held = server.http.post("/v1/completions", json={**body, "min_tokens": k + 2}).json()
    assert held["usage"]["completion_tokens"] > k + 1
    r = server.http.post("/v1/completions", json={**body, "stop_token_ids": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"


def test_tokenize_and_detokenize_as_vllm(server, generator):
    """vLLM's /tokenize (a prompt, or messages as chat completions renders them) and /detokenize, and their
    refusals (OpenAI's error object, the field named)."""
    text = "It is a truth universally acknowledged"
    r = server.http.post("/tokenize", json={"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    ids = list(generator.tokenizer.encode(text))
    limit = server.http.get("/v1/models").json()["data"][0]["max_model_len"]
    assert r == {"count": len(ids), "max_model_len": limit, "tokens": ids,
                 "token_strs": [generator.tokenizer.id_to_piece(i) for i in ids]}
    bare = server.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == list(generator.tokenizer.encode(text, bos=False)) and bare["token_strs"] is None
    assert server.http.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": text}
    chat = server.http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == list(generator.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    usage = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == chat["count"]
    for path, body, status, param in [
        ("/tokenize", {}, 400, "prompt"), ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "messages"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"), ("/tokenize", {"prompt": "a", "bogus": 1}, 400, "bogus"),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"), ("/detokenize", {"tokens": "1"}, 400, "tokens"),
    ]:
        r = server.http.post(path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)
    assert server.http.post("/tokenize", content=b"{").status_code == 400


def test_add_generation_prompt_false_renders_the_messages_as_they_are(server, generator):
    """vLLM's add_generation_prompt: false renders a conversation that may end with the assistant's turn (the
    Mistral formats close it with EOS), which a request for the next reply refuses."""
    ended = [*MESSAGES, {"role": "assistant", "content": "Paris is"}]
    ids = list(generator.tokenizer.apply_chat_template(ended, add_generation_prompt=False))
    body = {"messages": ended, "max_tokens": 4, "temperature": 0}
    r = server.http.post("/v1/chat/completions", json={**body, "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    [want] = generator.generate([ids], max_new_tokens=4, do_sample=False)
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    refused = server.http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"


def test_continue_final_message_continues_the_assistants_text(server, generator):
    """vLLM's continue_final_message (with add_generation_prompt false): the model continues the last assistant
    message, and the reply is the text that follows it (a first word keeps its leading space)."""
    ended = [*MESSAGES, {"role": "assistant", "content": "Paris is"}]
    ids = list(generator.tokenizer.apply_chat_template(ended, add_generation_prompt=False,
                                                        continue_final_message=True))
    assert ids[-1] != generator.tokenizer.eos_id
    r = server.http.post("/v1/chat/completions", json={"messages": ended, "max_tokens": 5, "temperature": 0,
                                                       "add_generation_prompt": False,
                                                       "continue_final_message": True})
    assert r.status_code == 200, r.text
    [want] = generator.generate([ids], max_new_tokens=5, do_sample=False)
    assert r.json()["choices"][0]["message"]["content"] == continuation(generator, ids, want)
    # vLLM's echo: the reply starts with the message it continues, streamed in the first delta; a request whose
    # last message is the user's has nothing to echo
    body = {"messages": ended, "max_tokens": 5, "temperature": 0, "add_generation_prompt": False,
            "continue_final_message": True, "echo": True, "n": 2}
    r = server.http.post("/v1/chat/completions", json=body)
    echoed = "Paris is" + continuation(generator, ids, want)
    assert [c["message"]["content"] for c in r.json()["choices"]] == [echoed] * 2
    vllm = {k: body[k] for k in ("add_generation_prompt", "continue_final_message", "echo")}  # extra_body
    chunks = server.openai.chat.completions.create(
        model="tiny", stream=True, extra_body=vllm, **{k: v for k, v in body.items() if k not in vllm})
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [echoed] * 2
    plain = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0,
                                                           "echo": True}).json()
    alone = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3,
                                                           "temperature": 0}).json()
    assert plain["choices"][0]["message"] == alone["choices"][0]["message"]


def test_content_parts_go_to_the_mistral_format_and_join_by_newlines_for_a_template(server):
    """A message's text parts: a Mistral format (this artifact's v1) takes them as mistral-common does (a blank line
    between the parts: the ids of mistral-common's encode_chat_completion, also through /tokenize and in the chat
    completion's usage); for a Jinja template they are joined by "\n" first, as vLLM joins them."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mixtrt.runtime.serve.protocol import ChatRequest, chat_messages, parse
    from tests.checkpoints import mistral_tokenizer_path

    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": ""},
                                          {"type": "text", "text": "about it."}]}]
    want = MistralTokenizer.from_file(str(mistral_tokenizer_path())).encode_chat_completion(
        ChatCompletionRequest.from_openai(parts)).tokens
    assert server.http.post("/tokenize", json={"messages": parts}).json()["tokens"] == want
    r = server.openai.chat.completions.create(model="tiny", messages=parts, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(want)
    req = parse(ChatRequest, {"messages": parts})
    assert chat_messages(req)[0]["content"] == "Tell me\n\nabout it."
    assert chat_messages(req, text_parts=True)[0]["content"] == parts[0]["content"]


def test_integer_fields_take_whole_floats_as_vllm_does():
    """A float with no fraction is the integer it is (Python clients computing max_tokens send 4.0; vLLM's schema
    reads it); a fraction, a string, a bool or a float past 2**53 stays a 400 naming the field."""
    from mixtrt.runtime.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse

    req = parse(CompletionRequest, {"prompt": "a", "max_tokens": 4.0, "top_k": -1.0, "n": 2.0, "seed": 7.0,
                                    "logprobs": 1.0, "min_tokens": 0.0, "stop_token_ids": [2.0]})
    assert (req.max_tokens, req.top_k, req.n, req.seed, req.logprobs, req.min_tokens, req.stop_token_ids) == (
        4, -1, 2, 7, 1, 0, [2])
    assert all(type(v) is int for v in (req.max_tokens, req.top_k, req.n, req.seed, req.logprobs))
    chat = parse(ChatRequest, {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 3.0,
                               "top_logprobs": 2.0, "logprobs": True})
    assert (chat.max_completion_tokens, chat.top_logprobs) == (3, 2)
    for field, value in (("max_tokens", 4.5), ("max_tokens", "4"), ("n", True), ("seed", 2.0**60), ("top_k", 1e300)):
        with pytest.raises(ApiError, match=f"^{field}: Input should be a valid integer") as e:
            parse(CompletionRequest, {"prompt": "a", field: value})
        assert e.value.param == field


def test_what_an_operator_reads(server, caplog):
    """A load balancer's X-Request-Id is the request's id in the log and comes back in the response (vLLM takes it
    as its request id); a slow upload is not counted as queue time; a scored prompt's one chosen token is counted
    nowhere (the log's completion_tokens, the generation token total); the finish and abort reasons' series exist
    at 0 before any request ended so."""
    text = server.http.get("/metrics").text
    for reason in ("stop", "length"):
        assert f'finished_reason="{reason}"' in text
    for reason in ("disconnect", "error", "shutdown", "stalled"):
        assert f'mixtrt:request_aborted_total{{model_name="tiny",reason="{reason}"}}' in text

    def slow_body():
        for part in (b'{"prompt": "a", ', b'"max_tokens": 2, ', b'"echo": false}'):
            yield part
            time.sleep(0.4)

    generated = server.metric("mixtrt:generation_tokens_total")
    with caplog.at_level("INFO", logger="mixtrt.serve"):
        r = server.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2},
                             headers={"X-Request-Id": "lb-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "lb-42"
        r = server.http.post("/v1/completions", content=slow_body(), headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32
        r = server.http.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 0, "echo": True, "logprobs": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0
        # refused requests carry the id their log line has too (given or fresh), as do unknown routes
        for path, body, rid in (("/v1/completions", {"prompt": "a", "max_tokens": -1}, "lb-43"),
                                ("/v1/completions", {"prompt": "a", "max_tokens": -1}, None),
                                ("/v1/nothing", {}, "lb-44")):
            r = server.http.post(path, json=body, headers={"X-Request-Id": rid} if rid else {})
            assert r.status_code in (400, 404) and r.headers["x-request-id"] == (rid or r.headers["x-request-id"])
            refused = [json.loads(rec.getMessage()) for rec in caplog.records if '"refused"' in rec.getMessage()]
            assert refused[-1]["id"] == r.headers["x-request-id"] and len(refused[-1]["id"]) in (5, 32)
        time.sleep(0.1)
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if '"event": "request"' in rec.getMessage()]
    assert [line["id"] for line in lines][0] == "lb-42"
    assert lines[1]["ttft_s"] < 0.3 and lines[1]["queue_s"] < 0.3  # the 0.8 s upload was the client's time
    assert lines[2]["completion_tokens"] == 0
    assert server.metric("mixtrt:generation_tokens_total") - generated == 4  # the two requests' 2 tokens each
    for path in ("/health", "/metrics", "/v1/models"):  # every route's response, one header each
        r = server.http.get(path, headers={"X-Request-Id": "lb-45"})
        assert r.headers.get_list("x-request-id") == ["lb-45"], (path, r.headers)
    with server.http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True},
                            headers={"X-Request-Id": "lb-46"}) as r:
        assert r.headers.get_list("x-request-id") == ["lb-46"] and "[DONE]" in r.read().decode()


def test_log_lines_are_json_with_their_time():
    """Every stderr line of `mixtrt serve` parses as JSON with `ts` first: the server's request lines and uvicorn's
    own warnings (an invalid HTTP request) alike."""
    import logging

    from mixtrt.runtime.serve.runner import _JsonLines

    fmt = _JsonLines()
    mine = logging.LogRecord("mixtrt.serve", logging.INFO, "", 0, '{"event": "request", "id": "x"}', None, None)
    theirs = logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, "Invalid HTTP request received.", None, None)
    a, b = json.loads(fmt.format(mine)), json.loads(fmt.format(theirs))
    assert list(a) == ["ts", "event", "id"] and a["ts"] == pytest.approx(mine.created, abs=1e-3)
    assert b == {"ts": pytest.approx(theirs.created, abs=1e-3), "event": "http", "level": "warning",
                 "message": "Invalid HTTP request received."}
    try:  # an exception in the app: its traceback kept in the line (it was dropped)
        raise ValueError("boom")
    except ValueError:
        import sys

        crash = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "Exception in ASGI application", None,
                                  sys.exc_info())
    line = json.loads(fmt.format(crash))
    assert line["level"] == "error" and "ValueError: boom" in line["exc"] and "Traceback" in line["exc"]
    for odd in ("{}", "{not json"):  # a message of ours that is not a JSON object still makes a JSON line
        record = logging.LogRecord("mixtrt.serve", logging.INFO, "", 0, odd, None, None)
        assert json.loads(fmt.format(record))["ts"] == pytest.approx(record.created, abs=1e-3)


class _IdProxy:
    """What Ray Serve's proxy does with request ids: the client's X-Request-Id as sent, else one of its own, put on
    the request and added to the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id") or b"proxy-0001"
        scope = {**scope, "headers": [*[(k, v) for k, v in scope["headers"] if k != b"x-request-id"],
                                      (b"x-request-id", rid)]}

        async def added(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, added)


def test_behind_a_proxy_that_gives_request_ids_the_app_takes_its_id_and_adds_none(generator, serve_artifact,
                                                                                  caplog):
    """Ray Serve's proxy gives every request an X-Request-Id and answers with it: the app (behind_proxy, as
    a Ray replica builds it) takes that id as it is, for its body and log line, and adds no second header (a
    response carried two, which differed where the client's id was one the plain server replaces); the ready
    line's load time counts the load done before the app (a replica loads in its constructor: it said 0.001 s)."""
    caplog.set_level("INFO", logger="mixtrt.serve")
    s = Server(generator, serve_artifact[1], app_options={"behind_proxy": True, "load_s": 2.5}, proxy=_IdProxy)
    try:
        for given, want in (("bad id with spaces", "bad id with spaces"), ("lb-7", "lb-7"), (None, "proxy-0001")):
            r = s.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1},
                            headers={"X-Request-Id": given} if given else {})
            assert r.status_code == 200 and r.headers.get_list("x-request-id") == [want], r.headers
            assert r.json()["id"] == "cmpl-" + want
        r = s.http.get("/health", headers={"X-Request-Id": "lb-8"})
        assert r.headers.get_list("x-request-id") == ["lb-8"]
    finally:
        s.close()
    lines = [json.loads(rec.getMessage()) for rec in caplog.records]
    assert [line["id"] for line in lines if line["event"] == "request"] == ["bad id with spaces", "lb-7",
                                                                              "proxy-0001"]
    [ready] = [line for line in lines if line["event"] == "ready"]
    assert ready["load_s"] >= 2.5
