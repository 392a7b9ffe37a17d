"""The TensorRT plugins' launches run under the Triton interpreter: each kernel is called with exactly what an AOT
plugin's launch gives it (plugins/trt_plugins.py `swa_launch` / `moe_launch`): TensorRT's argument order (the
plugin's inputs, the extra int32 arguments, the plugin's outputs, matched to the kernel's non-constexpr
parameters in signature order), the plan's grid and constexprs, aliased outputs given the inputs' memory. The
results must be the torch references' (plugins/<op>/torch_op.py). This checks the launch plans compute the ops;
that TensorRT launches them so is not checked here (no TensorRT)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'mixtrt[gpu]'; the test extra lists it)")

import mixtrt.plugins.moe.torch_op  # noqa: E402,F401
import mixtrt.plugins.swa.torch_op  # noqa: E402,F401
from mixtrt.plugins.swa.torch_op import rope_tables  # noqa: E402
from mixtrt.plugins.trt_plugins import max_step_tokens, moe_launch, swa_launch  # noqa: E402


def _launch(launch, inputs, outputs):
    """Call the launch's kernel as TensorRT would: inputs, extra int32 args, outputs, in the signature's order."""
    kernel, sig, meta, opts = launch.spec
    names = [n for n, t in sig.items() if t != "constexpr"]
    values = [*inputs, *launch.extra, *outputs]
    assert len(names) == len(values), (names, len(values))
    kernel[launch.grid](**dict(zip(names, values, strict=True)), **meta, **opts)


@pytest.mark.parametrize("tactic", [1, 2])  # the decode tile, the prefill tile
def test_swa_plugin_launch_computes_the_op(tactic):
    g = torch.Generator().manual_seed(0)
    B, N, K, D, C, W = 2, 6, 2, 32, 40, 24
    S = max_step_tokens(C, W)  # the longest step the plugin takes: C - W + 1 = 17
    past = torch.tensor([30, 3])  # row 0's ring has wrapped; rows at different positions
    total = (past + S).to(torch.int32)
    q, k, v = (torch.randn(B, S, h * D, generator=g) for h in (N, K, K))
    kc, vc = torch.randn(B, K, C, D, generator=g), torch.randn(B, K, C, D, generator=g)
    cos, sin = rope_tables(D, 10000.0, 64)
    want, wk, wv = torch.ops.mixtrt.sliding_window_attention(q, k, v, kc, vc, total, cos, sin, N, K, W, 0.0)
    out = torch.empty_like(q)
    launch = swa_launch("fp32", B, S, N, K, C, D, W, 0.0, tactic=tactic)
    assert launch.spec[2]["BLOCK_S"] == (4 if tactic == 1 else 16)  # G = 3: G_P2 4
    _launch(launch, [q, k, v, kc, vc, total, cos, sin], [out, kc, vc])  # present K/V alias the past buffers
    assert (out - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(kc, wk) and torch.equal(vc, wv)


@pytest.mark.parametrize("T,tactic", [(1, 1), (5, 1), (18, 2)])  # decode kernel; tiled kernel over 2 token blocks
def test_moe_plugin_launch_computes_the_op(T, tactic):
    g = torch.Generator().manual_seed(T)
    H, I, E, top_k, T_max = 64, 96, 4, 2, 32
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g) * 2
    fc1 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    fc2 = torch.randn(E, H, I, generator=g) * I**-0.5
    want = torch.ops.mixtrt.moe(x, logits, list(fc1), list(fc2), top_k)
    acc, count = torch.zeros(T_max, H), torch.zeros(T_max, dtype=torch.int32)
    out = torch.empty_like(x)
    launch = moe_launch("fp32", T, H, I, E, top_k, tactic=tactic)
    for _ in range(2):  # the state is zero again after a call, so a second call (the next layer) is right too
        _launch(launch, [x, logits, fc1, fc2, acc, count], [out, acc, count])
        assert (out - want).abs().max() <= 1e-4 * want.abs().max()
        assert not acc.any() and not count.any()


@pytest.mark.parametrize("T,tactic", [(1, 1), (3, 1), (3, 2)])
def test_moe_int4_plugin_launch_computes_the_op(T, tactic):
    """The MoEInt4 plugin's launch on its inputs as the TensorRT graph holds them (INT32 words of plugins/int4.py's
    bytes, read by the kernel through a byte pointer: the same memory viewed as uint8), blocks from the scales'
    shapes (fc1 16, fc2 32), RTN's signed scales: the reference op on the dequantized weights."""
    import numpy as np

    from mixtrt.export.quantize import rtn
    from mixtrt.plugins.int4 import unpack_int4
    from mixtrt.plugins.trt_plugins import moe_int4_blocks

    g = torch.Generator().manual_seed(10 + T)
    H, I, E, top_k, T_max = 32, 64, 4, 2, 4
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g) * 2
    packed = {}
    for name, shape, block in (("fc1", (E, 2 * I, H), 16), ("fc2", (E, H, I), 32)):
        w = (torch.randn(*shape, generator=g) * shape[2] ** -0.5).numpy()
        q, s = rtn(name, w, block)
        assert (s < 0).any()
        packed[name] = (torch.from_numpy(np.ascontiguousarray(q).view(np.int32)), torch.from_numpy(s),
                        torch.from_numpy(unpack_int4(q, s)))
    (w1, s1, d1), (w2, s2, d2) = packed["fc1"], packed["fc2"]
    E_, H_, I_, blocks = moe_int4_blocks(w1.shape, s1.shape, w2.shape, s2.shape)
    assert (E_, H_, I_, blocks) == (E, H, I, (16, 32)) and w1.dtype == torch.int32
    want = torch.ops.mixtrt.moe(x, logits, list(d1), list(d2), top_k)
    acc, count = torch.zeros(T_max, H), torch.zeros(T_max, dtype=torch.int32)
    out = torch.empty_like(x)
    launch = moe_launch("fp32", T, H, I, E, top_k, qblocks=blocks, tactic=tactic)
    for _ in range(2):
        _launch(launch, [x, logits, w1.view(torch.uint8), s1, w2.view(torch.uint8), s2, acc, count], [out, acc, count])
        assert (out - want).abs().max() <= 1e-4 * want.abs().max()
        assert not acc.any() and not count.any()
