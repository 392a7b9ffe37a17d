"""The SWA Triton kernels (plugins/swa/triton_kernels.py) under TRITON_INTERPRET=1 on the CPU vs
torch.ops.mixtrt.sliding_window_attention: outputs within tolerance and the ring caches EQUAL to the
reference's after every step (both keep slot = position % C).

TRITON_INTERPRET is read when a kernel is decorated, so it is set before the kernel module is imported; in a
whole-suite run this module may be collected after others that imported torch (fine; nothing else imports
triton or the kernel modules in-process).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra lists it)")

import mixtrt.plugins.swa.torch_op  # noqa: E402,F401  (registers torch.ops.mixtrt.sliding_window_attention)
from mixtrt.plugins.swa import triton_kernels as tk  # noqa: E402
from mixtrt.plugins.swa.torch_op import rope_tables  # noqa: E402

if type(tk.swa_attention_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError("plugins.swa.triton_kernels was imported before TRITON_INTERPRET=1 was set: the kernels "
                       "are compiled for a GPU and cannot run on CPU tensors in this process")

W = 8
P = 128  # rope rows (> every position used)
FP32_TOL, FP16_TOL = 1e-4, 1e-2  # max|out - ref| (outputs ~1), as tests/plugins/test_swa_op.py
TRAP_MIN = 5e-2
TILE = 16  # keys per tile in most tests (the default is 64): spans of 17..40 keys then cross tiles and splits


class Stepper:
    """The kernel (its own caches, updated in place) and the reference stepping on the same random inputs."""

    def __init__(self, dtype, B: int, C: int, window: int, N: int = 4, K: int = 2, D: int = 16, scale: float = 0.0,
                 seed: int = 0, block_n: int = TILE):
        self.dtype, self.N, self.K, self.D, self.window, self.scale = dtype, N, K, D, window, scale
        self.block_n = block_n
        self.kc = torch.zeros(B, K, C, D, dtype=dtype)
        self.vc = torch.zeros(B, K, C, D, dtype=dtype)
        self.ref_k, self.ref_v = self.kc.clone(), self.vc.clone()
        self.lengths = torch.zeros(B, dtype=torch.int32)
        cos, sin = rope_tables(D, 10000.0, P)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.gen = torch.Generator().manual_seed(seed)

    def inputs(self, B: int, S: int):
        return [torch.randn(B, S, h * self.D, generator=self.gen).to(self.dtype) for h in (self.N, self.K, self.K)]

    def step(self, S: int, rows: slice = slice(None), window: int | None = None, check_cache: bool = True,
             **kw) -> float:
        """S new tokens for ``rows``; the kernel may run with another ``window`` (traps). Returns max|diff|."""
        B = len(range(*rows.indices(self.kc.shape[0])))
        q, k, v = self.inputs(B, S)
        self.lengths[rows] += S
        total = self.lengths[rows].clone()
        ref, self.ref_k[rows], self.ref_v[rows] = torch.ops.mixtrt.sliding_window_attention(
            q, k, v, self.ref_k[rows], self.ref_v[rows], total, self.cos, self.sin, self.N, self.K, self.window,
            self.scale)
        kc, vc = self.kc[rows], self.vc[rows]  # row ranges of a contiguous buffer are contiguous views
        out = tk.swa_attention(q, k, v, kc, vc, total, self.cos, self.sin, self.N, self.K,
                               self.window if window is None else window, self.scale, block_n=self.block_n, **kw)
        assert out.shape == q.shape and out.dtype == self.dtype
        if check_cache:
            assert torch.equal(self.kc, self.ref_k) and torch.equal(self.vc, self.ref_v), "ring differs"
        return float((out.float() - ref.float()).abs().max())


def _tol(dtype) -> float:
    return FP32_TOL if dtype == torch.float32 else FP16_TOL


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
MODES = {  # name -> (window, capacity)
    "ring_C=W+16": (W, W + 16),  # the exporter's capacity: steps up to 17 tokens write from the attention kernel
    "ring_C=W": (W, W),
    "ring_C=W-1": (W, W - 1),  # the smallest ring the reference accepts: W-1 cached keys + the new one
    "linear": (-1, 64),  # full causal, row j = position j
}


@DTYPES
@pytest.mark.parametrize("mode", list(MODES))
def test_prefill_chunks_decode_wrap(mode, dtype):
    """B=1: a 20-token prefill (> W, > C for the small rings), a 7-token chunk continuing it (crosses the ring's
    end for C=W+16), two decode steps, a 30-token chunk (> C: only its last C keys stay)."""
    window, C = MODES[mode]
    st = Stepper(dtype, 1, C, window, seed=len(mode))
    for S in (20, 7, 1, 1, 30):
        assert st.step(S) <= _tol(dtype), (mode, int(st.lengths[0]))
    assert int(st.lengths[0]) == 59


SHAPES = [  # (N, K, D): every head dim of the brief, GQA ratios 1, 2, 3, 4
    (4, 4, 8), (6, 3, 12), (8, 2, 24), (2, 2, 40), (4, 2, 64), (4, 1, 80), (6, 2, 96), (8, 2, 128),
]


@pytest.mark.parametrize("N,K,D", SHAPES, ids=[f"N{n}K{k}D{d}" for n, k, d in SHAPES])
def test_head_dims_and_gqa(N, K, D):
    """Prefill past the window, a decode step, a chunk that wraps the ring (C = W + 4): padded head dims
    (D/2 -> a power of two >= 16) and padded GQA groups; fp32 and fp16 alternate (both: -m slow)."""
    dtype = torch.float32 if SHAPES.index((N, K, D)) % 2 == 0 else torch.float16
    st = Stepper(dtype, 1, W + 4, W, N=N, K=K, D=D, scale=0.37 if D == 40 else 0.0, seed=D)
    for S in (12, 1, 3):
        assert st.step(S) <= _tol(dtype), (N, K, D, int(st.lengths[0]))


@pytest.mark.slow
@DTYPES
@pytest.mark.parametrize("N,K,D", SHAPES, ids=[f"N{n}K{k}D{d}" for n, k, d in SHAPES])
@pytest.mark.parametrize("mode", list(MODES))
def test_head_dims_every_mode_slow(mode, N, K, D, dtype):
    window, C = MODES[mode]
    st = Stepper(dtype, 2, C, window, N=N, K=K, D=D, seed=D)
    st.step(13, rows=slice(0, 1))
    for S in (5, 1, 1, 2 * W):
        assert st.step(S) <= _tol(dtype)


@pytest.mark.parametrize("splits,dtype", [(1, torch.float32), (3, torch.float16)], ids=["fp32", "fp16-splits3"])
def test_ragged_batch(splits, dtype):
    """Rows prefilled one by one into their row of the buffer (B=1 calls on row views), then batched decode
    with different lengths per row (one short of the window, two past the capacity C = W+16), a batched
    2-token step over rows of different pasts, and a batch of the first rows only."""
    st = Stepper(dtype, 3, W + 16, W, seed=splits)
    for b, S in enumerate((3, 11, 23)):
        assert st.step(S, rows=slice(b, b + 1)) <= _tol(dtype)
    for S in (1, 1, 2, 1):
        assert st.step(S, num_splits=splits) <= _tol(dtype), st.lengths.tolist()
    assert st.step(1, rows=slice(0, 2), num_splits=splits) <= _tol(dtype)
    assert st.lengths.tolist() == [9, 17, 28]


def test_splits_on_prefill_and_linear_cache():
    """num_splits > 1 on multi-token steps (16-key tiles: 2-3 non-empty splits), and the default 64-key tile on
    a linear cache long enough for two tiles and two non-empty splits."""
    st = Stepper(torch.float32, 1, W + 16, W)
    assert st.step(20, num_splits=2) <= FP32_TOL
    assert st.step(5, num_splits=4) <= FP32_TOL
    lin = Stepper(torch.float16, 1, 40, -1)
    assert lin.step(30, num_splits=3) <= FP16_TOL
    assert lin.step(1, num_splits=3) <= FP16_TOL
    long = Stepper(torch.float32, 1, 160, -1, block_n=64)
    assert long.step(100) <= FP32_TOL
    assert long.step(1, num_splits=3) <= FP32_TOL


def test_attends_exactly_w_keys():
    """q = 0 gives uniform attention: the output is the mean of v over the visible keys, i - W < j <= i.
    A window off by one would average W-1 or W+1 values."""
    st = Stepper(torch.float32, 1, W + 2, W, N=2, K=1, D=16)
    vals = []
    for S in (13, 1, 4):
        v = torch.randn(1, S, 16, generator=st.gen)
        st.lengths += S
        q = torch.zeros(1, S, 32)
        k = torch.randn(1, S, 16, generator=st.gen)
        out = tk.swa_attention(q, k, v, st.kc, st.vc, st.lengths.clone(), st.cos, st.sin, 2, 1, W, 0.0)
        vals.append(v[0])
        allv = torch.cat(vals)  # [T, 16] by position
        past = int(st.lengths[0]) - S
        for s in range(S):
            i = past + s
            want = allv[max(0, i - W + 1): i + 1].mean(0)
            assert torch.allclose(out[0, s, :16], want, atol=1e-5) and torch.allclose(out[0, s, 16:], want, atol=1e-5)
            wrong = allv[max(0, i - W + 2): i + 1].mean(0)  # W-1 keys
            assert (out[0, s, :16] - wrong).abs().max() > 1e-3 or i < W - 1


@pytest.mark.parametrize("kernel_window", [W - 1, W + 1, -1])
def test_trap_window_off_by_one(kernel_window):
    """The kernel run with the window off by one (or none) must visibly disagree with the W reference once
    T > W: the comparison above would catch a kernel that attends W-1 or W+1 keys."""
    st = Stepper(torch.float32, 1, W + 16, W)
    diffs = [st.step(S, window=kernel_window, check_cache=False) for S in (20, 1, 1)]
    assert max(diffs) > TRAP_MIN


def test_trap_overwritten_keys_read_in_the_same_step():
    """A 30-token chunk on a ring of 24 overwrites slots its first queries still read: the kernels attend to
    the cache as it was plus the new keys, then write. Writing first (the mutant) must be caught."""
    assert not tk.fused_write_is_safe(30, W + 16, W)
    st = Stepper(torch.float32, 1, W + 16, W)
    st.step(20)
    assert st.step(30) <= FP32_TOL  # two launches: attention, then the ring write

    mutant = Stepper(torch.float32, 1, W + 16, W)
    mutant.step(20)
    q, k, v = mutant.inputs(1, 30)
    mutant.lengths += 30
    ref, _, _ = torch.ops.mixtrt.sliding_window_attention(q, k, v, mutant.ref_k, mutant.ref_v, mutant.lengths,
                                                          mutant.cos, mutant.sin, 4, 2, W, 0.0)
    tk.write_cache(k, v, mutant.kc, mutant.vc, mutant.lengths, mutant.cos, mutant.sin)  # write before attending
    out = tk.swa_attention(q, k, v, mutant.kc, mutant.vc, mutant.lengths, mutant.cos, mutant.sin, 4, 2, W, 0.0)
    assert (out - ref).abs().max() > TRAP_MIN


def test_trap_ring_slots():
    """After the ring wrapped, a cache holding the right keys in the wrong slots (rolled by one: a linear or
    compacted layout) changes the next output: slot = position % C is load-bearing, not just compared."""
    st = Stepper(torch.float32, 1, W + 2, W)
    for S in (13, 1):
        st.step(S)
    st.kc.copy_(st.kc.roll(1, dims=2))
    st.vc.copy_(st.vc.roll(1, dims=2))
    assert st.step(1, check_cache=False) > TRAP_MIN


def test_fused_write_rule():
    assert tk.fused_write_is_safe(1, W, W)  # decode on a window-sized ring
    assert tk.fused_write_is_safe(17, W + 16, W) and not tk.fused_write_is_safe(18, W + 16, W)
    assert not tk.fused_write_is_safe(1, W - 1, W)
    assert tk.fused_write_is_safe(500, 64, -1)  # a linear cache never overwrites a resident key


def test_rejects_bad_shapes():
    st = Stepper(torch.float32, 1, W, W)
    q, k, v = st.inputs(1, 2)
    lengths = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        tk.swa_attention(q, k, v, st.kc, st.vc, lengths, st.cos, st.sin, 3, 2, W, 0.0)
    with pytest.raises(ValueError, match="int32"):
        tk.swa_attention(q, k, v, st.kc, st.vc, lengths.long(), st.cos, st.sin, 4, 2, W, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        tk.swa_attention(q, k, v, st.kc.transpose(2, 3).contiguous().transpose(2, 3), st.vc, lengths, st.cos, st.sin,
                         4, 2, W, 0.0)
