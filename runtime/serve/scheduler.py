"""The engine loop: one thread owns the backend and its Engine; HTTP requests join and leave between steps.

    loop = EngineLoop(gen.backend, gen.tokenizer, max_batch=16, max_queue=64)
    loop.start()
    req = loop.submit([[1, 415, 2936]], config, n=2, request_id="r1", t0=time.perf_counter())  # in asyncio
    async for event in req.events():   # EngineEvents of its rows, in step order; ends after every output
        ...
    loop.cancel(req, "disconnect")     # applied before the next step: its rows leave the batch at once

Each iteration applies the cancels, adds the new rows (a request of P prompts with n choices is P * n
rows, choice p * n + j sampling with index j, so a seeded choice depends only on its seed and j), then runs
one step in its parts (`Engine.parts(prefill_chunk)`): prefills touching one row each, at most
`prefill_chunk` prompt tokens in all while rows decode (a longer prompt goes on at the next steps), then
the decode step. After each part its events go back to the requests' asyncio loops and, where they are
several requests' or a row's first token, the engine waits, briefly, for them to reach the sockets (`_handoff`:
one call into each event loop per part, which delivers and then marks the tasks it woke as run); one request's
later tokens go out while the next step runs.

Back-pressure: a request is refused (QueueFull) when the rows waiting for a free engine row would pass
`max_queue`; it never waits unboundedly. `stop(drain_s)` refuses new requests, lets the running ones
finish for at most drain_s seconds, then cancels the rest.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mixtrt.runtime.errors import BackendError, ConfigError, RowError
from mixtrt.runtime.generation import Engine, EngineEvent, GenerationConfig, Row, check_prefill_budget
from mixtrt.runtime.serve.metrics import Metrics

HANDOFF_S = 0.005  # the most a step waits for the server to send the previous step's tokens


class QueueFull(Exception):
    """Too many rows wait for a free engine row: answer 429."""


class NotAccepting(Exception):
    """The loop is stopping (or stopped): answer 503."""


class Cancelled(Exception):
    """The request was cancelled (disconnect, shutdown) before every choice finished."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Request:
    """One HTTP request's rows: choice p * n + j is prompt p, sample j."""

    id: str
    prompts: list[list[int]]
    config: GenerationConfig
    n: int
    t0: float  # when the request was received (perf_counter): time to first token counts from here
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    rows: list[Row] = field(default_factory=list)  # in choice order, once added (engine thread)
    finished: int = 0  # choices with an output (engine thread)
    ended: bool = False  # every choice finished, or cancelled (engine thread)
    continuation: bool = False  # the rows' text continues the prompt's (completions), else a new message (chat)
    stream: bool = True  # every token's event is delivered; False: only each choice's last (its output)
    score_only: bool = False  # echo without generation: the prompts are scored, the chosen tokens dropped

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def deliver(self, items: list[Any]) -> None:  # on `loop`
        for item in items:
            self.queue.put_nowait(item)

    async def events(self) -> AsyncIterator[EngineEvent]:
        """The events of this request's rows until every choice has its output; raises Cancelled or the
        engine's error (BackendError) if it ends otherwise."""
        outputs = 0
        while outputs < self.choices:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            outputs += item.output is not None
            yield item


class EngineLoop:
    def __init__(self, backend: Any, tokenizer: Any, max_batch: int, max_queue: int,
                 metrics: Metrics | None = None, prefill_chunk: int | None = None) -> None:
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        check_prefill_budget(prefill_chunk, "prefill_chunk")
        self.prefill_chunk = prefill_chunk
        self.engine = Engine(backend, tokenizer, max_batch)
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self._cond = threading.Condition()
        self._adds: list[Request] = []
        self._cancels: list[tuple[Request, str, Callable[[bool], None] | None]] = []
        self._exited = False  # the loop thread returned (guarded by _cond)
        self._waiting_rows = 0  # rows submitted and not yet prefilled (guarded by _cond)
        self._free_rows = max_batch  # engine rows free after the last step (guarded by _cond)
        self._accepting = True
        self._deadline: float | None = None  # set by stop()
        self._rows: dict[int, tuple[Request, Row]] = {}  # engine thread only
        self._active: list[Request] = []  # engine thread only
        self._last: dict[int, float] = {}  # row id -> time of its last token (inter-token latency)
        self._gauged: tuple[int, int, int] | None = None  # the gauges last set
        self._thread = threading.Thread(target=self._run, name="mixtrt-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- called from the server's threads ---------------------------------------------------------
    def submit(self, prompts: list[list[int]], config: GenerationConfig, n: int, request_id: str,
               t0: float, continuation: bool = False, stream: bool = True, score_only: bool = False) -> Request:
        """Queue a request (prompts already checked to fit); QueueFull / NotAccepting at once. continuation,
        score_only: see Engine.add. stream=False: events() yields only the events that carry an output (a request
        answered whole wakes its event loop once per choice, not once per token)."""
        req = Request(request_id, prompts, config, n, t0, asyncio.get_running_loop(), continuation=continuation,
                      stream=stream, score_only=score_only)
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if self._waiting_rows + req.choices - self._free_rows > self.max_queue:
                raise QueueFull(f"{self._waiting_rows} row(s) not yet running and this request's {req.choices} "
                                f"would leave more than {self.max_queue} waiting (--max-queue) for the "
                                f"{self._free_rows} free of {self.max_batch} engine rows; retry later")
            self._waiting_rows += req.choices
            self._adds.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request, reason: str, then: Callable[[bool], None] | None = None) -> None:
        """Cancel `req` before the next step (no-op once it ended). then(cut): called on req's event loop once the
        engine has taken the request's rows out (their tokens final: a request log written then agrees with the
        metrics), at once if the engine loop has exited; cut is False where the request had finished before the
        cancel came (the metrics count it finished, and its outputs are in its queue)."""
        with self._cond:
            if not self._exited:
                self._cancels.append((req, reason, then))
                self._cond.notify()
                return
        if then is not None:
            then(True)

    def begin_stop(self, drain_s: float) -> None:
        """Refuse new requests; running ones get at most drain_s seconds from now to finish, then they are
        cancelled ("shutdown") and the loop exits. Returns at once; a second call keeps the first deadline."""
        with self._cond:
            self._accepting = False
            if self._deadline is None:
                self._deadline = time.perf_counter() + drain_s
            self._cond.notify()

    def stop(self, drain_s: float) -> None:
        """begin_stop(drain_s), then return when the loop has exited."""
        self.begin_stop(drain_s)
        if self._thread.is_alive():
            self._thread.join()

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._adds or self._cancels or self._deadline is not None or self.engine.busy):
                    self._cond.wait()
                adds, self._adds = self._adds, []
                cancels, self._cancels = self._cancels, []
                deadline = self._deadline
            for req, reason, then in cancels:
                cut = not req.ended
                self._cancel(req, reason)
                if then is not None:
                    _post(req.loop, then, cut)
            for req in adds:
                self._add(req)
            if deadline is not None and (not self.engine.busy or time.perf_counter() >= deadline):
                shut = list(self._active)
                for req in shut:
                    self._cancel(req, "shutdown")
                with self._cond:
                    for req in self._adds:
                        _post(req.loop, req.deliver, [Cancelled("shutdown")])
                    self._adds = []
                    self._exited = True
                    late, self._cancels = self._cancels, []
                for req, _, then in late:  # cancels that came after this step's: their requests ended above
                    if then is not None:
                        _post(req.loop, then, req in shut or not req.ended)
                self._gauges()
                return
            if self.engine.busy:
                self._step()  # its parts update the gauges
            else:
                self._gauges()

    def _add(self, req: Request) -> None:
        if req.ended:  # cancelled before it was added
            return
        try:
            for p, ids in enumerate(req.prompts):
                first = None  # a prompt's n choices: prefilled once, the others start from its cache row
                for j in range(req.n):
                    row = self.engine.add(ids, req.config, sample_index=j, t0=req.t0,
                                          name=f"request {req.id} choice {p * req.n + j}",
                                          continuation=req.continuation, fork_of=first,
                                          score_only=req.score_only)
                    first = first or row
                    req.rows.append(row)
                    self._rows[row.id] = (req, row)
        except ConfigError as e:  # the server checks before submitting; a bug otherwise, answered as one
            self._end(req, e)
            return
        self._active.append(req)

    def _end(self, req: Request, error: BaseException | None, engine: bool = True) -> None:
        """Take req's unfinished rows out of the engine (engine False: the engine failed and is dropped whole, its
        rows are not touched); deliver `error` (None: it finished normally)."""
        for row in req.rows:
            self._rows.pop(row.id, None)
            self._last.pop(row.id, None)
            if engine and (row.reason is None or row in self.engine.waiting):
                self.engine.cancel(row)
        req.ended = True
        if req in self._active:
            self._active.remove(req)
        if error is not None:
            _post(req.loop, req.deliver, [error])

    def _cancel(self, req: Request, reason: str) -> None:
        if req.ended:
            return
        self._end(req, Cancelled(reason))
        if self.metrics is not None:
            self.metrics.aborted(reason)

    def _step(self) -> None:
        """Engine.step in its parts: a row's first token is handed out right after the prefill that ends its
        prompt, the decode step's tokens after it. While rows decode, the step's prefill is at most
        `prefill_chunk` tokens, so a decoding row waits for at most one chunk per step."""
        for part in self.engine.parts(self.prefill_chunk):
            mixed = self.engine.mixed_steps_run
            if not self._run_part(part):
                return
            if self.metrics is not None and self.engine.mixed_steps_run != mixed:
                self.metrics.mixed_steps.inc(self.engine.mixed_steps_run - mixed)

    def _run_part(self, part: Callable[[], list[EngineEvent]]) -> bool:
        """Run one part of a step and hand its events out; False when the engine failed and was replaced."""
        try:
            events = part()
            error: BackendError | None = None
        except RowError as e:  # the engine cancelled the failed rows (non-finite logits, ...); the others go on
            events, error = e.events, e
        except Exception as e:  # a backend failure: every request fails, a fresh engine takes over
            error = BackendError(f"the engine failed: {e}")
            failed = list(self._active)
            for req in failed:
                self._end(req, error, engine=False)
            self.engine = Engine(self.engine.backend, self.engine.tokenizer, self.max_batch)
            if self.metrics is not None:
                for _ in failed:  # per request, as every other reason
                    self.metrics.aborted("error")
            return False
        batches: dict[int, tuple[Request, list[EngineEvent]]] = {}
        tokens = 0  # the requests' tokens of this part (a non-streamed request's are not all handed out)
        first = False  # a row's first token, or the first text of its reply, is among them
        for event in events:
            found = self._rows.get(event.row.id)
            if found is None:
                continue
            req, row = found
            tokens += not req.score_only  # a scored prompt's one chosen token is never returned
            first = first or len(row.tokens) == 1 or (bool(event.text) and row.text_began)
            self._observe(row, event)
            if req.stream or event.output is not None:
                batches.setdefault(id(req), (req, []))[1].append(event)
            if event.output is not None:
                req.finished += 1
                self._rows.pop(row.id, None)
                self._last.pop(row.id, None)
                if req.finished == req.choices:
                    req.ended = True
                    self._active.remove(req)
        if self.metrics is not None and tokens:
            self.metrics.generation_tokens.inc(tokens)
        self._gauges()  # before the events go out: what a client sees next, the metrics already show
        # one request's later tokens go out while the next step runs: waiting for them cost its decode ~5% (1 client,
        # Mixtral-shaped fp32, 2-core VM: 15 interleaved pairs, median paired ratio 1.046)
        self._handoff(batches.values(), wait=first or len(batches) > 1)
        if error is not None:  # rows the engine cancelled (non-finite logits, ...): their requests fail
            own = getattr(error, "rows", {})
            for req in list(self._active):
                if any(row.message == "cancelled" and row.reason is not None for row in req.rows):
                    mine = [own[row.id] for row in req.rows if row.id in own]  # its own rows' failure, not others'
                    self._end(req, BackendError("; ".join(mine)) if mine else error)
                    if self.metrics is not None:
                        self.metrics.aborted("error")
        return True

    def _handoff(self, batches: Iterable[tuple[Request, list[EngineEvent]]], wait: bool = True) -> None:
        """Hand each request its events, one call into each event loop, and with `wait` wait (at most HANDOFF_S)
        until each loop has run the tasks they woke: the chunks are on the sockets before the next step's threads
        take the cores (on a few cores they would otherwise wait up to a step for one: for several requests the
        tokens of a step would reach their clients spread over the next one). Without `wait` (one request's
        later tokens) they go out while the next step runs."""
        loops: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[Request, list[EngineEvent]]]]] = {}
        for req, items in batches:
            loops.setdefault(id(req.loop), (req.loop, []))[1].append((req, items))
        waits = []
        for loop, deliveries in loops.values():
            done = threading.Event()
            if _post(loop, _deliver, loop, deliveries, done):
                waits.append(done)
        deadline = time.perf_counter() + HANDOFF_S
        for done in waits if wait else ():
            done.wait(max(deadline - time.perf_counter(), 0.0))

    def _observe(self, row: Row, event: EngineEvent) -> None:
        m = self.metrics
        if m is None:
            return
        if len(row.tokens) == 1 or row.id not in self._last:
            if not row.forked:  # a fork prefilled nothing of its own
                m.prompt_tokens.inc(len(row.prompt))
            m.ttft.observe(row.t_first - row.t0)
            m.prefill.observe(row.t_prefill)
            m.queue.observe(row.queue_s)
        else:
            m.itl.observe(row.t_last - self._last[row.id])
        self._last[row.id] = row.t_last
        if event.output is not None:
            m.success("length" if event.output.finish_reason == "length" else "stop")
            m.e2e.observe(row.t_last - row.t0)

    def _gauges(self) -> None:
        running, prefilling = self.engine.running, self.engine.prefilling
        with self._cond:
            self._waiting_rows = len(self.engine.waiting) + sum(r.choices for r in self._adds)
            self._free_rows = self.max_batch - len(running) - len(self.engine.parked) - (prefilling is not None)
        m = self.metrics
        if m is not None:  # a request counts as running from its first prefill chunk
            rows = {row.id for row in running} | ({prefilling.id} if prefilling is not None else set())
            busy = sum(any(r.id in rows for r in req.rows) for req in self._active)
            gauges = (busy, len(self._active) - busy + len(self._adds), len(running))
            if gauges != self._gauged:  # a decode step usually changes none of them
                self._gauged = gauges
                m.requests_running.set(gauges[0])
                m.requests_waiting.set(gauges[1])
                m.rows_running.set(gauges[2])


def _deliver(loop: asyncio.AbstractEventLoop, deliveries: list[tuple[Request, list[Any]]],
             done: threading.Event) -> None:
    """On `loop`: give each request its items, then set `done` once the tasks they woke have run (a
    callback queued now runs after them)."""
    for req, items in deliveries:
        req.deliver(items)
    loop.call_soon(done.set)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """loop.call_soon_threadsafe, False if that loop is closed (its server is gone: nobody waits)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False
