"""One Generator shared by threads: concurrent calls give exactly the outputs of the same calls made one after
another. The interleavings are forced, not left to luck: a turnstile orders whole steps of two threads, and
an instrumented lock and session put one thread's step inside onnxruntime while the other tries to step."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.generation import GenerationConfig, Generator
from mixtrt.runtime.tokenizer import Tokenizer

# 30 tokens: longer than the cache (21 rows), so each prefill is two chunks; different texts, different outputs
PROMPTS = {"A": list(range(1, 31)), "B": [1] + list(range(500, 529)) + [7]}
CFG = GenerationConfig(max_new_tokens=12, eos_token_id=(), return_logprobs=True)


@pytest.fixture(scope="module")
def artifact(exported):
    return exported["mistral-window"][1]


@pytest.fixture(scope="module")
def sequential(artifact) -> dict[str, Any]:
    gen = Generator(OrtBackend.load(artifact, threads=1), Tokenizer.load(artifact))
    return {name: gen.generate([p], CFG)[0] for name, p in PROMPTS.items()}


def run_threads(targets: dict[str, Callable[[], Any]], timeout: float = 120) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def body(name: str) -> None:
        try:
            results[name] = targets[name]()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread below
            results[name] = e

    threads = [threading.Thread(target=body, args=(n,), name=n) for n in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"thread {t.name} hung"
    for name, r in results.items():
        if isinstance(r, BaseException):
            raise AssertionError(f"thread {name} failed: {r!r}") from r
    return results


def same(got, want) -> None:
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.logprobs.tolist() == want.logprobs.tolist()  # bit for bit: the same computation, the same cache


class Turnstile:
    """A backend proxy whose steps run in the order `schedule` names the threads ("ABBA..."); past the end of
    the schedule, steps run as they come. Every step of a thread not on turn waits (up to `timeout`)."""

    def __init__(self, backend: OrtBackend, schedule: str, timeout: float = 60) -> None:
        self._backend, self._schedule, self._timeout = backend, schedule, timeout
        self._turn, self._cond = 0, threading.Condition()
        self.order: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def step(self, *args: Any, **kw: Any) -> Any:
        me = threading.current_thread().name
        with self._cond:
            ok = self._cond.wait_for(lambda: self._turn >= len(self._schedule) or self._schedule[self._turn] == me,
                                     self._timeout)
            assert ok, f"{me} waited for its turn at step {self._turn} of {self._schedule!r}"
        out = self._backend.step(*args, **kw)
        with self._cond:
            self.order.append(me)
            self._turn += 1
            self._cond.notify_all()
        return out


# a call is 2 prefill chunks + 11 decode steps = 13 steps
@pytest.mark.parametrize("schedule", ["AB" * 13, "A" * 2 + "B" * 2 + "AB" * 11, "BBA" + "BA" * 11 + "A",
                                      "A" * 13 + "B" * 13])
def test_steps_of_two_threads_interleaved_in_a_chosen_order(artifact, sequential, schedule):
    proxy = Turnstile(OrtBackend.load(artifact, threads=1), schedule)
    gen = Generator(proxy, Tokenizer.load(artifact))  # type: ignore[arg-type]
    out = run_threads({name: (lambda p=p: gen.generate([p], CFG)[0]) for name, p in PROMPTS.items()})
    assert "".join(proxy.order) == schedule  # the interleaving happened as scheduled
    for name in PROMPTS:
        same(out[name], sequential[name])


class ObservedLock:
    """Wraps the backend's lock: records a thread trying to enter while another holds it (`contended`)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.holder = inner, None
        self.contended = threading.Event()

    def __enter__(self) -> None:
        if self.holder is not None and self.holder != threading.current_thread().name:
            self.contended.set()
        self.inner.acquire()
        self.holder = threading.current_thread().name

    def __exit__(self, *exc: Any) -> None:
        self.holder = None
        self.inner.release()


class NoLock:
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


class Session:
    """Wraps the onnxruntime session: A's first run waits inside onnxruntime until `release_a` says so, and
    the most runs ever inside it at once is counted."""

    def __init__(self, inner: Any, release_a: Callable[[], bool]) -> None:
        self.inner, self.release_a = inner, release_a
        self.inside = self.most = 0
        self.a_inside, self.b_inside = threading.Event(), threading.Event()
        self.count = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run_with_iobinding(self, binding: Any) -> Any:
        me = threading.current_thread().name
        with self.count:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            if me == "B":
                self.b_inside.set()
            if me == "A" and not self.a_inside.is_set():
                self.a_inside.set()
                assert self.release_a(), "B never came to step while A was inside its step"
            return self.inner.run_with_iobinding(binding)
        finally:
            with self.count:
                self.inside -= 1


def _race(artifact, lock: Any, release_a: Callable[[Session, ObservedLock], bool]):
    backend = OrtBackend.load(artifact, threads=1)
    observed = ObservedLock(lock)
    backend._lock = observed  # type: ignore[assignment]
    session = Session(backend.session, lambda: release_a(session, observed))
    backend.session = session
    gen = Generator(backend, Tokenizer.load(artifact))

    def b() -> Any:
        assert session.a_inside.wait(60), "A never stepped"
        return gen.generate([PROMPTS["B"]], CFG)[0]

    out = run_threads({"A": lambda: gen.generate([PROMPTS["A"]], CFG)[0], "B": b})
    return out, session, observed


def test_a_step_inside_onnxruntime_keeps_the_other_thread_out(artifact, sequential):
    """A is inside onnxruntime; B calls step; A goes on only once B is seen waiting at the backend's lock."""
    out, session, observed = _race(artifact, threading.Lock(), lambda s, lock: lock.contended.wait(60))
    assert observed.contended.is_set() and session.most == 1  # provoked, and refused: one step at a time
    for name in PROMPTS:
        same(out[name], sequential[name])


def test_without_the_lock_the_same_race_puts_two_steps_inside_onnxruntime(artifact):
    """The control: the same forced interleaving with the lock removed does what the lock exists to prevent
    (so the test above would catch a backend that stopped serialising its steps)."""
    _, session, _ = _race(artifact, NoLock(), lambda s, lock: s.b_inside.wait(60))
    assert session.most == 2


def test_streams_consumed_by_two_threads_in_lockstep(artifact, sequential):
    gen = Generator(OrtBackend.load(artifact, threads=1), Tokenizer.load(artifact))
    barrier = threading.Barrier(2, timeout=60)

    def consume(prompt: list[int]) -> Any:
        last = None
        for event in gen.stream(prompt, CFG):
            barrier.wait()  # both threads take each token at the same time
            last = event.output or last
        return last

    out = run_threads({name: (lambda p=p: consume(p)) for name, p in PROMPTS.items()})
    for name in PROMPTS:
        same(out[name], sequential[name])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_a_fork_during_a_step_refuses_in_the_child_and_an_idle_one_works(artifact, sequential):
    """A process forked while a thread held the backend's step lock would hang forever in the child on its first
    step (that thread does not exist there): the child gets one clear error instead; forked while idle, the child
    generates as the parent does; the parent goes on either way."""
    import multiprocessing as mp

    gen = Generator(OrtBackend.load(artifact, threads=1), Tokenizer.load(artifact))
    ctx = mp.get_context("fork")

    def child(queue) -> None:
        try:
            queue.put(gen.generate([PROMPTS["A"]], CFG)[0].token_ids)
        except Exception as e:  # noqa: BLE001 - sent to the parent
            queue.put(f"{type(e).__name__}: {e}")
            grandchild = ctx.Process(target=lambda: queue.put(type(gen.backend._lock).__name__))  # and its children
            grandchild.start()
            grandchild.join(60)

    for held in (True, False):
        queue = ctx.Queue()
        if held:
            gen.backend._lock.acquire()  # what a step in another thread holds
        try:
            proc = ctx.Process(target=child, args=(queue,))
            proc.start()
        finally:
            if held:
                gen.backend._lock.release()
        got = queue.get(timeout=120)
        proc.join(120)
        assert proc.exitcode == 0
        if held:
            assert got.startswith("BackendError: the onnxruntime backend of") and "when this process forked" in got
            assert queue.get(timeout=60) == "_ForkedMidStep"
        else:
            assert got == sequential["A"].token_ids
    assert gen.generate([PROMPTS["A"]], CFG)[0].token_ids == sequential["A"].token_ids


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_a_chat_session_forked_mid_turn_refuses_in_the_child(artifact):
    """A turn streaming in another thread at the fork (between its steps, so no lock is held) left the child's
    session busy for good (every send, close and reset refused as "still streaming"): it is one BackendError there,
    and the parent's turn goes on."""
    import multiprocessing as mp

    gen = Generator(OrtBackend.load(artifact, threads=1), Tokenizer.load(artifact))
    session = gen.chat_session()
    turn = session.stream("Hello there", max_new_tokens=6)
    next(iter(turn))  # the turn is streaming: its session is busy
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        try:
            session.send("again", max_new_tokens=2)
            queue.put("sent")
        except Exception as e:  # noqa: BLE001 - sent to the parent
            queue.put(f"{type(e).__name__}: {e}")

    proc = ctx.Process(target=child)
    proc.start()
    got = queue.get(timeout=120)
    proc.join(120)
    assert got.startswith("BackendError: this chat session was in use when this process forked")
    assert list(turn) and session.send("again", max_new_tokens=2).token_ids  # the parent goes on
