"""The Triton backend: the whole model in torch with our Triton kernels for the two custom ops.

Dense layers (embedding, RMSNorm, the q/k/v/o projections, the dense FFN, the router matmul, the lm_head) run
in torch; `mixtrt::SlidingWindowAttention` and `mixtrt::MoE` run with plugins/swa/triton_kernels.py and
plugins/moe/triton_kernels.py. On CUDA when present; otherwise on the CPU under the Triton interpreter
(TRITON_INTERPRET=1, set here before the kernels are imported: slow, for proving the numerics).

This module imports torch and triton (the `gpu` extra) and onnx to read an artifact; nothing in the torch-free
runtime imports it: `load_backend("triton", ...)` reaches it through the registry.

Same Backend interface and step semantics as the onnxruntime backend (graph IO: input_ids, total_lengths,
logit_positions, the KV cache updated in place -> logits). The cache lives on the device as the kernels' ring
(slot = position mod C, the layout the torch reference keeps), `DeviceKVCache`, one [B, K, C, D] tensor per
layer for keys and one for values. A step of b rows uses rows [start_row, start_row + b) of each tensor as a
view (contiguous: rows are the first dimension), so the kernels write the cache in place.

Two ways in: `TritonBackend.from_artifact` (the artifact's graph initializers, checked against its manifest
as the onnxruntime backend checks them) and `TritonBackend.from_state_dict` (weights already in memory, e.g.
random weights made on the GPU by a benchmark).

INT4 artifacts: the MoE experts and the dense INT4 linears (q/k/v/o, Mistral's w1/w2/w3, an INT4 lm_head) stay
packed (uint8 + scales in the compute dtype, plugins/int4.py's layout) and the kernels (plugins/moe/triton_kernels.py,
plugins/int4_triton.py) dequantize them as they read them; the INT8 tensors (by default the embedding, lm_head
and a MoE model's wk/wv) are dequantized once at load to the compute dtype (graph_weights.py). `ops="torch"` runs
the two ops with their eager torch references instead (plugins/<op>/torch_op.py): the baseline a benchmark
compares the kernels with.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.backends.graph_weights import check_shapes, is_packed, read_graph_weights
from mixtrt.runtime.cache import CachePlan, check_batch_size, move_lengths, plan_row_move
from mixtrt.runtime.errors import ArtifactError, BackendError, ConfigError, first_line
from mixtrt.runtime.manifest import MODEL_FILE, Manifest, TensorSpec, graph_specs
from mixtrt.runtime.precision import PRECISIONS
from mixtrt.runtime.threads import guard_fork


def _kernels(device: str) -> tuple[Any, Any, Any, Any]:
    """(torch, swa kernels, moe kernels, the dense INT4 linear); on a CPU device the Triton interpreter, which must
    be chosen before triton decorates the kernels (it reads TRITON_INTERPRET then)."""
    import sys

    cpu = not device.startswith("cuda")
    if cpu and "mixtrt.plugins.swa.triton_kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from mixtrt.plugins import int4_triton as dense
    from mixtrt.plugins.moe import triton_kernels as moe
    from mixtrt.plugins.swa import triton_kernels as swa

    interpreted = type(swa.swa_attention_kernel).__name__ == "InterpretedFunction"
    if cpu and not interpreted:
        raise ConfigError("the triton backend on the CPU needs the Triton interpreter, but the kernels were already "
                          "compiled for a GPU in this process: set TRITON_INTERPRET=1 before importing them")
    if cpu and _compiled_language():
        raise ConfigError("the triton backend on the CPU needs the Triton interpreter, which triton chooses when it is "
                          "first imported, and this process imported triton before TRITON_INTERPRET=1 was set "
                          "(transformers' Mistral and Mixtral modules import it): set TRITON_INTERPRET=1 in the "
                          "environment, or load the backend before importing transformers or triton")
    if not cpu and interpreted:
        raise ConfigError(f"device {device!r}: TRITON_INTERPRET=1 is set in this process, so the kernels run in the "
                          "interpreter on CPU tensors only; unset it to run on the GPU")
    return torch, swa, moe, dense


def _compiled_language() -> bool:
    """triton.language's own jit functions (tl.zeros, tl.cdiv, ... in triton 3.x) were decorated for compiling:
    triton was imported without TRITON_INTERPRET, and interpreted kernels calling them fail at their first run."""
    import triton.language as tl

    return any(type(v).__name__ == "JITFunction" for v in vars(tl).values())


class DeviceKVCache:
    """Per-layer key/value ring buffers [B, K, C, D] on the backend's device and per-row lengths (host, int32).

    The tensors are fixed for the cache's life; only the backend that made the cache reads or writes them."""

    def __init__(self, torch: Any, num_layers: int, batch_size: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: Any, device: str) -> None:
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers))
        self.values = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers))
        self.lengths = np.zeros(batch_size, np.int32)
        self.capacity = capacity
        self.device = device

    @classmethod
    def for_model(cls, torch: Any, args: ModelArgs, batch_size: int, capacity: int, dtype: Any,
                  device: str) -> DeviceKVCache:
        """The cache a backend of model `args` hands out (batch_size checked as every backend checks it)."""
        return cls(torch, args.num_hidden_layers, check_batch_size(batch_size), args.num_key_value_heads, capacity,
                   args.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def move_rows(self, rows: Sequence[int]) -> None:
        """As HostKVCache.move_rows: row i becomes old row rows[i] (-1: empty); rows from len(rows) on are emptied."""
        moved, sources, emptied = plan_row_move(rows, self.lengths)
        for buf in (*self.keys, *self.values):
            if moved:
                buf[moved] = buf[sources]  # advanced indexing on the right copies first
            if emptied:
                buf[emptied] = 0
        move_lengths(self.lengths, moved, sources, emptied)


class TritonBackend:
    """Runs a causal LM with torch + our Triton kernels (CUDA, or the CPU under the Triton interpreter)."""

    def __init__(self, args: ModelArgs, weights: Mapping[str, Any], plan: CachePlan, max_positions: int, *,
                 precision: str = "fp32", device: str | None = None, where: str = "state dict",
                 ops: str = "triton") -> None:
        if args.head != "causal_lm":
            raise ConfigError(f"{where}: the triton backend runs causal LMs only; this is a {args.head} model")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
        import torch as _torch

        if device is None:
            device = "cuda" if _torch.cuda.is_available() else "cpu"
        if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device {device!r}: 'cuda' (or 'cuda:N') or 'cpu' (the Triton interpreter)")
        if device.startswith("cuda") and not _torch.cuda.is_available():
            why = ("this torch is a CPU build (install a CUDA build of torch: README's Install, `gpu`)"
                   if _torch.version.cuda is None else "torch sees no CUDA device on this machine")
            raise ConfigError(f"device {device!r}: {why}; device 'cpu' runs the kernels in the Triton interpreter")
        if ops not in ("triton", "torch"):
            raise ConfigError(f"ops={ops!r}: 'triton' (our kernels) or 'torch' (the eager reference ops: a baseline)")
        self.ops = ops
        if ops == "triton":
            torch, self._swa, self._moe, self._dense = _kernels(device)
        else:
            torch = _torch
            import mixtrt.plugins.swa.torch_op  # noqa: F401  (registers torch.ops.mixtrt.*)
            from mixtrt.plugins.moe.torch_op import reference

            self._moe_reference = reference  # the contract's stacked fc1 [E, 2I, H] / fc2 [E, H, I], as the kernels
        self._torch = torch
        self.args = args
        self.capacity = plan.capacity
        self.windowed = plan.windowed
        self.max_positions = max_positions
        self.windows = [w if w is not None else -1 for w in plan.windows]
        self.device = device
        self.dtype = getattr(torch, PRECISIONS[precision])
        check_shapes(dict(weights), args, where)
        rows = weights["rope_cos"].shape[0]
        if rows < max_positions:
            raise ArtifactError(f"{where}: rope tables of {rows} positions, fewer than the {max_positions} served")

        def dev(x: Any) -> Any:
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.require(x, requirements=["C", "W"]))
            return t.to(device=device, dtype=torch.uint8 if is_packed(x) else self.dtype).contiguous()

        self.w = {name: dev(x) for name, x in weights.items()}
        # INT4 experts and dense linears stay packed for the kernels; the eager reference ops and torch's matmuls
        # take float weights: dequantized here (the weight in fp32, then rounded to the compute dtype)
        if ops == "torch":
            for name in [n for n, t in self.w.items() if t.dtype == torch.uint8]:
                scales = self.w.pop(f"{name}_scales").float()
                self.w[name] = _unpack_int4(torch, self.w[name], scales).to(self.dtype)
        self._lock = threading.Lock()
        guard_fork(self, "the triton backend")

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_artifact(cls, directory: Path, manifest: Manifest, threads: int | None = None,
                      device: str | None = None) -> TritonBackend:
        """The artifact's graph weights (checked: graph IO and metadata against the manifest, every weight's
        shape, every attention node's heads and window against the cache plan). `threads`: torch's CPU threads
        (the interpreter's dense layers); None leaves torch's setting."""
        from mixtrt.runtime.threads import check_threads

        directory = Path(directory)
        if manifest.args.head != "causal_lm":
            raise ConfigError(f"{directory}: the triton backend runs causal LMs only; this artifact holds a "
                              f"{manifest.args.head} model")
        manifest.check_graph_io(directory)
        path = directory / MODEL_FILE
        inputs, outputs, metadata = graph_io(path)
        manifest.check_graph(path, inputs, outputs, metadata)
        graph = read_graph_weights(path, manifest.args, packed_dense=True)
        a = manifest.args
        for i, attrs in enumerate(graph.attention):
            want = {"num_heads": a.num_attention_heads, "kv_heads": a.num_key_value_heads,
                    "window": manifest.cache.windows[i] or -1}
            got = {k: attrs.get(k) for k in want}
            if got != want or float(attrs.get("scale", 0.0)) != 0.0:
                raise ArtifactError(f"{path}: the attention node of layer {i} has {got} (scale "
                                    f"{attrs.get('scale')}), the manifest's model and cache say {want}")
        if a.moe is not None and any(k != a.moe.num_experts_per_tok for k in graph.moe_k):
            raise ArtifactError(f"{path}: MoE nodes with k={graph.moe_k}, the model says "
                                f"{a.moe.num_experts_per_tok}")
        threads = check_threads(threads)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return cls(a, graph.tensors, manifest.cache, manifest.max_context, precision=manifest.precision,
                   device=device, where=str(path))

    @classmethod
    def from_state_dict(cls, args: ModelArgs, weights: Mapping[str, Any], *, max_context: int | None = None,
                        precision: str = "fp16", device: str | None = None, ops: str = "triton") -> TritonBackend:
        """A backend over in-memory weights (graph_weights' names; torch tensors stay where they are, numpy
        arrays are copied to the device). The cache plan is the exporter's for `max_context` (default
        max_position_embeddings), so the capacity is an exported artifact's; rope tables are computed when absent."""
        from mixtrt.plugins.swa.torch_op import rope_tables
        from mixtrt.runtime.backends import EXPORT_BACKENDS, window_slack

        max_context = max_context or args.max_position_embeddings
        weights = dict(weights)
        if "rope_cos" not in weights:
            weights["rope_cos"], weights["rope_sin"] = rope_tables(args.head_dim, args.rope_theta, max_context)
        plan = CachePlan.for_model(args, max_context, PRECISIONS[precision], slack=window_slack(EXPORT_BACKENDS))
        return cls(args, weights, plan, max_context, precision=precision, device=device, ops=ops)

    # ---- Backend ----------------------------------------------------------------------------------
    def new_cache(self, batch_size: int) -> DeviceKVCache:
        return DeviceKVCache.for_model(self._torch, self.args, batch_size, self.capacity, self.dtype, self.device)

    def move_rows(self, cache: DeviceKVCache, rows: Sequence[int]) -> None:
        with self._lock:
            cache.move_rows(rows)

    def step(self, cache: DeviceKVCache, input_ids: np.ndarray, start_row: int = 0, last_only: bool = False
             ) -> np.ndarray:
        """input_ids [b, S] for cache rows [start_row, start_row+b) -> logits [b, S, V] float32 ([b, 1, V] with
        last_only). Unlike onnxruntime's attention the kernels also take b > 1 rows of S > 1 tokens."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ConfigError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if start_row < 0 or start_row + b > cache.batch_size:
            raise ConfigError(f"rows [{start_row}, {start_row + b}) are outside the cache's {cache.batch_size} rows")
        if s > self.capacity:
            raise ConfigError(f"a step of {s} tokens is more than the cache's {self.capacity} rows (prefill in chunks)")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.args.vocab_size:
            raise ConfigError(f"token ids must be in [0, {self.args.vocab_size}), got {int(input_ids.min())}.."
                              f"{int(input_ids.max())}")
        rows = slice(start_row, start_row + b)
        total = cache.lengths[rows].astype(np.int64) + s
        if int(total.max()) > self.max_positions:
            raise ConfigError(f"position {int(total.max()) - 1} is past the {self.max_positions} positions this "
                              "artifact serves (max context chosen at export)")
        if not self.windowed and int(total.max()) > self.capacity:
            raise ConfigError(f"the cache holds {self.capacity} tokens per row (no sliding window) and this step "
                              f"needs {int(total.max())}")
        positions = np.full((b, 1), s - 1, np.int64) if last_only else np.tile(np.arange(s, dtype=np.int64), (b, 1))
        with self._lock:
            try:
                logits = self.forward(input_ids, total.astype(np.int32), positions,
                                      [(k[rows], v[rows]) for k, v in zip(cache.keys, cache.values, strict=True)])
            except (RuntimeError, ValueError) as e:  # torch / triton errors; the cache rows may be partly written
                raise BackendError(f"the triton backend failed on a step of {b} row(s) x {s} token(s): "
                                   f"{first_line(e)}") from None
            cache.lengths[rows] = total.astype(np.int32)
        return logits

    # ---- the graph ---------------------------------------------------------------------------------
    def forward(self, input_ids: np.ndarray, total_lengths: np.ndarray, logit_positions: np.ndarray,
                past: Sequence[tuple[Any, Any]]) -> np.ndarray:
        """The exported graph's function: input_ids [b, S], total_lengths [b] int32, logit_positions [b, P],
        past (k, v) [b, K, C, D] per layer (device tensors, updated in place) -> logits [b, P, V] float32."""
        torch, w, a = self._torch, self.w, self.args
        dev = self.device
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(dev)
            total = torch.from_numpy(np.ascontiguousarray(total_lengths, dtype=np.int32)).to(dev)
            b, s = input_ids.shape
            x = w["embed_tokens"][ids]  # [b, S, H]
            for i, (kc, vc) in enumerate(past):
                L = f"layers.{i}"
                h = self._rms(x, w[f"{L}.attention_norm"])
                q, k, v = (self._linear(h, f"{L}.{n}") for n in ("wq", "wk", "wv"))
                if self.ops == "triton":
                    att = self._swa.swa_attention(q, k, v, kc, vc, total, w["rope_cos"], w["rope_sin"],
                                                  a.num_attention_heads, a.num_key_value_heads, self.windows[i], 0.0)
                else:  # the reference returns new cache tensors (a clone): copied back into the ring
                    att, pk, pv = torch.ops.mixtrt.sliding_window_attention(
                        q, k, v, kc, vc, total, w["rope_cos"], w["rope_sin"], a.num_attention_heads,
                        a.num_key_value_heads, self.windows[i], 0.0)
                    kc.copy_(pk)
                    vc.copy_(pv)
                x = x + self._linear(att, f"{L}.wo")
                h = self._rms(x, w[f"{L}.ffn_norm"])
                if a.moe is None:
                    f = self._linear(torch.nn.functional.silu(self._linear(h, f"{L}.w1")) * self._linear(h, f"{L}.w3"),
                                     f"{L}.w2")
                else:
                    flat = h.reshape(b * s, a.hidden_size)
                    logits = flat @ w[f"{L}.gate"].T
                    if self.ops == "triton":
                        f = self._moe.moe(flat, logits, w[f"{L}.fc1"], w[f"{L}.fc2"], a.moe.num_experts_per_tok,
                                          fc1_scales=w.get(f"{L}.fc1_scales"), fc2_scales=w.get(f"{L}.fc2_scales"))
                    else:
                        f = self._moe_reference(flat, logits, w[f"{L}.fc1"], w[f"{L}.fc2"], a.moe.num_experts_per_tok)
                    f = f.view(b, s, a.hidden_size)
                x = x + f
            x = self._rms(x, w["norm"])
            pos = torch.from_numpy(np.ascontiguousarray(logit_positions, dtype=np.int64)).to(dev)
            picked = x.gather(1, pos[:, :, None].expand(-1, -1, a.hidden_size))  # [b, P, H]
            return self._linear(picked, "lm_head").float().cpu().numpy()

    def _linear(self, x: Any, name: str) -> Any:
        """x @ W^T for the weight `name`: the dense INT4 kernel on a packed weight (uint8 + `name_scales`), else
        torch's matmul."""
        w = self.w[name]
        if w.dtype == self._torch.uint8:
            return self._dense.int4_linear(x, w, self.w[f"{name}_scales"])
        return x @ w.T

    def _rms(self, x: Any, weight: Any) -> Any:
        """As the reference RMSNorm: normalise in fp32, cast back, then scale in the activation dtype."""
        xf = x.float()
        xf = xf * self._torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.args.rms_norm_eps)
        return weight * xf.to(x.dtype)


def _unpack_int4(torch: Any, qweight: Any, scales: Any) -> Any:
    """plugins/int4.py's unpack_int4 in torch: uint8 [..., N, K/2] + scales [..., N, K/block] -> [..., N, K]."""
    q = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).flatten(-2).to(torch.int16)
    q = torch.where(q >= 8, q - 16, q).to(scales.dtype)
    return (q * scales.repeat_interleave(q.shape[-1] // scales.shape[-1], dim=-1)).contiguous()


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, str]]:
    """The graph's inputs, outputs (as the manifest writes them) and metadata_props, read without its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf / onnx errors
        raise ArtifactError(f"{path}: cannot read the graph: {e}") from None
    return graph_specs(model)
