"""The server through the official openai client on loopback: outputs equal the Generator's on the same
artifact, streaming, n > 1 and seeds, stop strings, logprobs (prompt ones too), 16 concurrent streams."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import openai
import pytest

import mixtrt
from tests.serve.conftest import Server, continuation

PROMPTS = ["The capital of France is", "Once upon a time", "a", "Hello, my name is Anna and I live in a city by"]


def greedy(generator, prompt, n):
    [out] = generator.generate([prompt], max_new_tokens=n, do_sample=False, return_logprobs=True)
    return out


def test_completions_greedy_equal_the_generator(server, generator):
    for prompt in PROMPTS:
        want = greedy(generator, prompt, 8)
        r = server.openai.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        [choice] = r.choices
        assert choice.text == continuation(generator, prompt, want)
        # a completion continues its prompt: the prompt's text and the completion's are the whole text
        whole = generator.tokenizer.decode(generator.tokenizer.encode(prompt) + want.token_ids)
        assert prompt + choice.text == whole
        assert choice.finish_reason == ("length" if want.finish_reason == "length" else "stop")
        ids = generator.tokenizer.encode(prompt)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.token_ids))
    # token ids and a batch of prompts: one choice per prompt, in order
    ids = [generator.tokenizer.encode(p) for p in PROMPTS[:2]]
    r = server.openai.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [continuation(generator, p, greedy(generator, p, 5)) for p in PROMPTS[:2]]
    assert [c.index for c in r.choices] == [0, 1]


def test_streams_equal_the_full_answers(server, generator):
    want = greedy(generator, PROMPTS[0], 12)
    chunks = list(server.openai.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == continuation(generator, PROMPTS[0], want)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the wire ends with data: [DONE]
    with server.http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_equals_generator_chat(server, generator):
    messages = [{"role": "user", "content": "Tell me about Paris."}]
    want = generator.chat(messages, max_new_tokens=10, do_sample=False)
    r = server.openai.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    stream = server.openai.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                   stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.openai.models.list().data[0].id == "tiny"


def test_n_choices_and_seeds(server, generator):
    """A seeded choice depends on its seed and choice index only: choice 0 of n=3 is the n=1 answer, and the
    Generator's sample 0; a repeat gives the same choices; different indices differ."""
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, seed=7)
    prefilled = server.metric("mixtrt:prompt_tokens_total")
    three = server.openai.completions.create(n=3, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    # the prompt is prefilled once: choices 1 and 2 start from a copy of choice 0's cache row
    assert server.metric("mixtrt:prompt_tokens_total") - prefilled == three.usage.prompt_tokens
    again = server.openai.completions.create(n=3, **kw)
    one = server.openai.completions.create(n=1, **kw)
    texts = [c.text for c in three.choices]
    assert texts == [c.text for c in again.choices]
    assert one.choices[0].text == texts[0]
    solos = generator.generate([PROMPTS[1]] * 3, max_new_tokens=10, do_sample=True, temperature=1.0, seed=7)
    assert [continuation(generator, PROMPTS[1], solo) for solo in solos] == texts  # prompt i: sample index i
    assert len(set(texts)) > 1
    assert three.usage.completion_tokens == 30
    # streamed n=2: each choice's chunks concatenate to its answer
    chunks = list(server.openai.completions.create(n=2, stream=True, **kw))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)]
    assert streamed == texts[:2]


def test_stop_strings_cut_and_never_leak(server, generator):
    text = continuation(generator, PROMPTS[0], greedy(generator, PROMPTS[0], 16))
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    want = text[: text.index(stop)]
    r = server.openai.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(server.openai.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                                   stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_and_echo_prompt_logprobs(server, generator):
    want = greedy(generator, PROMPTS[0], 6)
    r = server.openai.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, want.logprobs, atol=1e-5)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # greedy: the chosen token is the most likely one, and the 3 alternatives are sorted below it
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(value) and max(top.values()) == pytest.approx(value)
    # echo + logprobs + 1 token: what lm-evaluation-harness's local-completions sends to score a text
    ids = generator.tokenizer.encode(PROMPTS[3])
    r = server.openai.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                         echo=True)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], generator.teacher_forced_logprobs(ids), atol=1e-4)
    assert r.choices[0].text.startswith(generator.tokenizer.decode(ids))
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert max(top.values()) >= value - 1e-6
    # text_offset indexes the returned text: each visible token's text starts there (BOS adds nothing; the first
    # word's dummy-prefix space is not in the text, nor in its token, as vLLM shows it), offsets never go back, and
    # the generated token follows the prompt's text with its own leading space
    text, offsets = r.choices[0].text, lp.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] == len(generator.tokenizer.decode(ids))
    assert lp.tokens[0] == "<s>" and not lp.tokens[1].startswith(" ") and text.startswith(lp.tokens[1])
    for token, at in zip(lp.tokens[1:], offsets[1:], strict=True):
        if not token.startswith("bytes:"):
            assert text[at:].startswith(token), (token, at, text)
    # ids without BOS: the first token is the first word, its space cut the same way
    r = server.openai.completions.create(model="tiny", prompt=ids[1:], max_tokens=0, logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text == generator.tokenizer.decode(ids[1:]) and "".join(c.logprobs.tokens) == c.text
    assert c.logprobs.tokens[1:] == lp.tokens[2:len(ids)]
    # a text that starts with a space or a newline: the dummy prefix is a token of its own ("▁" before "▁Paris"),
    # which the text does not show: "" like the first word's space, so the tokens still join to the text
    for lead in (" ", "\n", "  "):
        r = server.openai.completions.create(model="tiny", prompt=lead + PROMPTS[3], max_tokens=0, logprobs=1,
                                             echo=True)
        c = r.choices[0]
        assert c.text == lead + PROMPTS[3] and "".join(c.logprobs.tokens[1:]) == c.text, c.logprobs.tokens
        for token, at in zip(c.logprobs.tokens[1:], c.logprobs.text_offset[1:], strict=True):
            assert c.text[at:].startswith(token), (token, at, c.text)
    # echo with max_tokens 0 (OpenAI's legacy scoring request, vLLM's echo without generation): the same prompt
    # logprobs, the prompt's text alone, nothing generated; whole and streamed, each of n choices
    scored = lp
    for stream in (False, True):
        r = server.openai.completions.create(model="tiny", prompt=ids, max_tokens=0, temperature=0, logprobs=1,
                                             echo=True, n=2, stream=stream,
                                             **({"stream_options": {"include_usage": True}} if stream else {}))
        chunks = list(r) if stream else [r]
        choices = sorted((c for chunk in chunks for c in chunk.choices), key=lambda c: c.index)
        usage = chunks[-1].usage
        assert [c.index for c in choices] == [0, 1] and usage.completion_tokens == 0
        assert usage.prompt_tokens == len(ids)  # a prompt counts once, whatever n
        for c in choices:
            assert c.text == generator.tokenizer.decode(ids) and c.finish_reason == "length"
            assert c.logprobs.tokens == scored.tokens[:len(ids)]
            assert c.logprobs.token_logprobs == pytest.approx(scored.token_logprobs[:len(ids)], abs=1e-6)
    # a scoring request needs no new token: a prompt filling every position (128 here) is scored; one token more,
    # or the same prompt with a token to generate, is refused naming the limit
    full = (ids * 128)[:128]
    r = server.openai.completions.create(model="tiny", prompt=full, max_tokens=0, logprobs=0, echo=True)
    assert len(r.choices[0].logprobs.token_logprobs) == 128 and r.usage.completion_tokens == 0
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[1:], generator.teacher_forced_logprobs(full),
                               atol=1e-4)
    for prompt, max_tokens, words in ((full + [5], 0, "129 tokens, more than the 128 the model holds"),
                                      (full, 1, "128 tokens, which leaves no room for a new token")):
        with pytest.raises(openai.BadRequestError, match=words):
            server.openai.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, echo=True)
    # a prompt whose text is empty (BOS alone) is still echoed token by token before what is generated, whole and
    # streamed, as with max_tokens 0
    bos = ids[:1]
    for stream in (False, True):
        r = server.openai.completions.create(model="tiny", prompt=bos, max_tokens=2, temperature=0, logprobs=0,
                                             echo=True, stream=stream)
        chunks = list(r) if stream else [r]
        tokens = [t for chunk in chunks for c in chunk.choices for t in c.logprobs.tokens]
        values = [v for chunk in chunks for c in chunk.choices for v in c.logprobs.token_logprobs]
        text = "".join(c.text for chunk in chunks for c in chunk.choices)
        assert tokens[0] == "<s>" and values[0] is None and len(tokens) == 3, (stream, tokens)
        assert text == generator.tokenizer.decode(greedy(generator, bos, 2).token_ids)
    # streamed: the same offsets, counted from the start of the whole text (the echo included)
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1, echo=True)
    full = server.openai.completions.create(**kw).choices[0].logprobs.text_offset
    chunks = list(server.openai.completions.create(stream=True, **kw))
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == full
    # chat: logprobs with top_logprobs
    r = server.openai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode("utf-8", "replace").replace("\ufffd", "") in item.token or item.bytes
    # the tokens' bytes join to the message's content: a new message drops its first word's leading space, and
    # so does its first token's text (whole and streamed, several seeds)
    fronts, firsts = 0, set()
    for seed in range(8):
        kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, seed=seed,
                  logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
        r = server.openai.chat.completions.create(**kw)
        chunks = list(server.openai.chat.completions.create(stream=True, **kw))
        streamed = [item for c in chunks if c.choices and c.choices[0].logprobs
                    for item in c.choices[0].logprobs.content]
        text = r.choices[0].message.content
        for content in (r.choices[0].logprobs.content, streamed):
            assert b"".join(bytes(item.bytes) for item in content).decode("utf-8", "replace") == text
            assert [item.token for item in content] == [item.token for item in r.choices[0].logprobs.content]
            # the first position's alternatives read as they would had they been chosen, whichever token was:
            # the same prompt lists the same texts at every seed
            firsts.add(tuple(t.token for t in content[0].top_logprobs))
        # the same prompt and seed as a completion, which keeps the space: the case was met where it has one
        ids = list(generator.tokenizer.apply_chat_template(kw["messages"], add_generation_prompt=True))
        same = server.openai.completions.create(model="tiny", prompt=ids, max_tokens=6, seed=seed, logprobs=0,
                                                extra_body={"ignore_eos": True}).choices[0]
        assert same.text.lstrip(" ") == text
        fronts += same.logprobs.tokens[0].startswith(" ")
    assert 0 < fronts < 8, fronts  # both cases met: a first token with a leading space and one without
    [first] = firsts
    assert not any(t.startswith(" ") for t in first), first


def concurrent_streams(client: Any, prompts: list[list[int]], lengths: list[int]) -> list[str]:
    """Each prompt streamed greedily by its own thread through the openai `client`, all started together; the
    texts (a client's error is raised with its number)."""
    got: list[str | None] = [None] * len(prompts)
    errors: list[tuple[int, BaseException]] = []
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            start.wait(timeout=30)
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                               stream=True)
            got[i] = "".join(c.choices[0].text for c in stream)
        except BaseException as e:  # re-raised below with the client's number
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(g is not None for g in got), "a client did not finish within 60 s"
    return [g for g in got if g is not None]


def test_16_concurrent_streams_each_equal_the_request_alone(server, generator):
    """Continuous batching: 16 streaming clients with prompts of different lengths join and leave the batch
    at different steps; every output equals the same request run alone (greedy batch invariance, fp32)."""
    rng = np.random.default_rng(1)
    prompts = [[1] + rng.integers(3, 32000, size=int(n)).tolist() for n in rng.integers(1, 40, size=16)]
    lengths = [int(n) for n in rng.integers(4, 40, size=16)]
    alone = [continuation(generator, p, greedy(generator, p, n)) for p, n in zip(prompts, lengths, strict=True)]
    before = server.metric("mixtrt:generation_tokens_total")
    t0 = time.perf_counter()
    got = concurrent_streams(server.openai, prompts, lengths)
    elapsed = time.perf_counter() - t0
    assert got == alone
    tokens = server.metric("mixtrt:generation_tokens_total") - before
    assert tokens == sum(lengths)
    print(f"16 concurrent streams: {tokens:.0f} tokens in {elapsed:.2f} s = {tokens / elapsed:.0f} tok/s aggregate")


def test_a_prompt_arriving_while_rows_decode_runs_in_their_steps(generator, serve_artifact):
    """Mixed steps: requests that arrive while another streams are prefilled in chunks inside its decode steps
    (mixtrt:mixed_steps_total counts them), and every output equals the request run alone."""
    from tests.serve.conftest import slow

    rng = np.random.default_rng(3)
    prompts = [[1] + rng.integers(3, 32000, size=n).tolist() for n in (6, 30, 19)]
    lengths = [40, 12, 9]
    alone = [continuation(generator, p, greedy(generator, p, n)) for p, n in zip(prompts, lengths, strict=True)]
    s = Server(slow(generator, 0.01), serve_artifact[1], max_batch=4, max_queue=8, prefill_chunk=8)
    try:
        got: list[str] = []
        first = s.openai.completions.create(model="tiny", prompt=prompts[0], max_tokens=lengths[0], temperature=0,
                                            stream=True)
        got.append(next(iter(first)).choices[0].text)  # it decodes now
        later = concurrent_streams(s.openai, prompts[1:], lengths[1:])
        got[0] += "".join(c.choices[0].text for c in first)
        steps = s.metric("mixtrt:mixed_steps_total")
    finally:
        s.close()
    assert got + later == alone
    assert steps >= 3  # the 30- and 19-token prompts in chunks of at most 8


def test_request_log_line(server, caplog):
    with caplog.at_level("INFO", logger="mixtrt.serve"):
        server.openai.completions.create(model="tiny", prompt="a", max_tokens=3, temperature=0, stream=True)
        time.sleep(0.1)
    [record] = [json.loads(r.getMessage()) for r in caplog.records if '"event": "request"' in r.getMessage()][-1:]
    assert record["completion_tokens"] == 3 and record["finish"] == ["length"] and record["status"] == 200
    assert 0 <= record["prefill_s"] <= record["ttft_s"] <= record["first_sent_s"] <= record["e2e_s"]


def test_batch_invariance_of_logits(generator):
    """The backend contract (docs/DESIGN.md, Serving): a row's decode logits do not depend on the rows beside
    it. onnxruntime fp32 on the CPU: bit-equal (measured); asserted within the fp32 rounding bound."""
    from tests.checkpoints import close_logits

    backend = generator.backend
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, size=n).tolist() for n in (3, 9, 17, 30)]

    def run(batch):
        cache = backend.new_cache(len(batch))
        last = [backend.step(cache, np.array([p]), start_row=r)[0, -1] for r, p in enumerate(batch)]
        ids = np.array([[int(np.argmax(x))] for x in last])
        steps = []
        for _ in range(8):
            logits = backend.step(cache, ids)[:, 0]
            steps.append(logits)
            ids = np.argmax(logits, -1)[:, None]
        return np.stack(steps, 1)

    together = run(prompts)
    for i, p in enumerate(prompts):
        close_logits(together[i], run([p])[0])


def test_health_is_503_while_loading(serve_artifact, generator, monkeypatch):
    from mixtrt.runtime.generation import Generator

    release = threading.Event()

    def load(*args, **kwargs):
        assert release.wait(30)
        return generator

    monkeypatch.setattr(Generator, "load", staticmethod(load))
    s = Server(None, serve_artifact[1], wait=False)
    try:
        r = s.http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        assert s.http.get("/ping").status_code == 503 and s.http.post("/ping").status_code == 503  # vLLM's name
        assert s.http.get("/version").json() == {"version": mixtrt.__version__}  # answered while loading
        r = s.http.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        s.wait_ready()
        assert s.http.get("/health").json() == {"status": "ok"} == s.http.post("/ping").json()
        card = s.http.get("/v1/models").json()["data"][0]
        assert card["root"] == card["id"] and card["parent"] is None and card["max_model_len"] > 0
    finally:
        release.set()
        s.close()



@pytest.fixture(scope="module")
def int4_generator(serve_artifact, tmp_path_factory):
    """The serve checkpoint exported as an int4 artifact (the default Int4Options: accuracy level 4)."""
    from mixtrt.export.onnx_export import export_onnx
    from mixtrt.runtime.generation import Generator

    art = export_onnx(serve_artifact[0], tmp_path_factory.mktemp("serve-int4") / "int4", precision="int4",
                      progress=None)
    return Generator.load(art, threads=1, mixed_steps=True)


def test_int4_concurrent_streams_each_equal_the_request_alone(int4_generator):
    """The batch-invariance contract on an int4 artifact, through the server: 8 concurrent greedy streams
    (prompts of 2-40 tokens, prefilled in chunks of 5 while others decode) equal the same requests alone."""
    gen = int4_generator
    rng = np.random.default_rng(2)
    prompts = [[1] + rng.integers(3, 32000, size=int(n)).tolist() for n in rng.integers(1, 40, size=8)]
    lengths = [int(n) for n in rng.integers(4, 24, size=8)]
    alone = [continuation(gen, p, greedy(gen, p, n)) for p, n in zip(prompts, lengths, strict=True)]
    s = Server(gen, "int4", max_batch=8, max_queue=8, prefill_chunk=5)
    try:
        got = concurrent_streams(s.openai, prompts, lengths)
    finally:
        s.close()
    assert got == alone


def test_echo_without_generation_is_logged_and_counted_as_its_response_says(server, generator, caplog):
    """max_tokens 0 with echo: the one token the prefill chooses is not returned, so no stop string or stop id ends
    it: the response's finish_reason "length" is also the log line's and the metrics'."""
    ids = generator.tokenizer.encode(PROMPTS[0])
    nxt = greedy(generator, ids, 1)
    before = server.metric("mixtrt:request_success_total", finished_reason="stop")
    lengths = server.metric("mixtrt:request_success_total", finished_reason="length")
    with caplog.at_level("INFO", logger="mixtrt.serve"):
        r = server.http.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0,
                                                      "temperature": 0, "n": 2, "stop_token_ids": nxt.token_ids,
                                                      "stop": [nxt.text] if nxt.text.strip() else None})
        time.sleep(0.1)
    assert r.status_code == 200 and [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]
    [record] = [json.loads(m.getMessage()) for m in caplog.records if '"event": "request"' in m.getMessage()][-1:]
    assert record["finish"] == ["length", "length"], record
    assert server.metric("mixtrt:request_success_total", finished_reason="stop") == before
    assert server.metric("mixtrt:request_success_total", finished_reason="length") == lengths + 2


def test_a_line_break_in_a_tokens_text_does_not_split_the_event(server, generator):
    """U+0085, U+2028 and U+2029 are line breaks to str.splitlines (httpx's iter_lines splits streams with it) and
    JSON leaves them raw: escaped in the stream's data lines, so every line is one whole event."""
    tok = generator.tokenizer
    breaks = [i for i in range(tok.vocab_size) if any(c in tok.id_to_piece(i) for c in "\x85\u2028\u2029")]
    if not breaks:
        pytest.skip("this tokenizer has no piece holding U+0085, U+2028 or U+2029")
    with server.http.stream("POST", "/v1/completions", json={"prompt": [1, *breaks[:3]], "max_tokens": 2,
                                                             "echo": True, "stream": True, "temperature": 0}) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text.startswith(tok.decode([1, *breaks[:3]]))


def test_heavy_answers_are_built_off_the_event_loop_and_equal(server, generator, monkeypatch):
    """An answer past HEAVY_ITEMS tokens x alternatives (echo + logprobs of long prompts, many choices: tens of MB
    of JSON stalled every stream for seconds) is built in a thread, whole and streamed, /detokenize's too; the
    answers equal those built on the event loop."""
    import asyncio

    import mixtrt.runtime.serve.app as app_module

    ids = generator.tokenizer.encode(PROMPTS[3])
    body = {"model": "tiny", "prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 5, "echo": True, "n": 2}

    def answers() -> tuple[Any, list[Any], str]:
        whole = server.http.post("/v1/completions", json=body).json()
        with server.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        text = server.http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        for e in [whole, *events]:
            e.pop("id"), e.pop("created")
        return whole, sorted(events, key=lambda e: json.dumps(e)), text

    inline = answers()
    threaded: list[Any] = []
    real = asyncio.to_thread

    async def counted(fn: Any, *a: Any, **kw: Any) -> Any:
        threaded.append(getattr(fn, "__name__", fn))
        return await real(fn, *a, **kw)

    monkeypatch.setattr(app_module, "HEAVY_ITEMS", 0)
    monkeypatch.setattr(app_module.asyncio, "to_thread", counted)
    assert answers() == inline
    assert {"answer", "build", "decode"} <= set(threaded), threaded
