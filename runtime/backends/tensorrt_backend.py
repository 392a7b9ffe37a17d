"""The TensorRT backend: the artifact's engine.plan (`mixtrt build`) with the KV cache in device memory, bound in
place (each layer's present key/value share the past buffers' addresses; the plugins alias them).

NOT RUN (TensorRT needs an NVIDIA GPU; none was available): tests/runtime/test_backend_tensorrt.py holds the
`gpu`-marked checks (engine parity with onnxruntime, generation through 3W steps) for a machine with a GPU and
TensorRT. Needs the `tensorrt` extra and torch (the `gpu` extra) for the device buffers and the stream.

Same Backend interface and step semantics as onnxruntime's. The cache is the Triton kernels' ring
(`DeviceKVCache`, shared with the triton backend). The engine takes at most `max_batch` rows and `max_step_tokens`
new tokens per step (engine.json; the SWA plugin's fused ring write bounds a windowed step to C - W + 1): a
longer prefill step is run in pieces of that size. An engine with a prefill profile (engine.json
`prefill_profile`; `mixtrt build` adds it where a step may take 2 tokens or more) runs steps of 2 tokens or more in
it (TensorRT tuned the plugins' tactics for each profile: the attention plugin's prefill tile there) and decode
steps in profile 0. The MoE plugin's decode state (moe_state.acc fp32 [T_max, H],
moe_state.count int32 [T_max]) is allocated zeroed once and bound as its input and output; the plugin leaves it
zero after every call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime.errors import ArtifactError, BackendError, ConfigError
from mixtrt.runtime.manifest import ENGINE_CONFIG, ENGINE_FILE, TENSORRT_FEATURE, Manifest
from mixtrt.runtime.threads import guard_fork


class TensorRTBackend:
    """Runs an artifact's TensorRT engine (a CUDA GPU, TensorRT with our plugins registered)."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        from mixtrt.runtime.extras import require

        require("gpu", "the tensorrt backend (its device buffers)")
        import tensorrt as trt
        import torch

        from mixtrt.plugins.trt_plugins import register_all

        self.directory = Path(directory)
        if manifest.args.head != "causal_lm" or TENSORRT_FEATURE not in manifest.features:
            raise ConfigError(f"{directory}: the tensorrt backend runs a causal LM's engine; run `mixtrt build` first")
        if not torch.cuda.is_available():
            raise ConfigError("the tensorrt backend needs a CUDA GPU; none is visible to torch")
        config = json.loads((self.directory / ENGINE_CONFIG).read_text())
        self.max_batch = int(config["max_batch"])
        self.max_step_tokens = int(config["max_step_tokens"])
        self.state_shapes = config.get("moe_state") or {}
        self.prefill_profile = 1 if config.get("prefill_profile") else 0
        self._profile = 0
        self.args = manifest.args
        self.manifest = manifest
        self.capacity = manifest.cache.capacity
        self.windowed = manifest.cache.windowed
        self.max_positions = manifest.max_context
        self.device = "cuda"
        self._torch = torch
        self.dtype = getattr(torch, manifest.cache.dtype)
        register_all()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((self.directory / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{directory / ENGINE_FILE}: TensorRT cannot load the engine (built by another "
                                "TensorRT version or for another GPU? run `mixtrt build --force`)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        want = [t.name for t in (*manifest.inputs, *manifest.outputs)] + list(self.state_shapes)
        missing = sorted(set(want) - set(names))
        if missing:
            raise ArtifactError(f"{directory / ENGINE_FILE}: the engine has no tensors {missing[:4]}; rebuild it")
        self.context = self.engine.create_execution_context()
        self._state = {name: torch.zeros(shape, device="cuda", dtype=torch.float32 if name.endswith("acc")
                                         else torch.int32) for name, shape in self.state_shapes.items()}
        self._state_outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
                               and n not in {t.name for t in manifest.outputs}]
        self._lock = threading.Lock()
        guard_fork(self, "the tensorrt backend")

    @classmethod
    def from_artifact(cls, directory: Path, manifest: Manifest, threads: int | None = None) -> TensorRTBackend:
        return cls(directory, manifest)

    def new_cache(self, batch_size: int) -> Any:
        from mixtrt.runtime.backends.triton_backend import DeviceKVCache

        return DeviceKVCache.for_model(self._torch, self.args, batch_size, self.capacity, self.dtype, self.device)

    def move_rows(self, cache: Any, rows: Sequence[int]) -> None:
        with self._lock:
            cache.move_rows(rows)

    def step(self, cache: Any, input_ids: np.ndarray, start_row: int = 0, last_only: bool = False) -> np.ndarray:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ConfigError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if b > self.max_batch:
            raise ConfigError(f"{b} rows: the engine was built for at most {self.max_batch} (mixtrt build --max-batch)")
        if start_row < 0 or start_row + b > cache.batch_size:
            raise ConfigError(f"rows [{start_row}, {start_row + b}) are outside the cache's {cache.batch_size} rows")
        total = cache.lengths[start_row:start_row + b].astype(np.int64) + s
        if int(total.max()) > self.max_positions or (not self.windowed and int(total.max()) > self.capacity):
            raise ConfigError(f"position {int(total.max()) - 1} is past what this artifact serves")
        pieces = []
        for lo in range(0, s, self.max_step_tokens):  # a long prefill in steps the engine takes
            piece = input_ids[:, lo:lo + self.max_step_tokens]
            last = lo + piece.shape[1] == s
            pieces.append(self._run(cache, piece, start_row, last_only or not last))
        return pieces[-1] if last_only else np.concatenate(pieces, axis=1)

    def _run(self, cache: Any, ids: np.ndarray, start_row: int, last_only: bool) -> np.ndarray:
        torch = self._torch
        b, s = ids.shape
        rows = slice(start_row, start_row + b)
        total = (cache.lengths[rows] + s).astype(np.int32)
        positions = np.full((b, 1), s - 1, np.int64) if last_only else np.tile(np.arange(s, dtype=np.int64), (b, 1))
        feeds = {"input_ids": torch.from_numpy(ids).cuda(), "total_lengths": torch.from_numpy(total).cuda(),
                 "logit_positions": torch.from_numpy(positions).cuda()}
        logits = torch.empty((b, positions.shape[1], self.args.vocab_size), dtype=self.dtype, device="cuda")
        with self._lock:
            ctx = self.context
            stream = torch.cuda.current_stream()
            profile = self.prefill_profile if s >= 2 else 0
            if profile != self._profile:  # every input's shape is set again below, as a new profile needs
                if not ctx.set_optimization_profile_async(profile, stream.cuda_stream):
                    raise BackendError(f"TensorRT could not switch to optimisation profile {profile}")
                self._profile = profile
            for name, t in feeds.items():
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            for i in range(self.args.num_hidden_layers):
                for buf, past, present in zip((cache.keys[i][rows], cache.values[i][rows]), Manifest.past_names(i),
                                              Manifest.present_names(i), strict=True):
                    ctx.set_input_shape(past, tuple(buf.shape))
                    ctx.set_tensor_address(past, buf.data_ptr())
                    ctx.set_tensor_address(present, buf.data_ptr())  # in place: the plugin aliases them
            for name, t in self._state.items():
                ctx.set_tensor_address(name, t.data_ptr())
            for name in self._state_outputs:  # the state threaded through the MoE layers ends in the same buffers
                ctx.set_tensor_address(name, self._state["moe_state.acc" if "acc" in name else
                                                          "moe_state.count"].data_ptr())
            ctx.set_tensor_address("logits", logits.data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BackendError(f"TensorRT failed on a step of {b} row(s) x {s} token(s)")
            stream.synchronize()
            cache.lengths[rows] = total
        return logits.float().cpu().numpy()
