"""The one interface every backend fills (onnxruntime, triton, tensorrt, test fakes); the Engine sits above it.

A backend runs one step of the model over a fixed-capacity KV cache that it allocates and owns: the cache
may live in host or device memory, and its contents are the backend's business. The runtime keeps the
cache object, reads `cache.lengths` (tokens per row) and asks the backend to move or drop rows; it never
touches the buffers. One write: a rewind (`Engine.extend(keep=k)`) lowers a row's length to k, and only while
the row never held more tokens than `capacity`, when every backend holds positions 0..L-1 in rows 0..L-1 (ring
or window alike) and the next step writes over the rest; a backend whose layout differs must say so there.
Example, batch of two rows, window model:

    cache = backend.new_cache(2)
    backend.step(cache, np.array([[1, 415, 2936]]), start_row=0)   # prefill row 0: logits [1, 3, V]
    backend.step(cache, np.array([[1, 22557]]), start_row=1, last_only=True)  # row 1: logits [1, 1, V]
    backend.step(cache, np.array([[28705], [28723]]))              # decode rows 0-1: logits [2, 1, V]
    cache.lengths                                                  # -> [4, 3]
    backend.move_rows(cache, [1])                                  # row 0 finished: row 1 moves to row 0

Optional: a backend with `mixed_steps` True also has `step_mixed(cache, decode_ids [b], chunk_ids [S], last_only)`
-> (logits [b, V], chunk logits [S or 1, V]): rows [0, b) decode one token each and row b takes a prompt chunk, in
one call (a server's Engine steps; onnxruntime's mixed-step graph), with the logits of the two calls apart.

Thread safety: a backend serialises its steps (one lock), so several threads may share it as long as
each uses its own cache (the Engine gives every generation its own).

The other heads (base model, sequence / token classification, question answering) score whole texts: their
artifacts' graphs have no cache, and the same backend class runs them with `forward` (`PassBackend`):

    backend.forward(np.array([[1, 415, 2936], [1, 22557, 0]]))   # {"logits": [2, labels]} (row 2 padded)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from mixtrt.runtime.args import ModelArgs


@runtime_checkable
class Cache(Protocol):
    lengths: np.ndarray  # [B] int32: tokens each row holds (host memory; the backend updates it per step)

    @property
    def batch_size(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


@runtime_checkable
class Backend(Protocol):
    args: ModelArgs  # the model
    capacity: int  # cache rows (slots) per layer, fixed at export
    windowed: bool  # True: sliding-window cache, a row never fills; False: linear, a row is full at `capacity` tokens
    max_positions: int  # positions 0 .. max_positions - 1 are supported (the rope table); a sequence never exceeds it

    def new_cache(self, batch_size: int) -> Cache:
        """A cache for `batch_size` rows, every row empty (lengths all 0)."""
        ...

    def move_rows(self, cache: Cache, rows: Sequence[int]) -> None:
        """Row i becomes old row rows[i] (-1: an empty row); rows from len(rows) on are emptied.

        The runtime keeps the rows it steps together at the front: [2, 0] after rows 1 and 3 of four
        finished, [0, -1, 3] to empty row 1 for a new prompt while keeping row 3 (parked) behind it.
        """
        ...

    def step(self, cache: Cache, input_ids: np.ndarray, start_row: int = 0, last_only: bool = False
             ) -> np.ndarray:
        """Run input_ids [b, S] int64 for cache rows [start_row, start_row + b); return logits [b, S, V]
        float32, or [b, 1, V] for the last token only with last_only=True (a prefill that only samples).

        Token s of row r sits at position cache.lengths[start_row + r] + s; the step advances those
        lengths by S. S > 1 only with b == 1 (prefill runs row by row), and S <= capacity.
        """
        ...


@runtime_checkable
class PassBackend(Protocol):
    """A backend running an artifact whose graph has no cache (a head other than causal_lm)."""

    args: ModelArgs  # the model; args.head names the head
    max_positions: int  # a row never exceeds it

    def forward(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """One pass over input_ids [b, T] int64, rows right-padded (attention is causal: a token never sees the
        padding after it); the graph's outputs by name (Manifest.graph_io), float32."""
        ...
