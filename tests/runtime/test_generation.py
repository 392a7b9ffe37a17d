"""The generation loop on a fake numpy backend and tokenizer (parity with transformers runs on real exports).

ToyBackend is a deterministic toy LM whose logits depend on the last 3 tokens, read back from a real
HostKVCache (ring slots when windowed, slot = position otherwise), and on the position: a chunking, row
mapping (move_rows) or position bug changes the tokens. It also enforces the Backend rules (S > 1 only
with b == 1, S <= capacity, no feeding past the cache or max positions) and counts the tokens it ran.
"""


import numpy as np
import pytest

from mixtrt.runtime.backends.base import Backend
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import GenerationConfig, Generator, StreamEvent
from mixtrt.runtime.sampling import log_softmax
from tests.runtime.fakes import A9, C3, UTF8_CHAIN, A, B, ToyBackend, ToyTokenizer, V


def make(**kw) -> tuple[Generator, ToyBackend]:
    backend = ToyBackend(**kw)
    return Generator(backend, ToyTokenizer()), backend


PROMPTS = [[1, 5, 9, 12], [1, 20, 7, 7, 30, 11, 8, 4, 17, 40, 3, 19, 22], [1, 37]]  # 4, 13 (> capacity), 2 tokens


def reference_greedy(backend: ToyBackend, prompt: list[int], n: int) -> list[int]:
    """Greedy by hand: the prompt one token at a time, then token by token."""
    cache, ids = backend.new_cache(1), list(prompt)
    for t in prompt[:-1]:
        backend.step(cache, np.array([[t]]))
    for _ in range(n):
        ids.append(int(np.argmax(backend.step(cache, np.array([ids[-1:]]))[0, -1])))
    return ids[len(prompt):]


# ---- tests ---------------------------------------------------------------------------------------------
def test_toy_backend_is_a_backend():
    assert isinstance(ToyBackend(), Backend)


@pytest.mark.parametrize("windowed", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_batched_greedy_equals_one_by_one_and_by_hand(windowed, chunk):
    gen, backend = make(windowed=windowed, capacity=6 if windowed else 64)
    config = GenerationConfig(max_new_tokens=20, eos_token_id=(), prefill_chunk=chunk)
    batched = gen.generate(PROMPTS, config)
    for prompt, out in zip(PROMPTS, batched, strict=True):
        [alone] = gen.generate(prompt, config)
        by_hand = reference_greedy(ToyBackend(windowed=windowed, capacity=backend.capacity), prompt, 20)
        assert out.token_ids == alone.token_ids == by_hand
        assert out.text == alone.text == ToyTokenizer().decode(out.token_ids)
        assert (out.finish_reason, out.finish_message) == ("length", "max_new_tokens=20 reached")


def test_finished_rows_cost_no_work_and_results_match():
    gen, backend = make()
    base = gen.generate(PROMPTS, max_new_tokens=12, eos_token_id=())
    eos = base[1].token_ids[2]  # row 1 ends early at the first occurrence of this token
    backend.calls.clear()
    outs = gen.generate(PROMPTS, max_new_tokens=12, eos_token_id=eos)
    calls, tokens_run = list(backend.calls), backend.tokens_run
    for prompt, out, full in zip(PROMPTS, outs, base, strict=True):
        cut = full.token_ids.index(eos) + 1 if eos in full.token_ids else 12
        assert out.token_ids == full.token_ids[:cut]
        assert out.finish_reason == ("eos" if eos in full.token_ids else "length")
        assert out.token_ids == gen.generate(prompt, max_new_tokens=12, eos_token_id=eos)[0].token_ids
    # every token is run once: the prompts, then each generated token except the last of each row
    assert tokens_run == sum(map(len, PROMPTS)) + sum(len(o.token_ids) - 1 for o in outs)
    decode_batches = [b for b, s, _ in calls if b > 1]
    assert decode_batches == sorted(decode_batches, reverse=True) and min(decode_batches) < len(PROMPTS)


def test_eos_ends_row_and_is_not_in_text():
    gen, _ = make()
    [full] = gen.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=())
    eos = full.token_ids[3]
    [out] = gen.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=[eos, 0])
    n = full.token_ids.index(eos) + 1
    assert out.token_ids == full.token_ids[:n] and out.finish_reason == "eos"
    assert out.text == ToyTokenizer().decode(full.token_ids[: n - 1]) and str(eos) in out.finish_message


def test_model_eos_is_the_default():
    gen, backend = make()
    out = gen.generate(PROMPTS, max_new_tokens=40)
    for o in out:
        assert (o.finish_reason == "eos") == (2 in o.token_ids)
        if o.finish_reason == "eos":
            assert o.token_ids[-1] == 2 and o.token_ids.count(2) == 1


def test_artifact_eos_list_and_sampling_defaults():
    """A Generator's defaults (generation_config.json): its eos list stops rows, for a config given whole too;
    its sampling values apply when no config is given; options override them."""
    from mixtrt.runtime.chat_format import GenerationDefaults

    gen, backend = make()
    [full] = gen.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=())
    eos = full.token_ids[3]
    gen = Generator(backend, ToyTokenizer(), GenerationDefaults(eos_token_ids=(eos, 0), top_p=0.5))
    for out in (gen.generate(PROMPTS[0], max_new_tokens=10)[0],
                gen.generate(PROMPTS[0], GenerationConfig(max_new_tokens=10))[0]):
        assert out.finish_reason == "eos" and out.token_ids == full.token_ids[:full.token_ids.index(eos) + 1]
    assert (gen.config().top_p, gen.config(top_p=0.9).top_p, gen.config(GenerationConfig()).top_p) == (0.5, 0.9, 1.0)
    assert gen.config(GenerationConfig(eos_token_id=())).eos_token_id == ()  # never stop on eos, as asked


def test_stop_string_cuts_text_and_ends_row():
    gen, _ = make()
    [full] = gen.generate(PROMPTS[1], max_new_tokens=15, eos_token_id=())
    stop = full.text[5:8]
    at = full.text.index(stop)
    [out] = gen.generate(PROMPTS[1], max_new_tokens=15, eos_token_id=(), stop_strings=("zzzz", stop))
    assert out.text == full.text[:at] and out.finish_reason == "stop" and repr(stop) in out.finish_message
    assert full.token_ids[: len(out.token_ids)] == out.token_ids
    assert len(ToyTokenizer().decode(out.token_ids)) >= at + len(stop)  # the row ended on the token completing it
    assert len(ToyTokenizer().decode(out.token_ids[:-1])) < at + len(stop)


def test_linear_cache_fills_with_message():
    gen, backend = make(windowed=False, capacity=10)
    outs = gen.generate(PROMPTS[:1] + PROMPTS[2:], max_new_tokens=50, eos_token_id=())
    for prompt, out in zip(PROMPTS[:1] + PROMPTS[2:], outs, strict=True):
        assert len(prompt) + len(out.token_ids) == 10 and out.finish_reason == "length"
        assert out.finish_message == ("cache full: the model has no sliding window, and its cache holds 10 tokens "
                                      "(the artifact's max context, set at export (--max-context); the model has "
                                      "512 positions)")
    gen, _ = make(windowed=False, capacity=10, max_positions=10)  # the cache the model's own positions give
    [out] = gen.generate(PROMPTS[0], max_new_tokens=50, eos_token_id=())
    assert out.finish_message == ("cache full: the model has no sliding window, and its cache holds 10 tokens (the "
                                  "model's max_position_embeddings)")


def test_limit_messages_name_the_real_cause():
    """A windowed model gets a linear cache when its window is not shorter than the max context: the message says
    so rather than "no sliding window"; an artifact exported for fewer positions than the model has says that."""
    import dataclasses

    gen, backend = make(windowed=False, capacity=10)
    backend.args = dataclasses.replace(backend.args, sliding_window=4096)
    [out] = gen.generate(PROMPTS[0], max_new_tokens=50, eos_token_id=())
    assert out.finish_message == ("cache full: the model's sliding window (4096) is not shorter than the cache, so "
                                  "the cache does not roll, and its cache holds 10 tokens (the artifact's max "
                                  "context, set at export (--max-context); the model has 512 positions)")
    gen, backend = make(windowed=True, capacity=6, max_positions=15)
    backend.args = dataclasses.replace(backend.args, max_position_embeddings=32768)
    [out] = gen.generate(PROMPTS[0], max_new_tokens=50, eos_token_id=())
    assert out.finish_message == ("max positions: the artifact serves 15 positions (max context chosen at export; the "
                                  "model has 32768)")


def test_max_positions_ends_windowed_rows():
    gen, _ = make(windowed=True, capacity=6, max_positions=15)
    [out] = gen.generate(PROMPTS[0], max_new_tokens=50, eos_token_id=())
    assert len(out.token_ids) == 11 and out.finish_reason == "length" and "15 positions" in out.finish_message


def test_generation_runs_far_past_the_window_with_fixed_cache():
    gen, backend = make(windowed=True, capacity=6)
    [out] = gen.generate(PROMPTS[0], max_new_tokens=8 * 6, eos_token_id=())
    assert len(out.token_ids) == 48 and out.token_ids == reference_greedy(ToyBackend(), PROMPTS[0], 48)


def test_a_long_generation_keeps_its_text_in_few_strings():
    """The text of a long generation is kept joined (not one string per token: memory grows by the text, not by
    ~60 bytes a token), and equals the decode of its tokens, streamed or whole."""
    from mixtrt.runtime import generation

    gen, _ = make(windowed=True, capacity=6, max_positions=4000)
    cfg = GenerationConfig(max_new_tokens=3 * generation._JOIN_PIECES + 7, eos_token_id=(), do_sample=True, seed=1)
    [out] = gen.generate(PROMPTS[0], cfg)
    assert out.text == ToyTokenizer().decode(out.token_ids)
    assert "".join(e.text for e in gen.stream(PROMPTS[0], cfg)) == out.text
    engine, [row] = gen._engine(PROMPTS[0], cfg, False)
    while engine.busy:
        engine.step()
    assert len(row.pieces) < generation._JOIN_PIECES and "".join(row.pieces) == out.text


def test_prompt_too_long_is_refused_before_any_work():
    gen, backend = make(windowed=False, capacity=10)
    with pytest.raises(ConfigError, match="prompt 1 has 13 tokens, more than the 10 a row holds: .*cache full"):
        gen.generate(PROMPTS, eos_token_id=())
    assert backend.calls == []
    # a prompt filling the row leaves no room; one past it is more than the row holds (not "no room")
    with pytest.raises(ConfigError, match="prompt 0 has 10 tokens, which leaves no room for a new token"):
        gen.generate([PROMPTS[1][:10]], eos_token_id=())


@pytest.mark.parametrize("options, name", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": 0.0, "do_sample": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": -2**63 - 1}, "seed"), ({"prefill_chunk": 0}, "prefill_chunk"), ({"prefill_chunk": 7}, "prefill_chunk"),
    ({"eos_token_id": V}, "eos_token_id"), ({"stop_strings": ("",)}, "stop_strings"), ({"colour": 1}, "colour"),
    ({"top_logprobs": 3}, "top_logprobs=3 needs return_logprobs=True"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be a finite number"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"), ({"logit_bias": {1: 101}}, r"logit_bias\[1\]"),
    ({"logit_bias": {V: 1}}, f"logit_bias token ids \\[{V}\\] outside the vocabulary"),
    ({"suppress_tokens": [1, -2]}, r"suppress_tokens must be token ids \(integers >= 0\), got \[1, -2\]"),
    ({"suppress_tokens": 5}, "suppress_tokens must be token ids"),
    ({"suppress_tokens": [V]}, f"suppress_tokens \\[{V}\\] outside the vocabulary"),
    ({"suppress_tokens": list(range(V))}, f"suppress_tokens holds every one of the {V} token ids"),
    # a client's 100,000 keys: the first few and a count, not a message the size of the request
    ({"logit_bias": {V + i: 1 for i in range(100_000)}},
     f"^logit_bias token ids \\[{V}, {V + 1}, .*, {V + 7}\\] \\(and 99992 more\\) outside the vocabulary "
     f"\\[0, {V}\\)$"),
])
def test_invalid_options_raise_before_work(options, name):
    gen, backend = make()
    with pytest.raises(ConfigError, match=name):
        gen.generate(PROMPTS, **options)
    assert backend.calls == []


@pytest.mark.parametrize("prompts, match", [
    ("", "prompt 0 is empty"), ([], "empty"), ([[1, 2], []], "prompt 1 is empty"), ([1, V], "outside the vocab"),
    ([[1, -1]], "outside the vocab"), ([[1.5, 2]], "integers"), ([1, 2.5], "item 1 is a float"),
    (["a", [1, 2]], "mixes text and token-id lists"), ([[1, 2], "a"], "mixes text and token-id lists"),
])
def test_invalid_prompts_raise_before_work(prompts, match):
    gen, backend = make()
    with pytest.raises(ConfigError, match=match):
        gen.generate(prompts)
    with pytest.raises(ConfigError, match=match):
        gen.stream(prompts)  # raised at the call, not on first iteration
    assert backend.calls == []


def test_prompt_forms():
    gen, _ = make()
    config = GenerationConfig(max_new_tokens=4, eos_token_id=())
    text = "the cat"
    ids = ToyTokenizer().encode(text)
    expected = gen.generate([ids], config)[0].token_ids
    assert gen.generate(text, config)[0].token_ids == expected
    assert gen.generate([text, text], config)[1].token_ids == expected
    assert gen.generate(ids, config)[0].token_ids == expected
    assert gen.generate(np.array([ids]), config)[0].token_ids == expected
    # array-likes of ids as the lists they hold (torch tensors, one or a batch, as transformers users pass them)
    torch = pytest.importorskip("torch", reason="torch tensors as prompts need torch (the test extras have it)")
    assert gen.generate(torch.tensor(ids), config)[0].token_ids == expected
    assert gen.generate(torch.tensor([ids, ids]), config)[1].token_ids == expected
    assert gen.generate([torch.tensor(ids), np.array(ids)], config)[1].token_ids == expected


def test_stream_concatenates_to_text_with_split_utf8_characters():
    gen, _ = make(chain=UTF8_CHAIN)
    events = list(gen.stream([1, 20, A], max_new_tokens=14, eos_token_id=()))
    *tokens, last = events
    out = last.output
    assert all(isinstance(e, StreamEvent) for e in events) and last.token_id is None and last.text == ""
    assert [e.token_id for e in tokens] == out.token_ids and out.token_ids[:3] == [C3, A9, B]
    assert [e.text for e in tokens[:4]] == ["", "é", "b", ""]
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == out.text == ToyTokenizer().decode(out.token_ids) == "éb€a" * 2


def test_stream_holds_back_possible_stop_strings():
    gen, _ = make(chain=UTF8_CHAIN)
    # the text runs "ébۋéb€..."; "b€aX" never completes, so its prefixes are held back and then released
    events = list(gen.stream([1, 20, A], max_new_tokens=20, eos_token_id=(), stop_strings=("b€aX", "€aé")))
    out = events[-1].output
    assert out.text == "éb" and out.finish_reason == "stop" and "'€aé'" in out.finish_message
    assert "".join(e.text for e in events) == out.text
    # tokens: é(2) b €(3) a é(2); "b" waits from its own token until "€aé" resolves it
    assert [e.text for e in events[:-1]] == ["", "é", "", "", "", "", "", "", "b"]


def test_stream_and_generate_agree():
    gen, _ = make()
    for config in (GenerationConfig(max_new_tokens=9, eos_token_id=()),
                   GenerationConfig(max_new_tokens=30, do_sample=True, seed=3, top_p=0.9, stop_strings=("a",))):
        [out] = gen.generate(PROMPTS[1], config)
        events = list(gen.stream(PROMPTS[1], config))
        assert events[-1].output.token_ids == out.token_ids and events[-1].output.text == out.text
        assert "".join(e.text for e in events) == out.text


def test_sampling_seeded_reproducible_and_rows_independent():
    gen, _ = make()
    config = GenerationConfig(max_new_tokens=15, do_sample=True, temperature=1.5, seed=11, eos_token_id=())
    a = gen.generate(PROMPTS, config)
    assert [o.token_ids for o in a] == [o.token_ids for o in gen.generate(PROMPTS, config)]
    assert [o.token_ids for o in a] != [o.token_ids for o in gen.generate(PROMPTS, config, seed=12)]
    # a row's draws depend on (seed, row) only: other prompts, other finishing times change nothing
    other = gen.generate([PROMPTS[2], PROMPTS[1], [1, 3]], config)
    assert other[1].token_ids == a[1].token_ids
    assert gen.generate(PROMPTS[0], config)[0].token_ids == a[0].token_ids


def test_top_k_1_sampling_equals_greedy_generation():
    gen, _ = make()
    greedy = gen.generate(PROMPTS, max_new_tokens=10, eos_token_id=())
    sampled = gen.generate(PROMPTS, max_new_tokens=10, eos_token_id=(), do_sample=True, top_k=1, temperature=3.0)
    assert [o.token_ids for o in greedy] == [o.token_ids for o in sampled]


def test_repetition_penalty_changes_greedy_and_stays_batch_invariant():
    gen, _ = make()
    config = GenerationConfig(max_new_tokens=20, eos_token_id=(), repetition_penalty=3.0)
    plain = gen.generate(PROMPTS, max_new_tokens=20, eos_token_id=())
    penal = gen.generate(PROMPTS, config)
    assert [o.token_ids for o in plain] != [o.token_ids for o in penal]
    for prompt, out in zip(PROMPTS, penal, strict=True):
        assert gen.generate(prompt, config)[0].token_ids == out.token_ids


def test_logprobs_are_of_the_raw_logits():
    gen, backend = make()
    [out] = gen.generate(PROMPTS[1], max_new_tokens=6, eos_token_id=(), return_logprobs=True,
                         repetition_penalty=2.0, do_sample=True, temperature=0.5, seed=0)
    ids = PROMPTS[1] + out.token_ids
    cache = backend.new_cache(1)
    raw = np.concatenate([backend.step(cache, np.array([[t]]))[0] for t in ids[:-1]])  # [T-1, V]
    expected = log_softmax(raw)[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(out.logprobs, expected[len(PROMPTS[1]) - 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.prompt_logprobs, expected[: len(PROMPTS[1]) - 1], rtol=1e-5, atol=1e-5)
    [plain] = gen.generate(PROMPTS[1], max_new_tokens=6)
    assert plain.logprobs is None and plain.prompt_logprobs is None


@pytest.mark.parametrize("windowed", [True, False])
def test_teacher_forced_logprobs_and_perplexity(windowed):
    gen, backend = make(windowed=windowed, capacity=6 if windowed else 40)
    ids = PROMPTS[1] + PROMPTS[0] + PROMPTS[1]
    cache = backend.new_cache(1)
    raw = np.concatenate([backend.step(cache, np.array([[t]]))[0] for t in ids[:-1]])
    expected = log_softmax(raw)[np.arange(len(ids) - 1), ids[1:]]
    for chunk in (None, 1, 5):
        got = gen.teacher_forced_logprobs(ids, prefill_chunk=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gen.perplexity(ids), np.exp(-expected.mean()), rtol=1e-5)
    halves = np.concatenate([gen.teacher_forced_logprobs(ids[:15]), gen.teacher_forced_logprobs(ids[15:])])
    np.testing.assert_allclose(gen.perplexity(ids, window=15), np.exp(-halves.mean()), rtol=1e-5)


def test_scoring_refuses_text_and_a_window_that_is_not_an_integer():
    gen, _ = make()
    for call in (gen.perplexity, gen.teacher_forced_logprobs):
        with pytest.raises(ConfigError, match="token_ids must be token ids .* got str: encode the text first"):
            call("some text")  # type: ignore[arg-type]  # was read as one id per character
    for bad in (2.5, "8", True, 1):
        with pytest.raises(ConfigError, match=f"window must be an integer >= 2, got {bad!r}"):
            gen.perplexity(PROMPTS[1], window=bad)  # type: ignore[arg-type]
    assert gen.perplexity(PROMPTS[1], window=np.int64(4)) > 0
    # a scoring call's ids are named as what they are, not as a prompt; arrays are read as their lists
    assert gen.perplexity(np.array(PROMPTS[1])) == gen.perplexity(PROMPTS[1])
    with pytest.raises(ConfigError, match=r"^token_ids: token ids must be integers; item 1 is a float \(2.5\)$"):
        gen.teacher_forced_logprobs([1, 2.5])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="token_ids must be token ids .* got int"):
        gen.perplexity(7)  # type: ignore[arg-type]


def test_prefill_asks_for_all_logits_only_when_prompt_logprobs_are_needed():
    gen, backend = make()
    gen.generate(PROMPTS[1], GenerationConfig(max_new_tokens=3, eos_token_id=(), prefill_chunk=5))
    prefill = [last for (b, s, _), last in zip(backend.calls, backend.last_only, strict=True) if s > 1]
    assert len(prefill) == 3 and all(prefill)  # 13 tokens in chunks of 5: the lm_head runs on one row each
    backend.calls.clear()
    backend.last_only.clear()
    gen.teacher_forced_logprobs(PROMPTS[1], prefill_chunk=5)
    assert backend.last_only and not any(backend.last_only)


def test_chat_uses_the_template():
    gen, _ = make()
    messages = [{"role": "user", "content": "hi"}]
    ids = ToyTokenizer().apply_chat_template(messages)
    out = gen.chat(messages, max_new_tokens=5, eos_token_id=())
    assert out.token_ids == gen.generate(ids, max_new_tokens=5, eos_token_id=())[0].token_ids
    assert out.stats.prompt_tokens == len(ids)
    events = list(gen.stream_chat(messages, max_new_tokens=5, eos_token_id=()))
    assert events[-1].output.token_ids == out.token_ids
    with pytest.raises(ConfigError, match="message"):
        gen.chat([])


def test_stats():
    gen, _ = make()
    outs = gen.generate(PROMPTS, max_new_tokens=7, eos_token_id=())
    for prompt, out in zip(PROMPTS, outs, strict=True):
        s = out.stats
        assert (s.prompt_tokens, s.generated_tokens) == (len(prompt), 7)
        assert s.time_to_first_token_s > 0 and s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    [one] = gen.generate(PROMPTS[0], max_new_tokens=1)
    assert one.stats.decode_tokens_per_s is None and one.finish_message == "max_new_tokens=1 reached"


def test_config_normalizes_and_load_refuses_unknown_backend():
    config = GenerationConfig(stop_strings="\n\n", eos_token_id=[2, 5])
    assert config.stop_strings == ("\n\n",) and config.eos_token_id == (2, 5)
    with pytest.raises(ConfigError, match="backend"):
        Generator.load("nowhere", backend="vulkan")


def test_top_logprobs_are_kept_in_8_bytes_a_token_per_k():
    """A row's top-k logprobs grow by doubling in two arrays (a list of numpy pairs held ~1 KiB a token for as long
    as the row lived); a pair read during a growth is the one written."""
    import tracemalloc

    from mixtrt.runtime.generation import TopLogprobs

    top = TopLogprobs()
    assert not top and len(top) == 0
    with pytest.raises(IndexError):
        top[0]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    n, k = 10_000, 5
    for t in range(n):
        top.append(np.arange(t, t + k), np.full(k, -t, np.float32))
        ids, values = top[t // 2]
        assert ids[0] == t // 2 and values[0] == -(t // 2)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert held <= 2 * n * k * 8 + 4096, held  # doubling: at most twice the rows written
    ids, values = top.arrays()
    assert ids.shape == values.shape == (n, k) and ids.dtype == np.int64 and values.dtype == np.float32
    assert (ids[:, 0] == np.arange(n)).all() and (values[:, 0] == -np.arange(n)).all()
