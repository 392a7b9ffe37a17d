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
from mixtrt.runtime.sampling import log_softmax


def chunks(ids: list[int], chunk: int) -> list[list[int]]:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 2:
        raise ConfigError(f"--chunk must be an integer >= 2, got {chunk!r}")
    out = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    return [c for c in out if len(c) >= 2]


PIECE_TOKENS = 256  # tokens fed per backend step: its logits [piece, V] float32 are what is held of a chunk
ROWS = 64  # positions whose float64 log-softmax is computed at a time


def _logits(backend: Backend, ids: list[int], name: str, step: int) -> Iterator[np.ndarray]:
    """The float32 logits [n, V] predicting ids[1:], `step` positions at a time (at most the cache capacity), from an
    empty cache. name: the backend's artifact, as an error names it."""
    if len(ids) > backend.max_positions:
        raise ConfigError(f"a chunk of {len(ids)} tokens is past the {backend.max_positions} positions "
                          f"{name} serves: pass --chunk {backend.max_positions} or less")
    cache = backend.new_cache(1)
    for i in range(0, len(ids) - 1, step):
        logits = backend.step(cache, np.asarray([ids[i:min(i + step, len(ids) - 1)]], dtype=np.int64))[0]
        if not np.isfinite(logits).all():
            raise ConfigError(f"{name} produced non-finite logits (NaN or inf) on this text: its weights or config "
                              "are broken, or (an fp16 artifact) fp16 overflowed")
        yield logits


def evaluate(backend: Backend, ids: list[int], chunk: int = 256, reference: Backend | None = None,
             names: tuple[str, str] = ("the artifact", "the reference"),
             progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Perplexity of ids under `backend`; with `reference`, also mean KL(reference || backend) per scored token
    (nats) and the fraction of scored positions where both put the same token first. names: the two artifacts,
    as errors name them. progress(chunks done, chunks in all, perplexity so far): called after each chunk (what
    llama-perplexity prints as it goes). Memory: a piece's logits of each, and ROWS positions' float64 log-softmax,
    whatever the chunk and the vocabulary."""
    if reference is not None and reference.args.vocab_size != backend.args.vocab_size:
        raise ConfigError(f"{names[1]}: its vocabulary ({reference.args.vocab_size}) is not {names[0]}'s "
                          f"({backend.args.vocab_size})")
    nll = kl = 0.0
    count = agree = 0
    parts = chunks(ids, chunk)
    # the same pieces from both (their caches' capacities may differ), so their rows line up
    step = min([PIECE_TOKENS, backend.capacity] + ([reference.capacity] if reference is not None else []))
    for done, c in enumerate(parts, 1):
        targets = np.asarray(c[1:])
        refs = _logits(reference, c, names[1], step) if reference is not None else None
        at = 0
        for logits in _logits(backend, c, names[0], step):
            ref_logits = next(refs) if refs is not None else None
            for r in range(0, len(logits), ROWS):
                logp = log_softmax(logits[r:r + ROWS], np.float64)
                target = targets[at + r:at + r + len(logp)]
                nll -= float(logp[np.arange(len(target)), target].sum())
                if ref_logits is not None:
                    ref = log_softmax(ref_logits[r:r + ROWS], np.float64)
                    kl += float((np.exp(ref) * (ref - logp)).sum())
                    agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            at += len(logits)
        count += len(targets)
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
