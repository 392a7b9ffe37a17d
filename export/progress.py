"""Progress of a long step, for a person: a tqdm bar over bytes (rate, ETA) on a terminal, plain stage
lines otherwise, nothing when quiet.

    p = Progress(print, bar=None)            # bar=None: a bar when stderr is a terminal
    p("tracing the graph")                   # a stage line (to `say`)
    with p.bytes(total, "writing") as tick:  # a bar on stderr, or a line at each quarter
        tick(n)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO


def to_stderr(line: str) -> None:
    """The default `progress` of the library's long steps: a line on stderr, so stdout carries only results."""
    print(line, file=sys.stderr, flush=True)


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Progress:
    def __init__(self, say: Callable[[str], None] | None, bar: bool | None = None,
                 stream: IO[str] | None = None) -> None:
        self.say = say
        self.stream = stream
        self.bar = say is not None and (is_terminal(stream or sys.stderr) if bar is None else bar)

    def __call__(self, message: str) -> None:
        if self.say is not None:
            self.say(message)

    @contextmanager
    def bytes(self, total: int, desc: str) -> Iterator[Callable[[int], None]]:
        """Count `total` bytes: a bar (terminal), lines at 25/50/75/100 % (not a terminal), or nothing."""
        if self.say is None:
            yield lambda _n: None
            return
        if self.bar:
            from tqdm import tqdm

            with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                      file=self.stream or sys.stderr, leave=False) as bar:
                yield bar.update
            return
        done, said, t0 = 0, 0, time.perf_counter()

        def tick(n: int) -> None:
            nonlocal done, said
            done += n
            quarter = int(min(4, done * 4 // max(total, 1)))
            if quarter > said:
                said = quarter
                rate = done / max(time.perf_counter() - t0, 1e-9) / 2**20
                self(f"  {desc}: {25 * quarter}% ({done / 2**20:.0f} of {total / 2**20:.0f} MiB, {rate:.0f} MiB/s)")

        yield tick
