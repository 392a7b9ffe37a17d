"""The TensorRT plugin definitions (plugins/trt_plugins.py) without TensorRT: a stand-in `tensorrt.plugin` records
what `register_all` registers, then each plugin's aot_impl is called with tensor descriptors of plain shapes.
Checked: names, inputs, outputs and attributes are the ONNX ops' (the MoE op's stacked fixed-input form plus its
state pair), the autotune combinations cover every input and output, outputs alias the cache / state, the kernel
is compiled to PTX for sm_90 and its entry takes exactly the arguments TensorRT passes (inputs, the extra int32
arguments, outputs, then Triton's two hidden scratch pointers), and the grids and extra arguments are the ones the
torch wrappers launch. What a real TensorRT does with them is not checked here (`gpu`-marked tests).

Runs in a subprocess without TRITON_INTERPRET (the interpreter tests set it in this process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'mixtrt[gpu]'; the test extra lists it)")

SCRIPT = r"""
import inspect, json, sys, types
trt = types.ModuleType("tensorrt"); trt.float16, trt.float32 = "f16", "f32"
trtp = types.ModuleType("tensorrt.plugin")
REG = {}
def deco(kind):
    return lambda pid: (lambda f: REG.setdefault((kind, pid), f))
trtp.register, trtp.autotune, trtp.aot_impl = deco("register"), deco("autotune"), deco("aot_impl")
class Desc:
    def __init__(self, shape, dtype="f16"):
        self.shape = self.shape_expr = shape; self.dtype = dtype
    def like(self): return ("like", self.shape)
    def aliased(self): return ("aliased", self.shape)
class KernelLaunchParams: pass
trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymExprs = Desc, KernelLaunchParams, object
trtp.SymIntExprs = lambda n: [None] * n
trtp.SymInt32 = lambda v: v
trtp.cdiv = lambda a, b: -(-a // b)
trtp.AutoTuneCombination = lambda types_, fmt, tactics=None: (types_, fmt, tactics)
trt.plugin = trtp
sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp
from mixtrt.plugins import trt_plugins as P
P.register_all(arch=90)
out = {}
for (kind, pid), f in REG.items():
    out.setdefault(pid, {})[kind] = list(inspect.signature(f).parameters)
def run(pid, descs, attrs, tactic=1):
    f = REG[("aot_impl", pid)]
    name, ptx, p, extra = f(*descs, **attrs, outputs=None, tactic=tactic)
    entry = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
    reg = REG[("register", pid)](*descs, **attrs)
    tune = REG[("autotune", pid)](*descs, outputs=None)
    return {"name": name, "params": entry.count(".param"), "grid": [p.grid_x, p.grid_y, p.grid_z],
            "block": p.block_x, "shared": p.shared_mem, "extra": list(extra),
            "outputs": [list(map(str, o)) for o in reg],
            "tune": [t[0].count(",") + 1 for t in tune], "tactics": [t[2] for t in tune]}
B, S, N, K, D, C, W = 2, 3, 6, 2, 32, 80, 64
out["swa"] = run(P.SWA_ID, [Desc((B, S, N * D)), Desc((B, S, K * D)), Desc((B, S, K * D)), Desc((B, K, C, D)),
                            Desc((B, K, C, D)), Desc((B,), "i32"), Desc((128, D // 2)), Desc((128, D // 2))],
                 dict(num_heads=N, kv_heads=K, window=W, windowed_cache=1, scale=0.0))
S = 40  # the prefill tactic on a 40-token step: the tile of 64 // G_P2 = 16 tokens
out["swa_prefill"] = run(P.SWA_ID, [Desc((B, S, N * D)), Desc((B, S, K * D)), Desc((B, S, K * D)), Desc((B, K, C, D)),
                                    Desc((B, K, C, D)), Desc((B,), "i32"), Desc((128, D // 2)), Desc((128, D // 2))],
                         dict(num_heads=N, kv_heads=K, window=W, windowed_cache=1, scale=0.0), tactic=2)
T, H, I, E = 5, 192, 96, 4
out["moe"] = run(P.MOE_ID, [Desc((T, H)), Desc((T, E)), Desc((E, 2 * I, H)), Desc((E, H, I)), Desc((8, H), "f32"),
                            Desc((8,), "i32")], dict(k=2))
out["moe4"] = run(P.MOE_INT4_ID, [Desc((T, H)), Desc((T, E)), Desc((E, 2 * I, H // 8), "i32"),
                                  Desc((E, 2 * I, H // 64)), Desc((E, H, I // 8), "i32"), Desc((E, H, I // 32)),
                                  Desc((8, H), "f32"), Desc((8,), "i32")], dict(k=2))
out["moe_tiled"] = run(P.MOE_ID, [Desc((40, H)), Desc((40, E)), Desc((E, 2 * I, H)), Desc((E, H, I)),
                                  Desc((80, H), "f32"), Desc((80,), "i32")], dict(k=2), tactic=2)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_names_inputs_attributes_are_the_onnx_ops(report):
    from mixtrt.plugins import trt_plugins as P
    from mixtrt.plugins.moe import OP_TYPE as MOE
    from mixtrt.plugins.moe import onnx_op as moe_onnx
    from mixtrt.plugins.swa import OP_TYPE as SWA
    from mixtrt.plugins.swa import onnx_op as swa_onnx

    assert P.SWA_ID == f"mixtrt::{SWA}" and P.MOE_ID == f"mixtrt::{MOE}"
    swa = report[P.SWA_ID]
    assert swa["register"] == [*swa_onnx.INPUTS, *swa_onnx.ATTRIBUTES]
    assert swa["aot_impl"] == [*swa_onnx.INPUTS, *swa_onnx.ATTRIBUTES, "outputs", "tactic"]
    assert swa["autotune"] == [*swa_onnx.INPUTS, "outputs"]
    assert P.SWA_OUTPUTS == swa_onnx.OUTPUTS
    moe = report[P.MOE_ID]
    assert moe["register"] == [*P.MOE_INPUTS, *moe_onnx.ATTRIBUTES] and P.MOE_INPUTS[:4] == ("hidden", "router_logits",
                                                                                              "fc1", "fc2")
    assert moe["aot_impl"] == [*P.MOE_INPUTS, *moe_onnx.ATTRIBUTES, "outputs", "tactic"]
    moe4 = report[P.MOE_INT4_ID]  # the INT4 form: the same op and attributes, packed weights + scales
    assert P.MOE_INT4_ID == f"mixtrt::{MOE}Int4"
    assert moe4["register"] == [*P.MOE_INT4_INPUTS, *moe_onnx.ATTRIBUTES]
    assert moe4["aot_impl"] == [*P.MOE_INT4_INPUTS, *moe_onnx.ATTRIBUTES, "outputs", "tactic"]
    assert moe4["autotune"] == [*P.MOE_INT4_INPUTS, "outputs"]
    assert [n for n in P.MOE_INT4_INPUTS if not n.endswith("_scales")] == list(P.MOE_INPUTS)


def test_swa_launch(report):
    r = report["swa"]  # B=2, S=3, 6/2 heads of 32, C=80, W=64: G_P2=4, decode tile BLOCK_S = 16 // 4 = 4
    assert r["name"].startswith("swa_attention_kernel")
    assert r["params"] == 8 + 2 + 3 + 2  # inputs, S and C, outputs, Triton's two scratch pointers
    assert r["grid"] == [1, 2 * 2, 1] and r["extra"] == [3, 80] and r["block"] == 128
    assert 0 < r["shared"] <= 48 * 1024
    assert [o[0] for o in r["outputs"]] == ["like", "aliased", "aliased"]  # present k/v alias the past buffers
    assert r["tune"] == [8 + 3] and r["tactics"] == [[1, 2]]  # decode and prefill tiles, timed per profile
    p = report["swa_prefill"]  # S=40: 16 tokens a program with the prefill tile (the decode tile: 4)
    assert p["name"] == r["name"] and p["grid"] == [3, 2 * 2, 1] and p["extra"] == [40, 80]


def test_moe_launch(report):
    r = report["moe"]  # T=5, H=192, I=96, E=4, k=2
    assert r["name"].startswith("moe_decode_aliased_kernel")
    assert r["params"] == 6 + 4 + 3 + 2
    assert r["grid"] == [3, 10, 1] and r["extra"] == [5, 192, 96, 4] and r["block"] == 128
    assert 0 <= r["shared"] <= 48 * 1024
    assert [o[0] for o in r["outputs"]] == ["like", "aliased", "aliased"]
    assert r["tune"] == [6 + 3] and r["tactics"] == [[1, 2]]
    t = report["moe_tiled"]  # T=40: a program per I tile (3), expert (4) and block of 16 tokens (3)
    assert t["name"].startswith("moe_tiled_aliased_kernel") and t["params"] == r["params"]
    assert t["grid"] == [3, 4, 3] and t["extra"] == [40, 192, 96, 4] and 0 <= t["shared"] <= 48 * 1024


def test_step_bound_keeps_the_fused_write_safe():
    from mixtrt.plugins.swa.triton_kernels import fused_write_is_safe
    from mixtrt.plugins.trt_plugins import max_step_tokens, moe_launch, swa_launch

    for C, W in ((4112, 4096), (21, 5), (80, 64), (64, -1)):
        s = max_step_tokens(C, W)
        assert fused_write_is_safe(s, C, W) and (W <= 0 or not fused_write_is_safe(s + 1, C, W))
    launch = swa_launch("fp16", 1, 40, 32, 8, 4112, 128, 4096, 0.0)  # Mistral-7B: G=4, BLOCK_S = 4
    assert launch.grid == (10, 8, 1) and launch.spec[2]["WRITE_CACHE"] and launch.spec[2]["SCALE"] == 128**-0.5
    assert swa_launch("fp16", 1, 1, 32, 8, 4112, 128, 4096, 0.25).spec[2]["SCALE"] == 0.25
    with pytest.raises(ValueError, match="k=3"):
        moe_launch("fp16", 1, 64, 96, 2, 3)


def test_moe_int4_launch(report):
    r = report["moe4"]  # T=5, H=192, I=96, E=4, k=2; INT4 blocks 64 (fc1) and 32 (fc2) from the scales' shapes
    assert r["name"].startswith("moe_decode_aliased_kernel")
    assert r["params"] == 8 + 4 + 3 + 2  # inputs (weights + scales), T/H/I/E, outputs, Triton's scratch pointers
    assert r["grid"] == [3, 10, 1] and r["extra"] == [5, 192, 96, 4] and r["block"] == 128
    assert 0 <= r["shared"] <= 48 * 1024
    assert [o[0] for o in r["outputs"]] == ["like", "aliased", "aliased"]
    assert r["tune"] == [8 + 3] and r["tactics"] == [[1, 2]]


def test_moe_int4_blocks_refuse_what_does_not_fit():
    from mixtrt.plugins.trt_plugins import moe_int4_blocks

    assert moe_int4_blocks((4, 192, 24), (4, 192, 3), (4, 192, 12), (4, 192, 3)) == (4, 192, 96, (64, 32))
    with pytest.raises(ValueError, match="not INT4 words"):
        moe_int4_blocks((4, 192, 24), (4, 192, 3), (4, 96, 12), (4, 96, 3))
    with pytest.raises(ValueError, match="do not block"):
        moe_int4_blocks((4, 192, 24), (4, 192, 5), (4, 192, 12), (4, 192, 3))
