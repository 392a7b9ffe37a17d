"""Logits processing and token choice in numpy, in transformers' order and with its semantics.

    raw logits ─► repetition penalty ─► (do_sample only:) temperature ─► top-k ─► top-p ─► draw
                                        (greedy:)         argmax

Greedy ignores temperature / top-k / top-p as transformers does (they cannot change the argmax).
Each filter sets removed entries to -inf. Every function works on [V] or [..., V] logits.

    >>> logits = np.array([2.0, 1.0, 0.5, -1.0], np.float32)
    >>> top_k_filter(logits, 2)
    array([  2.,   1., -inf, -inf], dtype=float32)
    >>> s = Sampler(vocab_size=4, do_sample=True, top_k=2, seed=0)
    >>> s(logits) in (0, 1)
    True
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log softmax over the last axis, float32."""
    x = np.asarray(logits, np.float32)
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
    a negative logit is multiplied by `penalty`, any other divided by it. Each token counts once."""
    if penalty == 1.0:
        return logits
    penalized = np.where(logits < 0, logits * np.float32(penalty), logits / np.float32(penalty))
    return np.where(seen, penalized, logits).astype(np.float32)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Sampling probabilities become softmax(logits / T)."""
    if temperature == 1.0:
        return logits
    return (logits / np.float32(temperature)).astype(np.float32)


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
    to >= top_p (at least `min_tokens_to_keep`). Computed as transformers does: sort ascending, drop the
    tokens whose cumulative probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending
    ascending = np.take_along_axis(logits, order, axis=-1)
    cumulative = np.cumsum(softmax(ascending), axis=-1)
    drop_sorted = cumulative <= np.float32(1.0 - top_p)
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, np.float32(-np.inf), logits).astype(np.float32)


def row_rng(seed: int | None, row: int) -> np.random.Generator:
    """The random stream of batch row `row`: seeded by (seed, row), so a row's draws do not depend on the
    other rows of its batch. seed=None draws fresh entropy."""
    return np.random.default_rng(None if seed is None else [seed, row])


class Sampler:
    """Chooses one row's tokens from its raw logits [V] and remembers them (for the repetition penalty).

    Call it once per generated token; `prompt_ids` count as seen, like transformers' input_ids.
    """

    def __init__(self, vocab_size: int, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None, row: int = 0,
                 prompt_ids: Iterable[int] = ()) -> None:
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        self.rng = row_rng(seed, row) if do_sample else None
        self.seen: np.ndarray | None = None
        if repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, bool)
            self.seen[np.fromiter(prompt_ids, np.int64)] = True

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Raw logits [V] -> the scores the choice is made from (filtered entries are -inf)."""
        scores = np.asarray(logits, np.float32)
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, self.repetition_penalty)
        if self.do_sample:
            scores = apply_temperature(scores, self.temperature)
            scores = top_k_filter(scores, self.top_k)
            scores = top_p_filter(scores, self.top_p)
        return scores

    def __call__(self, logits: np.ndarray) -> int:
        scores = self.process(logits)
        if self.rng is None:
            token = int(np.argmax(scores))
        else:
            token = draw(scores, self.rng)
        if self.seen is not None:
            self.seen[token] = True
        return token


def draw(scores: np.ndarray, rng: np.random.Generator) -> int:
    """One token from softmax(scores) [V] by inverse CDF (float64); -inf entries are never drawn."""
    probs = np.exp(scores.astype(np.float64) - float(scores.max()))
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(token, len(cdf) - 1)
