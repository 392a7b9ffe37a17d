"""The numpy sampler on fixed logits, against transformers' logits processors where they exist."""

import numpy as np
import pytest

from mixtrt.runtime.sampling import (
    Sampler,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    log_softmax,
    min_p_filter,
    softmax,
    top_k_filter,
    top_p_filter,
)

V = 40


def random_logits(rows: int = 6, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * 2).astype(np.float32)


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def test_log_softmax_normalizes_and_handles_minus_inf():
    x = random_logits()
    x[:, :5] = -np.inf
    lp = log_softmax(x)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.isneginf(lp[:, :5]))
    np.testing.assert_allclose(lp[:, 5:], np.log(softmax(x)[:, 5:]), rtol=1e-5, atol=1e-6)


def test_repetition_penalty_equals_transformers(hf):
    torch, transformers = hf
    logits = random_logits()
    ids = np.random.default_rng(1).integers(0, V, (logits.shape[0], 12))  # repeats included
    seen = np.zeros_like(logits, bool)
    np.put_along_axis(seen, ids, True, axis=-1)
    for penalty in (1.3, 0.7):
        ours = apply_repetition_penalty(logits, seen, penalty)
        theirs = transformers.RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(ids), torch.from_numpy(logits))
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 3, 17, V + 5])
def test_top_k_equals_transformers(hf, top_k):
    torch, transformers = hf
    logits = random_logits()
    theirs = transformers.TopKLogitsWarper(top_k)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(top_k_filter(logits, top_k), theirs)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_equals_transformers_and_keeps_smallest_set(hf, top_p):
    torch, transformers = hf
    logits = random_logits(20)
    ours = top_p_filter(logits, top_p)
    theirs = transformers.TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(ours, theirs)
    probs = softmax(logits)
    for row, p in zip(ours, probs, strict=True):
        kept = np.isfinite(row)
        # the kept tokens are the most likely ones, their mass reaches top_p, and dropping the least likely
        # kept token would fall below it (smallest such set)
        assert p[kept].min() >= p[~kept].max(initial=0)
        assert p[kept].sum() >= top_p - 1e-6
        assert kept.sum() == 1 or p[kept].sum() - p[kept].min() < top_p + 1e-6


def test_top_p_keeps_at_least_one_token():
    logits = np.array([10.0, 0.0, -1.0], np.float32)
    assert np.isfinite(top_p_filter(logits, 1e-6)).sum() == 1


def test_temperature_equals_transformers(hf):
    torch, transformers = hf
    logits = random_logits()
    theirs = transformers.TemperatureLogitsWarper(0.7)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(apply_temperature(logits, 0.7), theirs, rtol=1e-6)


def test_full_chain_equals_transformers(hf):
    torch, transformers = hf
    logits = random_logits()
    ids = np.random.default_rng(2).integers(0, V, (logits.shape[0], 8))
    chain = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.2), transformers.TemperatureLogitsWarper(0.8),
        transformers.TopKLogitsWarper(10), transformers.TopPLogitsWarper(0.9),
    ])
    theirs = chain(torch.from_numpy(ids), torch.from_numpy(logits)).numpy()
    for r in range(len(logits)):
        s = Sampler(V, do_sample=True, temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.2, seed=0,
                    prompt_ids=ids[r].tolist())
        np.testing.assert_allclose(s.process(logits[r]), theirs[r], rtol=1e-6)


def test_top_k_1_sampling_equals_greedy():
    for r, row in enumerate(random_logits(50)):
        s = Sampler(V, do_sample=True, top_k=1, temperature=1.5, seed=r)
        assert s(row) == int(np.argmax(row)) == Sampler(V)(row)


def test_greedy_ignores_warpers_but_not_penalty():
    logits = np.array([3.0, 2.9, 0.0, -1.0], np.float32)
    assert Sampler(4, temperature=0.1, top_k=2, top_p=0.5)(logits) == 0
    assert Sampler(4, repetition_penalty=2.0, prompt_ids=[0])(logits) == 1
    s = Sampler(4, repetition_penalty=2.0)
    assert [s(logits), s(logits)] == [0, 1]  # generated tokens count as seen too


def reference_penalties(logits, prompt, generated, repetition, presence, frequency):
    """The penalties written out token by token: transformers' repetition penalty over prompt + generated, then
    OpenAI's (logit -= count * frequency + presence) over the generated tokens only."""
    out = [float(x) for x in logits]
    for t in set(prompt) | set(generated):
        out[t] = out[t] * repetition if out[t] < 0 else out[t] / repetition
    for t in set(generated):
        out[t] -= generated.count(t) * frequency + presence
    return np.array(out, np.float32)


@pytest.mark.parametrize("presence, frequency", [(0.7, 0.3), (-0.5, 0.0), (0.0, -1.25), (2.0, 2.0)])
def test_presence_and_frequency_penalties_follow_openai(presence, frequency):
    """Counted on the sampler's own choices (not the prompt), after the repetition penalty, on a copy of the
    logits (the raw logits give the logprobs), and greedy choices follow the penalized scores."""
    rows = random_logits(12, seed=3)
    prompt = [2, 5]
    s = Sampler(V, repetition_penalty=1.3, prompt_ids=prompt, presence_penalty=presence, frequency_penalty=frequency)
    generated: list[int] = []
    for row in rows:
        raw = row.copy()
        want = reference_penalties(row, prompt, generated, 1.3, presence, frequency)
        np.testing.assert_allclose(s.process(row), want, rtol=1e-6, atol=1e-6)
        token = s(row)
        assert token == int(np.argmax(want)) and np.array_equal(row, raw)
        generated.append(token)
    plain = Sampler(V, repetition_penalty=1.3, prompt_ids=prompt)
    seen = np.isin(np.arange(V), prompt)
    np.testing.assert_array_equal(plain.process(rows[0]), apply_repetition_penalty(rows[0], seen, 1.3))


def test_logit_bias_is_added_before_the_penalties_on_a_copy(hf):
    """transformers' order (SequenceBiasLogitsProcessor before RepetitionPenaltyLogitsProcessor) and vLLM's
    (logit_bias, then the penalties): a seen token with logit 2 and bias +3 under repetition penalty 2 scores 2.5,
    not 2 / 2 + 3."""
    torch, transformers = hf
    row = random_logits(1, seed=4)[0]
    raw = row.copy()
    top = int(np.argmax(row))
    bias = {top: -100.0, 7: 3.5, 9: 0.0, 11: 1.25}
    prompt = [7, 11, 12]
    s = Sampler(V, repetition_penalty=1.7, prompt_ids=prompt, frequency_penalty=1.0, logit_bias=bias)
    processors = transformers.LogitsProcessorList([
        transformers.SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}),
        transformers.RepetitionPenaltyLogitsProcessor(1.7)])
    want = processors(torch.tensor([prompt]), torch.from_numpy(row[None].copy()))[0].numpy()
    assert want[7] == pytest.approx((row[7] + 3.5) / 1.7 if row[7] + 3.5 > 0 else (row[7] + 3.5) * 1.7, rel=1e-6)
    np.testing.assert_allclose(s.process(row), want, rtol=1e-6, atol=1e-6)
    chosen = s(row)
    assert chosen == int(np.argmax(want)) and np.array_equal(row, raw)
    if chosen not in prompt:  # the token just chosen is now seen by the repetition penalty too
        want[chosen] = (want[chosen] / 1.7) if want[chosen] > 0 else want[chosen] * 1.7
    want[chosen] -= 1.0  # and pays its frequency penalty
    np.testing.assert_allclose(s.process(row), want, rtol=1e-6, atol=1e-6)
    assert Sampler(V, logit_bias={3: 100.0})(row) == 3  # +100 makes a token all but certain, greedy too
    # transformers' suppress_tokens: never chosen, whatever the bias (-inf; the raw row is not touched)
    suppressed = Sampler(V, logit_bias={3: 100.0}, suppress=(3, V + 5))
    assert suppressed.process(row)[3] == -np.inf and suppressed(row) != 3 and np.array_equal(row, raw)
    sampled = Sampler(V, do_sample=True, seed=1, suppress=range(V - 1))
    assert {sampled(row) for _ in range(20)} == {V - 1}  # the one token left


def test_frequency_penalty_breaks_a_greedy_loop():
    logits = np.array([3.0, 2.9, 0.0, -1.0], np.float32)
    s = Sampler(4, presence_penalty=0.7, frequency_penalty=0.3)
    assert [s(logits) for _ in range(4)] == [0, 1, 0, 1]  # 3 - 1.0 < 2.9; then 2.0 > 2.9 - 1.0; 1.7 < 1.9
    assert [Sampler(4, presence_penalty=-1.0)(logits) for _ in range(2)] == [0, 0]
    assert apply_presence_frequency(logits, {}, 1.0, 1.0).tolist() == logits.tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, -2.0], np.float32)
    s = Sampler(5, do_sample=True, temperature=temperature, seed=123)
    n = 20000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=5) / n
    expected = softmax(logits / temperature)
    tolerance = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3  # 4 standard errors per token
    assert np.all(np.abs(counts - expected) <= tolerance), (counts, expected)


def test_sampling_draws_only_kept_tokens():
    logits = random_logits(1)[0]
    s = Sampler(V, do_sample=True, top_k=5, top_p=0.6, seed=7)
    allowed = set(np.flatnonzero(np.isfinite(top_p_filter(top_k_filter(logits, 5), 0.6))))
    draws = {s(logits) for _ in range(500)}
    assert draws <= allowed and len(draws) > 1 or len(allowed) == 1


def test_same_seed_reproduces_and_rows_differ():
    logits = np.zeros(V, np.float32)

    def draws(seed, row):
        s = Sampler(V, do_sample=True, seed=seed, row=row)
        return [s(logits) for _ in range(30)]

    assert draws(5, 0) == draws(5, 0)
    assert draws(5, 0) != draws(6, 0)
    assert draws(5, 0) != draws(5, 1)
    # a negative seed is its 64-bit two's-complement value (what the server does with OpenAI's seeds)
    assert draws(-5, 1) == draws(2**64 - 5, 1) != draws(5, 1)
    assert draws(-2**63, 0) == draws(2**63, 0)


def _top_p_full_sort(logits: np.ndarray, top_p: float, min_tokens_to_keep: int = 1, dtype=np.float32) -> np.ndarray:
    """The former implementation (a full stable argsort, transformers' own steps), kept as the oracle; in
    float64 it is the same rule with the float32 cumulative sum's rounding (about 1e-5 over 32k tokens) gone."""
    order = np.argsort(logits, axis=-1, kind="stable")
    ascending = np.take_along_axis(logits, order, axis=-1).astype(dtype)
    e = np.exp(ascending - ascending.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1)
    drop_sorted = cumulative <= dtype(1.0 - top_p)
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, np.float32(-np.inf), logits).astype(np.float32)


@pytest.mark.parametrize("vocab", [7, 300, 32000])
def test_top_p_partial_sort_equals_full_sort(vocab):
    """Sharp, flat, tied (integer logits, repeated maxima), -inf-masked and min_tokens_to_keep cases: the same
    tokens as the full sort computed in float64, and as the former float32 one except where that one's
    rounding decides (flat or tied rows of a 32k vocabulary, where a kept count may differ by one)."""
    rng = np.random.default_rng(vocab)
    cases = 0
    for trial in range(60):
        kind = trial % 5
        if kind == 0:
            x = rng.standard_normal((3, vocab)) * rng.choice([0.1, 1.0, 4.0, 12.0])
        elif kind == 1:
            x = rng.integers(-3, 3, (3, vocab)).astype(np.float64)  # many ties
        elif kind == 2:
            x = np.zeros((3, vocab))
            x[:, rng.integers(0, vocab, 3)] = 2.0  # a few tied maxima over a flat floor
        elif kind == 3:
            x = rng.standard_normal((3, vocab)) * 3
            x[:, rng.random(vocab) < 0.5] = -np.inf  # after a top-k filter
            x[:, 0] = 1.0
        else:
            x = rng.gumbel(size=(3, vocab)) * 5
        x = x.astype(np.float32)
        for top_p in (0.01, 0.2, 0.5, 0.9, 0.97, 0.9999):
            keep = int(rng.integers(1, 4)) if kind == 4 else 1
            ours = top_p_filter(x, top_p, keep)
            np.testing.assert_array_equal(ours, _top_p_full_sort(x, top_p, keep, np.float64),
                                          err_msg=f"kind {kind} top_p {top_p} keep {keep}")
            if vocab < 32000 or kind in (3, 4):
                np.testing.assert_array_equal(ours, _top_p_full_sort(x, top_p, keep),
                                              err_msg=f"kind {kind} top_p {top_p} keep {keep} (float32)")
            cases += 1
    assert cases == 360


EXTREMES = [1e-300, 1e-45, 1e-40, 1e-30, 1e-8, 1e8, 1e30, 1e39, 1e300]


@pytest.mark.parametrize("value", EXTREMES)
def test_extreme_temperature_and_penalty_stay_finite(value):
    """Any finite positive temperature or penalty is valid; none may give NaN or an inf logit (transformers
    divides in float32 and overflows). Scores saturate instead; tiny temperatures sample the argmax."""
    import warnings

    logits = random_logits(8, seed=3)
    seen = np.zeros_like(logits, bool)
    seen[:, ::3] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings either
        scaled = apply_temperature(logits, value)
        penalized = apply_repetition_penalty(logits, seen, value)
        for row in range(len(logits)):
            s = Sampler(V, do_sample=True, temperature=value, repetition_penalty=value, top_p=0.9, top_k=7, seed=row,
                        prompt_ids=np.flatnonzero(seen[row]).tolist())
            token = s(logits[row])
            assert 0 <= token < V and np.isfinite(penalized[row, token])
    assert not np.isnan(scaled).any() and not np.isposinf(scaled).any()
    assert np.isfinite(penalized).all()
    if value < 1e30:  # the order is kept (a huge temperature flattens every logit to 0)
        np.testing.assert_array_equal(scaled.argmax(-1), logits.argmax(-1))
    if value <= 1e-30:  # the limit: only the most likely token is drawn
        for row, seed in enumerate(range(len(logits))):
            assert Sampler(V, do_sample=True, temperature=value, seed=seed)(logits[row]) == int(logits[row].argmax())
    if value >= 1e30:  # ... or none stands out: every token about equally likely
        np.testing.assert_allclose(softmax(scaled), 1.0 / V, rtol=1e-5)


def test_ordinary_values_keep_transformers_arithmetic():
    """The saturating path is taken only where float32 would overflow: otherwise the result is bit-equal to
    `logits / T` and to transformers' penalty."""
    logits = random_logits(4) * 1e3
    seen = np.ones_like(logits, bool)
    for value in (1e-3, 0.7, 3.0, 1e3):
        np.testing.assert_array_equal(apply_temperature(logits, value), logits / np.float32(value))
        expected = np.where(logits < 0, logits * np.float32(value), logits / np.float32(value))
        np.testing.assert_array_equal(apply_repetition_penalty(logits, seen, value), expected)


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_equals_transformers(hf, min_p):
    torch, transformers = hf
    logits = random_logits(20)
    ours = min_p_filter(logits, min_p)
    if min_p == 0.0:
        assert ours is logits  # off
        return
    theirs = transformers.MinPLogitsWarper(min_p)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert np.isfinite(ours).sum() > (min_p < 1) * len(ours)  # the filter bites, and keeps each row's argmax
    assert np.isfinite(ours[np.arange(len(ours)), logits.argmax(-1)]).all()


def test_chain_with_min_p_and_min_new_tokens_equals_transformers(hf):
    torch, transformers = hf
    logits = random_logits()
    eos = [int(logits[0].argmax()), 3]
    chain = transformers.LogitsProcessorList([
        transformers.MinNewTokensLengthLogitsProcessor(2, 2, eos), transformers.TemperatureLogitsWarper(0.8),
        transformers.TopPLogitsWarper(0.95), transformers.MinPLogitsWarper(0.05),
    ])
    s = Sampler(V, do_sample=True, temperature=0.8, top_p=0.95, min_p=0.05, seed=0, min_new_tokens=2, eos_ids=eos)
    for step in range(3):  # transformers counts new tokens from input_ids' length past the prompt's (2 here)
        ids = torch.zeros((1, 2 + step), dtype=torch.long)
        theirs = chain(ids, torch.from_numpy(logits[:1].copy())).numpy()[0]
        np.testing.assert_allclose(s.process(logits[0]), theirs, rtol=1e-6)
        assert np.isneginf(s.process(logits[0])[eos]).all() == (step < 2)
        s(logits[0])
    greedy = Sampler(V, min_new_tokens=1, eos_ids=eos)
    assert greedy(logits[0]) != eos[0] and greedy(logits[0]) == eos[0]  # eos only once a token was chosen


@pytest.mark.parametrize("kw, plain", [
    ({}, True),
    ({"min_new_tokens": 2}, True),  # no eos ids: nothing to hold back
    ({"min_new_tokens": 2, "eos_ids": [3]}, False),
    ({"repetition_penalty": 1.3, "prompt_ids": [3]}, False),
    ({"presence_penalty": 0.5}, False),
    ({"logit_bias": {3: 2.0}}, False),
    ({"logit_bias": {3: 0.0}}, True),  # a zero bias changes nothing
    ({"suppress": (3,)}, False),
    ({"do_sample": True, "seed": 0}, False),
])
def test_argmax_only_says_when_the_choice_is_the_raw_argmax(kw, plain):
    """The Engine takes one argmax for every `argmax_only` row of a step: that must be what the sampler would
    choose, and every setting that changes the scores must turn it off."""
    s = Sampler(V, **kw)
    assert s.argmax_only is plain
    x = random_logits(rows=8, seed=3)
    x[:, 3] += 10  # token 3 is every row's argmax: the settings above that touch it change the choice
    for row in x:
        if s.argmax_only:
            assert s(row.copy()) == int(np.argmax(row))
    if "min_new_tokens" in kw and "eos_ids" in kw:
        assert s.chosen == 0 and not s.argmax_only
        assert [s(row) for row in x[:2]] != [3, 3] and s.argmax_only  # eos held back for 2 tokens, then plain


def test_took_counts_a_choice_as_a_call_does():
    a, b = Sampler(V, min_new_tokens=1, eos_ids=[3]), Sampler(V, min_new_tokens=1, eos_ids=[3])
    x = random_logits(rows=2, seed=4)
    a(x[0])
    b.took(int(np.argmax(x[0])))
    assert a.chosen == b.chosen == 1 and a.argmax_only and b.argmax_only
