"""Held-out perplexity of an artifact on a text, and with a reference artifact the mean KL divergence and top-1
agreement of its next-token distributions (what llama.cpp's perplexity tool offers; `mixtrt perplexity`).

Protocol (training/evaluate.py's, so the numbers compare with models/tiny-mixtral/eval.json):
ids = [BOS] + tokenizer.encode(text); consecutive non-overlapping chunks of `chunk` tokens, each from an
empty cache (a last chunk of < 2 tokens is dropped); every token but a chunk's first is scored;
perplexity = exp(mean NLL), log-softmax in float64 over the full vocabulary.

    >>> from mixtrt.runtime.generation import Generator                     # doctest: +SKIP
    >>> evaluate(Generator.load("engines/tiny-int4").backend, ids, 256,     # doctest: +SKIP
    ...          reference=Generator.load("engines/tiny-fp32").backend)
    {'perplexity': 106.1, 'scored_tokens': 14363, 'mean_kl': 0.0061, 'top1_agreement': 0.962, ...}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from mixtrt.runtime.backends.base import Backend
from mixtrt.runtime.errors import ConfigError


def chunks(ids: list[int], chunk: int) -> list[list[int]]:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 2:
        raise ConfigError(f"--chunk must be an integer >= 2, got {chunk!r}")
    out = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    return [c for c in out if len(c) >= 2]


def chunk_logprobs(backend: Backend, ids: list[int], name: str = "the artifact") -> np.ndarray:
    """[len(ids) - 1, V] float64 log-softmax of the logits predicting ids[1:], from an empty cache, fed in
    pieces of at most the cache capacity. name: the backend's artifact, as an error names it."""
    if len(ids) > backend.max_positions:
        raise ConfigError(f"a chunk of {len(ids)} tokens is past the {backend.max_positions} positions "
                          f"{name} serves: pass --chunk {backend.max_positions} or less")
    cache = backend.new_cache(1)
    parts = []
    for i in range(0, len(ids) - 1, backend.capacity):
        piece = np.asarray([ids[i:min(i + backend.capacity, len(ids) - 1)]], dtype=np.int64)
        parts.append(backend.step(cache, piece)[0].astype(np.float64))
    logits = np.concatenate(parts)
    if not np.isfinite(logits).all():
        raise ConfigError(f"{name} produced non-finite logits (NaN or inf) on this text: its weights or config are "
                          "broken, or fp16 overflowed")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _pairs(backend: Backend, reference: Backend | None, parts: list[list[int]], names: tuple[str, str]
           ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray | None]]:
    for c in parts:
        yield c, chunk_logprobs(backend, c, names[0]), (chunk_logprobs(reference, c, names[1])
                                                         if reference is not None else None)


def evaluate(backend: Backend, ids: list[int], chunk: int = 256, reference: Backend | None = None,
             names: tuple[str, str] = ("the artifact", "the reference"),
             progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Perplexity of ids under `backend`; with `reference`, also mean KL(reference || backend) per scored token
    (nats) and the fraction of scored positions where both put the same token first. names: the two artifacts,
    as errors name them. progress(chunks done, chunks in all, perplexity so far): called after each chunk (what
    llama-perplexity prints as it goes)."""
    if reference is not None and reference.args.vocab_size != backend.args.vocab_size:
        raise ConfigError(f"{names[1]}: its vocabulary ({reference.args.vocab_size}) is not {names[0]}'s "
                          f"({backend.args.vocab_size})")
    nll = kl = 0.0
    count = agree = 0
    parts = chunks(ids, chunk)
    for done, (c, logp, ref) in enumerate(_pairs(backend, reference, parts, names), 1):
        target = np.asarray(c[1:])
        nll -= float(logp[np.arange(len(target)), target].sum())
        count += len(target)
        if ref is not None:
            kl += float((np.exp(ref) * (ref - logp)).sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        if progress is not None:
            progress(done, len(parts), math.exp(min(nll / count, 709.0)))
    if count == 0:
        raise ConfigError(f"the text has {len(ids)} token(s) with BOS: perplexity needs at least 2"
                          + (f" in a chunk (--chunk {chunk})" if len(ids) >= 2 else ""))
    mean = nll / count  # a perplexity past float range (mean NLL > ~709 nats: a broken model) is inf
    out: dict = {"perplexity": math.exp(mean) if mean < 709.0 else math.inf, "mean_nll": mean, "scored_tokens": count,
                 "chunk": chunk, "tokens": len(ids)}
    if reference is not None:
        out |= {"mean_kl": kl / count, "top1_agreement": agree / count}
    return out
