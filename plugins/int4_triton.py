"""A dense INT4 linear in Triton: out = x @ W^T with W kept packed (plugins/int4.py's layout) and dequantized in the
kernel, block by block as it is read. The triton backend runs an int4 artifact's dense INT4 layers (attention
q/k/v/o, Mistral's w1/w2/w3, an INT4 lm_head) with it, so their weights stay INT4 in memory.

W [N, K] (nn.Linear [out, in]) is ``qweight`` uint8 [N, K/2] (byte j of a row: element 2j in the low nibble, 2j+1 in
the high one, two's complement) and ``scales`` [N, K/block] in the activation dtype, W[n, k] = q[n, k] *
scales[n, k // block] (symmetric, zero point 0; a scale may be negative: RTN's). The weight is dequantized in fp32
and rounded to the activation dtype (what dequantizing at load then casting gives), products accumulate in fp32,
the output is rounded once. Any M and N (masked); K even, a multiple of the block (the exporter's rule), any size
(the K loop is masked too).

- ``int4_linear_kernel`` grid ``(M, cdiv(N, GEMV_BLOCK_N))`` with ``GEMV`` (few rows: decode): one row per program,
  the products summed over K tiles; else ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))`` with ``tl.dot`` tiles (prefill): an
  [BLOCK_N, BLOCK_K] weight tile is read once per BLOCK_M rows.

This module imports triton and torch (the `gpu` extra); set ``TRITON_INTERPRET=1`` before importing it to run the
kernel on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The GEMV form's tiles, measured on an H200 (benchmarks/tune_gpu.py, fp16, Mixtral-8x7B's 14336x4096, 4096x14336 and
# 6144x4096): [8, 512] with 4 warps and 4 stages read 0.08 ms / 0.07 / 0.04 (310-410 GB/s of packed weights + scales),
# [64, 64] 0.26 ms / 0.25 on the first two. A GEMV program reads its weights once per row, so the dot form, which
# reads them once per 16 rows (0.22 ms at M <= 16 on 14336x4096), wins from 3 rows.
GEMV_MAX_ROWS = 2
GEMV_BLOCK_N, GEMV_BLOCK_K = 8, 512
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64  # the dot form's tiles


@triton.jit
def int4_linear_kernel(
    x_ptr, w_ptr, s_ptr,  # x [M, K]; qweight uint8 [N, K/2]; scales [N, K/QBLOCK]
    M, N, K,
    out_ptr,  # [M, N] in x's dtype
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr, GEMV: tl.constexpr,
):
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        jb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + n[:, None].to(tl.int64) * (K // 2) + jb[None, :],
                       mask=n_ok[:, None] & (jb[None, :] < K // 2), other=0).to(tl.int32)
        lo = byte & 15
        hi = byte >> 4
        q = tl.reshape(tl.join(lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)), [BLOCK_N, BLOCK_K])
        scale = tl.load(s_ptr + n[:, None].to(tl.int64) * (K // QBLOCK) + kk[None, :] // QBLOCK,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = (q.to(tl.float32) * scale.to(tl.float32)).to(dtype)  # [BLOCK_N, BLOCK_K]
        if GEMV:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32x3")
    tl.store(out_ptr + m[:, None].to(tl.int64) * N + n[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


def launch_options(dtype: torch.dtype, gemv: bool = False) -> dict:
    return {"num_warps": 4, "num_stages": 1 if dtype == torch.float32 else 4 if gemv else 3}


def tiles(gemv: bool) -> dict:
    """The kernel's tile constexprs for the form."""
    if gemv:
        return {"BLOCK_M": 1, "BLOCK_N": GEMV_BLOCK_N, "BLOCK_K": GEMV_BLOCK_K}
    return {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, W = (qweight uint8 [N, K/2], scales [N, K/block] in x's dtype).
    ``path``: "gemv", "dot" or None (gemv for at most GEMV_MAX_ROWS rows)."""
    K = x.shape[-1]
    if qweight.dtype != torch.uint8 or qweight.ndim != 2 or 2 * qweight.shape[1] != K:
        raise ValueError(f"qweight {tuple(qweight.shape)} {qweight.dtype} must be uint8 [N, K/2] for K={K}")
    N = qweight.shape[0]
    if scales.ndim != 2 or scales.shape[0] != N or scales.shape[1] == 0 or K % scales.shape[1] \
            or (K // scales.shape[1]) % 2:
        raise ValueError(f"scales {tuple(scales.shape)} must be [N={N}, K/block] with an even block dividing K={K}")
    if scales.dtype != x.dtype:
        raise ValueError(f"scales {scales.dtype} must be in the activation dtype {x.dtype}")
    if len({x.device, qweight.device, scales.device}) != 1:
        raise ValueError("x, qweight and scales must be on one device")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M and N:
        path = path or ("gemv" if M <= GEMV_MAX_ROWS else "dot")
        if path not in ("gemv", "dot"):
            raise ValueError(f"path must be 'gemv', 'dot' or None, got {path!r}")
        gemv = path == "gemv"
        t = tiles(gemv)
        int4_linear_kernel[(triton.cdiv(M, t["BLOCK_M"]), triton.cdiv(N, t["BLOCK_N"]))](
            x2, qweight.contiguous(), scales.contiguous(), M, N, K, out, **t, QBLOCK=K // scales.shape[1], GEMV=gemv,
            **launch_options(x.dtype, gemv))
    return out.reshape(*x.shape[:-1], N)


# --- ahead-of-time specialisations (compiled by plugins/triton_aot.py; tests/plugins/test_triton_aot.py) ---------

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16"}


def spec(dtype: torch.dtype, qblock: int, gemv: bool) -> tuple:
    t = _PTR[dtype]
    sig = {"x_ptr": t, "w_ptr": "*u8", "s_ptr": t, "M": "i32", "N": "i32", "K": "i32", "out_ptr": t,
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "QBLOCK": "constexpr",
           "GEMV": "constexpr"}
    meta = {**tiles(gemv), "QBLOCK": qblock, "GEMV": gemv}
    return int4_linear_kernel, sig, meta, launch_options(dtype, gemv)


AOT_SPECS: list[tuple] = []  # no TensorRT plugin embeds it (TensorRT runs dense INT4 as DequantizeLinear -> MatMul)
# Launched by the triton backend: fp32 (int4 artifacts compute in fp32) and fp16, blocks 32 and 128, both forms.
JIT_SPECS: list[tuple] = [spec(d, b, g) for d in (torch.float32, torch.float16) for b in (32, 128)
                          for g in (True, False)]
