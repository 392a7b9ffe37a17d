"""How many threads a backend may use: 1 .. the cores this process may run on (more only slows it down).

    >>> check_threads(None) is None, check_threads(1)
    (True, 1)
"""

from __future__ import annotations

import os
from typing import Any

from mixtrt.runtime.errors import ConfigError


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
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= cores:
        raise ConfigError(f"{name}={threads!r} is not an integer in [1, {cores}] (the cores this process may use)")
    return threads
