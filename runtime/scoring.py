"""Scoring a text with a backend: teacher-forced log-probabilities and perplexity.

    gen = Generator.load("engines/tiny-mixtral-fp32")
    perplexity(gen.backend, gen.tokenizer.encode(text), window=256)
"""

from __future__ import annotations

import numpy as np

from mixtrt.runtime.backends.base import Backend
from mixtrt.runtime.errors import ConfigError


def teacher_forced_logprobs(backend: Backend, ids: list[int], prefill_chunk: int | None = None) -> np.ndarray:
    """[T - 1] float32: log p(ids[t] | ids[:t]) for t >= 1, the whole sequence fed in chunks from an empty cache."""
    from mixtrt.runtime.generation import Engine, GenerationConfig

    engine = Engine(backend, None, max_batch=1)
    limit, why = engine.limit()
    if len(ids) > limit:
        raise ConfigError(f"{len(ids)} tokens do not fit: {why}")
    if len(ids) < 2:
        raise ConfigError(f"teacher-forced scoring needs at least 2 tokens, got {len(ids)}")
    _, logprobs = engine.prefill(0, ids, GenerationConfig(return_logprobs=True, prefill_chunk=prefill_chunk))
    assert logprobs is not None
    return logprobs


def perplexity(backend: Backend, ids: list[int], window: int | None = None) -> float:
    """exp(-mean log p) of ids[1:]. window: score non-overlapping segments of `window` tokens, each from an
    empty cache (its first token is context only); None = the whole sequence in one pass."""
    if window is not None and (not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 2):
        raise ConfigError(f"window must be an integer >= 2, got {window!r}")
    step = window or len(ids)
    parts = [teacher_forced_logprobs(backend, ids[i:i + step]) for i in range(0, len(ids) - 1, step)
             if len(ids[i:i + step]) >= 2]
    if not parts:
        raise ConfigError("perplexity needs at least 2 tokens")
    return float(np.exp(-np.concatenate(parts).astype(np.float64).mean()))
