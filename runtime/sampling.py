"""Logits processing and token choice in numpy, in transformers' order and with its semantics.

    raw logits ─► logit_bias ─► suppress_tokens ─► eos held back (min_new_tokens) ─► repetition penalty ─►
        presence / frequency penalties ─►
        (do_sample only:) temperature ─► top-k ─► top-p ─► min-p ─► draw
        (greedy:)         argmax

(vLLM applies min-p before top-k / top-p; with top_p and min_p both set the kept sets can differ from it.)
Greedy ignores temperature / top-k / top-p / min-p as transformers does (they cannot change the argmax).
Each filter sets removed entries to -inf. Every function works on [V] or [..., V] logits.

    >>> logits = np.array([2.0, 1.0, 0.5, -1.0], np.float32)
    >>> top_k_filter(logits, 2)
    array([  2.,   1., -inf, -inf], dtype=float32)
    >>> s = Sampler(vocab_size=4, do_sample=True, top_k=2, seed=0)
    >>> s(logits) in (0, 1)
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)


def log_softmax(logits: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Natural-log softmax over the last axis, computed in `dtype` (float32; perplexity's float64)."""
    x: np.ndarray = np.asarray(logits, dtype)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_k_logprobs(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of logprobs [N, V]: (ids [N, k] int64, values [N, k] float32), the
    largest first (ties: the lower id first).

    >>> top_k_logprobs(np.log(np.array([[0.2, 0.5, 0.3]], np.float32)), 2)[0]
    array([[1, 2]])
    """
    k = min(k, logprobs.shape[-1])
    part = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(logprobs, part, axis=-1)
    order = np.lexsort((part, -values), axis=-1)
    ids = np.take_along_axis(part, order, axis=-1).astype(np.int64)
    return ids, np.take_along_axis(values, order, axis=-1).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: for each token seen (bool mask, same shape as logits)
    a negative logit is multiplied by `penalty`, any other divided by it. Each token counts once.

    A penalty far from 1 (any finite float > 0 is valid) can carry a logit past float32's range, where
    transformers' result turns inf and sampling from it NaN: such values saturate at float32's largest
    magnitude instead (the argmax is unchanged; the saturated tokens tie).
    """
    if penalty == 1.0:
        return logits
    finite = None  # -inf entries (masked: a structured-output row) stay -inf
    if _F32_TINY <= penalty <= _F32_MAX:
        p32 = np.float32(penalty)
        with np.errstate(over="ignore", invalid="ignore"):
            penalized = np.where(logits < 0, logits * p32, logits / p32)
        if np.isfinite(penalized).all():  # the common case, checked first: one pass
            return np.where(seen, penalized, logits).astype(np.float32)
        finite = np.isfinite(logits)
        if np.isfinite(penalized[finite]).all():
            return np.where(seen, penalized, logits).astype(np.float32)
    if finite is None:
        finite = np.isfinite(logits)
    x = np.asarray(logits, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        penalized = np.where(finite, np.clip(np.where(x < 0, x * penalty, x / penalty), -_F32_MAX, _F32_MAX), x)
    return np.where(seen, penalized, logits).astype(np.float32)


def apply_presence_frequency(logits: np.ndarray, counts: dict[int, int], presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties (as vLLM applies them, after the repetition penalty): token j,
    generated c_j > 0 times so far in this row's output, loses c_j * frequency + presence from its logit (a
    negative penalty raises it). A new array; tokens never generated keep their logits. (With |penalties| <= 2
    the change is far below float32's spacing near its largest values: it cannot overflow.)

    >>> apply_presence_frequency(np.zeros(4, np.float32), {1: 2, 3: 1}, 0.5, 0.25).tolist()
    [0.0, -1.0, 0.0, -0.75]
    """
    out = np.array(logits, np.float32)
    if not counts or (presence == 0 and frequency == 0):
        return out
    ids = np.fromiter(counts, np.int64, len(counts))
    times = np.fromiter(counts.values(), np.float64, len(counts))
    out[ids] = out[ids] - (times * frequency + presence)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Sampling probabilities become softmax(logits / T).

    transformers' `logits / T` in float32 wherever that stays finite. A temperature so small (or so large) that
    it would not (a logit over T past float32's range, T itself outside it) divides the logits shifted by
    their row's maximum, in float64: softmax is the same, the most likely tokens get 0 and the rest fall
    towards -inf, so a tiny temperature samples the argmax (its ties at random) instead of NaN.
    """
    if temperature == 1.0:
        return logits
    x = np.asarray(logits, np.float32)
    if _F32_TINY <= temperature <= _F32_MAX and x.size:
        peak = float(np.abs(x).max())
        if peak == np.inf and not np.isposinf(x).any():  # masked tokens (-inf; min_new_tokens' eos) stay -inf
            peak = float(np.abs(np.where(np.isneginf(x), np.float32(0), x)).max())
        if np.isfinite(peak) and peak / temperature < _F32_MAX:
            return (x / np.float32(temperature)).astype(np.float32)
    x64 = x.astype(np.float64)
    top = x64.max(axis=-1, keepdims=True) if x.size else np.zeros(x.shape[:-1] + (1,))
    top = np.where(np.isfinite(top), top, 0.0)  # a row all -inf stays -inf
    with np.errstate(over="ignore", under="ignore"):
        return ((x64 - top) / temperature).astype(np.float32)


def top_k_filter(logits: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' TopKLogitsWarper: keep logits >= the k-th largest (ties at the k-th are kept); 0 = off."""
    if top_k <= 0:
        return logits
    vocab = logits.shape[-1]
    k = min(max(top_k, min_tokens_to_keep), vocab)
    kth = np.partition(logits, vocab - k, axis=-1)[..., vocab - k : vocab - k + 1]
    return np.where(logits < kth, np.float32(-np.inf), logits).astype(np.float32)


def top_p_filter(logits: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' TopPLogitsWarper: keep the smallest set of most likely tokens whose probability sums
    to >= top_p (at least `min_tokens_to_keep`).

    transformers sorts ascending and drops the tokens whose cumulative probability is <= 1 - top_p: a token
    stays when the mass of the tokens sorted above it is < top_p. Its sort is not stable, so which of several
    tokens tied at the boundary it keeps is unspecified (the number kept is not); here the higher index ranks
    higher among ties. The same rule here without sorting the vocabulary: the candidates are the tokens at or
    above the n-th largest logit (np.partition; n grows, at least 4x a round, until their mass reaches top_p), and only
    they are sorted. A full argsort of a 32k vocabulary costs milliseconds per row; this costs a partition.
    """
    if top_p >= 1.0:
        return logits
    x = np.asarray(logits, np.float32)
    vocab = x.shape[-1]
    rows = x.reshape(-1, vocab)
    out = rows.copy()
    keep_min = max(1, min(min_tokens_to_keep, vocab))
    for row, dst in zip(rows, out, strict=True):
        probs = np.exp(row.astype(np.float64) - float(row.max()))
        probs /= probs.sum()
        n = min(vocab, max(64, keep_min))
        while True:
            if n * 4 > vocab:
                n = vocab
            kth = np.partition(row, vocab - n)[vocab - n] if n < vocab else -np.inf
            cand = np.flatnonzero(row >= kth)[::-1]  # every token tied with the n-th largest too
            # most likely first; among equal logits the higher index first
            cand = cand[np.argsort(-row[cand], kind="stable")]
            p = probs[cand]
            above = np.cumsum(p) - p  # mass of the tokens ranked above each candidate
            kept = max(int(np.count_nonzero(above < top_p)), keep_min)
            if kept < len(cand) or len(cand) == vocab:
                break
            # each token left has at most the last candidate's probability: at least this many more are needed
            short = (top_p - above[-1] - p[-1]) / max(float(p[-1]), 1e-300)
            n = int(min(vocab, max(4 * n, n + short + 1)))
        dst[cand[kept:]] = -np.inf
        dst[row < row[cand[kept - 1]]] = -np.inf
    return out.reshape(x.shape)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """transformers' MinPLogitsWarper (and vLLM's min_p): drop the tokens whose probability is below min_p times
    the most likely token's; 0 = off. The most likely token always stays.

    >>> min_p_filter(np.log(np.array([0.5, 0.3, 0.04, 0.16], np.float32)), 0.1)
    array([-0.6931472, -1.2039728,       -inf, -1.8325815], dtype=float32)
    """
    if min_p <= 0.0:
        return logits
    x = np.asarray(logits, np.float32)
    probs = softmax(x)
    low = probs < np.float32(min_p) * probs.max(axis=-1, keepdims=True)
    return np.where(low, np.float32(-np.inf), x).astype(np.float32)


def row_rng(seed: int | None, row: int) -> np.random.Generator:
    """The random stream of batch row `row`: seeded by (seed, row), so a row's draws do not depend on the
    other rows of its batch. seed=None draws fresh entropy. A negative seed (>= -2**63) is its 64-bit
    two's-complement value, as OpenAI-style servers read one: -1 and 2**64 - 1 draw the same."""
    if seed is not None and seed < 0:
        seed += 2**64
    return np.random.default_rng(None if seed is None else [seed, row])


class Sampler:
    """Chooses one row's tokens from its raw logits [V] and remembers them (for the penalties).

    Call it once per generated token; `prompt_ids` count as seen for the repetition penalty, like transformers'
    input_ids; the presence and frequency penalties count only the tokens this sampler chose (OpenAI's and vLLM's
    output tokens). While fewer than `min_new_tokens` tokens were chosen, the `eos_ids` cannot be (transformers'
    MinNewTokensLengthLogitsProcessor). Every penalty applies to greedy choices too.
    """

    def __init__(self, vocab_size: int, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 row: int = 0, prompt_ids: Iterable[int] = (), min_new_tokens: int = 0,
                 eos_ids: Iterable[int] = (), presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: Mapping[int, float] | None = None, suppress: Iterable[int] = (),
                 guide: Any = None) -> None:
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.repetition_penalty = repetition_penalty
        self.chosen = 0  # tokens chosen so far
        self.min_new_tokens = min_new_tokens
        self.eos = np.array([t for t in eos_ids if 0 <= t < vocab_size], np.int64)
        self.eos_ids = frozenset(int(t) for t in self.eos)  # the ids that end the row (Engine)
        self.rng = row_rng(seed, row) if do_sample else None
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        bias = {int(t): float(b) for t, b in (logit_bias or {}).items() if b != 0}
        self.bias_ids = np.fromiter(bias, np.int64, len(bias))
        self.bias = np.fromiter(bias.values(), np.float32, len(bias))
        self.suppress = np.array(sorted({int(t) for t in suppress if 0 <= t < vocab_size}), np.int64)
        # token -> times chosen, kept only when a presence or frequency penalty is set
        self.counts: dict[int, int] | None = {} if presence_penalty or frequency_penalty else None
        self.guide = guide  # structured output: allowed() [V] bool before each choice, consume(token) after
        self.seen: np.ndarray | None = None
        if repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, bool)
            self.seen[np.fromiter(prompt_ids, np.int64)] = True

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Raw logits [V] -> the scores the choice is made from (filtered entries are -inf)."""
        scores = np.asarray(logits, np.float32)
        if self.bias.size:  # OpenAI's logit_bias first, as transformers' sequence_bias and vLLM's logit_bias
            scores = scores.copy()  # the raw logits stay as they are (logprobs come from them)
            scores[self.bias_ids] += self.bias
        if self.suppress.size:  # transformers' suppress_tokens: never chosen
            if np.may_share_memory(scores, logits):
                scores = scores.copy()
            scores[self.suppress] = -np.inf
        if self.chosen < self.min_new_tokens and self.eos.size:
            if np.may_share_memory(scores, logits):
                scores = scores.copy()
            scores[self.eos] = -np.inf
        allowed = None
        if self.guide is not None:  # what the schema does not allow next is never chosen, whatever the settings
            allowed = self.guide.allowed()
            scores = np.where(allowed, scores, np.float32(-np.inf))
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, self.repetition_penalty)
        if self.counts:
            scores = apply_presence_frequency(scores, self.counts, self.presence_penalty, self.frequency_penalty)
        if self.do_sample:
            scores = apply_temperature(scores, self.temperature)
            scores = top_k_filter(scores, self.top_k)
            scores = top_p_filter(scores, self.top_p)
            scores = min_p_filter(scores, self.min_p)
        if allowed is not None and not np.isfinite(scores).any():
            # every allowed token lost its score (eos held back by min_new_tokens where a complete document allows
            # only eos, a penalty or bias pushing the allowed ones to -inf): the schema wins, on the raw logits
            scores = np.where(allowed, np.asarray(logits, np.float32), np.float32(-np.inf))
        return scores

    @property
    def argmax_only(self) -> bool:
        """The next choice is the argmax of the raw logits (greedy, nothing to add or mask): the Engine takes the
        argmax of every such row of a step at once and hands it to `took`."""
        return (self.rng is None and not self.bias.size and not self.suppress.size and self.seen is None
                and self.counts is None
                and self.guide is None and not (self.chosen < self.min_new_tokens and self.eos.size))

    def took(self, token: int) -> int:
        """`token`, the argmax of the raw logits, chosen while `argmax_only` held (what __call__ would count)."""
        self.chosen += 1
        return token

    def __call__(self, logits: np.ndarray) -> int:
        scores = self.process(logits)
        if self.rng is None:
            token = int(np.argmax(scores))
        else:
            token = draw(scores, self.rng)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1
        if self.guide is not None:
            self.guide.consume(token)
        self.chosen += 1
        return token


def draw(scores: np.ndarray, rng: np.random.Generator) -> int:
    """One token from softmax(scores) [V] by inverse CDF (float64); -inf entries are never drawn."""
    probs = np.exp(scores.astype(np.float64) - float(scores.max()))
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(token, len(cdf) - 1)
