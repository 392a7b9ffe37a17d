"""Multi-turn chat that keeps its KV cache: each turn prefills only the tokens the cache does not hold yet.

    session = gen.chat_session(system="Be brief.")
    reply = session.send("Who is Mr. Darcy?")                  # GenerationOutput
    for event in session.stream("And Elizabeth?"):             # StreamEvent, as Generator.stream
        print(event.text, end="")
    session.turns[-1]      # ChatTurn(prompt_tokens=61, cached_tokens=38, prefilled_tokens=23, kind='cached')

A session is one row of an Engine (`max_batch=1`) added with `keep=True`: when a reply ends, the row is
parked with its cache, and the next turn `extend`s it.

Exactness rule. The cache must hold exactly the ids the chat format gives for the conversation, so each
turn renders the whole conversation (`apply_chat_template(messages, add_generation_prompt=True)`) and
compares it with what the row holds (every id it was fed and generated, the reply's EOS included):

- the held ids are a prefix of the rendered ones: only the rest is prefilled ("cached");
- otherwise they part at some token: the format re-tokenizes the assistant's text differently from the ids
  the model generated, or rewrites earlier turns (mistral-common v2/v3 and tekken v3 put the system prompt and
  the tools before the LAST user message, so with a system prompt every turn parts early; v1, v7
  (`[SYSTEM_PROMPT]` first) and templates that only append (ChatML, Mistral v0.1's) part only where a reply
  re-tokenizes). Where the cache still holds the common prefix as it was (`Engine.can_rewind`: a linear
  cache always, a windowed one until its window first drops a token), the row keeps that prefix and
  prefills the rest ("rewound", as llama.cpp's server reuses a common prefix); else the turn starts a new
  context, prefilled from the start ("mismatch").

A reply that ended by max_new_tokens has no EOS: the format's close (EOS, `<|im_end|>`, ...) is simply the
start of the next turn's new ids. A reply cut at a stop string holds tokens the rendered conversation
does not, so the next turn parts there. A reply with no text is not added to the conversation (the
Mistral formats refuse an empty assistant message); the next turn parts before it. The result is
always what stateless `Generator.chat` on `session.messages` gives (greedy: the same tokens).

Limits. The longest conversation is the Engine's limit (a linear cache's capacity, else the max
positions). A turn whose conversation would not leave room for one new token starts a new context with
the system prompt and this message alone ("restart", with a note saying so); a message too long even
for that is refused with a ConfigError, and the session is unchanged.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import Engine, GenerationConfig, GenerationOutput, Row, StreamEvent
from mixtrt.runtime.threads import guard_fork

if TYPE_CHECKING:
    from mixtrt.runtime.generation import Generator

TurnKind = Literal["new", "cached", "rewound", "mismatch", "restart"]


@dataclass(frozen=True)
class ChatTurn:
    """What one turn cost: the rendered conversation, how much of it the cache already held, and why not more.

    prefilled_tokens = prompt_tokens - cached_tokens: the tokens fed to the model before the first new one.
    """

    prompt_tokens: int  # the conversation's ids for this turn (with the generation prompt)
    cached_tokens: int  # of those, held in the cache from earlier turns
    prefilled_tokens: int
    kind: TurnKind  # "cached" (the cache was kept), "rewound" (its common prefix with the conversation was
    #                 kept); a new context: "new" (none held: the first turn, or after close / reset / a cancelled
    #                 turn), "mismatch" or "restart"
    note: str = ""  # where the conversation left the cache, for "rewound" and "mismatch"; why a "restart";
    #                 why the turn was dropped (an empty reply)


class ChatSession:
    """A conversation whose KV cache outlives each turn (see the module docstring for the rules).

    One turn at a time: a turn started while another streams is refused (ConfigError), from any thread.
    `close()` during a turn (another thread's stop button) cancels it before its next token: its stream ends
    without an output, `send` raises a ConfigError, and the conversation stays as it was. `messages` is the
    conversation so far (system first, if any), `turns` one ChatTurn per turn started.
    """

    def __init__(self, generator: Generator, system: str | None = None,
                 config: GenerationConfig | None = None) -> None:
        self.generator = generator
        self.system = system
        if config is not None and not isinstance(config, GenerationConfig):
            raise ConfigError(f"chat session: config must be a GenerationConfig or None, got {type(config).__name__}"
                              " (options go as keyword arguments of send / stream)")
        self.config = config
        self.engine = Engine(generator.backend, generator.tokenizer, max_batch=1)
        _check_system_type(system)
        if system:
            self._check_system(system)
        self.messages: list[dict[str, Any]] = self._start()
        self.turns: list[ChatTurn] = []
        self._row: Row | None = None
        self._busy = False  # a turn is streaming (set and tested under _lock)
        self._lock = threading.Lock()
        guard_fork(self, "this chat session")
        self._cancel = False  # close() asked for the streaming turn to end

    def _check_system(self, system: str) -> None:
        """The system prompt is valid text and leaves room for a short message and a reply (checked once, at the
        start, not refused again with every message)."""
        from mixtrt.runtime.prompts import check_text

        check_text(system, "the system prompt")
        ids = self.generator.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": "hi"}], add_generation_prompt=True)
        limit, why = self.engine.limit()
        if len(ids) >= limit:
            raise ConfigError(f"the system prompt is too long: with a one-word message it takes {len(ids)} tokens, "
                              f"which leaves no room for a reply ({why})")

    def _start(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    # ---- turns ---------------------------------------------------------------------------------------
    def send(self, message: str | Mapping[str, Any], config: GenerationConfig | None = None,
             **overrides: Any) -> GenerationOutput:
        """The reply to `message` (a user message's text, or a message mapping), added to the conversation."""
        out = None
        for event in self.stream(message, config, **overrides):
            out = event.output or out
        if out is None:  # the turn ended without its reply: close() cancelled it
            raise ConfigError("chat session: the reply was cancelled (the session was closed while it streamed); "
                              "the conversation is as it was")
        return out

    def stream(self, message: str | Mapping[str, Any], config: GenerationConfig | None = None,
               **overrides: Any) -> Iterator[StreamEvent]:
        """The reply as StreamEvents (the last one carries the output). Everything is checked and the turn is
        planned at the call (`turns[-1]` says what it will prefill); a ConfigError leaves the session as it
        was. A stream closed before its last event cancels the turn: the conversation stays as it was and
        the next turn starts a new context."""
        with self._lock:  # tested and set at once: two threads cannot both start a turn
            if self._busy:
                raise ConfigError("chat session: the previous reply is still streaming; finish or close it first")
            self._busy, self._cancel = True, False
        try:
            return _Reply(self, self._plan(message, config, overrides))
        except BaseException:
            self._busy = False
            raise

    def _plan(self, message: str | Mapping[str, Any], config: GenerationConfig | None, overrides: dict[str, Any]
              ) -> collections.abc.Generator[StreamEvent, None, None]:
        """stream()'s checks and the turn's plan, made now; the turn's events (a generator) to come."""
        if not isinstance(message, (str, Mapping)):
            raise ConfigError("chat session: the message must be its text (a str) or a mapping like {'role': 'user', "
                              f"'content': '...'}}, got {type(message).__name__}")
        cfg = self.generator.config(config or self.config, **overrides)
        cfg.validate(self.engine.backend.args)  # what add / extend check, before the session changes
        self.engine.chunk(cfg.prefill_chunk)
        if self.engine.broken is not None:  # the last turn was cut inside a step: this one starts a new context
            self._free()
        new = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        messages, ids, restart = self._render(new)
        held = self._row.sequence if self._row is not None else []
        common = _common(held, ids[:-1])  # at least one new id is fed
        if self._row is not None and not restart and len(held) < len(ids) and ids[:len(held)] == held:
            turn = ChatTurn(len(ids), self._row.cached, len(ids) - self._row.cached, "cached")
            self.engine.extend(self._row, ids[len(held):], cfg)
        elif self._row is not None and not restart and self.engine.can_rewind(self._row, common):
            turn = ChatTurn(len(ids), common, len(ids) - common, "rewound",
                            f"{_parted(common, len(held))}: the cache keeps the {common} before")
            self.engine.extend(self._row, ids[common:], cfg, keep=common)
        else:
            kind: TurnKind = "restart" if restart else "mismatch" if self._row is not None else "new"
            # a common prefix the cache could not keep: its window has dropped tokens (Engine.can_rewind)
            why = ("the cache's sliding window has dropped the oldest tokens, so it cannot keep the ones before"
                   if common else "there is nothing before that to keep")
            note = restart or (f"{_parted(common, len(held))} and {why}: a new context for this turn"
                               if self._row is not None else "")
            self._free()
            turn = ChatTurn(len(ids), 0, len(ids), kind, note)
            self._row = self.engine.add(ids, cfg, keep=True, name="the conversation")
        self.turns.append(turn)
        return self._run(self._row, messages, new)

    def _render(self, new: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int], str]:
        """The conversation with `new` and its ids; when it does not fit, a new context (system + new) and the
        note saying so; a message that does not fit even then is refused."""
        tokenizer = self.generator.tokenizer
        messages = self.messages + [new]
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        limit, why = self.engine.limit()
        if len(ids) < limit:
            return messages, ids, ""
        alone = self._start() + [new]
        alone_ids = list(tokenizer.apply_chat_template(alone, add_generation_prompt=True))
        if len(alone_ids) >= limit:
            alone_what = "with the system prompt" if self.system else "alone"
            raise ConfigError(f"the message is too long: {len(alone_ids)} tokens {alone_what} leave no "
                              f"room for a reply ({why}); the conversation is unchanged")
        note = (f"the conversation reached {len(ids)} tokens, more than the model holds ({why}): a new context "
                f"with {'the system prompt and ' if self.system else ''}this message")
        return alone, alone_ids, note

    def _run(self, row: Row, messages: list[dict[str, Any]], new: dict[str, Any]
             ) -> collections.abc.Generator[StreamEvent, None, None]:
        out = None
        try:
            while self.engine.busy and not self._cancel:
                for event in self.engine.step():
                    yield StreamEvent(event.text, event.token)
                    if event.output is not None:
                        out = event.output
                        yield StreamEvent("", None, out)
        finally:
            self._end_turn(out, messages)

    def _end_turn(self, out: GenerationOutput | None, messages: list[dict[str, Any]]) -> None:
        """A turn's end: its reply joins the conversation; a turn cut short (closed, failed, or never iterated)
        leaves the conversation as it was and frees the cache row (the next turn starts a new context)."""
        try:
            if out is None:  # the cache holds a partial turn
                self._free()
            elif out.text:
                self.messages = messages + [{"role": "assistant", "content": out.text}]
            else:  # nothing to add: a chat format refuses an empty reply, and two user turns in a row
                self.messages = messages[:-1]
                self.turns[-1] = dataclasses.replace(self.turns[-1], note=(
                    "the reply was empty: this message and its reply are not kept in the conversation"))
        finally:
            self._busy = self._cancel = False

    # ---- the session -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the cache row (the conversation is kept: the next turn starts a new context). During a turn (from
        another thread, or between its events): the turn is cancelled before its next token, by the thread that
        runs it, which frees the row."""
        with self._lock:
            if self._busy:
                self._cancel = True
                return
        self._free()

    def _free(self) -> None:
        if self.engine.broken is not None:  # a turn cut part-way through a step: its cache is not to be trusted
            self.engine = Engine(self.engine.backend, self.engine.tokenizer, max_batch=1)
            self._row = None
        if self._row is not None:
            self.engine.cancel(self._row)
            self._row = None

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and its cache); `system` replaces the system prompt if given."""
        if self._busy:
            raise ConfigError("chat session: a reply is still streaming; finish or close it first")
        _check_system_type(system)
        if system:  # checked as the constructor checks it, before anything is forgotten
            self._check_system(system)
        self.close()
        if system is not None:
            self.system = system
        self.messages = self._start()

    def undo(self) -> dict[str, Any]:
        """Drop the last exchange (a user message and the reply to it) from the conversation and return that
        message, to send it again (llama-cli's /regen) or edit it; the cache keeps what comes before it (the next
        turn rewinds to it where the cache still holds it). ConfigError when there is no exchange to drop."""
        if self._busy:
            raise ConfigError("chat session: a reply is still streaming; finish or close it first")
        if len(self.messages) < 2 or self.messages[-1].get("role") != "assistant" or \
                self.messages[-2].get("role") != "user":
            raise ConfigError("chat session: no exchange to undo (the conversation has no reply yet)")
        message = self.messages[-2]
        self.messages = self.messages[:-2]
        return message

    @property
    def cached_tokens(self) -> int:
        """Tokens the cache holds now."""
        return self._row.cached if self._row is not None else 0

    def __repr__(self) -> str:
        return f"ChatSession({len(self.messages)} messages, {len(self.turns)} turns, {self.cached_tokens} cached)"


class _Reply(Iterator[StreamEvent]):
    """A turn's stream (ChatSession.stream): the turn generator, and its end when the stream is closed or dropped
    before its first event (a generator that never started does not run its `finally`)."""

    def __init__(self, session: ChatSession, events: collections.abc.Generator[StreamEvent, None, None]) -> None:
        self._session, self._events, self._started = session, events, False

    def __next__(self) -> StreamEvent:
        self._started = True
        return next(self._events)

    def close(self) -> None:
        """Cancel the turn if it has not ended (ChatSession.stream)."""
        started, self._started = self._started, True
        self._events.close()  # a started turn ends in its own finally
        if not started:
            self._session._end_turn(None, [])

    def __del__(self) -> None:  # dropped unread: the turn ends here (at interpreter exit there may be nothing to end)
        try:
            self.close()
        except Exception:
            pass


def _common(held: Sequence[int], ids: Sequence[int]) -> int:
    """The length of the longest common prefix of two id lists."""
    return next((i for i, (a, b) in enumerate(zip(held, ids, strict=False)) if a != b), min(len(held), len(ids)))


def _check_system_type(system: Any) -> None:
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"chat session: system must be a str (the system prompt) or None, got "
                          f"{type(system).__name__}")


def _parted(at: int, held: int) -> str:
    """Where the rendered conversation leaves the `held` cached ids, and why it can (one line's start)."""
    return (f"the chat format's ids for the conversation leave the cached ones at token {at} of {held} (it "
            "re-tokenizes the reply or rewrites an earlier turn)")
