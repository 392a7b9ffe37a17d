"""Bad requests (400 with OpenAI's error object, naming the field), 401, 413, 429, disconnects, the drain
on stop, and `mixtrt serve` as a process: SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import openai
import pytest

from mixtrt.runtime.generation import GenerationConfig
from mixtrt.runtime.serve.scheduler import Cancelled, EngineLoop
from tests.serve.conftest import TIMEOUT, Server, httpx, slow

BAD = [  # (body, status, param, words in the message)
    (b'{"prompt": "a", "max_tokens": 3', 400, None, "malformed JSON"),
    (b'["a"]', 400, None, "JSON object"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, "nested too deeply"),
    ({"prompt": "a", "max_tokens": "3"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "only with echo"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "a", "n": 1000}, 400, "n", "less than or equal to 128"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [1, "x"]}, 400, "prompt", "item 1 is a str"),
    ({"prompt": [1, 2.5]}, 400, "prompt", "item 1 is a float"),
    ({"prompt": ["a", [1, 5]], "echo": True}, 400, "prompt", "mixes text and token-id lists"),
    ({"prompt": [[1, 5], "a"], "echo": True, "stream": True}, 400, "prompt", "mixes text and token-id lists"),
    ({"prompt": [1, 99999999]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": "a", "best_of": 2}, 400, "best_of", "only equal to n"),
    ({"prompt": "a", "suffix": "end"}, 400, "suffix", "not supported"),
    ({"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias", "must be a number in [-100, 100]"),
    ({"prompt": "a", "logit_bias": {"five": 1}}, 400, "logit_bias", "token ids"),
    ({"prompt": "a", "logit_bias": {"99999999": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ({"prompt": "a", "min_p": 1.5}, 400, "min_p", "less than or equal to 1"),
    ({"prompt": "a", "min_tokens": -1}, 400, "min_tokens", "greater than or equal to 0"),
    ({"prompt": "a", "min_tokens": 10, "max_tokens": 3}, 400, "min_tokens", "10 is more than max_tokens (3)"),
    ({"prompt": "a", "min_tokens": 17}, 400, "min_tokens", "more than max_tokens (16, the default)"),
    ({"prompt": list(range(3, 124)), "min_tokens": 10}, 400, "min_tokens",
     "more than the 7 tokens the request can generate: max_tokens is not given and the longest prompt (121 tokens) "
     "leaves 7 of the 128 positions"),
    ({"prompt": "a", "typical_p": 0.5}, 400, "typical_p", "unknown field"),
    ({"prompt": "a", "max_tokens": 200}, 400, "max_tokens", "ask for at most 126"),  # "a" is 2 of 128 positions
    (b'{"prompt": "a", "model": "\\ud800"}', 404, "model", "the model '\\ud800' does not exist"),
    (b'{"prompt": "a", "stop": ["\\ud800"]}', 400, "stop", "stop[0] is not valid text"),
    (b'{"prompt": "a", "\\ud800": 1}', 400, "\\ud800", "unknown field '\\ud800'"),
    (b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "an integer of more than 4300 digits"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "greater than 0"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "temperature", "finite number"),
    ({"prompt": "a", "stop": [""]}, 400, "stop", "non-empty"),
    # matched at every token on the shared engine loop: bounded (100,000 of them slowed every other client 36x)
    ({"prompt": "a", "stop": [f"s{i}" for i in range(65)]}, 400, "stop", "at most 64 stop strings"),
    ({"prompt": "a", "stop": ["x" * 4097]}, 400, "stop", "got 1 of 4097"),
    # a value that fits no member of a union is told what the field takes; a list's bad item is named by its index
    ({"prompt": "a", "stop": 5}, 400, "stop", "stop: must be a string or a list of strings"),
    ({"prompt": "a", "stop": ["a", 5]}, 400, "stop", "stop.1: Input should be a valid string"),
    ({"prompt": "a", "seed": 2**64}, 400, "seed", "less than 18446744073709551616"),  # the exact bound
    # a client's dict key that reads like a union member's name is a key, named as such
    ({"prompt": "a", "logit_bias": {"str": "x"}}, 400, "logit_bias", "logit_bias.str: Input should be a valid number"),
    ({"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal to 2"),
    (b'{"prompt": "a", "frequency_penalty": NaN}', 400, "frequency_penalty", "finite number"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
    ({"prompt": "a", "model": "other"}, 404, "model", "does not exist"),
    ({"prompt": list(range(3, 300))}, 400, "prompt", "max positions: the model supports 128 positions"),
    # more rows than the server holds (16 + 64): named by what the client made many
    ({"prompt": [[5]] * 81}, 400, "prompt", "81 prompt(s) x n=1 choices is more than the server holds"),
    ({"prompt": [[5]] * 41, "n": 2}, 400, "n", "41 prompt(s) x n=2 choices"),
    ({"prompt": "a", "reasoning_effort": "low"}, 400, "reasoning_effort", "unknown field"),  # null: left out
]


def test_request_headers_past_the_limit_get_431_at_once(server):
    """A request head over MAX_HEAD_BYTES (a 4 MiB header, sent in pieces) is answered 431 with OpenAI's error
    object and the connection closed, before the rest is read (uvicorn's httptools parser has no bound, and joined
    a 64 MiB header for seconds on the event loop); a head under the limit, and the server afterwards, serve."""
    import socket

    from mixtrt.runtime.serve.runner import MAX_HEAD_BYTES

    def head(size: int) -> bytes:
        return b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size

    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as c:
        t0 = time.perf_counter()
        reply = b""
        try:
            data = head(4 << 20)
            for i in range(0, len(data), 16 << 10):
                c.sendall(data[i:i + (16 << 10)])
        except OSError:  # the server closed the connection: what is expected once it answered
            pass
        while chunk := c.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 431 ") and time.perf_counter() - t0 < 5, reply[:200]
        error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
        assert f"over the limit of {MAX_HEAD_BYTES} bytes" in error["message"], error
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as c:
        c.sendall(head(MAX_HEAD_BYTES // 2) + b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert server.http.get("/health").status_code == 200


def test_head_limit_counts_the_read_that_ends_the_head(server):
    """The bound is the head's own bytes: a head just over it sent whole in one write (the read that ends the head
    counted) gets 431, on a new connection and as the second request of a kept-alive one; a head just under it
    and a small head followed by a body of several limits in the same write are served."""
    import socket

    from mixtrt.runtime.serve.runner import MAX_HEAD_BYTES

    def request(pad: int, body: bytes = b"", path: bytes = b"/health", close: bool = True) -> bytes:
        start = (b"POST " if body else b"GET ") + path + b" HTTP/1.1\r\nHost: x\r\n"
        start += b"Connection: close\r\n" if close else b""
        end = b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        return start + b"X-Pad: " + b"a" * (pad - len(start) - len(end) - 9) + b"\r\n" + end + body

    def replies(*writes: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as c:
            for w in writes:
                c.sendall(w)
            out = b""
            while chunk := c.recv(65536):
                out += chunk
            return out

    assert len(request(MAX_HEAD_BYTES)) == MAX_HEAD_BYTES
    assert replies(request(MAX_HEAD_BYTES)).startswith(b"HTTP/1.1 200 ")
    assert replies(request(MAX_HEAD_BYTES + 1)).startswith(b"HTTP/1.1 431 ")
    assert replies(request(MAX_HEAD_BYTES + 30000)).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as c:  # kept alive
        c.sendall(request(200, close=False))
        first = b""
        while not first.endswith(b"}"):
            first += c.recv(65536)
        c.sendall(request(MAX_HEAD_BYTES + 1))
        second = b""
        while chunk := c.recv(65536):
            second += chunk
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 431 "), (first[:100], second[:100])
    body = b'{"prompt": "a", "max_tokens": 1' + b" " * (3 * MAX_HEAD_BYTES) + b"}"
    big = replies(request(300, body, b"/v1/completions"))
    assert big.startswith(b"HTTP/1.1 200 "), big[:300]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    for body, status, param, words in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = server.http.post("/v1/completions", headers={"content-type": "application/json"}, **kw)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] == param and words in error["message"], (body, error)
    r = server.http.post("/v1/completions", content=gzip.compress(b'{"prompt": "a"}'),
                         headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding 'gzip' is not supported" in r.json()["error"]["message"]
    # a form or XML body is named by its type; JSON sent under another type (curl -d without -H) is still read
    for content, kind in ((b"prompt=hi&max_tokens=2", "application/x-www-form-urlencoded"),
                          (b"<prompt>hi</prompt>", "application/xml; charset=utf-8")):
        r = server.http.post("/v1/completions", content=content, headers={"content-type": kind})
        assert r.status_code == 415, r.text
        assert r.json()["error"]["message"] == (f"Content-Type {kind.split(';')[0]!r}: the request body must be JSON "
                                                "(Content-Type: application/json)")
    for kind in ("application/x-www-form-urlencoded", "text/plain", "application/vnd.api+json"):
        r = server.http.post("/v1/completions", content=b' {"prompt": "a", "max_tokens": 1}',
                             headers={"content-type": kind})
        assert r.status_code == 200, (kind, r.text)
    hi = [{"role": "user", "content": "hi"}]
    for body, param in [({"messages": []}, "messages"), ({"messages": [{"content": "hi"}]}, "messages"),
                        ({"messages": hi, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": hi, "max_completion_tokens": 500}, "max_completion_tokens"),
                        ({"messages": hi, "response_format": {"type": "xml"}}, "response_format"),
                        ({"messages": hi, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                        ({"messages": hi, "tool_choice": "required"}, "tool_choice"),
                        ({"messages": hi, "store": True}, "store"),
                        ({"messages": hi, "functions": [{"name": "f"}]}, "functions"),
                        ({"messages": hi, "modalities": ["text", "audio"]}, "modalities"),
                        ({"messages": hi, "chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
                        ({"messages": [*hi, {"role": "assistant", "content": "x"}], "continue_final_message": True},
                         "continue_final_message"),  # without add_generation_prompt: false
                        ({"messages": hi, "skip_special_tokens": False}, "skip_special_tokens"),
                        ({"messages": hi, "reasoning_effort": "low"}, "reasoning_effort"),
                        ({"messages": hi, "max_tokens": 0}, "max_tokens"),  # no echo in chat: nothing to return
                        ({"messages": [*hi, {"role": "assistant", "content": None}, *hi]}, "messages")]:
        r = server.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "message 1 (assistant) has no content" in r.json()["error"]["message"]  # the null content named
    with pytest.raises(openai.BadRequestError) as e:
        server.openai.completions.create(model="tiny", prompt="a", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    r = server.http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert server.openai.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2
    # routes: an unknown one and a wrong method get the error object too; a model is retrieved by its id
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("POST", "/v1/completions/", 404)]:  # no redirect echoing the client's Host
        r = server.http.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"  # as OpenAI types an invalid URL
    assert server.openai.models.retrieve("tiny").id == "tiny"
    assert server.http.head("/health").status_code == 200  # load balancers' probes
    with pytest.raises(openai.NotFoundError):
        server.openai.models.retrieve("other")


def test_api_key(generator, serve_artifact):
    s = Server(generator, serve_artifact[1], api_key="sesame")
    try:
        assert s.openai.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text is not None
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", timeout=TIMEOUT, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert s.http.get("/v1/models").status_code == 401
        assert s.http.post("/tokenize", json={"prompt": "a"}).status_code == 401
        assert s.http.post("/detokenize", json={"tokens": [1]}).status_code == 401
        assert s.http.get("/health").status_code == 200 and s.http.get("/metrics").status_code == 200
        wrong.close()
    finally:
        s.close()


def test_disconnect_frees_the_row_and_a_full_queue_answers_429(generator, serve_artifact, caplog):
    """One engine row, no queue: a second request is refused at once with 429; a client that goes away
    mid-stream is cancelled (its row freed, the metrics show it) and the next request runs. The request
    log says what the clients got: the stream's 200 ended by the disconnect; no status for the
    non-streaming request that never got a response."""
    caplog.set_level("INFO", logger="mixtrt.serve")
    s = Server(slow(generator, 0.02), serve_artifact[1], max_batch=1, max_queue=0)
    try:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 100, "temperature": 0, "stream": True}
        with s.http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the row is decoding
            assert s.metric("mixtrt:num_rows_running") == 1
            with pytest.raises(openai.RateLimitError) as e:
                s.openai.completions.create(model="tiny", prompt="b", max_tokens=2)
            assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
            assert e.value.body["code"] == "rate_limit_exceeded"  # OpenAI's code
            assert "0 row(s) not yet running" in e.value.body["message"]  # the decoding row is not counted
            assert "0 free of 1 engine rows" in e.value.body["message"]
            assert e.value.response.headers["retry-after"] == "1"
        # the response was closed after one chunk: within a step or two the row is gone
        deadline = time.monotonic() + 5
        while s.metric("mixtrt:request_aborted_total", reason="disconnect") < 1:
            assert time.monotonic() < deadline, "the disconnect was never noticed"
            time.sleep(0.01)
        assert s.metric("mixtrt:num_rows_running") == 0 and s.metric("mixtrt:num_requests_running") == 0
        generated = s.metric("mixtrt:generation_tokens_total")
        assert generated < 20  # far from the 100 asked: it stopped
        assert s.metric("mixtrt:request_refused_total", status="429") == 1
        # the stream's log line is written once the engine took its row out: its tokens are the metric's
        deadline = time.monotonic() + 5
        while not (logged := [json.loads(r.getMessage()) for r in caplog.records if '"end": "disconnect"' in
                              r.getMessage()]):
            assert time.monotonic() < deadline, "the disconnected stream was never logged"
            time.sleep(0.01)
        assert logged[0]["completion_tokens"] == generated
        assert s.openai.completions.create(model="tiny", prompt="b", max_tokens=2).usage.completion_tokens == 2
        # a non-streaming client that disconnects is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            s.http.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 5
        while s.metric("mixtrt:request_aborted_total", reason="disconnect") < 2:
            assert time.monotonic() < deadline, "the non-streaming disconnect was never noticed"
            time.sleep(0.01)
        assert s.metric("mixtrt:num_rows_running") == 0
        deadline = time.monotonic() + 5
        while len(records := [json.loads(r.getMessage()) for r in caplog.records
                              if '"event": "request"' in r.getMessage()]) < 3:
            assert time.monotonic() < deadline, "a request was never logged"
            time.sleep(0.01)
        ended = [(r["stream"], r["status"], r["end"]) for r in records if r["end"] != "finished"]
        assert ended == [(True, 200, "disconnect"), (False, None, "disconnect")], records
    finally:
        s.close()


def test_a_stream_whose_client_stops_reading_is_cancelled_and_its_output_dropped(generator, serve_artifact, caplog,
                                                                                 monkeypatch):
    """A client that takes no chunk for STALL_S while one waits for it is not reading: its rows are cancelled
    (`request_aborted_total{reason="stalled"}`), what was queued for it is dropped (a non-reading client held the
    whole output of its rows, however many), the log line says `end: stalled`, and a client that reads again gets
    the stream's end: an error event naming the stall, then [DONE]."""
    import mixtrt.runtime.serve.app as app_module

    monkeypatch.setattr(app_module, "STALL_S", 0.3)
    monkeypatch.setattr(app_module, "STALL_CHECK_S", 0.05)
    caplog.set_level("INFO", logger="mixtrt.serve")
    s = Server(slow(generator, 0.01), serve_artifact[1], max_batch=4, sndbuf=4096)
    try:
        body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 110, "n": 4, "logprobs": 20,
                           "ignore_eos": True, "stream": True}).encode()
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
        client.connect(("127.0.0.1", s.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 30
        while s.metric("mixtrt:request_aborted_total", reason="stalled") < 1 or s.metric("mixtrt:num_rows_running"):
            assert time.monotonic() < deadline, "the stalled stream was never cancelled, or its rows never freed"
            time.sleep(0.05)
        generated = s.metric("mixtrt:generation_tokens_total")
        assert generated < 4 * 110  # cut before the end
        while not (logged := [json.loads(r.getMessage()) for r in caplog.records if '"end": "stalled"' in
                              r.getMessage()]):
            assert time.monotonic() < deadline, "the stalled stream was never logged"
            time.sleep(0.05)
        assert logged[0]["status"] == 200 and logged[0]["completion_tokens"] == generated
        client.settimeout(10)
        data = b""
        while b"data: [DONE]" not in data:
            more = client.recv(65536)
            assert more, data[-300:]
            data += more
        events = [line for line in data.decode().splitlines() if line.startswith("data: ")]
        assert "the request was cancelled (stalled)" in events[-2] and events[-1] == "data: [DONE]"
        assert len(events) < generated  # what waited for the client was dropped, not sent late
        client.close()
        assert s.openai.completions.create(model="tiny", prompt="b", max_tokens=2).usage.completion_tokens == 2
    finally:
        s.close()


def test_request_bodies_are_bounded_in_time_and_in_all(generator, serve_artifact, monkeypatch):
    """A client that stops sending its body is answered 408 after BODY_IDLE_S (uvicorn waits for ever: 350 such
    connections held 1.6 GB); the bodies being read at once hold at most BODY_BUDGET_BODIES x --max-body-bytes, a
    body past that a 429 (the server goes on)."""
    import mixtrt.runtime.serve.app as app_module

    monkeypatch.setattr(app_module, "BODY_IDLE_S", 0.5)
    monkeypatch.setattr(app_module, "BODY_BUDGET_BODIES", 1)
    s = Server(generator, serve_artifact[1], max_body_bytes=4096)

    def partial(sent: bytes, length: int) -> socket.socket:
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % length + sent)
        return c

    def answer(c: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            more = c.recv(65536)
            if not more:
                break
            data += more
        return data

    try:
        t = time.monotonic()
        c = partial(b'{"prompt": "a"', 3000)
        got = answer(c)
        assert got.startswith(b"HTTP/1.1 408") and b"no bytes for 0.5 s after 14" in got, got
        assert time.monotonic() - t < 5
        c.close()
        monkeypatch.setattr(app_module, "BODY_IDLE_S", 10.0)
        first = partial(b" " * 3000, 3500)  # 3000 of the budget's 4096 bytes held
        time.sleep(0.3)
        second = partial(b" " * 2000, 2500)
        got = answer(second)
        assert got.startswith(b"HTTP/1.1 429") and b"bytes of request bodies" in got, got
        second.close()
        first.close()
        deadline = time.monotonic() + 5
        while s.app.state.mixtrt.body_bytes:  # the budget is given back as bodies end, however they end
            assert time.monotonic() < deadline, s.app.state.mixtrt.body_bytes
            time.sleep(0.05)
        assert s.openai.completions.create(model="tiny", prompt="b", max_tokens=2).usage.completion_tokens == 2
    finally:
        s.close()


def test_stop_drains_then_cancels_within_its_bound(generator):
    """EngineLoop.stop: new requests are refused; a running request that cannot finish within drain_s is
    cancelled ("shutdown"), and stop returns soon after the bound."""
    loop = EngineLoop(slow(generator, 0.01).backend, generator.tokenizer, max_batch=2, max_queue=4)
    loop.start()
    config = generator.config(max_new_tokens=120, do_sample=False)

    async def scenario() -> tuple[str, float, int]:
        three = generator.config(max_new_tokens=3, do_sample=False)
        short = loop.submit([[1, 5, 6]], three, 1, "s", time.perf_counter())
        long = loop.submit([[1, 7, 8]], config, 1, "l", time.perf_counter())
        events = long.events()
        await events.__anext__()
        done = [e async for e in short.events()]
        t0 = time.perf_counter()
        stopper = asyncio.get_running_loop().run_in_executor(None, loop.stop, 0.2)
        try:
            async for _ in events:
                pass
            reason = "finished"
        except Cancelled as e:
            reason = e.reason
        await stopper
        return reason, time.perf_counter() - t0, len(done)

    reason, took, short_events = asyncio.run(scenario())
    assert reason == "shutdown" and took < 2.0 and short_events == 3
    with pytest.raises(Exception, match="shutting down"):
        asyncio.run(_submit(loop, config))


def test_a_cancel_after_the_request_finished_says_so(generator):
    """EngineLoop.cancel's then(cut): False where the request had finished before the cancel came (the metrics
    count it finished, and its outputs wait in its queue: a request's log line then says "finished"), True where
    the cancel took running rows out (counted aborted)."""
    from mixtrt.runtime.serve.metrics import Metrics

    metrics = Metrics("tiny")
    loop = EngineLoop(slow(generator, 0.01).backend, generator.tokenizer, max_batch=2, max_queue=4, metrics=metrics)
    loop.start()

    async def scenario() -> list[tuple[str, bool, int]]:
        seen: list[tuple[str, bool, int]] = []
        done = asyncio.Event()
        short = loop.submit([[1, 5, 6]], generator.config(max_new_tokens=2, do_sample=False), 1, "s",
                            time.perf_counter())
        long = loop.submit([[1, 7, 8]], generator.config(max_new_tokens=120, do_sample=False), 1, "l",
                           time.perf_counter())
        await long.events().__anext__()
        while not short.ended:  # finished in the engine; its events not read (a client that stopped reading)
            await asyncio.sleep(0.005)
        for req in (short, long):
            loop.cancel(req, "disconnect", then=lambda cut, req=req: (seen.append((req.id, cut, req.queue.qsize())),
                                                                       len(seen) == 2 and done.set()))
        await asyncio.wait_for(done.wait(), TIMEOUT)
        return seen

    try:
        seen = dict((rid, (cut, queued)) for rid, cut, queued in asyncio.run(scenario()))
    finally:
        loop.stop(0)
    assert seen["s"] == (False, 2) and seen["l"][0] is True, seen  # the short one's 2 token events still queued
    text = metrics.render().decode()
    assert 'mixtrt:request_aborted_total{model_name="tiny",reason="disconnect"} 1.0' in text, text


def test_a_request_answered_whole_gets_only_its_outputs(generator):
    """stream=False: events() yields one event per choice (its output), the same outputs as a streamed twin's,
    and the metrics still count every generated token."""
    from mixtrt.runtime.serve.metrics import Metrics

    metrics = Metrics("tiny")
    loop = EngineLoop(generator.backend, generator.tokenizer, max_batch=4, max_queue=4, metrics=metrics)
    loop.start()
    config = generator.config(max_new_tokens=7, min_new_tokens=7, do_sample=False)

    async def scenario() -> tuple[list, list]:
        whole = loop.submit([[1, 5, 6]], config, 2, "w", time.perf_counter(), stream=False)
        streamed = loop.submit([[1, 5, 6]], config, 2, "s", time.perf_counter())
        return [e async for e in whole.events()], [e async for e in streamed.events()]

    try:
        whole, streamed = asyncio.run(scenario())
    finally:
        loop.stop(1.0)
    assert len(streamed) == 14 and len(whole) == 2 and all(e.output is not None for e in whole)
    ids = lambda events: sorted(e.output.token_ids for e in events if e.output is not None)  # noqa: E731
    assert ids(whole) == ids(streamed) and all(len(t) == 7 for t in ids(whole))
    assert metrics.registry.get_sample_value("mixtrt:generation_tokens_total", {"model_name": "tiny"}) == 28


def test_the_engine_waits_for_a_first_text_and_several_requests_tokens_only(generator):
    """After a part, the loop waits for its chunks to reach the sockets where they hold a row's first token or the
    first text of its reply (a first "▁" of a new message shows nothing) or several requests' tokens; one request's
    later tokens go out while the next step runs."""
    loop = EngineLoop(generator.backend, generator.tokenizer, max_batch=4, max_queue=4)
    waits: list[tuple[bool, int, list[str]]] = []
    handoff = loop._handoff

    def record(batches, wait=True):
        batches = list(batches)
        waits.append((wait, len(batches), [e.text for _, events in batches for e in events]))
        handoff(batches, wait)

    loop._handoff = record
    loop.start()
    space = generator.tokenizer.piece_id("▁")
    config = generator.config(max_new_tokens=5, do_sample=False, eos_token_id=(), logit_bias={space: 100})

    async def one() -> None:
        req = loop.submit([[1, 5, 6]], config, 1, "a", time.perf_counter())
        assert [e.text async for e in req.events()][:2] == ["", " "]  # the first "▁" shows nothing

    async def two() -> None:
        reqs = [loop.submit([[1, 5, 6]], config, 1, name, time.perf_counter()) for name in "bc"]
        for req in reqs:
            assert len([e async for e in req.events()]) == 5

    try:
        asyncio.run(one())
        alone = [w for w, n, _ in waits]
        assert alone == [True, True, False, False, False], waits  # first token, first text, then no wait
        waits.clear()
        asyncio.run(two())
        assert all(w for w, n, _ in waits if n > 1) and any(n > 1 for _, n, _ in waits), waits
    finally:
        loop.stop(1.0)


async def _submit(loop: EngineLoop, config: GenerationConfig) -> None:
    loop.submit([[1, 2]], config, 1, "x", time.perf_counter())


class CliServer:
    """`mixtrt serve` in a subprocess on a free port, ready (/health 200); its stderr lines collected."""

    def __init__(self, artifact, drain: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mixtrt", "serve", str(artifact), "--port", "0",
                                      "--threads", "1", "--drain", drain, "--model-name", "tiny"],
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.proc.stderr is not None
        listening = json.loads(self.proc.stderr.readline())
        assert listening["event"] == "listening"
        self.url = listening["url"]
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr),  # type: ignore[arg-type]
                                       daemon=True)
        self.reader.start()
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while self.http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def records(self) -> list[dict]:
        """The JSON log lines, once the process has exited."""
        self.reader.join(5)
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_cli_serves_and_sigterm_drains_then_exits_0(serve_artifact):
    s = CliServer(serve_artifact[1], drain="10")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=100, temperature=0, stream=True)
        first = next(iter(stream))
        s.proc.send_signal(signal.SIGTERM)
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)  # the running request finishes
        assert s.proc.wait(TIMEOUT) == 0
        records = s.records()
        [request] = [r for r in records if r["event"] == "request"]
        assert request["completion_tokens"] == 100 and request["finish"] == ["length"] and text
        [ready] = [r for r in records if r["event"] == "ready"]
        assert ready["gc_frozen_objects"] > 1000  # the server's own process: what loading left is frozen
        client.close()
    finally:
        s.close()


def test_cli_sigterm_past_the_drain_cancels_cleanly(serve_artifact):
    """--drain 0: SIGTERM cancels a running stream at once, and the client still gets a whole response (the
    error event, then data: [DONE] as vLLM ends such a stream, then the end of the body) instead of a cut
    connection; the process exits 0."""
    s = CliServer(serve_artifact[1], drain="0")
    try:
        body = {"prompt": "a", "max_tokens": 120, "n": 16, "stream": True}
        with s.http.stream("POST", "/v1/completions", json=body) as r:
            events = r.iter_lines()
            next(line for line in events if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in events if line]  # ends normally: no RemoteProtocolError
        assert s.proc.wait(TIMEOUT) == 0
        [request] = [r for r in s.records() if r["event"] == "request"]
        if request["end"] == "shutdown":  # (a fast machine may finish all 16 rows before the signal lands)
            assert "cancelled (shutdown)" in rest[-2] and '"error"' in rest[-2], rest[-3:]
        else:
            assert request["end"] == "finished"
        assert rest[-1] == "data: [DONE]", rest[-3:]
    finally:
        s.close()


def test_cli_second_ctrl_c_cancels_a_request_answered_whole(serve_artifact):
    """A second SIGINT (uvicorn's forced exit) cancels the handler of a request answered whole: its rows leave
    the engine too (they went on generating for nobody, holding the exit up), its log line says it was cut by
    the shutdown, and the process exits 0 well within the drain time."""
    s = CliServer(serve_artifact[1], drain="60")
    try:
        body = {"prompt": "a", "max_tokens": 120, "n": 16, "ignore_eos": True}
        answered: list = []
        answer = threading.Thread(target=lambda: answered.append(_ignore_errors(s.http.post, "/v1/completions",
                                                                               json=body)), daemon=True)
        answer.start()
        deadline = time.monotonic() + TIMEOUT
        while 'mixtrt:num_requests_running{model_name="tiny"} 1.0' not in s.http.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(TIMEOUT) == 0 and time.monotonic() - t0 < 30
        [request] = [r for r in s.records() if r["event"] == "request"]
        answer.join(TIMEOUT)
        if request["end"] == "finished":  # (a fast machine may finish the 16 rows before the second signal)
            assert None not in request["finish"] and request["status"] == 200, request
        else:  # answered with OpenAI's error object (uvicorn sent a plain-text 500 for the cancelled handler)
            assert (request["status"], request["end"]) == (503, "shutdown"), request
            assert answered and answered[0].status_code == 503, answered
            assert answered[0].json()["error"]["message"] == "the request was cancelled (shutdown)"
        # uvicorn's tracebacks of the handlers and the lifespan it cancels are not written
        assert not any("Traceback" in line or "CancelledError" in line for line in s.lines), s.lines
    finally:
        s.close()


def test_cli_second_ctrl_c_logs_a_cut_stream_as_shutdown(serve_artifact):
    """A stream the second SIGINT cuts (uvicorn cancels its response) is logged as cut by the shutdown, not as a
    client that went away, and its rows leave the engine."""
    s = CliServer(serve_artifact[1], drain="60")
    try:
        body = {"prompt": "a", "max_tokens": 120, "n": 16, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=s.url, timeout=TIMEOUT) as client, \
                client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # streaming
            s.proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            s.proc.send_signal(signal.SIGINT)
            assert s.proc.wait(TIMEOUT) == 0
            _ignore_errors(lambda: list(lines))
        [request] = [r for r in s.records() if r["event"] == "request"]
        if request["end"] != "finished":  # (a fast machine may finish the 16 rows before the second signal)
            assert request["end"] == "shutdown", request
    finally:
        s.close()


def _ignore_errors(fn, *args, **kwargs):
    """fn's result, None where it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception:  # the server went away under the request: what the test makes happen
        return None


def test_cli_address_that_cannot_be_had_is_one_line_and_exit_2(serve_artifact):
    """A port in use, a name that does not resolve: one line naming the address (not blamed on stdout), exit 2; an
    IPv6 address, bracketed or not, listens and is logged as a URL takes it."""
    import socket

    from mixtrt.runtime.serve.runner import listen

    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        for host, why in [("127.0.0.1", "Address already in use"), ("no-such-host.invalid", "")]:
            r = subprocess.run([sys.executable, "-m", "mixtrt", "serve", str(serve_artifact[1]), "--host", host,
                                "--port", str(port)], capture_output=True, text=True, timeout=TIMEOUT)
            [line] = r.stderr.strip().splitlines()
            assert r.returncode == 2 and line.startswith(f"mixtrt serve: error: cannot listen on {host} port {port}: ")
            assert why in line and "stdout" not in line and "while attempting" not in line, line
    finally:
        taken.close()
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("this machine has no IPv6 loopback: the bracketed form is not tried")
    for host in ("::1", "[::1]"):
        sock = listen(host, 0)
        assert sock.getsockname()[0] == "::1"
        sock.close()


def test_a_stop_while_loading_does_not_wait_for_the_load(tmp_path, monkeypatch):
    """The app's shutdown while its artifact still loads returns at once (the load runs in a daemon thread; a
    real Mixtral takes minutes, past an orchestrator's grace period), and a load that ends after the stop starts
    no engine loop. (`mixtrt serve` then exits 0 without waiting for the thread.)"""
    from mixtrt.runtime.serve.app import ServeSettings, create_app

    release = threading.Event()
    monkeypatch.setattr(ServeSettings, "load_generator", lambda self: (release.wait(TIMEOUT), generator_stub)[1])
    generator_stub = types.SimpleNamespace(backend=None, tokenizer=None)
    app = create_app(ServeSettings(tmp_path, model_name="tiny"))

    async def scenario() -> float:
        async with app.router.lifespan_context(app):
            assert app.state.mixtrt.loading
            t0 = time.perf_counter()
        return time.perf_counter() - t0

    took = asyncio.run(scenario())
    state = app.state.mixtrt
    assert took < 1.0 and state.closing and state.loading
    release.set()
    state.loader.join(TIMEOUT)
    assert not state.loading and state.loop is None and state.generator is None and state.error is None


def test_cli_sigterm_as_soon_as_it_listens_exits_0(serve_artifact):
    """SIGTERM right after the listening line (before uvicorn took the signals over, while the artifact loads):
    exit 0, not death by the signal; a stop during the load says so and does not wait for it."""
    proc = subprocess.Popen([sys.executable, "-m", "mixtrt", "serve", str(serve_artifact[1]), "--port", "0",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and json.loads(proc.stderr.readline())["event"] == "listening"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        events = [json.loads(line)["event"] for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert events in (["stopped_while_loading"], ["ready"]), events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_load_failure_is_one_line_and_exit_2(tmp_path):
    """An artifact that cannot load: the server (already listening) stops, the error is one line, exit 2."""
    (tmp_path / "manifest.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "mixtrt", "serve", str(tmp_path), "--port", "0"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("mixtrt serve: error: "), r.stderr


@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("chunk, running, prefilling, cached", [(None, 2, None, 0), (2, 0, 0, 2), (3, 1, None, 0),
                                                                 (5, 1, 1, 2), (10_000, 2, None, 0)])
def test_prefill_chunk_bounds_the_prefill_between_decode_steps(generator, mixed, chunk, running, prefilling, cached):
    """While a row decodes, one engine-loop step prefills at most `prefill_chunk` prompt tokens: a new row whose
    prompt is cut holds its cache row, part-prefilled, and does not decode yet. With mixed steps the step's
    prefill is one row's chunk, in the decode pass: the next row waits for the next step."""
    from tests.serve.conftest import SeparateSteps

    backend = generator.backend if mixed else SeparateSteps(generator.backend)
    loop = EngineLoop(backend, generator.tokenizer, max_batch=4, max_queue=4, prefill_chunk=chunk)
    engine, config = loop.engine, generator.config(max_new_tokens=20, do_sample=False)
    assert engine.mixed == mixed
    if mixed and chunk is not None and chunk >= 3:  # the first new row's whole prompt, and no other row
        running, prefilling = 1, None
    first = engine.add([1, 5, 6, 7], config)
    engine.admit()
    new = [engine.add([1, 8, 9], config), engine.add([1, 10, 11, 12], config)]
    loop._step()  # the loop thread's step, driven by hand
    assert engine.running == [first, *new[:running]] and len(first.tokens) == 2
    assert engine.prefilling is (None if prefilling is None else new[prefilling])
    if prefilling is not None:
        assert new[prefilling].cached == cached and not new[prefilling].tokens
    assert engine.mixed_steps_run == (mixed and chunk is not None)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunk_prefilled_rows_equal_the_requests_alone(generator, chunk):
    """Prompts longer than the window (W=5; the ring wraps inside and between chunks) prefilled in chunks of
    1, 3 (odd) and more than the prompt while another row decodes: greedy tokens and prompt logprobs equal
    Generator.generate's (one whole prefill, alone)."""
    loop = EngineLoop(generator.backend, generator.tokenizer, max_batch=3, max_queue=4, prefill_chunk=chunk)
    engine = loop.engine
    config = generator.config(max_new_tokens=12, do_sample=False, return_logprobs=True)
    prompts = [[1, *range(300, 307)], [1, *range(40, 53)], [1, *range(900, 919)]]
    rows = [engine.add(prompts[0], config)]
    loop._step()
    rows += [engine.add(p, config) for p in prompts[1:]]
    outputs = {}
    while engine.busy:
        for event in engine.step(prefill_budget=chunk):
            if event.output is not None:
                outputs[event.row.id] = event.output
    for row, prompt in zip(rows, prompts, strict=True):
        [want] = generator.generate([prompt], config)
        got = outputs[row.id]
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(got.prompt_logprobs, want.prompt_logprobs, atol=1e-4)


@pytest.mark.parametrize("argv, mixed", [([], True), (["--separate-prefill"], False)])
def test_the_command_line_sets_mixed_steps(serve_artifact, monkeypatch, argv, mixed):
    """`mixtrt serve` runs prompt chunks in the decode pass unless --separate-prefill (ServeSettings.mixed_steps)."""
    from mixtrt.cli import main
    from mixtrt.runtime.serve import runner

    seen = {}
    monkeypatch.setattr(runner, "serve", lambda settings, host, port: seen.update(settings=settings) or 0)
    assert main(["serve", str(serve_artifact[1]), *argv]) == 0
    assert seen["settings"].mixed_steps is mixed
    assert seen["settings"].allowed_origins == ("*",)  # CORS: any origin unless told
    assert main(["serve", str(serve_artifact[1]), "--allowed-origins", "http://a", "http://b"]) == 0
    assert seen["settings"].allowed_origins == ("http://a", "http://b")
    assert main(["serve", str(serve_artifact[1]), "--allowed-origins"]) == 0
    assert seen["settings"].allowed_origins == ()  # none: CORS off


@pytest.mark.parametrize("max_batch, mixed", [(1, False), (4, True)])
def test_the_server_loads_mixed_steps_only_where_a_row_can_decode_beside_a_prefill(serve_artifact, generator,
                                                                                    monkeypatch, max_batch, mixed):
    """--max-batch 1 never runs a prompt chunk beside a decoding row: it keeps the plain graph (cheaper steps)."""
    from mixtrt.runtime.generation import Generator
    from tests.serve.conftest import Server

    asked = {}

    def load(*args, **kwargs):
        asked.update(kwargs)
        return generator

    monkeypatch.setattr(Generator, "load", staticmethod(load))
    s = Server(None, serve_artifact[1], max_batch=max_batch)
    s.close()
    assert asked["mixed_steps"] is mixed


def test_what_common_clients_send_is_accepted(server, generator):
    """Explicit nulls (clients that serialise unset fields), the neutral values of OpenAI fields the server does not
    implement (SDKs and agent frameworks send them by default), the `developer` role, /v1/models/, HEAD and a
    browser's CORS preflight: each served as OpenAI or vLLM serves it."""
    base = {"prompt": "a", "max_tokens": 3, "temperature": 0}
    alone = server.http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    nulls = {k: None for k in ("n", "stream", "echo", "presence_penalty", "frequency_penalty", "ignore_eos", "logprobs",
                               "stop", "seed", "top_p", "best_of", "suffix", "stream_options", "user",
                               # fields the server does not know, null: left out too (vLLM knows or ignores them)
                               "reasoning_effort", "prompt_logprobs", "audio", "prediction")}
    neutral = {"best_of": 1, "suffix": "", "logit_bias": {"5": 0}, "skip_special_tokens": True,
               "spaces_between_special_tokens": True, "include_stop_str_in_output": False,
               "safety_identifier": "u1", "prompt_cache_key": "k", "min_p": 0, "min_tokens": 0}
    for extra in (nulls, neutral):
        r = server.http.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone, (extra, r.text)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chat = {"messages": system, "max_tokens": 3, "temperature": 0}
    reply = server.http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    for extra in ({"logprobs": None, "n": None, "stream": None, "max_completion_tokens": None},
                  {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True,
                   "store": False, "metadata": {"app": "x"}, "service_tier": "auto"},
                  {"tool_choice": "auto", "tools": None},
                  {"functions": [], "function_call": "none", "modalities": ["text"], "add_generation_prompt": True,
                   "continue_final_message": False, "chat_template_kwargs": {}, "echo": False,
                   "safety_identifier": "u1", "prompt_cache_key": "k",
                   "stream_options": None},
                  {"messages": [{"role": "developer", "content": "Be brief."}, system[1]]},
                  {"messages": [system[0], {"role": "user", "content": [{"type": "text", "text": "hi"}],
                                            "name": "u"}]}):
        r = server.http.post("/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reply, (extra, r.text)
    assert server.http.get("/v1/models/").json()["data"][0]["id"] == "tiny"
    for path in ("/v1/models", "/v1/models/tiny", "/metrics", "/health", "/version"):
        assert server.http.head(path).status_code == 200, path
    preflight = server.http.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*", preflight.text
    r = server.http.post("/v1/completions", json=base, headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "*"


def test_cors_can_be_limited_or_off(generator, serve_artifact):
    s = Server(generator, serve_artifact[1], allowed_origins=("http://ok.example",))
    try:
        ask = {"Access-Control-Request-Method": "POST"}
        good = s.http.options("/v1/completions", headers={"Origin": "http://ok.example", **ask})
        assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "http://ok.example"
        bad = s.http.options("/v1/completions", headers={"Origin": "http://evil.example", **ask})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    finally:
        s.close()
    s = Server(generator, serve_artifact[1], allowed_origins=())
    try:
        r = s.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"Origin": "http://x"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        s.close()


def test_a_big_prompt_is_tokenized_off_the_event_loop(generator, serve_artifact):
    """Tokenizing megabytes takes seconds: a body past INLINE_BODY_BYTES is parsed and tokenized in a worker
    thread, so the streams already running and /health go on meanwhile; a small one stays on the loop (cheaper)."""
    from mixtrt.runtime.generation import Generator
    from mixtrt.runtime.serve.app import INLINE_BODY_BYTES

    threads: list[str] = []

    class Recording:
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def encode(self, *args, **kwargs):
            threads.append(threading.current_thread().name)
            return self._tok.encode(*args, **kwargs)

    gen = Generator(generator.backend, Recording(generator.tokenizer), generator.defaults)
    s = Server(gen, serve_artifact[1])
    try:
        loop_thread = s.thread.name
        assert s.http.post("/v1/completions", json={"prompt": "a b", "max_tokens": 1}).status_code == 200
        assert threads == [loop_thread]
        threads.clear()
        big = "word " * (INLINE_BODY_BYTES // 4)
        r = s.http.post("/v1/completions", json={"prompt": big, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # too long for 128 positions
        assert threads and loop_thread not in threads, threads
    finally:
        s.close()


def test_a_stream_ended_by_the_engine_while_its_client_was_not_reading_is_logged_as_such():
    """A stream blocked sending to a client that stopped reading never sees the engine's Cancelled: its log line
    takes the end from what the request's queue still holds (it said "finished" with outputs missing)."""
    from mixtrt.runtime.serve.app import _ended_by

    def call_with(items, choices=2):
        rows = [object() for _ in range(choices)]
        handle = types.SimpleNamespace(queue=asyncio.Queue(), rows=rows, choices=choices)
        for item in items:
            handle.queue.put_nowait(item(rows) if callable(item) else item)
        return types.SimpleNamespace(handle=handle, outputs={})

    def event(i, output):
        return lambda rows: types.SimpleNamespace(row=rows[i], output=output)

    call = call_with([event(0, None), event(0, "out0"), Cancelled("shutdown")])
    assert _ended_by(call) == "shutdown" and call.outputs == {0: "out0"}  # the outputs it had are logged
    assert _ended_by(call_with([RuntimeError("the engine failed")])) == "error"
    call = call_with([event(0, "out0"), event(1, "out1")])  # the engine finished it; the client never read it all
    assert _ended_by(call) == "finished" and call.outputs == {0: "out0", 1: "out1"}
    assert _ended_by(call_with([event(0, "out0")])) == "disconnect"


def test_a_client_gone_before_its_whole_body_is_one_log_line_not_a_traceback(serve_artifact):
    s = CliServer(serve_artifact[1], drain="5")
    try:
        host, port = s.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\":")
            time.sleep(0.3)
        assert s.http.get("/health").status_code == 200  # and the server goes on
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(TIMEOUT) == 0
        [refused] = [r for r in s.records() if r["event"] == "refused"]
        assert refused["status"] is None and "disconnected after 10 bytes of its request body" in refused["error"]
        assert not any("Traceback" in line or "ClientDisconnect" in line for line in s.lines), s.lines
    finally:
        s.close()


def test_a_cut_streams_log_line_names_the_choices_that_had_finished(generator, serve_artifact, caplog):
    """A client gone while one of its choices had just finished (its output still queued for the stream): the
    request's log line shows that choice's finish, as the metrics count it, not null."""
    caplog.set_level("INFO", logger="mixtrt.serve")
    rng = np.random.default_rng(5)
    prompts = [[1, *rng.integers(3, 32000, size=8).tolist()] for _ in range(2)]
    first = [generator.generate([p], max_new_tokens=1, do_sample=False)[0].token_ids[0] for p in prompts]
    if first[0] == first[1]:
        pytest.skip("both prompts choose the same first token: no prompt that stops alone")
    s = Server(slow(generator, 0.3), serve_artifact[1], max_batch=2)
    try:
        stops = s.metric("mixtrt:request_success_total", finished_reason="stop")
        body = {"prompt": prompts, "max_tokens": 50, "temperature": 0, "stream": True, "stop_token_ids": [first[0]]}
        with s.http.stream("POST", "/v1/completions", json=body):
            pass  # gone at once: prompt 0 stops at its first token, in a step that ends after the client left
        deadline = time.monotonic() + 10
        while not (lines := [json.loads(r.getMessage()) for r in caplog.records
                             if '"event": "request"' in r.getMessage()]):
            assert time.monotonic() < deadline, "no log line"
            time.sleep(0.02)
        stopped = s.metric("mixtrt:request_success_total", finished_reason="stop") - stops
    finally:
        s.close()
    [line] = lines
    assert line["end"] == "disconnect" and line["finish"].count("stop") == stopped, (line, stopped)


def test_the_default_model_id_is_the_folder_name_as_given(tmp_path, monkeypatch):
    """Clients name the model by it: a symlink's own name (`current -> v2` keeps `current` across rollouts), the
    current folder's name for `.`, a trailing slash ignored."""
    from mixtrt.runtime.serve.app import ServeSettings

    (tmp_path / "v2").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "v2")
    monkeypatch.chdir(tmp_path / "v2")
    for given, want in ((tmp_path / "current", "current"), (f"{tmp_path}/current/", "current"), (".", "v2"),
                        ("../current", "current"), (tmp_path / "v2", "v2")):
        assert ServeSettings(given).name == want
    assert ServeSettings(tmp_path / "current", model_name="m").name == "m"


@pytest.mark.parametrize("flag, env, want", [(None, "from-env", "from-env"), ("flag", "from-env", "flag"),
                                             (None, None, None), (None, "", None)])
def test_the_api_key_may_come_from_the_environment(serve_artifact, monkeypatch, flag, env, want):
    """MIXTRT_API_KEY (as vLLM's VLLM_API_KEY) keeps the key out of `ps`; --api-key wins over it."""
    from mixtrt.cli import main

    seen = []
    monkeypatch.setattr("mixtrt.runtime.serve.runner.serve", lambda settings, **kw: seen.append(settings) or 0)
    if env is None:
        monkeypatch.delenv("MIXTRT_API_KEY", raising=False)
    else:
        monkeypatch.setenv("MIXTRT_API_KEY", env)
    assert main(["serve", str(serve_artifact[1]), *(["--api-key", flag] if flag else [])]) == 0
    assert seen[0].api_key == want


@pytest.mark.parametrize("proxy", [True, False])
def test_a_cancelled_handler_of_a_request_answered_whole(generator, serve_artifact, caplog, proxy):
    """Behind Ray Serve's proxy, a cancelled handler of a request answered whole is its client gone (the proxy
    cancels it; uvicorn says http.disconnect instead): its rows leave, logged and counted as a disconnect, nothing
    sent. Without the proxy only uvicorn stopping cancels a handler (a second Ctrl-C, its graceful timeout): a
    shutdown, answered 503."""
    caplog.set_level("INFO", logger="mixtrt.serve")
    s = Server(slow(generator, 0.05), serve_artifact[1], max_batch=2, app_options={"behind_proxy": proxy})
    sent: list[dict] = []
    try:
        aborted = {r: s.metric("mixtrt:request_aborted_total", reason=r) for r in ("disconnect", "shutdown")}
        body = json.dumps({"prompt": "a", "max_tokens": 100, "ignore_eos": True}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", s.port)}

        async def call() -> None:
            given = []

            async def receive() -> dict:
                if not given:
                    given.append(True)
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()  # the client never says it left: the handler is cancelled
                raise AssertionError("unreachable")

            async def send(message: dict) -> None:
                sent.append(message)

            task = asyncio.create_task(s.app(scope, receive, send))
            deadline = time.monotonic() + TIMEOUT
            while await asyncio.to_thread(s.metric, "mixtrt:num_requests_running") < 1:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.02)
            task.cancel()
            if proxy:
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await task  # answered (the cancel is the server's own)
            # the log line is written on this loop once the engine has taken the rows out: it runs on meanwhile
            deadline = time.monotonic() + TIMEOUT
            while await asyncio.to_thread(s.metric, "mixtrt:num_rows_running") or not [
                    r for r in caplog.records if '"event": "request"' in r.getMessage()]:
                assert time.monotonic() < deadline, "the rows did not leave or no log line"
                await asyncio.sleep(0.02)

        asyncio.run(call())
        after = {r: s.metric("mixtrt:request_aborted_total", reason=r) for r in ("disconnect", "shutdown")}
    finally:
        s.close()
    [line] = [json.loads(r.getMessage()) for r in caplog.records if '"event": "request"' in r.getMessage()]
    counted = (after["disconnect"] - aborted["disconnect"], after["shutdown"] - aborted["shutdown"])
    if proxy:
        assert (line["end"], line["status"], counted, sent) == ("disconnect", None, (1, 0), []), line
    else:
        assert (line["end"], line["status"], counted) == ("shutdown", 503, (0, 1)), line
        assert sent and sent[0]["status"] == 503


def test_a_backend_failure_fails_every_request_in_flight_and_counts_each(generator, serve_artifact):
    """A step that raises (not a row's own failure): every request in flight fails (a plain request 500, a stream an
    error event and [DONE]), each counted in request_aborted_total{reason="error"}, the failed engine's rows are not
    touched again, and a fresh engine serves the next request."""
    from tests.serve.conftest import SlowBackend

    class FailsOnce(SlowBackend):
        armed = False

        @staticmethod
        def _fail():
            if FailsOnce.armed:
                FailsOnce.armed = False
                raise RuntimeError("device lost")

        def step(self, *args, **kwargs):
            self._fail()
            return super().step(*args, **kwargs)

        def step_mixed(self, *args, **kwargs):
            self._fail()
            return super().step_mixed(*args, **kwargs)

    from mixtrt.runtime.generation import Generator

    gen = Generator(FailsOnce(generator.backend, 0.05), generator.tokenizer, generator.defaults)
    s = Server(gen, serve_artifact[1], max_batch=3, max_queue=8)
    try:
        results: list = []

        def plain(i):
            results.append(s.http.post("/v1/completions", json={"prompt": f"a b {i}", "max_tokens": 40,
                                                                "ignore_eos": True}).status_code)

        def streamed():
            with s.http.stream("POST", "/v1/completions", json={"prompt": "c d", "max_tokens": 40, "stream": True,
                                                                 "ignore_eos": True}) as r:
                results.append("".join(r.iter_text()))

        threads = [threading.Thread(target=plain, args=(i,)) for i in range(2)] + [threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while s.metric("mixtrt:num_requests_running") < 3:  # all three decoding
            assert time.monotonic() < deadline
            time.sleep(0.01)
        FailsOnce.armed = True
        for t in threads:
            t.join(TIMEOUT)
        codes = sorted(r for r in results if isinstance(r, int))
        [stream] = [r for r in results if isinstance(r, str)]
        assert codes == [500, 500] and "the engine failed" in stream and stream.rstrip().endswith("data: [DONE]")
        assert s.metric("mixtrt:request_aborted_total", reason="error") == 3
        r = s.http.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        s.close()
