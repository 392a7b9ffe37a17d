"""How many threads a backend may use: 1 .. the cores this process may run on (more only slows it down).

    >>> check_threads(None) is None, check_threads(1)
    (True, 1)
"""

from __future__ import annotations

import numbers
import os
import threading
import weakref
from typing import Any

from mixtrt.runtime.errors import BackendError, ConfigError


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: Any, name: str = "threads") -> int | None:
    """None (the backend's default) or an integer in [1, available_cores()]; anything else is a ConfigError."""
    if threads is None:
        return None
    cores = available_cores()
    if not isinstance(threads, numbers.Integral) or isinstance(threads, bool) or not 1 <= int(threads) <= cores:
        raise ConfigError(f"{name}={threads!r} is not an integer in [1, {cores}] (the cores this process may use)")
    return int(threads)  # a numpy integer too, as the other integer arguments


# Objects whose `_lock` serialises their steps (backends, chat sessions). A process forked while another thread held
# one gets the lock held forever in the child (that thread does not exist there): the child's first step would hang
# with no error; a chat session whose turn another thread was streaming would stay busy for good (`_busy`). So in
# a forked child such a lock (or a busy session's) is replaced by one that refuses with a clear error (the object's
# state was mid-step: a half-written cache, a turn half run), and a lock not held is simply fresh.
_GUARDED: weakref.WeakSet[Any] = weakref.WeakSet()


class _ForkedMidStep:
    """The lock of an object that was mid-step when this process forked (another thread's call, or a turn left
    streaming): every use refuses."""

    def __init__(self, what: str) -> None:
        self.what = what

    def _refuse(self) -> None:
        raise BackendError(f"{self.what} was in use when this process forked (a call running in another thread, or a "
                           "turn left streaming), so its state here is half-changed: load the artifact again in the "
                           "child process (or fork before using it)")

    def __enter__(self) -> None:
        self._refuse()

    def __exit__(self, *exc: object) -> None:
        pass

    def acquire(self, *args: object, **kwargs: object) -> bool:
        self._refuse()
        return False

    def locked(self) -> bool:
        return False


def guard_fork(owner: Any, what: str) -> None:
    """Register `owner` (which holds `owner._lock`) for the fork rule above; `what` names it in the error."""
    owner._fork_what = what
    _GUARDED.add(owner)


def _after_fork_in_child() -> None:
    for owner in list(_GUARDED):
        if isinstance(owner._lock, _ForkedMidStep):  # refused in this process already: in its children too
            continue
        # held: a step was running; busy: a chat session's turn was streaming in another thread (between its steps)
        held = owner._lock.locked() or getattr(owner, "_busy", False)
        owner._lock = _ForkedMidStep(owner._fork_what) if held else threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
