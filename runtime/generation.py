"""Text generation over any Backend: the steppable Engine (the loop, written once) and the Generator API.

The Engine holds one backend cache of `max_batch` rows. Rows are admitted, stepped and dropped at any
time, so one loop serves generate and stream (all rows added at once), chat sessions (a row whose cache
outlives a turn: `keep=True`, then `extend`) and a server's continuous batching (rows added between
steps). Each `step()`:

    1. admits the waiting rows while cache rows are free: each is prefilled alone, in chunks of
       <= prefill_chunk tokens (backend rule: S > 1 only with b == 1), and its first token is chosen
       from the last prompt position's logits; with step(prefill_budget=N), at most N prompt tokens while
       rows decode: a longer prompt goes on at the next steps (its row `prefilling`, not decoding yet);
    2. decodes every running row together, one token per row;
    3. moves finished rows out of the batch with backend.move_rows, so they cost no more work (a kept row
       is parked behind the running ones, its cache intact).

    gen = Generator.load("engines/mistral-tiny")
    [out] = gen.generate("The capital of France is", max_new_tokens=8)
    out.finish_reason, out.stats.generated_tokens                         # ('length', 8)

A row ends with (checked in this order after each new token):
- "stop": a stop string appeared in its text; the text is cut before it (token_ids keep every token);
- "eos": it produced an eos token (kept in token_ids, not in the text);
- "length": max_new_tokens reached, or the sequence (prompt + generated) reached the longest the model can
  hold: the cache capacity for a model without a sliding window, else max positions. finish_message says
  which. A sequence never exceeds that limit, so every token in it could be fed back to the model.

Logprobs are log_softmax of the RAW model logits (before penalty / temperature / top-k / top-p), as
transformers' `output_logits` followed by log_softmax; prompt_logprobs[t] = log p(prompt[t+1] | prompt[:t+1]).
Sampling draws a row from a numpy Generator seeded by (seed, sample_index): generate() gives prompt i the
index i, so a row's tokens do not depend on the other rows of its batch or the cache row it lands in, and a
prompt run alone equals it run as the first prompt of a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.backends.base import Backend
from mixtrt.runtime.chat_format import ChatTokenizer, GenerationDefaults
from mixtrt.runtime.errors import BackendError, ConfigError, GuideError, NonFiniteLogitsError, RowError
from mixtrt.runtime.prompts import (
    Prompts,
    as_list,
    check_messages_text,
    check_text,
    is_token_id,
    normalize_prompts,
    outside_vocab,
)
from mixtrt.runtime.sampling import Sampler, log_softmax, top_k_logprobs
from mixtrt.runtime.tool_calls import ToolCall, ToolReply, ToolStream, ToolUse, calls_banned, chat_prompt, tool_use

if TYPE_CHECKING:
    from mixtrt.runtime.chat_session import ChatSession

FinishReason = Literal["eos", "stop", "length"]
STRUCTURED = ("json_schema", "grammar", "regex", "choice")  # GenerationConfig's structured-output fields


@dataclass(frozen=True)
class GenerationConfig:
    """transformers' GenerationConfig names. eos_token_id None = the model's eos ids (a Generator fills in the
    artifact's: generation_config.json's list, else config.json's); () = never stop on eos. prefill_chunk None =
    the backend's cache capacity. Greedy unless do_sample."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0  # eos cannot be chosen before this many new tokens (stop strings still stop)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: each token already generated loses this much logit (-2..2)
    frequency_penalty: float = 0.0  # OpenAI's: ... and this much per time it was generated (-2..2)
    # OpenAI's: added to the logits of these token ids before any choice ({id: bias} or pairs; -100..100)
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    return_logprobs: bool = False
    top_logprobs: int = 0  # with return_logprobs: also the k most likely tokens of each position
    prefill_chunk: int | None = None
    # structured output (runtime/structured.py), at most one of these, enforced token by token: the reply is JSON
    # that this JSON schema accepts (a mapping or its JSON text; {} or True: any JSON value; kept as canonical JSON
    # text),
    json_schema: str | None = None
    # or text of a grammar: Lark in llguidance's dialect (`%json {schema}` embeds a schema) or llama.cpp's GBNF
    # (kept as Lark text); a forced tool call is held to one,
    grammar: str | None = None
    # or text that this regular expression matches whole (Rust's regex syntax, as llguidance reads it),
    regex: str | None = None
    # or exactly one of these strings
    choice: tuple[str, ...] | None = None
    # transformers' suppress_tokens: these ids are never chosen (their scores -inf at every step, after logit_bias)
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Every field checked by type and range, so a bad value is one ConfigError naming it before any work."""

        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
            fix(name, int(value))

        def real(name: str) -> float:
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)) \
                    or not np.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            fix(name, float(value))
            return float(value)

        for name in ("do_sample", "return_logprobs"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
            fix(name, bool(getattr(self, name)))
        integer("max_new_tokens", 1)
        integer("min_new_tokens", 0)
        integer("top_k", 0)
        integer("top_logprobs", 0)
        if self.top_logprobs and not self.return_logprobs:
            raise ConfigError(f"top_logprobs={self.top_logprobs} needs return_logprobs=True (they come with the "
                              "logprobs)")
        if self.seed is not None:
            integer("seed", -2**63)  # a negative seed is its 64-bit two's-complement value (sampling.row_rng)
        if self.prefill_chunk is not None:
            integer("prefill_chunk", 1)
        temperature, top_p, penalty = real("temperature"), real("top_p"), real("repetition_penalty")
        if not 0 <= real("min_p") <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not temperature >= 0 or (self.do_sample and temperature == 0):
            raise ConfigError(f"temperature must be > 0 when do_sample=True (>= 0 otherwise), got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
        if not penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= real(name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2] (OpenAI's range), got {getattr(self, name)!r}")
        fix("logit_bias", _logit_bias(self.logit_bias))
        suppress = self.suppress_tokens
        if not isinstance(suppress, (list, tuple)) or not all(map(_is_token_id, suppress)):
            raise ConfigError(f"suppress_tokens must be token ids (integers >= 0), got {suppress!r}")
        fix("suppress_tokens", tuple(sorted({int(t) for t in suppress})))
        stops = self.stop_strings
        if isinstance(stops, str):
            stops = (stops,)
        if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
            raise ConfigError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        for i, stop in enumerate(stops):
            check_text(stop, f"stop_strings[{i}]")
        fix("stop_strings", tuple(stops))
        eos: Any = self.eos_token_id
        if eos is not None:
            many = isinstance(eos, (list, tuple, np.ndarray))
            ids = list(eos) if many else [eos]
            if not all(map(_is_token_id, ids)):
                raise ConfigError(f"eos_token_id must be a token id, a sequence of them or None, got {eos!r}")
            fix("eos_token_id", tuple(int(i) for i in ids) if many else int(ids[0]))
        given = [name for name in STRUCTURED if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)}: give one of them (each constrains the whole reply)")
        if given:
            from mixtrt.runtime.structured import check

            fix(given[0], check(given[0], getattr(self, given[0])))

    def constraint(self) -> tuple[str, str] | None:
        """The structured-output constraint as runtime/structured.py's Guide takes it: (field name, its text; a
        choice's as a JSON list), None without one."""
        for name in STRUCTURED:
            value = getattr(self, name)
            if value is not None:
                from mixtrt.runtime.structured import constraint_text

                return name, constraint_text(name, value)
        return None

    def eos_ids(self, args: ModelArgs) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return tuple(args.eos_token_ids)
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (int(self.eos_token_id),)

    def validate(self, args: ModelArgs) -> None:
        """The checks that need the model: eos, logit_bias and suppress_tokens ids inside the vocabulary, some id
        left unsuppressed; a json_schema row has an eos id to end its document with."""
        for message in (outside_vocab(self.eos_ids(args), args.vocab_size, "eos_token_id", shown=None),
                        outside_vocab((i for i, _ in self.logit_bias), args.vocab_size, "logit_bias token ids"),
                        outside_vocab(self.suppress_tokens, args.vocab_size, "suppress_tokens")):
            if message:
                raise ConfigError(message)
        if len(self.suppress_tokens) >= args.vocab_size:
            raise ConfigError(f"suppress_tokens holds every one of the {args.vocab_size} token ids: none is left to "
                              "choose")
        constraint = self.constraint()
        if constraint is not None and not self.eos_ids(args):
            raise ConfigError(f"{constraint[0]}: the reply ends with an eos id once its text is complete, and "
                              "eos_token_id=() (ignore_eos) leaves none")


def _is_token_id(value: Any) -> bool:
    """An integer >= 0 (numpy's too; not a bool): what eos_token_id, logit_bias and suppress_tokens take as an id."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and bool(value >= 0)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """GenerationConfig.logit_bias as sorted (token id, bias) pairs: from a mapping or pairs; ids integers >= 0
    (a string of digits too, as OpenAI's JSON keys are), biases finite in [-100, 100]."""
    if isinstance(value, dict):
        value = list(value.items())
    if not isinstance(value, (list, tuple)) or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in value):
        raise ConfigError(f"logit_bias must map token ids to biases, got {value!r}")
    out: dict[int, float] = {}
    for key, bias in value:
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not _is_token_id(token):
            raise ConfigError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        if not isinstance(bias, (int, float, np.integer, np.floating)) or isinstance(bias, (bool, np.bool_)) \
                or not -100 <= bias <= 100:
            raise ConfigError(f"logit_bias[{key!r}] must be a number in [-100, 100], got {bias!r}")
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


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
    # with top_logprobs k > 0: (token ids int64, logprobs float32), each [generated, k] / [prompt - 1, k],
    # most likely first
    top_logprobs: tuple[np.ndarray, np.ndarray] | None = None
    prompt_top_logprobs: tuple[np.ndarray, np.ndarray] | None = None
    # a chat reply with tools offered that called them (runtime/tool_calls.py): the calls, and `text` is then the
    # text before the first call (OpenAI's message content); None otherwise
    tool_calls: tuple[ToolCall, ...] | None = None
    # with a structured-output constraint: whether its text is complete where the reply ended (an eos ends only a
    # complete one; one cut by max_new_tokens or a stop string may be complete too: a --regex 'yes' after "yes");
    # None without one
    constraint_complete: bool | None = None


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


def dropped_front(text: str, shown: str) -> str:
    """What `text` has in front of `shown` where `shown` ends it ("" where it does not): what a fresh decode drops in
    front of a message's text (a sentencepiece word's dummy-prefix space)."""
    return text[:len(text) - len(shown)] if text.endswith(shown) else ""


class _Lead:
    """The front of a new message's text (a row added with continuation=False, or extended). Stop strings are
    matched on the text that continues the prompt, as transformers' stop criteria and vLLM see it (a first word
    keeps its space, so " te" stops "▁te" at once whether or not the text continues the prompt); the row's text
    is the decode of its generated ids alone, which leaves out what a fresh decoder drops in front (sentencepiece's
    dummy-prefix space). So the stop-filtered text is held until that fresh decode shows a character, and the
    characters the continuation has more in front are dropped from it."""

    def __init__(self, tokenizer: Any) -> None:
        self.fresh = tokenizer.stream()
        self.primed = ""  # the continuation's text until the fresh decode shows a character
        self.shown = ""  # the fresh decode's
        self.drop: int | None = None  # characters still to drop from the front, once known
        self.held = ""  # stop-filtered text waiting for `drop`
        self.front = ""  # what is dropped, once known (a first word's leading space)

    def see(self, token: int | None, piece: str) -> None:
        """Each token and the continuation text it added; token None: the end (piece: the decoder's flush)."""
        if self.drop is not None:
            return
        self.primed += piece
        self.shown += self.fresh.put(token) if token is not None else self.fresh.flush()
        if self.shown or token is None:
            # the two differ only in front; where they differ otherwise (a prompt that ends inside a character the
            # output completes), the continuation's text is kept whole
            self.front = dropped_front(self.primed, self.shown)
            self.drop = len(self.front)

    def emit(self, text: str) -> str:
        """The stop filter's output -> the row's text."""
        if self.drop is None:
            self.held += text
            return ""
        text, self.held = self.held + text, ""
        cut = min(self.drop, len(text))
        self.drop -= cut
        return text[cut:]


_ENGINES = itertools.count(1)  # Engine.serial: 0 is no engine's
_P = ParamSpec("_P")


def _step_part(part: Callable[Concatenate[Engine, _P], list[EngineEvent]]
               ) -> Callable[Concatenate[Engine, _P], list[EngineEvent]]:
    """A part of a step (admit, decode, mixed_step) that marks its engine broken if it is cut short by anything
    but a row's own failure (RowError: the engine cancelled that row and left the others consistent), and refuses
    to run on a broken engine. A KeyboardInterrupt between the backend's pass and the rows taking their tokens
    would otherwise leave every row's cache a position ahead of its tokens, and the next steps would run on
    silently."""
    @functools.wraps(part)
    def run(engine: Engine, *args: _P.args, **kwargs: _P.kwargs) -> list[EngineEvent]:
        engine._check_whole()
        engine.broken = "a step was cut short"
        try:
            events = part(engine, *args, **kwargs)
        except RowError:
            engine.broken = None
            raise
        except BaseException as e:
            engine.broken = f"a step was cut short by {type(e).__name__}"
            raise
        engine.broken = None
        return events
    return run


class TopLogprobs:
    """A row's top-k logprobs, one (ids, logprobs) pair of k per generated token, kept in two arrays that grow by
    doubling: 8 bytes a token per k (a list of numpy pairs, views of per-token arrays, held ~1 KiB a token for as
    long as the row lived: +27 MB over a 25,000-token stream with logprobs 5, measured). `top[t]` is token t's
    pair; the engine thread appends while a server's event loop reads earlier tokens' pairs (a growth copies the
    rows written before it swaps the arrays, so a reader holding either sees them)."""

    __slots__ = ("_ids", "_values", "_n")

    def __init__(self) -> None:
        self._ids: np.ndarray | None = None
        self._values: np.ndarray | None = None
        self._n = 0

    def append(self, ids: np.ndarray, values: np.ndarray) -> None:
        if self._ids is None or self._values is None:
            self._ids, self._values = np.empty((16, len(ids)), np.int32), np.empty((16, len(ids)), np.float32)
        elif self._n == len(self._ids):
            self._ids, self._values = (np.concatenate([a, np.empty_like(a)]) for a in (self._ids, self._values))
        self._ids[self._n], self._values[self._n] = ids, values
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= t < self._n or self._ids is None or self._values is None:
            raise IndexError(f"token {t} of {self._n}")
        return self._ids[t], self._values[t]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n, k], logprobs float32 [n, k]), copies."""
        if self._ids is None or self._values is None:
            raise ValueError("no top logprobs were kept")
        return self._ids[:self._n].astype(np.int64), self._values[:self._n].copy()


@dataclass(eq=False)
class Row:
    """One sequence in the Engine: its prompt, sampling state, generated tokens and timings."""

    id: int
    prompt: list[int]
    config: GenerationConfig
    sampler: Sampler
    decoder: Any  # tokenizer StreamDecoder, primed with the prompt: the text continuing it
    text: _StopText
    lead: _Lead | None  # a new message's front (None: the text continues the prompt's)
    keep: bool  # park the row (cache intact) when it finishes, for `Engine.extend`
    t0: float  # when the row was added (time to first token counts from here)
    name: str = "row"  # how errors name the row (Engine.add: "row N" unless told)
    history: list[int] = field(default_factory=list)  # earlier turns of a kept row (prompts and tokens)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    joined: int = 0  # pieces[:joined] are chunks of _JOIN_PIECES pieces joined
    prompt_logprobs: np.ndarray | None = None
    top: TopLogprobs = field(default_factory=TopLogprobs)  # with config.top_logprobs
    prompt_top: tuple[np.ndarray, np.ndarray] | None = None
    reason: FinishReason | None = None
    message: str = ""
    failure: str = ""  # why the engine cancelled the row (its structured output could not go on)
    t_prefill: float = 0.0  # time inside its prefill calls (not the other rows' steps between its chunks)
    t_admitted: float = 0.0  # when its prefill began (t_admitted - t0: the time it waited for a cache row)
    t_first: float = 0.0
    t_last: float = 0.0
    cached: int = 0  # tokens of `sequence` the cache holds (the last generated token is fed on the next step)
    released: bool = False
    prefill_from: int = 0  # `cached` when this turn's prefill started (prompt logprobs index from there)
    pending: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # this turn's tokens to prefill
    fork_of: Row | None = None  # another sample of the same prompt: start from that row's prefill (Engine.add)
    forked: bool = False  # it did (its prompt was not prefilled again)
    engine: int = 0  # the Engine that added it (Engine.serial): another engine's cancel / release / extend refuse it

    @property
    def queue_s(self) -> float:
        """How long it waited before its prefill began (for a cache row, behind other rows)."""
        return max(self.t_admitted - self.t0, 0.0)

    @property
    def sequence(self) -> list[int]:
        """Every token of the row so far: earlier turns, this turn's prompt, generated tokens."""
        return self.history + self.prompt + self.tokens

    @property
    def text_began(self) -> bool:
        """Whether the row's newest text piece is its first (its text began at its latest event: a first token's
        text may be held back, a new message's "▁" or a stop string's start)."""
        return self.joined == 0 and len(self.pieces) == 1

    @property
    def front(self) -> str:
        """What a new message's text leaves out in front of its tokens' text (a first word's leading space), once
        its first character is shown; "" for a continuation."""
        return self.lead.front if self.lead is not None else ""

    @property
    def new_message(self) -> bool:
        """Whether the row's text is a new message's (a fresh decode of its tokens) rather than its prompt's
        continuation."""
        return self.lead is not None


@dataclass(frozen=True)
class EngineEvent:
    """A new token of `row` and the text it completed (complete UTF-8, may be ""); `output` is set when the
    row finished with this token."""

    row: Row
    token: int
    text: str
    output: GenerationOutput | None = None


PRIME_TOKENS = 64  # the context a continuation's decoder is fed: enough for any decoder's state at the prompt's end


def primed_stream(tokenizer: Any, context: Sequence[int]) -> Any:
    """A stream decoder that has decoded the tail of `context` (its text dropped): what it returns next is the
    text the following ids add after the context's text. For sentencepiece, a "▁"-led first piece keeps its space
    after visible text (a fresh decoder drops it as the dummy prefix); an incomplete UTF-8 character at the end
    of the context completes in the following text.

        >>> from mixtrt.runtime.tokenizer import Tokenizer
        >>> tok = Tokenizer.load()
        >>> prompt, word = tok.encode("The cat sat", bos=True), tok.encode("basketball", bos=False)
        >>> tok.stream().put(word[0]), primed_stream(tok, prompt).put(word[0])
        ('basketball', ' basketball')
    """
    context = list(context)
    n = PRIME_TOKENS
    while True:  # a tail that shows no text (control ids only) says nothing of what came before it: a longer one
        stream = tokenizer.stream()
        if "".join(stream.put(token) for token in context[-n:]) or n >= len(context):
            break
        n *= 4
    if hasattr(stream, "mark_shown"):
        stream.mark_shown()  # the context's own text showed its incomplete end as U+FFFD already
    return stream


def check_prefill_budget(value: object, name: str = "prefill_budget") -> None:
    """An engine step's prefill budget: None (no limit) or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be None or an integer >= 1, got {value!r}")


class Engine:
    """Rows admitted, stepped and dropped at any time over one backend cache of `max_batch` rows.

        engine = Engine(backend, tokenizer, max_batch=8)
        row = engine.add([1, 415, 2936], GenerationConfig(max_new_tokens=16))
        while engine.busy:
            for event in engine.step():
                print(event.row.id, event.text, event.output)

    Cache rows: the running rows first (stepped together as rows [0, n)), then the parked (kept) rows.
    Not thread-safe: one thread drives an engine (Generator makes one per call).
    """

    def __init__(self, backend: Backend, tokenizer: Any, max_batch: int) -> None:
        if not is_token_id(max_batch) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = int(max_batch)
        self.cache = backend.new_cache(self.max_batch)
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []  # cache rows 0 .. len-1
        self.prefilling: Row | None = None  # a row part-way through its prefill: the cache row after the running ones
        self.parked: list[Row] = []  # cache rows after those
        self.prefilled = 0  # prompt tokens fed so far, all rows (a server's per-step prefill budget reads it)
        self.mixed_steps_run = 0  # steps whose prompt chunk ran in the decode pass (mixed_step)
        self.forked = 0  # rows started from another row's prefill (Engine.add's fork_of)
        self._ids = 0
        # why the engine cannot go on: a step was cut part-way (KeyboardInterrupt, a backend failure) after the
        # backend had advanced the cache and before the rows took their tokens; None while rows and cache agree
        self.broken: str | None = None
        self.serial = next(_ENGINES)  # tells this engine's rows from another's (Row.engine)
        self._limit = self.limit()  # the backend's limits do not change: computed once, not per token
        # the backend runs a prompt chunk in the decode step's pass (onnxruntime's mixed-step graph)
        self.mixed = bool(getattr(backend, "mixed_steps", False))

    # ---- admission -----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Rows are waiting, being prefilled or running (step() has work)."""
        return bool(self.waiting or self.running or self.prefilling is not None)

    def limit(self) -> tuple[int, str]:
        """The longest sequence (prompt + generated) a row can hold, and the message naming that limit."""
        b = self.backend
        window = getattr(b.args, "sliding_window", None)
        if not b.windowed and b.capacity <= b.max_positions:
            why = "the model has no sliding window" if not window else \
                f"the model's sliding window ({window}) is not shorter than the cache, so the cache does not roll"
            positions = getattr(b.args, "max_position_embeddings", None)
            size = "the model's max_position_embeddings" if b.capacity == positions else \
                f"the artifact's max context, set at export (--max-context); the model has {positions} positions"
            return b.capacity, f"cache full: {why}, and its cache holds {b.capacity} tokens ({size})"
        trained = getattr(b.args, "max_position_embeddings", b.max_positions)
        if b.max_positions < trained:
            return b.max_positions, (f"max positions: the artifact serves {b.max_positions} positions (max context "
                                     f"chosen at export; the model has {trained})")
        return b.max_positions, f"max positions: the model supports {b.max_positions} positions"

    def chunk(self, prefill_chunk: int | None) -> int:
        capacity = self.backend.capacity
        if prefill_chunk is not None and not 1 <= prefill_chunk <= capacity:
            raise ConfigError(f"prefill_chunk must be in [1, cache capacity {capacity}], got {prefill_chunk}")
        return prefill_chunk or capacity

    def add(self, prompt: list[int], config: GenerationConfig, *, sample_index: int = 0, keep: bool = False,
            t0: float | None = None, name: str | None = None, continuation: bool = False,
            fork_of: Row | None = None, score_only: bool = False) -> Row:
        """Queue a row for `prompt` (token ids); everything is checked now, before any work. The row is
        prefilled at the next step(). sample_index seeds its sampling with (config.seed, sample_index).

        fork_of: a row added just before with the same prompt and config (another sample of one request, as a
        server's n > 1): when that row's prefill ends and this one waits next with a cache row free, it starts
        from a copy of that row's cache row and its last prompt logits instead of a prefill of its own (the
        same numbers: the prompt's keys, values and logits do not depend on the sample). Otherwise it is
        prefilled as any row.

        continuation: the row's text continues the prompt's (prompt text + row text = the decode of prompt +
        generated ids, as a completions API returns it: a sentencepiece word's leading space is kept after the
        prompt's text); False: the row's text is the decode of its generated ids alone (a new message).

        score_only: the caller wants the prompt's logprobs and drops the token its prefill chooses (a server's
        echo without generation), so the prompt may fill every position the model holds.

        name: how errors name the row (default "row N", N its id)."""
        self._check_whole()
        name = f"row {self._ids}" if name is None else name
        _check_config(config, "add")
        if not is_token_id(sample_index) or sample_index < 0:
            raise ConfigError(f"sample_index must be an integer >= 0, got {sample_index!r}")
        for flag, value in (("keep", keep), ("continuation", continuation), ("score_only", score_only)):
            if not isinstance(value, bool):
                raise ConfigError(f"{flag} must be True or False, got {value!r}")
        if fork_of is not None:
            self._own(fork_of, "add's fork_of")
        config.validate(self.backend.args)
        self.chunk(config.prefill_chunk)
        self._check_ids(prompt, name)
        if len(prompt) == 0:
            raise ConfigError(f"{name} is empty: a row needs at least one prompt token")
        self._check_fits(len(prompt), name, room=0 if score_only else 1)
        if fork_of is not None and (fork_of.prompt != list(prompt) or fork_of.config is not config or fork_of.history
                                    or keep or fork_of.keep):
            raise ConfigError("fork_of must be a row of the same prompt and config (not a kept row)")
        row = Row(self._ids, list(prompt), config, self._sampler(config, sample_index, prompt, not continuation),
                  primed_stream(self.tokenizer, prompt), _StopText(config.stop_strings),
                  None if continuation else _Lead(self.tokenizer), keep,
                  time.perf_counter() if t0 is None else t0, name, fork_of=fork_of, engine=self.serial)
        self._ids += 1
        self.waiting.append(row)
        return row

    def extend(self, row: Row, ids: list[int], config: GenerationConfig, *, t0: float | None = None,
               keep: int | None = None) -> None:
        """Continue a finished kept row: feed `ids` after everything it holds, then generate by `config`.
        Its cache is reused, so only the new tokens (and its last generated token) are prefilled.

        keep: feed `ids` after the first `keep` tokens of the row's sequence instead (the rest is dropped from
        its cache: a rewind), where `can_rewind(row, keep)` says the cache still holds them as they were."""
        self._check_whole()
        self._own(row, "extend")
        _check_config(config, "extend")
        if row not in self.parked or row.released:
            raise ConfigError("extend needs a finished row added with keep=True that was not released")
        if row in self.waiting:  # extended and not stepped since: it would be queued twice
            raise ConfigError("extend: the row is already waiting to go on (extended and not stepped since)")
        self._check_ids(ids, "extend's ids")
        if len(ids) == 0:
            raise ConfigError("extend needs at least one new token")
        if keep is not None and not self.can_rewind(row, keep):
            raise ConfigError(f"extend: keep={keep!r} is not a prefix the row's cache holds as it was (1 to the "
                              f"{row.cached} tokens it holds, while its sliding window has dropped none)")
        config.validate(self.backend.args)
        self.chunk(config.prefill_chunk)
        base = row.sequence if keep is None else row.sequence[:keep]
        sequence = base + list(ids)
        self._check_fits(len(sequence), "the conversation")
        if keep is not None:  # positions [keep, cached) are written over as the new tokens go in
            row.cached = keep
            self.cache.lengths[self._slot(row)] = keep
        row.history, row.prompt, row.tokens = base, list(ids), []
        row.config, row.logprobs, row.pieces, row.joined, row.prompt_logprobs = config, [], [], 0, None
        row.top, row.prompt_top = TopLogprobs(), None
        row.reason, row.message = None, ""
        row.sampler = self._sampler(config, 0, sequence)
        row.decoder, row.text = primed_stream(self.tokenizer, sequence), _StopText(config.stop_strings)
        row.lead = _Lead(self.tokenizer)
        row.t0 = time.perf_counter() if t0 is None else t0
        self.waiting.append(row)

    def can_rewind(self, row: Row, keep: int) -> bool:
        """Whether `extend(row, ids, keep=keep)` may drop all but the first `keep` tokens of a parked row's cache:
        0 < keep <= the tokens it holds, and it never held more than the cache's rows, so every backend still has
        positions 0..keep-1 in rows 0..keep-1 (a linear cache always; a windowed one until its first eviction,
        after which a ring has written over old positions and onnxruntime's compacted them)."""
        return (isinstance(keep, int) and not isinstance(keep, bool) and row in self.parked and not row.released
                and 0 < keep <= row.cached <= self.backend.capacity)

    def cancel(self, row: Row) -> None:
        """Stop a waiting or running row now (no output event) and free its cache row (kept rows too)."""
        self._own(row, "cancel")
        if row in self.waiting:
            self.waiting.remove(row)
        row.keep = False
        if row.reason is None:
            row.reason, row.message = "length", "cancelled"
        self.release(row)

    def release(self, row: Row) -> None:
        """Free a finished kept row's cache row (it can no longer be extended)."""
        self._own(row, "release")
        if row.reason is None:
            raise ConfigError(f"release: {row.name} has not finished (release frees a finished kept row's cache; "
                              "cancel stops a row)")
        row.released = True
        if row in self.parked or row in self.running or row is self.prefilling:
            self._compact(drop={row.id})

    def _own(self, row: Row, what: str) -> None:
        """A row this engine added (another engine's row would have its state changed under that engine)."""
        if not isinstance(row, Row):
            raise ConfigError(f"{what} takes a Row (what Engine.add returned), got {type(row).__name__}")
        if row.engine != self.serial:
            raise ConfigError(f"{what}: {row.name} was added to another Engine (each engine owns its rows and cache)")

    def _check_ids(self, ids: Any, name: str) -> None:
        """Token ids: a sequence of integers inside the vocabulary (a wrong one fails the backend's step for every
        row beside it, not only its own)."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence | np.ndarray) or np.ndim(ids) != 1:
            raise ConfigError(f"{name} must be token ids (a list of integers; encode text with the tokenizer "
                              f"first), got {type(ids).__name__}")
        if not all(is_token_id(t) for t in ids):
            raise ConfigError(f"{name} must be integer token ids, got {[t for t in ids][:8]!r}")
        problem = outside_vocab(ids, self.backend.args.vocab_size, f"{name}: token ids")
        if problem:
            raise ConfigError(problem)

    def _check_fits(self, n: int, name: str, room: int = 1) -> None:
        """n tokens and `room` new ones fit the longest sequence a row holds."""
        limit, why = self.limit()
        if n > limit:
            raise ConfigError(f"{name} has {n} tokens, more than the {limit} a row holds: {why}")
        if n + room > limit:
            raise ConfigError(f"{name} has {n} tokens, which leaves no room for a new token: {why}")

    def _sampler(self, cfg: GenerationConfig, index: int, seen: Sequence[int], new_message: bool = True) -> Sampler:
        args = self.backend.args
        return Sampler(args.vocab_size, do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k,
                       top_p=cfg.top_p, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
                       row=index, prompt_ids=seen, min_new_tokens=cfg.min_new_tokens, eos_ids=cfg.eos_ids(args),
                       presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty,
                       logit_bias=dict(cfg.logit_bias), suppress=cfg.suppress_tokens,
                       guide=self._guide(cfg, new_message))

    def _guide(self, cfg: GenerationConfig, new_message: bool) -> Any:
        """A row's structured-output constraint (runtime/structured.py Guide), None without one."""
        constraint = cfg.constraint()
        if constraint is None:
            return None
        from mixtrt.runtime.structured import Guide

        args = self.backend.args
        return Guide(self.tokenizer, constraint, cfg.eos_ids(args), args.vocab_size, new_message)

    # ---- the loop ------------------------------------------------------------------------------------
    def step(self, prefill_budget: int | None = None) -> list[EngineEvent]:
        """Admit waiting rows (prefill), then one decode step of every running row; the events of this step.

        prefill_budget: while rows decode, prefill at most this many prompt tokens in this step (a longer
        prompt goes on at the next steps, its row not yet decoding), so a decoding row waits for at most one
        budget of prefill per step; with nothing decoding, prompts are prefilled whole. None: no limit.

        A row whose logits are not finite (NaN / inf: broken weights or config, fp16 overflow) is cancelled
        and the step raises NonFiniteLogitsError naming it, with the other rows' events of this step in
        `error.events`; those rows go on at the next step. No token is ever chosen from such logits. A row whose
        structured output cannot go on is cancelled the same way (RowError).
        """
        events: list[EngineEvent] = []
        try:
            for part in self.parts(prefill_budget):
                events += part()
        except RowError as e:
            raise type(e)(str(e), events + e.events, e.rows) from None
        return events

    def parts(self, prefill_budget: int | None = None) -> Iterator[Callable[[], list[EngineEvent]]]:
        """step() in parts, to be called in order: prefills touching one row each, then the decode step. A
        server hands each part's events out at once (a new row's first token does not wait for the decode
        step or the other rows' prefills)."""
        check_prefill_budget(prefill_budget)
        self._check_whole()
        if self.waiting and not self.running and self.prefilling is None and not self._admissible():
            raise ConfigError(f"all {self.max_batch} cache rows hold kept rows (keep=True) and {len(self.waiting)} "
                              "row(s) wait for one: release one (Engine.release), or the wait never ends")
        if self.running and prefill_budget is not None and self.mixed and self._admissible():
            yield functools.partial(self.mixed_step, prefill_budget)
            return
        spent = 0
        decoding = bool(self.running)  # with nothing decoding, this step's prompts go in whole
        while self._admissible():
            left = None
            if decoding and prefill_budget is not None:
                if spent >= prefill_budget:
                    break
                left = prefill_budget - spent
            before = self.prefilled
            yield functools.partial(self.admit, max_rows=1, budget=left)
            if self.prefilled == before:  # the row failed (cancelled): go on with the others next step
                break
            spent += self.prefilled - before
        yield self.decode

    def _check_whole(self) -> None:
        if self.broken is not None:
            raise BackendError(f"this Engine cannot go on: {self.broken}, so its cache no longer matches its rows; "
                               "start a new Engine")

    def _admissible(self) -> bool:
        """A row is part-way through its prefill, or one waits and a cache row is free for it."""
        if self.prefilling is not None:
            return True
        return bool(self.waiting) and (len(self.running) + len(self.parked) - (self.waiting[0] in self.parked)
                                       < self.max_batch)

    @_step_part
    def admit(self, max_rows: int | None = None, budget: int | None = None) -> list[EngineEvent]:
        """The first half of step(): prefill rows while cache rows are free: first the row part-way through
        its prefill, then waiting rows (at most max_rows rows touched), feeding at most `budget` prompt tokens
        in all (None: no limit). A row whose prompt is done gets its first token and joins the running rows;
        one cut off by the budget stays `prefilling` (its cache row held, not decoding) and goes on at the
        next admit."""
        events: list[EngineEvent] = []
        touched = 0
        while self._admissible() and (max_rows is None or touched < max_rows) and (budget is None or budget > 0):
            row = self.prefilling
            if row is None:
                row = self.waiting.popleft()
                self._admit(row)
            touched += 1
            fed = row.cached
            try:
                done = self._prefill_row(row, budget)
            except NonFiniteLogitsError as e:
                self.cancel(row)
                raise NonFiniteLogitsError(str(e), events) from None
            if budget is not None:
                budget -= row.cached - fed
            if done is not None:
                self.prefilling = None
                self.running.append(row)  # its cache row is already the one after the running rows
                events += self._accept(row, done)
                events += self._forks(row, done)
                self._failed(events)
        self._compact()
        return events

    def _failed(self, events: list[EngineEvent], problem: str = "") -> None:
        """Cancel the running rows whose structured output could not go on (`Row.failure`) and raise RowError
        naming them (with `problem`, the step's other rows' failure, and `events`); nothing when none failed."""
        failed = [row for row in self.running if row.failure]
        for row in failed:
            self.cancel(row)
        if failed:
            self._compact()
        own = {row.id: f"{row.name}: {row.failure}" for row in failed}
        named = "; ".join([problem] * bool(problem) + list(own.values()))
        if named:
            raise (NonFiniteLogitsError if problem else RowError)(named, events, own)

    def _forks(self, row: Row, logits: np.ndarray) -> list[EngineEvent]:
        """`row` just finished its prefill (running, its first token chosen): the rows waiting next that are
        forks of it (Engine.add) start now, while cache rows are free, each from a copy of its cache row and
        its last prompt logits, each sampling its own first token."""
        events: list[EngineEvent] = []
        while self.waiting and self.waiting[0].fork_of is row and self._admissible():
            fork = self.waiting.popleft()
            self._admit(fork)  # the cache row after the running ones, emptied
            slot, held = len(self.running), len(self.running) + 1 + len(self.parked)
            order = list(range(held))
            order[slot] = self.running.index(row)
            self.backend.move_rows(self.cache, order)  # a copy of row's cache row (its prompt, nothing generated)
            fork.cached, fork.t_prefill = row.cached, row.t_prefill
            if row.prompt_logprobs is not None and fork.prompt_logprobs is not None:
                fork.prompt_logprobs[:] = row.prompt_logprobs
            if row.prompt_top is not None and fork.prompt_top is not None:
                fork.prompt_top[0][:], fork.prompt_top[1][:] = row.prompt_top
            self.prefilling = None
            self.running.append(fork)
            fork.forked = True
            self.forked += 1
            events += self._accept(fork, logits)
        return events

    @_step_part
    def decode(self) -> list[EngineEvent]:
        """The second half of step(): one decode step of every running row."""
        if not self.running:
            return []
        ids = np.array([[row.tokens[-1]] for row in self.running], np.int64)  # [b, 1]
        events, bad = self._decoded(self.backend.step(self.cache, ids)[:, 0])  # logits [b, 1, V]
        self._failed(events, f"{bad}: {_NON_FINITE}" if bad else "")
        return events

    def _decoded(self, logits: np.ndarray) -> tuple[list[EngineEvent], str]:
        """The running rows' next tokens from a decode pass's logits [b, V]: their events, and the rows whose
        logits were not finite (cancelled), named ("" if none)."""
        events: list[EngineEvent] = []
        finite = np.isfinite(logits).all(axis=-1)
        bad = [row for i, row in enumerate(self.running) if not finite[i]]
        plain = [row.sampler.argmax_only for row in self.running]
        # the greedy rows' tokens in one call, on the float32 scores a sampler chooses from
        best = np.asarray(logits, np.float32).argmax(axis=-1).tolist() if any(plain) else None
        for i, row in enumerate(self.running):
            row.cached += 1
            if finite[i]:
                events += self._accept(row, logits[i], best[i] if best is not None and plain[i] else None)
        for row in bad:
            self.cancel(row)
        self._compact()
        return events, ", ".join(f"{r.name} (generated token {len(r.tokens) + 1}, position {r.cached - 1})"
                                 for r in bad)

    @_step_part
    def mixed_step(self, budget: int) -> list[EngineEvent]:
        """step() in one backend pass (a backend with `step_mixed`): every running row's next token together
        with the next chunk (at most `budget` tokens, and the row's prefill_chunk) of the prefilling row, or
        else of the first waiting row, which is admitted. A row whose prompt this finishes gets its first token
        and joins the running rows. The tokens and logits are those of a decode step and a prefill chunk run
        apart (the backend's batch-invariance contract)."""
        check_prefill_budget(budget, "budget")
        row = self.prefilling
        if row is None:
            row = self.waiting.popleft()
            self._admit(row)
        cfg, tokens = row.config, row.pending
        start = row.cached - row.prefill_from
        n = min(self.chunk(cfg.prefill_chunk), budget, len(tokens) - start)
        ids = np.array([r.tokens[-1] for r in self.running], np.int64)
        began = time.perf_counter()
        step_mixed = self.backend.step_mixed  # type: ignore[attr-defined]  # the optional part of Backend
        logits, chunk = step_mixed(self.cache, ids, tokens[start:start + n], last_only=row.prompt_logprobs is None)
        row.t_prefill += time.perf_counter() - began
        self.mixed_steps_run += 1
        events, bad = self._decoded(logits)
        try:
            self._fed(chunk, tokens, start, n, row.prompt_logprobs, row.prompt_top, name=row.name,
                      first=row.prefill_from)
        except NonFiniteLogitsError as e:
            self.cancel(row)  # and the decoding rows whose guide failed in this pass
            self._failed(events, "; ".join([f"{bad}: {_NON_FINITE}"] * bool(bad) + [str(e)]))
        row.cached += n
        self.prefilled += n
        if start + n == len(tokens):
            self.prefilling = None
            self.running.append(row)  # its cache row is already the one after the running rows
            events += self._accept(row, chunk[-1])
            events += self._forks(row, chunk[-1])
            self._compact()
        self._failed(events, f"{bad}: {_NON_FINITE}" if bad else "")
        return events

    def _admit(self, row: Row) -> None:
        """Make `row` the prefilling row, in the cache row right after the running ones (moving parked rows
        back), its prompt (what the cache does not hold yet) pending."""
        slot = len(self.running)
        parked = [r for r in self.parked if r is not row]
        order = list(range(slot)) + [self._slot(row) if row in self.parked else -1] + [self._slot(r) for r in parked]
        # the slot may still hold a row that finished when nothing else was running (see _compact)
        if parked or row in self.parked or self.cache.lengths[slot:].any():
            self.backend.move_rows(self.cache, order)
        self.parked = parked
        self.prefilling = row
        cfg, pending = row.config, row.sequence[row.cached:]
        row.prefill_from, row.pending, row.t_prefill = row.cached, np.asarray(pending, np.int64), 0.0
        row.t_admitted = time.perf_counter()
        # (top_k_logprobs gives at most the vocabulary: a larger top_logprobs means all of it)
        k = min(cfg.top_logprobs, self.backend.args.vocab_size) if cfg.return_logprobs else 0
        row.prompt_logprobs = np.empty(len(pending) - 1, np.float32) if cfg.return_logprobs else None
        row.prompt_top = (np.empty((len(pending) - 1, k), np.int64),
                          np.empty((len(pending) - 1, k), np.float32)) if k else None

    def _prefill_row(self, row: Row, budget: int | None) -> np.ndarray | None:
        """Feed the prefilling row's next prompt tokens (at most `budget`; None: all), in chunks of at most
        its config's prefill_chunk; the last prompt position's logits [V] once the prompt is done, else None."""
        slot = len(self.running)  # the prefilling row's cache row
        tokens, chunk = row.pending, self.chunk(row.config.prefill_chunk)
        start = row.cached - row.prefill_from
        end = len(tokens) if budget is None else min(len(tokens), start + budget)
        began = time.perf_counter()
        logits = None
        try:
            while start < end:
                n = min(chunk, end - start)
                logits = self._feed(slot, tokens, start, n, row.config, row.prompt_logprobs, row.prompt_top,
                                    name=row.name, first=row.prefill_from)
                start += n
                row.cached += n
                self.prefilled += n
        finally:
            row.t_prefill += time.perf_counter() - began
        return logits[-1] if logits is not None and start == len(tokens) else None

    def _slot(self, row: Row) -> int:
        if row in self.running:
            return self.running.index(row)
        if row is self.prefilling:
            return len(self.running)
        return len(self.running) + (self.prefilling is not None) + self.parked.index(row)

    def _compact(self, drop: frozenset[int] | set[int] = frozenset()) -> None:
        """Keep unfinished rows running at the front (the fewest rows moved: the running order may change), then
        the prefilling row, park finished kept rows behind them, free the rest.

        When nothing is left running, prefilling or parked, the finished rows stay in the cache as they are
        (no copy): `_admit` empties a slot before reusing it.
        """
        if not drop and not self.parked and all(r.reason is None for r in self.running):
            return  # the common step: every row goes on where it is (the order below would be unchanged)
        active = [r for r in self.running if r.reason is None and r.id not in drop]
        # running rows already inside the new running range stay in their cache rows; the others fill the holes
        # (a row finishing among 16 moves one row, not every row after it: a cache row is MBs of keys and values)
        slot = {r.id: i for i, r in enumerate(self.running)}
        placed: list[Row | None] = [None] * len(active)
        for r in active:
            if slot[r.id] < len(active):
                placed[slot[r.id]] = r
        movers = iter(r for r in active if slot[r.id] >= len(active))
        active = [r if r is not None else next(movers) for r in placed]
        prefilling = self.prefilling if self.prefilling is not None and self.prefilling.id not in drop else None
        parked = [r for r in self.parked if r.id not in drop and not r.released]
        parked += [r for r in self.running if r.reason is not None and r.keep and not r.released and r.id not in drop]
        order = [self._slot(r) for r in active + ([prefilling] if prefilling else []) + parked]
        held = len(self.running) + (self.prefilling is not None) + len(self.parked)
        if order and (order != list(range(len(order))) or len(order) < held):
            self.backend.move_rows(self.cache, order)
        self.running, self.prefilling, self.parked = active, prefilling, parked

    def prefill(self, slot: int, ids: list[int], cfg: GenerationConfig, *, name: str = "the sequence",
                first: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """Feed ids to cache row `slot` in chunks; return the last position's logits [V] and, with
        return_logprobs, log p(ids[t] | ids[:t]) for t >= 1 [len(ids) - 1]. Non-finite logits raise
        NonFiniteLogitsError naming `name` and the positions (ids[0] sits at position `first`)."""
        tokens = np.asarray(ids, np.int64)
        chunk = self.chunk(cfg.prefill_chunk)
        logprobs = np.empty(len(ids) - 1, np.float32) if cfg.return_logprobs else None
        for start in range(0, len(ids), chunk):
            logits = self._feed(slot, tokens, start, min(chunk, len(ids) - start), cfg, logprobs, None,
                                name=name, first=first)
        return logits[-1], logprobs

    def _feed(self, slot: int, tokens: np.ndarray, start: int, n: int, cfg: GenerationConfig,
              logprobs: np.ndarray | None, top: tuple[np.ndarray, np.ndarray] | None, *, name: str,
              first: int) -> np.ndarray:
        """One backend call feeding tokens[start:start + n] to cache row `slot`; its logits ([n, V] with
        `logprobs`, else [1, V]). With `logprobs` (and `top`), fills in log p(tokens[t] | tokens[:t]) (and the
        k most likely tokens) for the positions t - 1 of this call that have a next token in `tokens`."""
        piece = tokens[start:start + n]
        # [S, V] when the prompt's logprobs are wanted, else [1, V]: the lm_head runs on the last token only
        logits = self.backend.step(self.cache, piece[None, :], start_row=slot, last_only=logprobs is None)[0]
        self._fed(logits, tokens, start, n, logprobs, top, name=name, first=first)
        return logits

    def _fed(self, logits: np.ndarray, tokens: np.ndarray, start: int, n: int, logprobs: np.ndarray | None,
             top: tuple[np.ndarray, np.ndarray] | None, *, name: str, first: int) -> None:
        """After tokens[start:start + n] were fed: refuse non-finite logits, and fill in the logprobs (_feed)."""
        if not np.isfinite(logits).all():
            raise NonFiniteLogitsError(f"{name} (prefill of positions {first + start}-"
                                       f"{first + start + n - 1}): {_NON_FINITE}")
        if logprobs is not None:
            targets = tokens[start + 1:start + 1 + n]  # the next token of each position
            lp = log_softmax(logits[: len(targets)])
            logprobs[start:start + len(targets)] = lp[np.arange(len(targets)), targets]
            if top is not None:
                k = top[0].shape[1]
                top[0][start:start + len(targets)], top[1][start:start + len(targets)] = top_k_logprobs(lp, k)

    def _accept(self, row: Row, logits: np.ndarray, argmax: int | None = None) -> list[EngineEvent]:
        """Choose row's next token from its raw logits [V] and apply the finish rules. argmax: their argmax,
        given where the row's sampler is `argmax_only` (taken for the whole batch at once)."""
        cfg = row.config
        try:
            token = row.sampler(logits) if argmax is None else row.sampler.took(argmax)
        except GuideError as e:  # cancelled by the step's caller (_failed), the other rows going on
            row.failure = str(e)
            return []
        row.t_last = time.perf_counter()
        if not row.tokens:
            row.t_first = row.t_last
        row.tokens.append(token)
        if cfg.return_logprobs:
            lp = log_softmax(logits)
            row.logprobs.append(float(lp[token]))
            if cfg.top_logprobs:
                ids, values = top_k_logprobs(lp[None], cfg.top_logprobs)
                row.top.append(ids[0], values[0])
        if token in row.sampler.eos_ids:
            row.reason, row.message = "eos", f"end-of-sequence token {token}"
        text = ""
        if row.reason is None:
            piece = row.decoder.put(token)
            if row.lead is not None:
                row.lead.see(token, piece)
            text = row.text.feed(piece)
        limit, why = self._limit
        if row.reason is None and len(row.tokens) >= cfg.max_new_tokens:
            row.reason, row.message = "length", f"max_new_tokens={cfg.max_new_tokens} reached"
        if row.reason is None and len(row.history) + len(row.prompt) + len(row.tokens) >= limit:
            row.reason, row.message = "length", why
        if row.text.stop is None and row.reason is not None:
            piece = row.decoder.flush()
            if row.lead is not None:
                row.lead.see(None, piece)
            text += row.text.feed(piece)
            text += row.text.finish()
        if row.text.stop is not None:
            row.reason, row.message = "stop", f"stop string {row.text.stop!r}"
        if row.lead is not None:
            if row.reason is not None:  # settled now (a stop string before the fresh decode showed anything)
                row.lead.see(None, "")
            text = row.lead.emit(text)
        if text:
            row.pieces.append(text)
            if len(row.pieces) - row.joined >= _JOIN_PIECES:  # a long generation's text kept as few strings
                row.pieces[row.joined:] = ["".join(row.pieces[row.joined:])]
                row.joined += 1
        return [EngineEvent(row, token, text, _output(row) if row.reason is not None else None)]


# a row's newest text pieces are joined into one string every this many (a piece is a ~60-byte str object: 100k
# tokens kept one per token held ~6 MB where their text is ~0.5 MB); each piece is copied once, into its chunk
_JOIN_PIECES = 256

_NON_FINITE = ("the model produced NaN or infinite logits; its weights or config are broken, or (an fp16 artifact) "
               "fp16 overflowed: export with --precision fp32")


def _output(row: Row) -> GenerationOutput:
    n = len(row.tokens)
    decode_s = row.t_last - row.t_first
    stats = GenerationStats(
        prompt_tokens=len(row.prompt),
        generated_tokens=n,
        time_to_first_token_s=row.t_first - row.t0,
        prefill_tokens_per_s=len(row.prompt) / row.t_prefill if row.t_prefill > 0 else None,
        decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
    )
    assert row.reason is not None
    return GenerationOutput(
        token_ids=list(row.tokens), text="".join(row.pieces), finish_reason=row.reason,
        finish_message=row.message, stats=stats,
        logprobs=np.array(row.logprobs, np.float32) if row.config.return_logprobs else None,
        prompt_logprobs=row.prompt_logprobs,
        top_logprobs=row.top.arrays() if row.top else None,
        prompt_top_logprobs=row.prompt_top,
        constraint_complete=None if row.sampler.guide is None else row.sampler.guide.complete(),
    )


class Generator:
    """Generation on a Backend with a tokenizer: generate, stream, chat (each call runs its own Engine).

    Generation defaults: a call without a `config` starts from the artifact's (`defaults`, what the
    checkpoint's generation_config.json sets; mixtrt's GenerationConfig defaults for the rest) and applies
    the keyword overrides; a `config` given is used as it is. Either way eos_token_id None means the
    artifact's eos ids. `gen.config(**overrides)` is the artifact's defaults with overrides, checked.

    Thread safety: one Generator may be shared by threads. Each call owns its engine and cache, and the
    backend serialises steps, so concurrent calls give exactly the outputs of the same calls made one
    after another.
    """

    def __init__(self, backend: Backend, tokenizer: ChatTokenizer, defaults: GenerationDefaults | None = None
                 ) -> None:
        self.backend = backend
        self.tokenizer: ChatTokenizer = tokenizer
        self.defaults = defaults or GenerationDefaults()

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", threads: int | None = None,
             verify: bool = True, mixed_steps: bool = False) -> Generator:
        """The artifact's backend, tokenizer and generation defaults, as its manifest records them
        (`chat`). verify: check file hashes against the manifest (sizes always). mixed_steps: a backend that
        can (onnxruntime) runs a prompt chunk in the decode step's pass (what a server's Engine steps use;
        `Engine.mixed_step`); the others ignore it."""
        from mixtrt.runtime.backends import load_backend
        from mixtrt.runtime.chat_format import load_chat_tokenizer
        from mixtrt.runtime.manifest import Manifest

        engine = load_backend(backend, artifact_dir, threads=threads, verify=verify, head="causal_lm",
                              **({"mixed_steps": True} if mixed_steps else {}))
        chat = Manifest.read(artifact_dir).chat  # the files were checked by load_backend
        tokenizer = load_chat_tokenizer(artifact_dir, chat, engine.args.vocab_size)
        return cls(engine, tokenizer, chat.generation)

    def __reduce__(self) -> Any:
        raise ConfigError("a Generator cannot be pickled or copied (it holds an onnxruntime session and the "
                          "artifact's memory maps): load the artifact in the other process with Generator.load(path) "
                          "(a process forked from this one may use this Generator)")

    def config(self, config: GenerationConfig | None = None, /, **overrides: Any) -> GenerationConfig:
        """The config a call with these arguments runs: `config`, else the artifact's generation defaults,
        with `overrides` (GenerationConfig names) and the artifact's eos ids for eos_token_id None; checked. A
        structured-output constraint among the overrides replaces the config's."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise ConfigError(f"config must be a GenerationConfig or None, got {type(config).__name__} (options go as "
                              "keyword arguments: generate(prompt, max_new_tokens=32))")
        names = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown generation options {unknown}; known: {sorted(names)}")
        if config is not None and any(overrides.get(name) is not None for name in STRUCTURED):
            # a constraint given for the call replaces the config's (a session's, say): not two at once
            overrides = {**{name: None for name in STRUCTURED}, **overrides}
        if config is None:
            cfg = GenerationConfig(**{**self.defaults.config_kwargs(), **overrides})
        else:
            cfg = dataclasses.replace(config, **overrides) if overrides else config
        if cfg.eos_token_id is None and self.defaults.eos_token_ids is not None:
            cfg = dataclasses.replace(cfg, eos_token_id=self.defaults.eos_token_ids)
        cfg.validate(self.backend.args)
        return cfg

    # ---- public API --------------------------------------------------------------------------------
    def generate(self, prompts: Prompts, config: GenerationConfig | None = None, *, continuation: bool = False,
                 **overrides: Any) -> list[GenerationOutput]:
        """One output per prompt, in order. prompts: a str, a list of str, one token-id list, or a list of them.
        An output's text is the decode of its generated ids; continuation=True: the text that continues the
        prompt's (prompt text + output text = the decode of prompt + generated ids: a first word keeps its
        leading space), as a completions API returns it (Engine.add)."""
        engine, rows = self._engine(prompts, self.config(config, **overrides), continuation)
        outputs: dict[int, GenerationOutput] = {}
        while engine.busy:
            for event in engine.step():
                if event.output is not None:
                    outputs[event.row.id] = event.output
        return [outputs[row.id] for row in rows]

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, *,
               continuation: bool = False, **overrides: Any) -> Iterator[StreamEvent]:
        """Events as tokens are produced; the texts concatenate to the final text; the last event has .output.
        Everything is checked at the call (not at the first iteration). continuation: as in generate."""
        engine, rows = self._engine(prompt, self.config(config, **overrides), continuation)
        if len(rows) != 1:
            raise ConfigError(f"stream takes one prompt, got {len(rows)}")
        return _stream(engine)

    def chat(self, messages: Sequence[dict[str, Any]], config: GenerationConfig | None = None, *,
             tools: Sequence[dict[str, Any]] | None = None, tool_choice: str | dict[str, Any] | None = None,
             parallel_tool_calls: bool = True, **overrides: Any) -> GenerationOutput:
        """The assistant's next answer to `messages` ([{"role": "user", "content": ...}, ...]). tools: OpenAI's
        function list, shown to the model by its chat format; a reply that calls them has `tool_calls` (and
        `text` is what it wrote before the calls). tool_choice: OpenAI's ("auto", "none", "required", or
        {"type": "function", "function": {"name": ...}}; runtime/tool_calls.py `tool_use`);
        parallel_tool_calls=False keeps a reply's first call."""
        ids, use = self._chat_ids(messages, tools, tool_choice, parallel_tool_calls)
        out = self.generate([ids], self._chat_config(config, overrides, use, tools, tool_choice))[0]
        return _with_calls(out, use.reply(out, self.tokenizer), use, self.tokenizer) if use is not None else out

    def stream_chat(self, messages: Sequence[dict[str, Any]], config: GenerationConfig | None = None, *,
                    tools: Sequence[dict[str, Any]] | None = None, tool_choice: str | dict[str, Any] | None = None,
                    parallel_tool_calls: bool = True, **overrides: Any) -> Iterator[StreamEvent]:
        """As stream, for chat; with tools, the text from a reply's first call on is held back (it is the call),
        and the last event's output has the calls (or, if they do not parse, the held text comes with it)."""
        ids, use = self._chat_ids(messages, tools, tool_choice, parallel_tool_calls)
        events = self.stream(ids, self._chat_config(config, overrides, use, tools, tool_choice))
        return events if use is None else _calls_held(events, self.tokenizer, use)

    def chat_session(self, system: str | None = None, config: GenerationConfig | None = None) -> ChatSession:
        """A multi-turn chat that keeps its KV cache between turns (runtime/chat_session.py); `config` is
        its turns' default (else the artifact's defaults)."""
        from mixtrt.runtime.chat_session import ChatSession

        return ChatSession(self, system, config)

    def teacher_forced_logprobs(self, token_ids: Sequence[int], prefill_chunk: int | None = None) -> np.ndarray:
        """[T - 1] float32: log p(token_ids[t] | token_ids[:t]) for t >= 1, the whole sequence fed in chunks."""
        from mixtrt.runtime.scoring import teacher_forced_logprobs

        [ids] = normalize_prompts([_scored_ids(token_ids)], self.tokenizer, self.backend.args.vocab_size,
                                  name="token_ids")
        return teacher_forced_logprobs(self.backend, ids, prefill_chunk)

    def perplexity(self, token_ids: Sequence[int], window: int | None = None) -> float:
        """exp(-mean log p) of token_ids[1:]. window: score non-overlapping segments of `window` tokens, each
        from an empty cache (its first token is context only); None = the whole sequence in one pass."""
        from mixtrt.runtime.scoring import perplexity

        [ids] = normalize_prompts([_scored_ids(token_ids)], self.tokenizer, self.backend.args.vocab_size,
                                  name="token_ids")
        return perplexity(self.backend, ids, window)

    # ---- helpers -----------------------------------------------------------------------------------
    def _engine(self, prompts: Prompts, cfg: GenerationConfig, continuation: bool = False
                ) -> tuple[Engine, list[Row]]:
        ids = normalize_prompts(prompts, self.tokenizer, self.backend.args.vocab_size)
        cfg.validate(self.backend.args)
        engine = Engine(self.backend, self.tokenizer, max_batch=len(ids))
        t0 = time.perf_counter()
        return engine, [engine.add(p, cfg, sample_index=i, t0=t0, name=f"prompt {i}", continuation=continuation)
                        for i, p in enumerate(ids)]

    def _chat_ids(self, messages: Sequence[dict[str, Any]], tools: Any = None, tool_choice: Any = None,
                  parallel: bool = True) -> tuple[list[int], ToolUse | None]:
        """The prompt's ids (a forced call's start included), and how the reply is read (None without tools)."""
        check_messages_text(messages)  # a list (a str would be read as one message per character)
        if not messages:
            raise ConfigError("chat needs at least one message")
        if not isinstance(parallel, bool):
            raise ConfigError(f"parallel_tool_calls must be True or False, got {parallel!r}")
        offered, use = tool_use(self.tokenizer, tools, tool_choice, parallel)
        return chat_prompt(self.tokenizer, list(messages), offered, use, tool_choice, add_generation_prompt=True), use

    def _chat_config(self, config: GenerationConfig | None, overrides: dict[str, Any], use: ToolUse | None,
                     tools: Any, tool_choice: Any) -> GenerationConfig:
        """A chat call's config: a forced call's grammar (_forced_plain); under tool_choice "none" the call token
        suppressed (tool_calls.calls_banned), whatever logit_bias the caller gives it."""
        cfg = _forced_plain(self.config(config, **overrides), use, tool_choice)
        return calls_suppressed(cfg, self.tokenizer, tools, tool_choice)


def calls_suppressed(cfg: GenerationConfig, tokenizer: Any, tools: Any, tool_choice: Any) -> GenerationConfig:
    """cfg, and under tool_choice "none" the call token among its suppress_tokens (tool_calls.calls_banned) beside
    its own: a reply that shows the tools cannot call them (Generator.chat and the server)."""
    ban = calls_banned(tokenizer, tools, tool_choice)
    return dataclasses.replace(cfg, suppress_tokens=(*cfg.suppress_tokens, *ban)) if ban else cfg


def _check_config(config: Any, what: str) -> None:
    if not isinstance(config, GenerationConfig):
        raise ConfigError(f"{what} takes a GenerationConfig, got {type(config).__name__}")


def _scored_ids(token_ids: Any) -> list[Any]:
    """The ids a scoring call takes, as a list; text is refused (it would be read as one id per character)."""
    if isinstance(token_ids, (str, bytes)):
        raise ConfigError(f"token_ids must be token ids (a list of ints), got {type(token_ids).__name__}: encode "
                          "the text first (generator.tokenizer.encode)")
    token_ids = as_list(token_ids, "token_ids")
    if not isinstance(token_ids, Sequence):
        raise ConfigError(f"token_ids must be token ids (a list of ints), got {type(token_ids).__name__}")
    return list(token_ids)


def _forced_plain(cfg: GenerationConfig, use: ToolUse | None, tool_choice: Any) -> GenerationConfig:
    """cfg with a forced call's grammar (ToolUse.grammar) in place of any json_schema: a forced tool_choice makes
    the reply a call, which has no content for a response format to shape (OpenAI's rule; the server's too). A
    grammar, regex or choice asks for a reply of another form: refused."""
    if use is None or not use.call_forced:
        return cfg
    for name in ("grammar", "regex", "choice"):
        if getattr(cfg, name) is not None and (name != "grammar" or cfg.grammar != use.grammar):
            raise ConfigError(f"tool_choice={tool_choice!r} asks for a call, and {name} for a reply of its own form: "
                              "give one of them")
    return dataclasses.replace(cfg, json_schema=None, grammar=use.grammar)


def _with_calls(out: GenerationOutput, reply: ToolReply | None, use: ToolUse, tokenizer: Any) -> GenerationOutput:
    """out as a chat reply with tools: its calls, and `text` the text before them; without calls its text (after a
    forced start's text: ToolUse.text)."""
    if reply is None:
        return dataclasses.replace(out, text=use.text(out, tokenizer)) if use.forced else out
    return dataclasses.replace(out, text=reply.content or "", tool_calls=reply.calls)


def _calls_held(events: Iterator[StreamEvent], tokenizer: Any, use: ToolUse) -> Iterator[StreamEvent]:
    """stream_chat's events with tools: a call's text is held back until the output says whether the reply's
    calls parse (runtime/tool_calls.py ToolStream)."""
    held = ToolStream(use, tokenizer)
    for event in events:
        if event.output is None:
            yield StreamEvent(held.feed(event.token_id, event.text), event.token_id)
        else:
            rest, reply = held.finish(event.output)
            yield StreamEvent(rest + event.text, event.token_id, _with_calls(event.output, reply, use, tokenizer))


def _stream(engine: Engine) -> Iterator[StreamEvent]:
    while engine.busy:
        for event in engine.step():
            yield StreamEvent(event.text, event.token)
            if event.output is not None:
                yield StreamEvent("", None, event.output)
