"""The runtime's KV cache: fixed-capacity buffers per layer, owned by the runtime, bound in place.

Shapes: L layers, B batch rows, K kv heads, C capacity (rows per layer), D head dim.

    keys[l], values[l]: [B, K, C, D]     lengths: [B] int32 (tokens each row has seen)

Capacity is fixed when the model is exported (manifest "cache"), so memory never grows with the number
of generated tokens. What a row's C slots hold is private to the backend:
- windowed layout (the model has a sliding window W < max context): C = W + slack. onnxruntime keeps the
  most recent positions compacted at the front of the buffer (it never wraps); the reference model and
  TensorRT keep a ring (slot = position % C). Either way every query sees its W-key window.
  Example, W=4, C=6: after 9 tokens onnxruntime holds [p3..p8] in rows 0-5; the ring holds
  [p6, p7, p8, p3, p4, p5].
- linear layout (no window, e.g. Mixtral-8x7B's own config): C = max context and row j = position j;
  a row whose length reaches C is full.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mixtrt.runtime.args import ModelArgs

# Extra rows beyond the window for the windowed layout. onnxruntime compacts its window buffer once the
# slack is used up (every `slack` decode steps), so the slack trades copies for memory (genai uses 16).
WINDOW_SLACK = 16


def cache_capacity(args: ModelArgs, max_context: int) -> tuple[int, bool]:
    """(capacity, windowed) for a model exported with `max_context` positions.

    A window at least as long as the context never bites, so that model gets the linear layout.
    """
    windows = {args.window(i) for i in range(args.num_hidden_layers)}
    if None in windows or max(windows) >= max_context:
        return max_context, False
    return min(max(windows) + WINDOW_SLACK, max_context), True


class KVCache:
    """Per-layer key/value buffers [B, K, C, D] and per-row lengths, zero at start."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: np.dtype | type = np.float32) -> None:
        shape = (batch_size, kv_heads, capacity, head_dim)
        # tuples: the buffers are fixed for the cache's life (a backend may keep pointers into them)
        self.keys = tuple(np.zeros(shape, dtype) for _ in range(num_layers))
        self.values = tuple(np.zeros(shape, dtype) for _ in range(num_layers))
        self.lengths = np.zeros(batch_size, np.int32)
        self.capacity = capacity

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Move `rows` (in this order) to the front; later rows are free. Buffers keep their size.

        Used to stop spending decode work on finished rows: the backend then runs rows [0, len(rows)).
        """
        rows = list(rows)
        if rows == list(range(len(rows))):
            return
        for buf in (*self.keys, *self.values):
            buf[: len(rows)] = buf[rows]
        self.lengths[: len(rows)] = self.lengths[rows]
        self.lengths[len(rows):] = 0
