"""Text generation over any Backend: chunked prefill, batched decode, sampling, stop rules, streaming, chat.

The loop is written once (`Generator._loop`) and serves generate, stream, chat and stream_chat:

    1. prefill each row alone, in chunks of <= prefill_chunk tokens (backend rule: S > 1 only with b == 1),
       and choose its first token from the last prompt position's logits;
    2. decode the active rows together, one token per row per step; a row that finishes is dropped with
       cache.keep_rows(active) so it costs no more work (rows keep their batch index in `_Row.index`).

    >>> gen = Generator.load("engines/mistral-tiny")                      # doctest: +SKIP
    >>> [out] = gen.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
    >>> out.finish_reason, out.stats.generated_tokens                     # doctest: +SKIP
    ('length', 8)

A row ends with (checked in this order after each new token):
- "stop": a stop string appeared in its text; the text is cut before it (token_ids keep every token);
- "eos": it produced an eos token (kept in token_ids, not in the text);
- "length": max_new_tokens reached, or the sequence (prompt + generated) reached the longest the model can
  hold: the cache capacity for a model without a sliding window, else max positions. finish_message says
  which. A sequence never exceeds that limit, so every token in it could be fed back to the model.

Logprobs are log_softmax of the RAW model logits (before penalty / temperature / top-k / top-p), as
transformers' `output_logits` followed by log_softmax; prompt_logprobs[t] = log p(prompt[t+1] | prompt[:t+1]).
Sampling draws row i from a numpy Generator seeded by (seed, i): a row's tokens do not depend on the
other rows of its batch, and a prompt run alone equals it run as row 0 of a batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.backend import Backend
from mixtrt.runtime.cache import KVCache
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.sampling import Sampler, log_softmax

FinishReason = Literal["eos", "stop", "length"]
Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | np.ndarray
BACKENDS = ("onnxruntime",)


@dataclass(frozen=True)
class GenerationConfig:
    """transformers' GenerationConfig names. eos_token_id None = the model's eos ids; () = never stop on eos.
    prefill_chunk None = the backend's cache capacity. Greedy unless do_sample."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    return_logprobs: bool = False
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.stop_strings, str):
            fix("stop_strings", (self.stop_strings,))
        fix("stop_strings", tuple(self.stop_strings))
        if isinstance(self.eos_token_id, (list, tuple, np.ndarray)):
            fix("eos_token_id", tuple(int(i) for i in self.eos_token_id))

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")

        integer("max_new_tokens", 1)
        integer("top_k", 0)
        if self.seed is not None:
            integer("seed", 0)
        if self.prefill_chunk is not None:
            integer("prefill_chunk", 1)
        if not self.temperature >= 0 or (self.do_sample and self.temperature == 0):
            raise ConfigError(f"temperature must be > 0 when do_sample=True (>= 0 otherwise), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    def eos_ids(self, args: ModelArgs) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return tuple(args.eos_token_ids)
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (int(self.eos_token_id),)

    def validate(self, args: ModelArgs) -> None:
        """The checks that need the model: eos ids inside the vocabulary."""
        bad = [i for i in self.eos_ids(args) if not 0 <= i < args.vocab_size]
        if bad:
            raise ConfigError(f"eos_token_id {bad} outside the vocabulary [0, {args.vocab_size})")


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float  # from the start of the call to this row's first token
    prefill_tokens_per_s: float | None  # prompt tokens / this row's prefill time (None if too fast to time)
    decode_tokens_per_s: float | None  # (generated - 1) / time from first to last token; None if < 2 tokens


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list[int]  # generated only (an eos token included)
    text: str
    finish_reason: FinishReason
    finish_message: str
    stats: GenerationStats
    logprobs: np.ndarray | None = None  # [generated] float32, of the raw logits; with return_logprobs
    prompt_logprobs: np.ndarray | None = None  # [prompt - 1] float32; with return_logprobs


@dataclass(frozen=True)
class StreamEvent:
    """One new token and the text it completed (complete UTF-8 only; may be ""), or, last, the output."""

    text: str
    token_id: int | None
    output: GenerationOutput | None = None


class _StopText:
    """Accumulates a row's text, holding back any tail that could still become a stop string.

    stops=("\\n\\n",): feed("a\\n") -> "a" (the "\\n" is held), feed("b") -> "\\nb", feed("\\n\\n") -> stop.
    A stop string always starts inside the held-back part, so searching it is enough.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""
        self.stop: str | None = None

    def feed(self, piece: str) -> str:
        """Add text; return what is now safe to emit. After a stop string, emits nothing more."""
        if self.stop is not None or not piece:
            return ""
        self.held += piece
        hits = [(self.held.find(s), s) for s in self.stops if s in self.held]
        if hits:
            at, self.stop = min(hits)
            out, self.held = self.held[:at], ""
            return out
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:n]):
                    keep = n
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out

    def finish(self) -> str:
        out, self.held = self.held, ""
        return out if self.stop is None else ""


@dataclass
class _Row:
    index: int  # position in the caller's batch
    prompt: list[int]
    sampler: Sampler
    decoder: Any  # tokenizer StreamDecoder
    text: _StopText
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    prompt_logprobs: np.ndarray | None = None
    reason: FinishReason | None = None
    message: str = ""
    t_prefill: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0


class Generator:
    """Generation on a Backend with a tokenizer (see the module docstring for the loop and its rules)."""

    def __init__(self, backend: Backend, tokenizer: Any) -> None:
        self.backend = backend
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", threads: int | None = None,
             verify: bool = True) -> Generator:
        """The artifact's backend and tokenizer. verify: check file hashes against the manifest (sizes always)."""
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is not supported; choose one of {list(BACKENDS)}")
        from mixtrt.runtime.ort_backend import OrtBackend
        from mixtrt.runtime.tokenizer import Tokenizer

        engine = OrtBackend.load(artifact_dir, threads=threads, verify=verify)
        tokenizer = Tokenizer.load(Path(artifact_dir) / "tokenizer.model")
        if tokenizer.vocab_size > engine.args.vocab_size:
            raise ConfigError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces but the model has only "
                              f"{engine.args.vocab_size} embeddings")
        return cls(engine, tokenizer)

    # ---- public API --------------------------------------------------------------------------------
    def generate(self, prompts: Prompts, config: GenerationConfig | None = None,
                 **overrides: Any) -> list[GenerationOutput]:
        """One output per prompt, in order. prompts: a str, a list of str, one token-id list, or a list of them."""
        cfg = self._config(config, overrides)
        rows = self._prompts(prompts)
        outputs: list[GenerationOutput | None] = [None] * len(rows)
        for index, _, output in self._run(rows, cfg):
            if output is not None:
                outputs[index] = output
        return outputs  # type: ignore[return-value]

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
               **overrides: Any) -> Iterator[StreamEvent]:
        """Events as tokens are produced; the texts concatenate to the final text; the last event has .output."""
        cfg = self._config(config, overrides)
        rows = self._prompts(prompt)
        if len(rows) != 1:
            raise ConfigError(f"stream takes one prompt, got {len(rows)}")
        return self._stream(self._run(rows, cfg))

    def chat(self, messages: Sequence[dict[str, str]], config: GenerationConfig | None = None,
             **overrides: Any) -> GenerationOutput:
        """The assistant's next answer to `messages` ([{"role": "user", "content": ...}, ...])."""
        return self.generate([self._chat_ids(messages)], config, **overrides)[0]

    def stream_chat(self, messages: Sequence[dict[str, str]], config: GenerationConfig | None = None,
                    **overrides: Any) -> Iterator[StreamEvent]:
        return self.stream(self._chat_ids(messages), config, **overrides)

    def teacher_forced_logprobs(self, token_ids: Sequence[int], prefill_chunk: int | None = None) -> np.ndarray:
        """[T - 1] float32: log p(token_ids[t] | token_ids[:t]) for t >= 1, the whole sequence fed in chunks."""
        [ids] = self._prompts([list(token_ids)])
        limit, why = self._limit()
        if len(ids) > limit:
            raise ConfigError(f"{len(ids)} tokens do not fit: {why}")
        chunk = self._chunk(prefill_chunk)
        cache = self.backend.new_cache(1)
        _, logprobs = self._prefill(cache, 0, ids, chunk, want_logprobs=True)
        return logprobs

    def perplexity(self, token_ids: Sequence[int], window: int | None = None) -> float:
        """exp(-mean log p) of token_ids[1:]. window: score non-overlapping segments of `window` tokens, each
        from an empty cache (its first token is context only); None = the whole sequence in one pass."""
        ids = list(token_ids)
        if window is not None and window < 2:
            raise ConfigError(f"window must be >= 2, got {window}")
        step = window or len(ids)
        parts = [self.teacher_forced_logprobs(ids[i:i + step]) for i in range(0, len(ids) - 1, step)
                 if len(ids[i:i + step]) >= 2]
        if not parts:
            raise ConfigError("perplexity needs at least 2 tokens")
        return float(np.exp(-np.concatenate(parts).astype(np.float64).mean()))

    # ---- the loop ----------------------------------------------------------------------------------
    @staticmethod
    def _stream(events: Iterator[tuple[int, tuple[int, str], GenerationOutput | None]]) -> Iterator[StreamEvent]:
        for _, (token, text), output in events:
            if output is None:
                yield StreamEvent(text, token)
            else:
                yield StreamEvent("", None, output)

    def _run(self, prompts: list[list[int]], cfg: GenerationConfig
             ) -> Iterator[tuple[int, tuple[int, str], GenerationOutput | None]]:
        """Check everything now, then return the loop: it yields (batch index, (token, text), None) per token
        and (batch index, (-1, ""), output) when a row finishes."""
        cfg.validate(self.backend.args)
        chunk = self._chunk(cfg.prefill_chunk)
        limit, why = self._limit()
        for i, ids in enumerate(prompts):
            if len(ids) >= limit:
                raise ConfigError(f"prompt {i} has {len(ids)} tokens, which leaves no room for a new token: {why}")
        return self._loop(prompts, cfg, chunk, limit, why)

    def _loop(self, prompts: list[list[int]], cfg: GenerationConfig, chunk: int, limit: int, why: str
              ) -> Iterator[tuple[int, tuple[int, str], GenerationOutput | None]]:
        backend, args = self.backend, self.backend.args
        eos = frozenset(cfg.eos_ids(args))
        rows = [
            _Row(i, ids, Sampler(args.vocab_size, do_sample=cfg.do_sample, temperature=cfg.temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                                 seed=cfg.seed, row=i, prompt_ids=ids),
                 self.tokenizer.stream(), _StopText(cfg.stop_strings))
            for i, ids in enumerate(prompts)
        ]

        def accept(row: _Row, logits: np.ndarray) -> Iterator[tuple[int, tuple[int, str], GenerationOutput | None]]:
            """Choose row's next token from its raw logits [V] and apply the finish rules."""
            token = row.sampler(logits)
            row.t_last = time.perf_counter()
            if not row.tokens:
                row.t_first = row.t_last
            row.tokens.append(token)
            if cfg.return_logprobs:
                row.logprobs.append(float(log_softmax(logits)[token]))
            if token in eos:
                row.reason, row.message = "eos", f"end-of-sequence token {token}"
            text = row.text.feed(row.decoder.put(token)) if row.reason is None else ""
            if row.reason is None and len(row.tokens) >= cfg.max_new_tokens:
                row.reason, row.message = "length", f"max_new_tokens={cfg.max_new_tokens} reached"
            if row.reason is None and len(row.prompt) + len(row.tokens) >= limit:
                row.reason, row.message = "length", why
            if row.text.stop is None and row.reason is not None:
                text += row.text.feed(row.decoder.flush())
                text += row.text.finish()
            if row.text.stop is not None:
                row.reason, row.message = "stop", f"stop string {row.text.stop!r}"
            row.pieces.append(text)
            yield row.index, (token, text), None
            if row.reason is not None:
                yield row.index, (-1, ""), self._output(row, t0, cfg.return_logprobs)

        t0 = time.perf_counter()
        cache = backend.new_cache(len(rows))
        for r, row in enumerate(rows):
            start = time.perf_counter()
            last, row.prompt_logprobs = self._prefill(cache, r, row.prompt, chunk, cfg.return_logprobs)
            row.t_prefill = time.perf_counter() - start
            yield from accept(row, last)
        active = [row for row in rows if row.reason is None]
        cache.keep_rows([row.index for row in active])  # cache row i now holds active[i]
        while active:
            ids = np.array([[row.tokens[-1]] for row in active], np.int64)  # [b, 1]
            logits = backend.step(cache, ids)  # [b, 1, V]
            for i, row in enumerate(active):
                yield from accept(row, logits[i, 0])
            keep = [i for i, row in enumerate(active) if row.reason is None]
            if len(keep) < len(active):
                cache.keep_rows(keep)
                active = [active[i] for i in keep]

    def _prefill(self, cache: KVCache, row: int, ids: list[int], chunk: int,
                 want_logprobs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Feed ids to cache row `row` in chunks; return the last position's logits [V] and, if asked,
        log p(ids[t] | ids[:t]) for t >= 1 [len(ids) - 1]."""
        tokens = np.asarray(ids, np.int64)
        logprobs = np.empty(len(ids) - 1, np.float32) if want_logprobs else None
        for start in range(0, len(ids), chunk):
            piece = tokens[start:start + chunk]
            # [S, V] when the prompt's logprobs are wanted, else [1, V]: the lm_head runs on the last token only
            logits = self.backend.step(cache, piece[None, :], start_row=row, last_only=logprobs is None)[0]
            if logprobs is not None:
                targets = tokens[start + 1:start + 1 + len(piece)]  # the next token of each position
                lp = log_softmax(logits[: len(targets)])
                logprobs[start:start + len(targets)] = lp[np.arange(len(targets)), targets]
        return logits[-1], logprobs

    # ---- helpers -----------------------------------------------------------------------------------
    def _output(self, row: _Row, t0: float, logprobs: bool) -> GenerationOutput:
        n = len(row.tokens)
        decode_s = row.t_last - row.t_first
        stats = GenerationStats(
            prompt_tokens=len(row.prompt),
            generated_tokens=n,
            time_to_first_token_s=row.t_first - t0,
            prefill_tokens_per_s=len(row.prompt) / row.t_prefill if row.t_prefill > 0 else None,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        )
        assert row.reason is not None
        return GenerationOutput(
            token_ids=list(row.tokens), text="".join(row.pieces), finish_reason=row.reason,
            finish_message=row.message, stats=stats,
            logprobs=np.array(row.logprobs, np.float32) if logprobs else None,
            prompt_logprobs=row.prompt_logprobs,
        )

    def _limit(self) -> tuple[int, str]:
        """The longest sequence (prompt + generated) a row can hold, and the message naming that limit."""
        b = self.backend
        if not b.windowed and b.capacity <= b.max_positions:
            return b.capacity, (f"cache full: the model has no sliding window and its cache holds {b.capacity} "
                                f"tokens (max context chosen at export)")
        return b.max_positions, f"max positions: the model supports {b.max_positions} positions"

    def _chunk(self, prefill_chunk: int | None) -> int:
        capacity = self.backend.capacity
        if prefill_chunk is not None and not 1 <= prefill_chunk <= capacity:
            raise ConfigError(f"prefill_chunk must be in [1, cache capacity {capacity}], got {prefill_chunk}")
        return prefill_chunk or capacity

    def _config(self, config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
        cfg = config or GenerationConfig()
        names = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown generation options {unknown}; known: {sorted(names)}")
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def _chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if not messages:
            raise ConfigError("chat needs at least one message")
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))

    def _prompts(self, prompts: Prompts) -> list[list[int]]:
        """Normalize to a list of token-id lists, checking emptiness and the id range."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ConfigError("prompts is empty: give a str, a list of str, a token-id list or a list of them")
        if all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in prompts):
            prompts = [prompts]  # one tokenized prompt
        vocab = self.backend.args.vocab_size
        rows = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ConfigError(f"prompt {i} is empty")
                ids = list(self.tokenizer.encode(p, bos=True, eos=False))
            elif isinstance(p, (Sequence, np.ndarray)) and not isinstance(p, bytes):
                if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in p):
                    raise ConfigError(f"prompt {i}: token ids must be integers")
                ids = [int(t) for t in p]
            else:
                raise ConfigError(f"prompt {i}: expected a str or a list of token ids, got {type(p).__name__}")
            if not ids:
                raise ConfigError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ConfigError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            rows.append(ids)
        return rows
