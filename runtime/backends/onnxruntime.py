"""The ONNX Runtime backend: one step of the exported graph with the KV cache bound in place, or (the base
model and the classifier heads, whose graphs have no cache) one pass over whole texts.

The graph's present K/V outputs are bound to the same memory as its past K/V inputs (IOBinding with raw
pointers into the cache's host buffers), so GroupQueryAttention updates the cache in place and no cache
copy happens per step. Rows [start_row, start_row + b) of the cache are bound as one contiguous slice of
each [B, K, C, D] buffer; the binding is kept on the cache and reused while the rows stay the same
(decode steps), with the step inputs bound by pointer to buffers kept beside it, so a decode step copies
its ids and lengths into those and returns a copy of the bound logits (no binding call).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime import hugepages
from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.cache import HostKVCache, check_batch_size
from mixtrt.runtime.errors import ArtifactError, BackendError, ConfigError, first_line
from mixtrt.runtime.manifest import MODEL_FILE, Manifest, TensorSpec, graph_specs
from mixtrt.runtime.threads import check_threads, guard_fork


def bind_array(binding: Any, name: str, array: np.ndarray, *, output: bool = False) -> None:
    """Bind a C-contiguous numpy array (or a row slice of one) to `name` by pointer: no copy, and an
    output bound to an input's memory makes onnxruntime update that buffer in place."""
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: a bound array must be C-contiguous")
    bind = binding.bind_output if output else binding.bind_input
    bind(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)


class OrtBackend:
    """Runs an artifact's model.onnx on ONNX Runtime (CPU)."""

    def __init__(self, directory: Path, manifest: Manifest, threads: int | None = None, fuse: bool = True,
                 mixed_steps: bool = False) -> None:
        """fuse: apply ort_fusions' rewrites to the graph before creating the session (packed q/k/v, residual
        norms); False runs model.onnx as written (for comparisons).

        mixed_steps (a causal LM): run the mixed-step graph (ort_mixed), which adds `step_mixed`, one pass over
        the decoding rows' tokens and a prompt chunk together (a server's steps); plain steps run through it too.
        Where the graph has a form the rewrite does not know, the backend runs plain steps
        (`self.mixed_steps` False, `self.mixed_reason` says why)."""
        import onnx
        import onnxruntime as ort

        from mixtrt.runtime.backends.ort_fusions import FusionCounts
        from mixtrt.runtime.backends.ort_fusions import fuse as fuse_graph

        self.directory = Path(directory)
        self.manifest = manifest
        self.args: ModelArgs = manifest.args
        self.head = manifest.args.head
        self.capacity = manifest.cache.capacity
        self.windowed = manifest.cache.windowed
        self.max_positions = manifest.max_context
        self.dtype = np.dtype(manifest.cache.dtype)
        opts = self.session_options(check_threads(threads))
        model_path = self.directory / MODEL_FILE
        manifest.check_graph_io(self.directory)
        self.fusions = FusionCounts()
        self.mixed_steps, self.mixed_reason = False, "not asked for"
        # with no decoding rows the mixed graph's decode part runs on a stand-in over this row (ort_mixed); made on
        # first use; only its first position is ever written
        self._scratch: list[np.ndarray] | None = None
        checked: tuple[list[TensorSpec], list[TensorSpec], dict[str, str]] | None = None
        before = hugepages.snapshot(float_weights=manifest.quantization is None)
        try:
            if fuse or mixed_steps:
                model = onnx.load(str(model_path), load_external_data=False)
                if fuse:
                    self.fusions = fuse_graph(model, self.directory)
                if mixed_steps:
                    checked = graph_specs(model)  # what the session would show without the rewrite
                    self.mixed_steps, self.mixed_reason = self._mix(model)
                source: str | bytes = model.SerializeToString()
                del model
                # the rewritten graph comes as bytes: its external data is found beside model.onnx
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(self.directory))
            else:
                source = str(model_path)
            # CPU only: the cache is bound through host pointers (a CUDA path needs device buffers)
            with _large_blocks_mapped():
                self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
            del source
        except Exception as e:  # onnx and onnxruntime raise their own exception types
            raise ArtifactError(f"{model_path}: onnxruntime cannot load the graph: {first_line(e)}") from None
        _release_freed_heap()
        # the pre-packed weights on 2 MiB pages (runtime/hugepages.py): decode streams them every step
        self.huge_pages = hugepages.collapse_since(before)
        if checked is None:
            checked = ([_spec(t) for t in self.session.get_inputs()], [_spec(t) for t in self.session.get_outputs()],
                       dict(self.session.get_modelmeta().custom_metadata_map))
        manifest.check_graph(model_path, *checked)  # the mixed graph: its IO before the rewrite
        self._lock = threading.Lock()
        guard_fork(self, f"the onnxruntime backend of {self.directory}")

    def session_options(self, threads: int | None) -> Any:
        """The onnxruntime session's options (a subclass may add to them: benchmarks/profile_int4.py profiles the
        graph the backend runs, rewrites included)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 4  # fatal only: a failing step's error is raised (BackendError), not also logged
        if self.manifest.quantization is not None:  # the fused DequantizeLinear + MatMul -> MatMulNBits
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                          str(self.manifest.quantization.accuracy_level))
        return opts

    def _mix(self, model: Any) -> tuple[bool, str]:
        """Rewrite `model` into the mixed-step graph; (done, why not)."""
        from mixtrt.runtime.backends.ort_mixed import NotMixable, mixed

        if self.head != "causal_lm":
            return False, f"a {self.head} model has no cache"
        try:
            mixed(model, self.args.num_hidden_layers)
        except NotMixable as e:
            return False, str(e)
        return True, ""

    @classmethod
    def from_artifact(cls, directory: Path, manifest: Manifest, threads: int | None = None,
                      mixed_steps: bool = False) -> OrtBackend:
        return cls(directory, manifest, threads=threads, mixed_steps=mixed_steps)

    @classmethod
    def load(cls, directory: str | Path, threads: int | None = None, verify: bool = True, fuse: bool = True,
             mixed_steps: bool = False) -> OrtBackend:
        """verify: check each file's sha256 against the manifest (sizes are always checked)."""
        directory = Path(directory)
        return cls(directory, Manifest.load(directory, verify=verify), threads=threads, fuse=fuse,
                   mixed_steps=mixed_steps)

    def _needs(self, causal_lm: bool, what: str) -> None:
        if (self.head == "causal_lm") != causal_lm:
            need = "a causal LM" if causal_lm else "a head without a KV cache (not a causal LM)"
            raise ConfigError(f"{self.directory}: {what} needs {need}; this artifact holds a {self.head} model")

    def forward(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """One pass of a cache-less graph (a head other than causal_lm) over input_ids [b, T] int64 (rows
        right-padded: attention is causal, so a token never sees the padding after it): the graph's outputs
        by name (Manifest.graph_io), float32."""
        self._needs(False, "forward")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ConfigError(f"input_ids must be [batch, tokens] with tokens >= 1, got shape {input_ids.shape}")
        if input_ids.shape[1] > self.max_positions:
            raise ConfigError(f"{input_ids.shape[1]} tokens are more than the {self.max_positions} positions this "
                              "artifact serves (max context chosen at export)")
        with self._lock:
            try:
                outs = self.session.run(None, {"input_ids": input_ids})
            except Exception as e:  # onnxruntime's own exception types
                raise BackendError(f"onnxruntime failed on a pass of {input_ids.shape[0]} row(s) x "
                                   f"{input_ids.shape[1]} token(s): {e}") from None
        return {t.name: o.astype(np.float32, copy=False) for t, o in zip(self.manifest.outputs, outs, strict=True)}

    def new_cache(self, batch_size: int) -> HostKVCache:
        self._needs(True, "a KV cache")
        check_batch_size(batch_size)
        a = self.args
        return HostKVCache(a.num_hidden_layers, batch_size, a.num_key_value_heads, self.capacity, a.head_dim,
                           self.dtype)

    def move_rows(self, cache: HostKVCache, rows: Sequence[int]) -> None:
        with self._lock:  # a step of another thread must not see a half-moved cache
            cache.move_rows(rows)

    def _binding(self, cache: HostKVCache, start_row: int, b: int) -> _Bound:
        """An IOBinding with rows [start_row, start_row + b) of every cache buffer bound as past and present,
        kept on the cache and reused while the rows are the same (the buffers never move)."""
        bound = cache.binding
        if isinstance(bound, _Bound) and bound.backend is self and bound.rows == (start_row, b):
            return bound
        binding = self.session.io_binding()
        rows = slice(start_row, start_row + b)
        for layer in range(self.args.num_hidden_layers):
            for buf, past, present in zip((cache.keys[layer], cache.values[layer]), Manifest.past_names(layer),
                                          Manifest.present_names(layer), strict=True):
                bind_array(binding, past, buf[rows])
                bind_array(binding, present, buf[rows], output=True)
        bound = _Bound(self, (start_row, b), binding)
        cache.binding = bound
        return bound

    def _lengths(self, cache: HostKVCache, rows: slice, s: int) -> np.ndarray:
        """The rows' lengths after a step of s tokens (int32), checked against the positions and the cache."""
        total = cache.lengths[rows] + np.int32(s)
        if total.size:
            top = int(cache.lengths[rows].max()) + s  # in Python ints: no int32 overflow near the bound
            if top > self.max_positions:
                raise ConfigError(f"position {top - 1} is past the {self.max_positions} positions this "
                                  "artifact serves (max context chosen at export)")
            if not self.windowed and top > self.capacity:
                raise ConfigError(f"the cache holds {self.capacity} tokens per row (no sliding window) and this "
                                  f"step needs {top}")
        return total

    def step(self, cache: HostKVCache, input_ids: np.ndarray, start_row: int = 0, last_only: bool = False
             ) -> np.ndarray:
        """input_ids [b, S] for cache rows [start_row, start_row+b) -> logits [b, S, V] float32
        ([b, 1, V] with last_only: the graph's lm_head then runs on the last token only)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ConfigError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if s > 1 and b > 1:
            raise ConfigError("a multi-token step runs one row at a time (onnxruntime's attention needs batch 1)")
        if start_row < 0 or start_row + b > cache.batch_size:
            raise ConfigError(f"rows [{start_row}, {start_row + b}) are outside the cache's {cache.batch_size} rows")
        if self.mixed_steps:  # the mixed graph's chunk row always has a token: here the last (or only) row
            last = start_row + b - 1
            # logits [b + P, V]: the decode rows' then the chunk's, which is the last row's one token (s == 1) or
            # the only row's positions
            logits = self._run_mixed(cache, start_row, input_ids[:-1, 0], last, input_ids[-1], last_only)
            return logits[:, None] if s == 1 else logits[None]
        rows = slice(start_row, start_row + b)
        total = self._lengths(cache, rows, s)
        with self._lock:
            bound = self._binding(cache, start_row, b)
            bound.feed(input_ids, total, last_only)
            try:
                self.session.run_with_iobinding(bound.binding)
            except Exception as e:  # onnxruntime's own exception types; the cache rows may be partly written
                raise BackendError(f"onnxruntime failed on a step of {b} row(s) x {s} token(s): {first_line(e)}"
                                   ) from None
            cache.lengths[rows] = total
            logits = bound.logits.astype(np.float32)  # a copy: the caller owns it; the bound buffer is reused
        return logits

    def step_mixed(self, cache: HostKVCache, decode_ids: np.ndarray, chunk_ids: np.ndarray,
                   last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One pass over decode_ids [b] (the next token of each of cache rows [0, b)) and chunk_ids [S] (the
        next prompt tokens of cache row b): (logits [b, V], the chunk's logits [S, V], or [1, V] with
        last_only), float32. Needs mixed_steps; the same logits as a decode step and a step of the chunk."""
        if not self.mixed_steps:
            raise ConfigError(f"step_mixed needs the backend loaded with mixed_steps=True ({self.mixed_reason})")
        decode_ids = np.ascontiguousarray(decode_ids, dtype=np.int64)
        chunk_ids = np.ascontiguousarray(chunk_ids, dtype=np.int64)
        if decode_ids.ndim != 1 or chunk_ids.ndim != 1 or not chunk_ids.size:
            raise ConfigError(f"step_mixed takes decode ids [b] and a non-empty chunk [S], got shapes "
                              f"{decode_ids.shape} and {chunk_ids.shape}")
        if decode_ids.size + 1 > cache.batch_size:
            raise ConfigError(f"{decode_ids.size} decoding rows and a chunk's row need {decode_ids.size + 1} cache "
                              f"rows; the cache has {cache.batch_size}")
        logits = self._run_mixed(cache, 0, decode_ids, decode_ids.size, chunk_ids, last_only)
        return logits[:decode_ids.size], logits[decode_ids.size:]

    def _run_mixed(self, cache: HostKVCache, start_row: int, decode_ids: np.ndarray, chunk_row: int,
                   chunk_ids: np.ndarray, last_only: bool) -> np.ndarray:
        """decode_ids [b] for rows [start_row, start_row + b), chunk_ids [S >= 1] for row chunk_row -> logits
        [b + P, V] float32: the decode rows', then the chunk's (P = 1 with last_only, else S)."""
        b, s = decode_ids.size, chunk_ids.size
        rows = slice(start_row, start_row + b)
        chunk = slice(chunk_row, chunk_row + 1)
        total, chunk_total = self._lengths(cache, rows, 1), self._lengths(cache, chunk, s)
        with self._lock:
            bound = self._mixed_binding(cache, rows, chunk)
            bound.feed(decode_ids, chunk_ids, total, chunk_total, last_only)
            try:
                self.session.run_with_iobinding(bound.binding)
            except Exception as e:  # onnxruntime's own exception types; the cache rows may be partly written
                raise BackendError(f"onnxruntime failed on a step of {b} decoding row(s) and a chunk of {s} "
                                   f"token(s): {first_line(e)}") from None
            cache.lengths[rows], cache.lengths[chunk] = total, chunk_total
            logits = bound.logits[0].astype(np.float32)  # a copy: the caller owns it; the bound buffer is reused
        return logits

    def _mixed_binding(self, cache: HostKVCache, rows: slice, chunk: slice) -> _MixedBound:
        """The mixed graph's IOBinding for decode rows `rows` (maybe none) and chunk row `chunk`, kept on the
        cache and reused while they are the same."""
        from mixtrt.runtime.backends.ort_mixed import prefill_name

        key = (rows.start, rows.stop, chunk.start, chunk.stop)
        bound = cache.binding
        if isinstance(bound, _MixedBound) and bound.backend is self and bound.rows == key:
            return bound
        binding = self.session.io_binding()
        a = self.args
        if self._scratch is None:  # the decode part's stand-in row (ort_mixed): untouched pages cost nothing
            self._scratch = [np.empty((1, a.num_key_value_heads, self.capacity, a.head_dim), self.dtype)
                             for _ in range(2 * a.num_hidden_layers)]
        scratch = self._scratch
        for layer in range(a.num_hidden_layers):
            for i, (buf, past, present) in enumerate(zip((cache.keys[layer], cache.values[layer]),
                                                         Manifest.past_names(layer), Manifest.present_names(layer),
                                                         strict=True)):
                decoding = buf[rows] if rows.stop > rows.start else scratch[2 * layer + i]
                bind_array(binding, past, decoding)
                bind_array(binding, present, decoding, output=True)
                bind_array(binding, prefill_name(past), buf[chunk])
                bind_array(binding, prefill_name(present), buf[chunk], output=True)
        bound = _MixedBound(self, key, binding, rows.stop - rows.start)
        cache.binding = bound
        return bound


class _Bound:
    """A cache's IOBinding for one row range, with the step's inputs and logits bound by pointer to buffers kept
    here: a step whose shape is the last step's only copies its ids and lengths in and its logits out, with no
    binding call (measured on the Mixtral-shaped model: the backend's Python per decode step 190 -> 110 us)."""

    def __init__(self, backend: OrtBackend, rows: tuple[int, int], binding: Any) -> None:
        self.backend, self.rows, self.binding = backend, rows, binding
        self.ids = np.empty((0, 0), np.int64)
        self.total = np.empty(rows[1], np.int32)
        bind_array(binding, "total_lengths", self.total)
        self.positions: np.ndarray | None = None
        self.positions_key: tuple[int, bool] | None = None
        self.logits = np.empty((0, 0, 0), backend.dtype)

    def feed(self, input_ids: np.ndarray, total: np.ndarray, last_only: bool) -> None:
        b, s = input_ids.shape
        if self.ids.shape != (b, s):
            self.ids = np.empty((b, s), np.int64)
            bind_array(self.binding, "input_ids", self.ids)
        self.ids[...] = input_ids
        self.total[...] = total
        if self.positions_key != (s, last_only):  # which new tokens get logits: [[S-1]] or arange(S) per row
            self.positions = (np.full((b, 1), s - 1, np.int64) if last_only
                              else np.ascontiguousarray(np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))))
            bind_array(self.binding, "logit_positions", self.positions)
            self.positions_key = (s, last_only)
            self.logits = np.empty((b, 1 if last_only else s, self.backend.args.vocab_size), self.backend.dtype)
            bind_array(self.binding, "logits", self.logits, output=True)


class _MixedBound:
    """The mixed graph's IOBinding for one (decode rows, chunk row) pair, with its inputs and logits bound by
    pointer to buffers kept here, as _Bound does for the plain graph."""

    def __init__(self, backend: OrtBackend, rows: tuple[int, int, int, int], binding: Any, b: int) -> None:
        from mixtrt.runtime.backends.ort_mixed import PREFILL_LENGTHS

        self.backend, self.rows, self.binding = backend, rows, binding
        self.ids = np.empty((0, 0), np.int64)
        self.total, self.chunk_total = np.empty(b, np.int32), np.empty(1, np.int32)
        bind_array(binding, "total_lengths", self.total)
        bind_array(binding, PREFILL_LENGTHS, self.chunk_total)
        self.positions = np.empty((1, 0), np.int64)
        self.positions_key: tuple[int, int, bool] | None = None
        self.logits = np.empty((0, 0, 0), backend.dtype)

    def feed(self, decode_ids: np.ndarray, chunk_ids: np.ndarray, total: np.ndarray, chunk_total: np.ndarray,
             last_only: bool) -> None:
        b, s = decode_ids.size, chunk_ids.size
        if self.ids.shape != (1, b + s):
            self.ids = np.empty((1, b + s), np.int64)
            bind_array(self.binding, "input_ids", self.ids)
        self.ids[0, :b], self.ids[0, b:] = decode_ids, chunk_ids
        self.total[...], self.chunk_total[...] = total, chunk_total
        if self.positions_key != (b, s, last_only):  # each decode token, then the chunk's last or all tokens
            chunk = [b + s - 1] if last_only else list(range(b, b + s))
            positions = np.asarray([list(range(b)) + chunk], np.int64)
            self.positions = positions
            bind_array(self.binding, "logit_positions", positions)
            self.positions_key = (b, s, last_only)
            self.logits = np.empty((1, positions.shape[1], self.backend.args.vocab_size), self.backend.dtype)
            bind_array(self.binding, "logits", self.logits, output=True)


# onnxruntime's type strings -> numpy dtype names (the manifest's)
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}


def _spec(arg: Any) -> TensorSpec:
    """An onnxruntime NodeArg as the manifest writes graph IO (a dynamic dimension becomes its name, or "?")."""
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type),
                      tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape))


def _glibc() -> Any:
    """The C library when it is glibc (mallopt, malloc_trim), else None: the process's one handle
    (hugepages.libc, looked up once)."""
    c = hugepages.libc()
    return c if c is not None and hasattr(c, "malloc_trim") and hasattr(c, "mallopt") else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LOAD_MMAP_THRESHOLD = 1 << 20  # while a session is created: blocks from 1 MiB up are their own mappings
RUN_MMAP_THRESHOLD = 32 << 20  # after: glibc's own ceiling for its dynamic threshold (64-bit)


@contextlib.contextmanager
def _large_blocks_mapped() -> Iterator[None]:
    """Session creation with every block of 1 MiB or more in a mapping of its own (glibc; elsewhere nothing).

    While onnxruntime creates a session it makes each weight's fused form (an INT4 `DequantizeLinear` + `MatMul`
    becomes a `MatMulNBits` with its own transposed copy) and then its pre-packed form, freeing each earlier one.
    glibc's dynamic threshold moves up to the size of the first such block freed, after which blocks of that
    size come from the heap, whose freed space the next blocks cannot always reuse: the peak grew by most of
    the weights' bytes (a 4.33 GiB INT4 7B artifact peaked at 9.8 GiB, now 6.3). Mapped blocks go back to the OS
    when freed. Afterwards the threshold is glibc's ceiling, where its dynamic rule ends up once a block that large
    has been freed (runtime buffers come from the heap, no system call per step). The setting is the process's:
    where the user set a threshold (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES' glibc.malloc.mmap_threshold) or asked
    for none of this (MIXTRT_MALLOPT=0), it is left alone."""
    libc = None if _own_malloc_settings() else _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)


def _own_malloc_settings() -> bool:
    """The process runs with a malloc threshold of the user's, or MIXTRT_MALLOPT=0: mixtrt leaves malloc alone."""
    import os

    return (os.environ.get("MIXTRT_MALLOPT", "1") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""))


def _release_freed_heap() -> None:
    """Give the heap pages freed during session creation back to the OS (glibc only; elsewhere a no-op).

    onnxruntime frees each weight's unpacked copy once its kernel has pre-packed it, but glibc keeps
    freed blocks of that size in the heap: without this the resident size after loading the
    Mixtral-shaped benchmark model is ~1170 MiB instead of ~890 MiB (measured), for the life of the process.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
