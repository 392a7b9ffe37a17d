"""The MoE Triton kernels (plugins/moe/triton_kernels.py) under TRITON_INTERPRET=1 on the CPU vs the MoE
reference (plugins/moe/torch_op.py): the decode kernel and the grouped path, fp32 / fp16 / INT4 weights, and the traps.

TRITON_INTERPRET is read when a kernel is decorated, so it is set before the kernel module is imported.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra lists it)")

from mixtrt.plugins.int4 import pack_int4, unpack_int4  # noqa: E402
from mixtrt.plugins.moe import triton_kernels as tk  # noqa: E402
from mixtrt.plugins.moe.torch_op import reference  # noqa: E402

if type(tk.moe_decode_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError("plugins.moe.triton_kernels was imported before TRITON_INTERPRET=1 was set: the kernels "
                       "are compiled for a GPU and cannot run on CPU tensors in this process")

FP32_RTOL, FP16_RTOL = 1e-4, 5e-3  # max|diff| / max(1, max|ref|), as tests/plugins/test_moe_op.py
TRAP_MIN = 5e-2
PATHS = pytest.mark.parametrize("path", ["decode", "tiled", "grouped"])


def _inputs(T: int, E: int, H: int, I: int, seed: int, dtype=torch.float32):
    """Routing with clear top-k margins (no near-ties, also after fp16 rounding); stacked weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    spaced = torch.linspace(-2.0, 2.0, E)
    logits = torch.stack([spaced[torch.randperm(E, generator=g)] for _ in range(T)]).reshape(T, E)
    logits = logits + 0.05 * torch.randn(T, E, generator=g)
    fc1 = 0.3 * torch.randn(E, 2 * I, H, generator=g)  # [gate; up] rows per expert
    fc2 = 0.3 * torch.randn(E, H, I, generator=g)
    return tuple(t.to(dtype) for t in (hidden, logits, fc1, fc2))


def _reference(hidden, logits, fc1, fc2, k):
    """The fp32 reference on the same (possibly fp16-rounded) values, stacked as the kernels take them."""
    return reference(hidden.float(), logits.float(), fc1.float(), fc2.float(), k)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def _tol(dtype) -> float:
    return FP32_RTOL if dtype == torch.float32 else FP16_RTOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", [2, 3, 8])
def test_matches_reference(E, k, dtype):
    """Both paths, H=40 / I=24 (not powers of two), decode with 3 tokens and the grouped path with 17."""
    for path, T in (("decode", 3), ("grouped", 17)):
        hidden, logits, fc1, fc2 = _inputs(T, E, 40, 24, seed=E * 10 + k, dtype=dtype)
        out = tk.moe(hidden, logits, fc1, fc2, k, path=path)
        assert out.shape == hidden.shape and out.dtype == dtype
        assert _rel(out, _reference(hidden, logits, fc1, fc2, k)) <= _tol(dtype), path


@pytest.mark.parametrize("path", ["decode", "grouped", pytest.param("tiled", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_multi_tile_shapes(dtype, path):
    """H=192, I=96: several H tiles per fc1 row block and several I tiles (decode: 3 programs per pair)."""
    T = 2 if path == "decode" else 24
    hidden, logits, fc1, fc2 = _inputs(T, 8, 192, 96, seed=5, dtype=dtype)
    out = tk.moe(hidden, logits, fc1, fc2, 2, path=path)
    assert _rel(out, _reference(hidden, logits, fc1, fc2, 2)) <= _tol(dtype)


def test_default_path_and_unrouted_experts():
    """T=1, k=1, E=8: seven experts get no token (both paths); T=0; the default path picks by T."""
    hidden, logits, fc1, fc2 = _inputs(6, 8, 40, 24, seed=3)
    ref = _reference(hidden[:1], logits[:1], fc1, fc2, 1)
    for path in ("decode", "grouped", None):
        assert _rel(tk.moe(hidden[:1], logits[:1], fc1, fc2, 1, path=path), ref) <= FP32_RTOL
    assert _rel(tk.moe(hidden, logits, fc1, fc2, 2), _reference(hidden, logits, fc1, fc2, 2)) <= FP32_RTOL  # grouped
    assert tk.moe(hidden[:0], logits[:0], fc1, fc2, 2).shape == (0, 40)


@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_tiled_path_token_blocks_unrouted_experts_and_state(k):
    """moe_tiled_kernel (the TensorRT plugin's prefill tactic): T=21 tokens over two blocks of 16 (the second
    partial), E=8 with k=1 (experts without a token in a block return at once), H=40 / I=40 (two I tiles, the
    second partial); the state is zero after the call and a second call gives the same output."""
    hidden, logits, fc1, fc2 = _inputs(21, 8, 40, 40, seed=30 + k)
    ref = _reference(hidden, logits, fc1, fc2, k)
    out = tk.moe(hidden, logits, fc1, fc2, k, path="tiled")
    assert _rel(out, ref) <= FP32_RTOL
    acc, count = tk._STATE.get(21, 40, hidden.device)
    assert not acc.any() and not count.any()
    assert torch.equal(tk.moe(hidden, logits, fc1, fc2, k, path="tiled"), out)


def test_decode_state_is_zero_after_each_call():
    """The decode kernel's accumulator and counters are reset by the last program of each token, so repeated
    calls (a decode loop) give the same result without re-zeroing."""
    hidden, logits, fc1, fc2 = _inputs(3, 4, 40, 24, seed=4)
    first = tk.moe(hidden, logits, fc1, fc2, 2, path="decode")
    acc, count = tk._STATE.get(3, 40, hidden.device)
    assert not acc.any() and not count.any()
    assert torch.equal(tk.moe(hidden, logits, fc1, fc2, 2, path="decode"), first)


def test_align_groups_pairs_by_expert():
    """moe_align_kernel: every BLOCK_M block holds pairs of one expert (pads = T*k), each pair exactly once,
    unused blocks marked E."""
    T, E, k = 37, 8, 2
    _, logits, _, _ = _inputs(T, E, 8, 8, seed=6)
    bm = tk.GROUP_BLOCK_M
    max_blocks = -(-T * k // bm) + E
    w = torch.empty(T * k)
    pairs = torch.empty(max_blocks * bm, dtype=torch.int32)
    owner = torch.empty(max_blocks, dtype=torch.int32)
    tk.moe_align_kernel[(1,)](logits, T, E, w, pairs, owner, TOP_K=k, E_P2=8, BLOCK_M=bm, BLOCK_T=16)
    probs = logits.softmax(-1)
    top_w, top_e = probs.topk(k, dim=-1)
    assert torch.allclose(w.view(T, k), top_w / top_w.sum(-1, keepdim=True), atol=1e-6)
    blocks = pairs.view(max_blocks, bm)
    real = blocks[blocks < T * k]
    assert sorted(real.tolist()) == list(range(T * k))
    for b in range(max_blocks):
        got = blocks[b][blocks[b] < T * k].long()
        if int(owner[b]) == E:
            assert len(got) == 0
        else:
            assert len(got) > 0 and (top_e.view(-1)[got] == owner[b]).all()
    assert (owner.diff() >= 0).all()  # experts in order


@PATHS
@pytest.mark.parametrize("dtype,block1,block2", [(torch.float16, 64, 32), (torch.float32, 8, 6)],
                         ids=["fp16-blocks64,32", "fp32-blocks8,6"])
def test_int4_matches_reference_on_dequantised_weights(dtype, block1, block2, path):
    """INT4 weights (plugins/int4.py packing) vs the reference run on unpack_int4 of the same bytes; H=192,
    I=96 with power-of-two blocks, and awkward blocks 8 / 6 (H % 16 and I % 8 != 0 would need them)."""
    T = 2 if path == "decode" else 20
    hidden, logits, fc1, fc2 = _inputs(T, 4, 192, 96, seed=8, dtype=dtype)
    (q1, s1), (q2, s2) = pack_int4(fc1.numpy(), block1), pack_int4(fc2.numpy(), block2)
    deq1, deq2 = torch.from_numpy(unpack_int4(q1, s1)), torch.from_numpy(unpack_int4(q2, s2))
    out = _int4_moe(hidden, logits, q1, s1, q2, s2, 2, path)
    assert _rel(out, _reference(hidden, logits, deq1, deq2, 2)) <= _tol(dtype)
    assert _rel(out, _reference(hidden, logits, fc1, fc2, 2)) > 1e-3  # it did quantise


def _int4_moe(hidden, logits, q1, s1, q2, s2, k, path):
    t = torch.from_numpy
    return tk.moe(hidden, logits, t(q1), t(q2), k, fc1_scales=t(s1), fc2_scales=t(s2), path=path)


# --- traps: each mistake runs and must be caught by the comparisons above -------------------------------------


def _trap_case(path: str):
    T = 2 if path == "decode" else 24
    hidden, logits, fc1, fc2 = _inputs(T, 8, 40, 24, seed=7)
    return hidden, logits, fc1, fc2, _reference(hidden, logits, fc1, fc2, 2)


@PATHS
def test_trap_int4_nibble_order(path):
    """Element 2j in the high nibble instead of the low one."""
    hidden, logits, fc1, fc2, _ = _trap_case(path)
    (q1, s1), (q2, s2) = pack_int4(fc1.numpy(), 8), pack_int4(fc2.numpy(), 8)
    ref = _reference(hidden, logits, torch.from_numpy(unpack_int4(q1, s1)), torch.from_numpy(unpack_int4(q2, s2)), 2)
    assert _rel(_int4_moe(hidden, logits, q1, s1, q2, s2, 2, path), ref) <= FP32_RTOL
    swap = lambda q: ((q >> 4) | (q << 4)).astype(np.uint8)  # noqa: E731
    assert _rel(_int4_moe(hidden, logits, swap(q1), s1, swap(q2), s2, 2, path), ref) > TRAP_MIN


@PATHS
def test_trap_int4_scale_block_axis(path):
    """Scales laid out block-major ([K/block, N] flattened, DequantizeLinear's layout for a [K, N] MatMul
    weight) instead of [N, K/block]: same element count, wrong axis."""
    hidden, logits, fc1, fc2, _ = _trap_case(path)
    (q1, s1), (q2, s2) = pack_int4(fc1.numpy(), 8), pack_int4(fc2.numpy(), 8)
    ref = _reference(hidden, logits, torch.from_numpy(unpack_int4(q1, s1)), torch.from_numpy(unpack_int4(q2, s2)), 2)
    block_major = lambda s: np.ascontiguousarray(np.swapaxes(s, -1, -2)).reshape(s.shape)  # noqa: E731
    assert _rel(_int4_moe(hidden, logits, q1, block_major(s1), q2, block_major(s2), 2, path), ref) > TRAP_MIN


@PATHS
@pytest.mark.parametrize("layout", ["interleaved", "up_gate"])
def test_trap_gate_up_rows(layout, path):
    """fc1 rows g0, u0, g1, u1, ... (com.microsoft.MoE) or [up; gate] instead of [gate; up]."""
    hidden, logits, fc1, fc2, ref = _trap_case(path)
    gate, up = fc1.chunk(2, dim=1)
    wrong = torch.stack((gate, up), dim=2).reshape(fc1.shape) if layout == "interleaved" else torch.cat((up, gate), 1)
    assert _rel(tk.moe(hidden, logits, wrong, fc2, 2, path=path), ref) > TRAP_MIN


@PATHS
def test_trap_expert_order(path):
    hidden, logits, fc1, fc2, ref = _trap_case(path)
    assert _rel(tk.moe(hidden, logits, fc1.flip(0), fc2.flip(0), 2, path=path), ref) > TRAP_MIN


@PATHS
def test_trap_probabilities_instead_of_logits(path):
    hidden, logits, fc1, fc2, ref = _trap_case(path)
    assert _rel(tk.moe(hidden, logits.softmax(-1), fc1, fc2, 2, path=path), ref) > TRAP_MIN


def test_trap_k_and_renormalisation():
    """k=1 (weight 1) and k=2 (renormalised pair) differ from each other and from un-renormalised weights."""
    hidden, logits, fc1, fc2 = _inputs(3, 8, 40, 24, seed=9)
    out1 = tk.moe(hidden, logits, fc1, fc2, 1, path="decode")
    out2 = tk.moe(hidden, logits, fc1, fc2, 2, path="decode")
    assert _rel(out1, _reference(hidden, logits, fc1, fc2, 1)) <= FP32_RTOL
    assert _rel(out2, _reference(hidden, logits, fc1, fc2, 2)) <= FP32_RTOL
    assert _rel(out1, _reference(hidden, logits, fc1, fc2, 2)) > TRAP_MIN
    p = logits.softmax(-1)
    top_w, top_e = p.topk(2, dim=-1)
    experts = [(fc1[e], fc2[e]) for e in range(8)]
    unnormalised = torch.stack([sum(float(w) * _expert(hidden[t], *experts[int(e)])
                                    for w, e in zip(top_w[t], top_e[t], strict=True)) for t in range(3)])
    assert _rel(out2, unnormalised) > TRAP_MIN


def _expert(x, fc1, fc2):
    g, u = (fc1 @ x).chunk(2)
    return fc2 @ (torch.nn.functional.silu(g) * u)


def test_rejects_bad_inputs():
    hidden, logits, fc1, fc2 = _inputs(2, 4, 40, 24, seed=1)
    with pytest.raises(ValueError, match="top_k"):
        tk.moe(hidden, logits, fc1, fc2, 5)
    with pytest.raises(ValueError, match="hidden's dtype"):
        tk.moe(hidden, logits, fc1.half(), fc2.half(), 2)
    q1, _ = pack_int4(fc1.numpy(), 8)
    q2, s2 = pack_int4(fc2.numpy(), 8)
    with pytest.raises(ValueError, match="scales"):
        tk.moe(hidden, logits, torch.from_numpy(q1), torch.from_numpy(q2), 2, fc2_scales=torch.from_numpy(s2))
    with pytest.raises(ValueError, match="INT4"):
        tk.moe(hidden, logits, fc1, fc2, 2, fc1_scales=torch.from_numpy(s2))
    with pytest.raises(ValueError, match="path"):
        tk.moe(hidden, logits, fc1, fc2, 2, path="fast")
