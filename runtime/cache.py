"""The KV cache plan (decided once, at export) and the host-memory cache buffers of the CPU backends.

Shapes: L layers, B batch rows, K kv heads, C capacity (rows per layer), D head dim.

`CachePlan` is the one place the cache is decided: its capacity, its layout and the window each layer's
attention applies. The exporter traces the graph from it, the manifest stores it, the backends allocate
from it. Rules:
- a window at least as long as the max context never bites: that layer attends full causal;
- every layer windowed (W < max context): the "windowed" layout, C = max(W) + slack, where slack is the
  most any backend the artifact serves needs (onnxruntime: 16, see its backend);
- any full-attention layer (no window, or `layer_types` mixing full and sliding layers): the "linear"
  layout, C = max context and row j = position j; windowed layers then mask their window inside it.

What a row's C slots hold is private to each backend. Example, W=4, C=6, after 9 tokens onnxruntime holds
[p3..p8] in rows 0-5 (GroupQueryAttention compacts, never wraps); the reference model, TensorRT and
onnxruntime's standard-op attention body keep a ring (slot = position % C): [p6, p7, p8, p3, p4, p5].
Either way every query sees its W-key window.

    >>> from mixtrt.runtime.args import ModelArgs
    >>> args = ModelArgs("MistralForCausalLM", 32000, 4096, 14336, 32, 32, 8, 128, sliding_window=4096)
    >>> plan = CachePlan.for_model(args, max_context=32768, dtype="float16", slack=16)
    >>> plan.layout, plan.capacity, plan.windows[0]
    ('windowed', 4112, 4096)
    >>> CachePlan.for_model(args, max_context=4096, dtype="float32").layout  # the window never bites
    'linear'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.errors import ArtifactError, ConfigError
from mixtrt.runtime.precision import PRECISIONS

LAYOUTS = ("windowed", "linear")


@dataclass(frozen=True)
class CachePlan:
    capacity: int  # C: rows per layer
    layout: str  # "windowed" (every layer has a window, the backend keeps recent positions) | "linear" (row = position)
    windows: tuple[int | None, ...]  # per layer: keys its attention sees (i - W < j <= i), None = full causal
    dtype: str  # numpy dtype name of the cache buffers: "float32" | "float16"

    @property
    def windowed(self) -> bool:
        return self.layout == "windowed"

    @property
    def window(self) -> int | None:
        """The longest window of a windowed layout (None for a linear one)."""
        return max(w for w in self.windows if w is not None) if self.windowed else None

    @classmethod
    def for_model(cls, args: ModelArgs, max_context: int, dtype: str = "float32", slack: int = 0) -> CachePlan:
        """The plan for `args` exported with `max_context` positions and `slack` extra rows for a windowed layout."""
        windows = tuple(w if w is not None and w < max_context else None
                        for w in (args.window(i) for i in range(args.num_hidden_layers)))
        if any(w is None for w in windows):
            return cls(max_context, "linear", windows, dtype)
        longest = max(w for w in windows if w is not None)
        return cls(min(longest + slack, max_context), "windowed", windows, dtype)

    @classmethod
    def one_pass(cls, args: ModelArgs, max_context: int, dtype: str = "float32") -> CachePlan:
        """The plan of a graph without a KV cache (a head that scores whole texts at once): every layer
        attends over the given tokens as in the linear layout (row = position, C = max context), windowed
        layers masking their window; nothing outlives the call, so no backend allocates it."""
        return cls(max_context, "linear", cls.for_model(args, max_context, dtype).windows, dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "layout": self.layout, "window": self.window,
                "windows": list(self.windows), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any], num_layers: int) -> CachePlan:
        """The manifest's "cache" object; checked for consistency (a hand-edited one is refused)."""
        if not isinstance(d.get("windows"), list):
            raise ArtifactError(f"cache.windows must be a list, got {d.get('windows')!r}")
        plan = cls(capacity=d["capacity"], layout=d["layout"], windows=tuple(d["windows"]), dtype=d["dtype"])
        if not isinstance(plan.capacity, int) or isinstance(plan.capacity, bool) or plan.capacity < 1:
            raise ArtifactError(f"cache.capacity must be a positive integer, got {plan.capacity!r}")
        if not isinstance(plan.layout, str) or plan.layout not in LAYOUTS:
            raise ArtifactError(f"cache.layout {plan.layout!r} is not one of {list(LAYOUTS)}")
        if len(plan.windows) != num_layers or not all(
                w is None or (isinstance(w, int) and not isinstance(w, bool) and 1 <= w) for w in plan.windows):
            raise ArtifactError(f"cache.windows must hold one window (int >= 1 or null) per layer ({num_layers})")
        if plan.windowed and (None in plan.windows or plan.capacity < max(w or 0 for w in plan.windows)):
            raise ArtifactError("cache.layout 'windowed' needs a window on every layer and capacity >= the window")
        if d.get("window") != plan.window:
            raise ArtifactError(f"cache.window {d.get('window')!r} does not match the windows {list(plan.windows)}")
        if not isinstance(plan.dtype, str) or plan.dtype not in PRECISIONS.values():
            raise ArtifactError(f"cache.dtype {plan.dtype!r} is not one of {sorted(PRECISIONS.values())}")
        return plan


class HostKVCache:
    """Per-layer key/value buffers [B, K, C, D] in host memory and per-row lengths, zero at start.

    The buffers are fixed for the cache's life (tuples: a backend may keep pointers into them); only the
    backend that made the cache reads or writes them.
    """

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: np.dtype | type = np.float32) -> None:
        shape = (batch_size, kv_heads, capacity, head_dim)
        nbytes = 2 * num_layers * int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        memory = physical_memory()
        if memory is not None and nbytes > memory:
            raise ConfigError(f"a KV cache of {batch_size} row(s) needs {nbytes / 2**30:.1f} GiB, more than this "
                              f"machine's {memory / 2**30:.1f} GiB of memory (fewer rows, or export with a smaller "
                              "--max-context)")
        self.keys = tuple(np.zeros(shape, dtype) for _ in range(num_layers))
        self.values = tuple(np.zeros(shape, dtype) for _ in range(num_layers))
        self.lengths = np.zeros(batch_size, np.int32)
        self.capacity = capacity
        self.binding: Any = None  # a backend's per-cache state (onnxruntime: the reusable IOBinding)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def move_rows(self, rows: Sequence[int]) -> None:
        """Row i becomes old row rows[i] (-1: an empty row); rows from len(rows) on are emptied.

        `[2, 0]` moves rows 2 and 0 to the front and frees the rest; `[0, -1, 3]` keeps row 0, empties
        row 1 and moves row 3 to row 2. An emptied row holds zeros and length 0.
        """
        moved, sources, emptied = plan_row_move(rows, self.lengths)
        for buf in (*self.keys, *self.values):
            if moved:
                buf[moved] = buf[sources]  # the right side is a copy: sources may be overwritten
            if emptied:
                buf[emptied] = 0
        move_lengths(self.lengths, moved, sources, emptied)


def check_batch_size(batch_size: object) -> int:
    """A cache's (or a batch's) row count as every backend takes it: an int >= 1 (not a bool), else one
    ConfigError naming it."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def plan_row_move(rows: Sequence[int], lengths: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """The work of a cache's `move_rows(rows)` (every backend's cache shares this rule): the rows that
    receive another row, the rows they receive (same order), and the rows emptied (-1 entries, plus rows
    from len(rows) on that hold something). A row taken more than once is copied (`[0, 0]`: row 1 becomes a
    copy of row 0, as the engine starts a request's other samples from its prefilled prompt). Raises
    ValueError for an index out of range.
    """
    rows = list(rows)
    n = len(lengths)
    if len(rows) > n or any(not -1 <= r < n for r in rows):
        raise ValueError(f"move_rows({rows}) on a cache of {n} rows")
    moved = [i for i, r in enumerate(rows) if r != i and r >= 0]
    emptied = [i for i, r in enumerate(rows) if r < 0] + [i for i in range(len(rows), n) if lengths[i]]
    return moved, [rows[i] for i in moved], emptied


def move_lengths(lengths: np.ndarray, moved: list[int], sources: list[int], emptied: list[int]) -> None:
    """Apply a `plan_row_move` to the per-row lengths, in place."""
    new = lengths.copy()
    new[moved] = lengths[sources]
    new[emptied] = 0
    lengths[:] = new


def physical_memory() -> int | None:
    """Bytes of physical memory (None where the OS does not say): more than this is never allocated."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
