# ruff: noqa: UP006, UP007, UP035  (typing forms on purpose: see the comment above the imports)
"""TensorRT plugins for both ops: Python plugin definitions (`tensorrt.plugin`: register, autotune, aot_impl)
whose implementations are our Triton kernels compiled ahead of time to PTX (plugins/triton_aot.py), so an engine
runs without Python.

NOT RUN against TensorRT (it needs an NVIDIA GPU; none was available). What is tested without it
(tests/plugins/test_trt_plugins.py, test_trt_plugin_launch.py): the launch plans below (kernel choice, grid,
block, shared memory, the extra int32 arguments in the kernels' argument order), that they compile, that each
launch run under the Triton interpreter exactly as TensorRT would call it computes its op (the references'
outputs, the cache / state written in place), and that names, inputs, outputs and attributes are the ONNX ops'.
`register_all()` needs TensorRT >= 10.9 (AOT Python plugins) and is imported by
`mixtrt build` and the tensorrt backend before a graph is parsed or an engine deserialised.

- `mixtrt::SlidingWindowAttention` (8 inputs, 3 outputs; attributes num_heads, kv_heads, window, windowed_cache,
  scale): one launch of `swa_attention_kernel` with the ring write fused (WRITE_CACHE), present_key/value
  aliased to past_key/value (`TensorDesc.aliased()`, preview feature ALIASED_PLUGIN_IO_10_03): the cache is
  written in place. Two tactics, two tiles, each correct for any number of new tokens S: 1 the decode tile
  (BLOCK_S = 16 / G_P2 query tokens per program), 2 the prefill tile (64 / G_P2 tokens: each key tile read once
  per 64 query rows); TensorRT times both in each optimisation profile and keeps the faster, so the engine's decode
  profile (opt S = 1) and prefill profile (opt S = the step bound) get their own (`SWA_TACTICS`). The fused write
  is safe only while S <= C - W + 1 (`fused_write_is_safe`), so an engine's profiles bound the tokens of a step to
  that (`max_step_tokens`) and the runtime prefills in chunks.
- `mixtrt::MoE`, the stacked fixed-input form (hidden [T, H], router_logits [T, E], fc1 [E, 2I, H], fc2 [E, H, I],
  attribute k; plugins/moe/SPEC.md) plus the decode kernel's zeroed state (acc fp32 [T_max, H], count int32
  [T_max]), aliased in and out like the cache: one launch, two tactics (`MOE_TACTICS`) on the same arguments:
  `moe_decode_aliased_kernel` (`moe_decode_kernel` with the state inputs in TensorRT's argument order; reads an
  expert's weights once per token-expert pair) and `moe_tiled_aliased_kernel` (a program per I tile, expert and
  block of 16 tokens: an expert's weights once per token block), both correct for any T; TensorRT times both in
  the decode and the prefill profile.
- `mixtrt::MoEInt4`, the INT4 form (int4 artifacts; `mixtrt build` writes it, export/tensorrt_build.py
  `int4_forms`): hidden, router_logits, fc1 INT32 [E, 2I, H/8] + fc1_scales [E, 2I, H/block1], fc2 INT32
  [E, H, I/8] + fc2_scales [E, H, I/block2], then the same state pair; the same kernel with INT4 weights
  (`INT4`, the two blocks from the scales' shapes), which dequantizes each block as it reads it. The words are
  plugins/int4.py's bytes (INT32 only because TensorRT passes no UINT8 tensor to a plugin); the kernel reads
  them through a byte pointer. A new plugin name rather than a version: every Python plugin is version "1".

TensorRT facts this relies on (tensorrt/plugin/_lib.py, quickly_deployable_plugins sample): a Python plugin's
creator has version "1" whatever the op's version, so the graph TensorRT parses must carry
`plugin_version = "1"` on these nodes; attributes are int/float/str/bool/bytes fields of the node; an AOT
implementation returns (kernel name, PTX, KernelLaunchParams, extra scalar arguments) and TensorRT passes the
inputs, then the extra arguments, then the outputs.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions' annotations as
# objects, written with typing's Tuple / List / Union as TensorRT's own samples write them.
import functools
from dataclasses import dataclass
from typing import Any, List, Tuple, Union

SWA_ID = "mixtrt::SlidingWindowAttention"
MOE_ID = "mixtrt::MoE"
SWA_INPUTS = ("q", "k", "v", "past_key", "past_value", "total_lengths", "cos_cache", "sin_cache")
SWA_OUTPUTS = ("output", "present_key", "present_value")
SWA_ATTRIBUTES = ("num_heads", "kv_heads", "window", "windowed_cache", "scale")
MOE_INPUTS = ("hidden", "router_logits", "fc1", "fc2", "acc", "count")  # acc/count: the decode kernel's state
MOE_OUTPUTS = ("output", "acc_out", "count_out")  # acc_out/count_out alias acc/count
MOE_ATTRIBUTES = ("k",)
# mixtrt::MoEInt4: the MoE op's INT4 form (plugins/moe/SPEC.md "TensorRT INT4 plugin"); fc1 / fc2 are INT32 words
# holding plugins/int4.py's packed bytes ([E, 2I, H/8], [E, H, I/8]), scales [E, N, K/block] in the activation dtype
MOE_INT4_ID = "mixtrt::MoEInt4"
MOE_INT4_INPUTS = ("hidden", "router_logits", "fc1", "fc1_scales", "fc2", "fc2_scales", "acc", "count")
QDP_VERSION = "1"  # every tensorrt.plugin creator's version
SWA_TACTICS = {1: 1, 2: 64}  # SWA plugin tactic -> the tokens its tile is sized for (block_sizes): decode, prefill
MOE_TACTICS = {1: "decode", 2: "tiled"}  # MoE / MoEInt4 tactic -> kernel: moe_decode / moe_tiled (aliased forms)


def _cdiv(a: Any, b: int) -> Any:
    return (a + b - 1) // b


@dataclass(frozen=True)
class Launch:
    """One kernel launch of an AOT plugin: the spec to compile, grid (x, y, z), threads per block, shared bytes,
    and the int32 arguments between the inputs and the outputs (ints here; TensorRT shape expressions in the
    plugin)."""

    spec: tuple
    grid: tuple[Any, Any, Any]
    block: int
    extra: tuple[Any, ...]


def max_step_tokens(capacity: int, window: int) -> int:
    """The most new tokens one step of the SWA plugin may take (the fused ring write's bound; a linear cache:
    the capacity)."""
    return capacity if window <= 0 else max(1, capacity - window + 1)


def swa_launch(dtype: str, B: Any, S: Any, num_heads: int, kv_heads: int, capacity: int, head_dim: int, window: int,
               scale: float, cdiv: Any = _cdiv, tactic: int = 1) -> Launch:
    """The SlidingWindowAttention plugin's launch for q [B, S, N*D] and a cache [B, K, C, D] (dtype "fp16"/"fp32");
    `tactic` picks the tile (SWA_TACTICS)."""
    import torch

    from mixtrt.plugins.swa import triton_kernels as swa

    if num_heads % kv_heads or head_dim % 2:
        raise ValueError(f"num_heads {num_heads} must be a multiple of kv_heads {kv_heads}, head dim {head_dim} even")
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    if tactic not in SWA_TACTICS:
        raise ValueError(f"SWA plugin tactic {tactic} is not one of {sorted(SWA_TACTICS)}")
    spec = swa._attention_spec(torch_dtype, num_heads, kv_heads, head_dim, window, SWA_TACTICS[tactic])
    if scale:  # the spec compiles the default 1/sqrt(D)
        spec[2]["SCALE"] = float(scale)
    block_s = spec[2]["BLOCK_S"]
    return Launch(spec, (cdiv(S, block_s), B * kv_heads, 1), spec[3]["num_warps"] * 32, (S, capacity))


def moe_int4_blocks(fc1_shape: Any, fc1_scales_shape: Any, fc2_shape: Any, fc2_scales_shape: Any
                    ) -> tuple[int, int, int, tuple[int, int]]:
    """(E, H, I, (block1, block2)) of the INT4 plugin's inputs: fc1 words [E, 2I, H/8], fc2 words [E, H, I/8],
    scales [E, N, K/block]; ValueError when they do not fit together."""
    E, two_i, h8 = (int(d) for d in fc1_shape)
    H, I = 8 * h8, two_i // 2  # noqa: E741
    if tuple(int(d) for d in fc2_shape) != (E, H, I // 8) or two_i % 2 or I % 8:
        raise ValueError(f"fc1 {tuple(fc1_shape)} / fc2 {tuple(fc2_shape)}: not INT4 words [E, 2I, H/8] / [E, H, I/8]")
    s1, s2 = (tuple(int(d) for d in s) for s in (fc1_scales_shape, fc2_scales_shape))
    if s1[:2] != (E, two_i) or s2[:2] != (E, H) or H % s1[2] or I % s2[2] or (H // s1[2]) % 2 or (I // s2[2]) % 2:
        raise ValueError(f"scales {s1} / {s2} do not block fc1 {tuple(fc1_shape)} / fc2 {tuple(fc2_shape)} evenly")
    return E, H, I, (H // s1[2], I // s2[2])


def moe_launch(dtype: str, T: Any, H: int, I: int, E: int, top_k: int,  # noqa: E741
               qblocks: tuple[int, int] | None = None, cdiv: Any = _cdiv, tactic: int = 1) -> Launch:
    """The MoE plugin's launch for hidden [T, H] and E experts of width I: tactic 1 the decode kernel (a program per
    I tile and (token, expert) pair), 2 the tiled one (a program per I tile, expert and block of 16 tokens; an
    expert's weights read once per block). Same arguments, same state contract; TensorRT times both per profile."""
    import torch

    from mixtrt.plugins.moe import triton_kernels as moe

    if not 1 <= top_k <= E:
        raise ValueError(f"k={top_k} must be in [1, {E}]")
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    if tactic not in MOE_TACTICS:
        raise ValueError(f"MoE plugin tactic {tactic} is not one of {sorted(MOE_TACTICS)}")
    if MOE_TACTICS[tactic] == "tiled":
        spec = moe.tiled_spec(torch_dtype, E, top_k, qblocks, aliased=True)
        grid = (cdiv(I, moe.DECODE_BLOCK_I), E, cdiv(T, moe.TILED_BLOCK_T))
    else:
        spec = moe.aliased_decode_spec(torch_dtype, E, top_k, qblocks)
        grid = (cdiv(I, moe.DECODE_BLOCK_I), T * top_k, 1)
    return Launch(spec, grid, spec[3]["num_warps"] * 32, (T, H, I, E))


@functools.lru_cache(maxsize=64)
def _compiled(key: str, arch: int) -> tuple[str, str, int]:
    spec = _SPECS[key]
    from mixtrt.plugins.triton_aot import compile_spec

    k = compile_spec(spec, arch)
    return k.metadata.name, k.asm["ptx"], k.metadata.shared


_SPECS: dict[str, tuple] = {}


def compiled(launch: Launch, arch: int) -> tuple[str, str, int]:
    """(kernel name, PTX, dynamic shared bytes) of a launch's kernel for sm_<arch> (compiled once per process)."""
    kernel, sig, meta, opts = launch.spec
    key = repr((kernel.__name__, sorted(sig.items()), sorted(meta.items()), sorted(opts.items())))
    _SPECS[key] = launch.spec
    return _compiled(key, arch)


_REGISTERED = False


def register_all(arch: int | None = None) -> None:
    """Register the plugins (SWA, MoE, MoEInt4) with TensorRT (once per process). `arch`: the GPU's compute
    capability as an int (86, 90, ...); default: the current CUDA device's."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    dt = {trt.float16: "fp16", trt.float32: "fp32"}

    @trtp.register(SWA_ID)
    def swa_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, past_key: trtp.TensorDesc,
                 past_value: trtp.TensorDesc, total_lengths: trtp.TensorDesc, cos_cache: trtp.TensorDesc,
                 sin_cache: trtp.TensorDesc, num_heads: int, kv_heads: int, window: int, windowed_cache: int,
                 scale: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return q.like(), past_key.aliased(), past_value.aliased()

    @trtp.autotune(SWA_ID)
    def swa_tune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, past_key: trtp.TensorDesc,
                 past_value: trtp.TensorDesc, total_lengths: trtp.TensorDesc, cos_cache: trtp.TensorDesc,
                 sin_cache: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP16|FP32, FP16|FP32, FP16|FP32, FP16|FP32, FP16|FP32, INT32, FP16|FP32, "
                                         "FP16|FP32, FP16|FP32, FP16|FP32, FP16|FP32", "LINEAR", list(SWA_TACTICS))]

    @trtp.aot_impl(SWA_ID)
    def swa_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, past_key: trtp.TensorDesc,
                past_value: trtp.TensorDesc, total_lengths: trtp.TensorDesc, cos_cache: trtp.TensorDesc,
                sin_cache: trtp.TensorDesc, num_heads: int, kv_heads: int, window: int, windowed_cache: int,
                scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int
                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        B, S = q.shape_expr[0], q.shape_expr[1]
        C, D = past_key.shape[2], past_key.shape[3]  # fixed at export
        launch = swa_launch(dt[q.dtype], B, S, num_heads, kv_heads, C, D, window, scale, cdiv=trtp.cdiv,
                            tactic=tactic)
        name, ptx, shared = compiled(launch, arch)
        return name, ptx, _params(trtp, launch, shared), _extra(trtp, launch)

    @trtp.register(MOE_ID)
    def moe_desc(hidden: trtp.TensorDesc, router_logits: trtp.TensorDesc, fc1: trtp.TensorDesc,
                 fc2: trtp.TensorDesc, acc: trtp.TensorDesc, count: trtp.TensorDesc, k: int
                 ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return hidden.like(), acc.aliased(), count.aliased()

    @trtp.autotune(MOE_ID)
    def moe_tune(hidden: trtp.TensorDesc, router_logits: trtp.TensorDesc, fc1: trtp.TensorDesc,
                 fc2: trtp.TensorDesc, acc: trtp.TensorDesc, count: trtp.TensorDesc,
                 outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP16|FP32, FP16|FP32, FP16|FP32, FP16|FP32, FP32, INT32, FP16|FP32, FP32, "
                                         "INT32", "LINEAR", list(MOE_TACTICS))]

    @trtp.aot_impl(MOE_ID)
    def moe_aot(hidden: trtp.TensorDesc, router_logits: trtp.TensorDesc, fc1: trtp.TensorDesc,
                fc2: trtp.TensorDesc, acc: trtp.TensorDesc, count: trtp.TensorDesc, k: int,
                outputs: Tuple[trtp.TensorDesc], tactic: int
                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        E, two_i, H = fc1.shape
        launch = moe_launch(dt[hidden.dtype], hidden.shape_expr[0], H, two_i // 2, E, k, cdiv=trtp.cdiv,
                            tactic=tactic)
        name, ptx, shared = compiled(launch, arch)
        return name, ptx, _params(trtp, launch, shared), _extra(trtp, launch)

    @trtp.register(MOE_INT4_ID)
    def moe4_desc(hidden: trtp.TensorDesc, router_logits: trtp.TensorDesc, fc1: trtp.TensorDesc,
                  fc1_scales: trtp.TensorDesc, fc2: trtp.TensorDesc, fc2_scales: trtp.TensorDesc, acc: trtp.TensorDesc,
                  count: trtp.TensorDesc, k: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return hidden.like(), acc.aliased(), count.aliased()

    @trtp.autotune(MOE_INT4_ID)
    def moe4_tune(hidden: trtp.TensorDesc, router_logits: trtp.TensorDesc, fc1: trtp.TensorDesc,
                  fc1_scales: trtp.TensorDesc, fc2: trtp.TensorDesc, fc2_scales: trtp.TensorDesc, acc: trtp.TensorDesc,
                  count: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP16|FP32, FP16|FP32, INT32, FP16|FP32, INT32, FP16|FP32, FP32, INT32, "
                                         "FP16|FP32, FP32, INT32", "LINEAR", list(MOE_TACTICS))]

    @trtp.aot_impl(MOE_INT4_ID)
    def moe4_aot(hidden: trtp.TensorDesc, router_logits: trtp.TensorDesc, fc1: trtp.TensorDesc,
                 fc1_scales: trtp.TensorDesc, fc2: trtp.TensorDesc, fc2_scales: trtp.TensorDesc, acc: trtp.TensorDesc,
                 count: trtp.TensorDesc, k: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        E, H, I, blocks = moe_int4_blocks(fc1.shape, fc1_scales.shape, fc2.shape, fc2_scales.shape)
        launch = moe_launch(dt[hidden.dtype], hidden.shape_expr[0], H, I, E, k, qblocks=blocks, cdiv=trtp.cdiv,
                            tactic=tactic)
        name, ptx, shared = compiled(launch, arch)
        return name, ptx, _params(trtp, launch, shared), _extra(trtp, launch)

    del swa_desc, swa_tune, swa_aot, moe_desc, moe_tune, moe_aot, moe4_desc, moe4_tune, moe4_aot
    _REGISTERED = True


def _params(trtp: Any, launch: Launch, shared: int) -> Any:
    p = trtp.KernelLaunchParams()
    p.grid_x, p.grid_y, p.grid_z = launch.grid
    p.block_x = launch.block
    p.shared_mem = shared
    return p


def _extra(trtp: Any, launch: Launch) -> Any:
    args = trtp.SymIntExprs(len(launch.extra))
    for i, value in enumerate(launch.extra):
        args[i] = trtp.SymInt32(value)
    return args
