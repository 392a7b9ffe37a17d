"""The one interface every backend fills (onnxruntime, tensorrt, test fakes); the Generator sits above it.

A backend runs one step of the model over a fixed-capacity KV cache that it allocates and the runtime
owns (see mixtrt.runtime.cache). Example, batch of two rows, window model:

    cache = backend.new_cache(2)
    backend.step(cache, np.array([[1, 415, 2936]]), start_row=0)   # prefill row 0: logits [1, 3, V]
    backend.step(cache, np.array([[1, 22557]]), start_row=1, last_only=True)  # row 1: logits [1, 1, V]
    backend.step(cache, np.array([[28705], [28723]]))              # decode rows 0-1: logits [2, 1, V]
    cache.lengths                                                  # -> [4, 3]
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.cache import KVCache


@runtime_checkable
class Backend(Protocol):
    args: ModelArgs  # the model
    capacity: int  # cache rows (slots) per layer, fixed at export
    windowed: bool  # True: sliding-window cache, a row never fills; False: linear, a row is full at `capacity` tokens
    max_positions: int  # positions 0 .. max_positions - 1 are supported (the rope table); a sequence never exceeds it

    def new_cache(self, batch_size: int) -> KVCache:
        """A zeroed cache for `batch_size` rows (lengths all 0)."""
        ...

    def step(self, cache: KVCache, input_ids: np.ndarray, start_row: int = 0, last_only: bool = False
             ) -> np.ndarray:
        """Run input_ids [b, S] int64 for cache rows [start_row, start_row + b); return logits [b, S, V]
        float32, or [b, 1, V] for the last token only with last_only=True (a prefill that only samples).

        Token s of row r sits at position cache.lengths[start_row + r] + s; the step advances those
        lengths by S. S > 1 only with b == 1 (prefill runs row by row), and S <= capacity.
        """
        ...
