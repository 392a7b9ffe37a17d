"""INT4 weight packing shared by the MoE Triton kernels and the CPU/ONNX side (numpy only, no torch).

A float matrix W [N, K] (nn.Linear layout [out, in]) is stored as

- ``qweight`` uint8 [N, K//2]: byte j of a row holds elements 2j (low nibble) and 2j+1 (high nibble), each a
  4-bit two's-complement integer in [-8, 7];
- ``scales`` [N, K//block] in the dtype of W (the activation dtype);

with W[n, k] ~= q[n, k] * scales[n, k // block]: symmetric, zero point 0, q = round-half-to-even(w / scale)
clamped to [-8, 7]. `pack_int4`'s own scale is max|w| over the block / 7 (every |error| <= scale / 2); the
export's `rtn` passes `signed_scales` instead, -(the block's largest-magnitude weight) / 8, as llama.cpp's q4_0:
16 levels, a 12.5% finer step, that weight exact, and an |error| up to one step for a weight of the other sign
near it (clamped at +7). K must be a multiple of ``block``, and ``block`` even (32 / 64 / 128 usually; a smaller
even divisor of K for awkward K). Leading dimensions are kept: stacked experts [E, N, K] give qweight
[E, N, K//2] and scales [E, N, K//block].

Worked example, one row, block 4: W = [1.75, -0.875, 0.25, 0.0] -> scale = 1.75 / 7 = 0.25,
q = [7, -3.5 -> -4 (half to even), 1, 0], nibbles 0x7, 0xC, 0x1, 0x0 -> qweight = [0xC7, 0x01], scales = [0.25];
unpack_int4 gives back [1.75, -1.0, 0.25, 0.0]. With the export's rtn scale, -1.75 / 8 = -0.21875:
q = [-8, 4, -1.14 -> -1, 0], nibbles 0x8, 0x4, 0xF, 0x0 -> qweight = [0x48, 0x0F]; back [1.75, -0.875, 0.21875, 0.0].

onnxruntime's QMoE/MatMulNBits store unsigned nibbles with an implicit zero point 8 (q + 8): the same bytes
XOR 0x88.
"""

from __future__ import annotations

import numpy as np


def pack_int4(w: np.ndarray, block: int, scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W [..., N, K] float -> (qweight uint8 [..., N, K//2], scales [..., N, K//block] in W's dtype).

    scales: given (e.g. a clipped max from a search), q = round(w / scale) clamped to [-8, 7] with them."""
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"pack_int4 takes a float matrix, got {w.dtype}")
    K = w.shape[-1]
    _check_block(block, K)
    blocks = w.astype(np.float32, copy=False).reshape(*w.shape[:-1], K // block, block)
    if scales is None:
        scales = (np.abs(blocks).max(axis=-1) / 7).astype(w.dtype)
    elif scales.shape != blocks.shape[:-1]:
        raise ValueError(f"scales {scales.shape} must be {blocks.shape[:-1]} for W {w.shape} in blocks of {block}")
    return pack_nibbles(_rounded(blocks, scales.astype(np.float32)[..., None], -8, 7).reshape(w.shape)), scales


def _check_block(block: int, k: int) -> None:
    if block < 2 or block % 2 or k % block:
        raise ValueError(f"block {block} must be even and divide K={k}")


def _rounded(blocks: np.ndarray, scales: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round(blocks / scales) clamped to [lo, hi], int8; `scales` broadcast against `blocks`. A zero scale is an
    all-zero block: divided by 1 its q is 0 (a masked divide, the same numbers, is ~20x slower). Computed in place
    on one float32 temporary."""
    q = blocks / np.where(scales != 0, scales, np.float32(1))
    np.rint(q, out=q)
    np.clip(q, lo, hi, out=q)
    return q.astype(np.int8)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q int [..., K] in [-8, 7] (K even) -> uint8 [..., K//2], element 2j in the low nibble (two's complement):
    pack_int4's qweight for integers chosen elsewhere (GPTQ)."""
    q = np.asarray(q, np.int8)
    if q.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {q.shape}")
    u = q.view(np.uint8)
    return ((u[..., 0::2] & 0x0F) | (u[..., 1::2] << 4)).astype(np.uint8, copy=False)


def pack_int8(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit sibling (mixtrt keeps the vocabulary tables at 8 bits by default): W [..., N, K] -> (q int8
    [..., N, K] in [-127, 127], scales float32 [..., N, K//block] = max|w| / 127 per block), W ~= q * scale."""
    w = np.asarray(w, np.float32)
    if w.shape[-1] % block:
        raise ValueError(f"block {block} does not divide K={w.shape[-1]}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    scales = (np.abs(blocks).max(axis=-1) / 127).astype(np.float32)
    return _rounded(blocks, scales[..., None], -127, 127).reshape(w.shape), scales


def signed_scales(w: np.ndarray, block: int) -> np.ndarray:
    """Scales that use all 16 levels, as llama.cpp's q4_0: scale = -(the block's element of largest |w|) / 8, so that
    element maps to -8 exactly and the rest to [-8, 7] (one more level than max|w| / 7, a 12.5% finer step). The scale
    is negative where that element is positive: W = q * scale still holds, zero point 0. [..., N, K] -> [..., N,
    K//block] float32."""
    blocks = np.asarray(w, np.float32).reshape(*w.shape[:-1], w.shape[-1] // block, block)
    return (_extreme(blocks, -1) / -8).astype(np.float32)


def _extreme(blocks: np.ndarray, axis: int) -> np.ndarray:
    """Each block's element of largest magnitude (the block along `axis`); where both signs reach it, the one first
    in the block, as llama.cpp's q4_0 loop keeps it (an all-zero block: its first element, so a -0.0 there gives the
    scale the sign it always had; which zero max / min return is numpy's choice)."""
    hi, lo = blocks.max(axis=axis), blocks.min(axis=axis)
    pick = np.where(-lo > hi, lo, hi)
    zero = (hi == 0) & (lo == 0)
    if zero.any():
        pick[zero] = np.take(blocks, 0, axis=axis)[zero]
    tie = (-lo == hi) & (hi != 0)
    if tie.any():
        at = np.nonzero(tie)
        b = np.moveaxis(blocks, axis, -1)[at]  # [ties, block]
        first_lo = (b == lo[at][:, None]).argmax(axis=-1) < (b == hi[at][:, None]).argmax(axis=-1)
        pick[at] = np.where(first_lo, lo[at], hi[at])
    return pick


def rtn_dequantize_linear(b: np.ndarray, block: int) -> tuple[bytes, tuple[int, int], np.ndarray]:
    """Round to nearest on all 16 levels (signed_scales) of MatMul's B [K, N] in blocks of `block` along K, straight
    to dequantize_linear_layout's output: the bytes of `dequantize_linear_layout(*pack_int4(B^T, block,
    signed_scales(B^T, block)))` without either transpose (most of an int4 export's time at full size)."""
    a = np.asarray(b, np.float32)
    K, N = a.shape
    _check_block(block, K)
    blocks = a.reshape(K // block, block, N)
    scales = (_extreme(blocks, 1) / -8).astype(np.float32)  # [K // block, N]
    return pack_nibbles(_rounded(blocks, scales[:, None, :], -8, 7).reshape(-1)).tobytes(), (K, N), scales


def int4_values(qweight: np.ndarray) -> np.ndarray:
    """qweight uint8 [..., N, K//2] -> q int8 [..., N, K] in [-8, 7] (element 2j from the low nibble)."""
    x = np.asarray(qweight, dtype=np.uint8)
    q = np.empty((*x.shape[:-1], 2 * x.shape[-1]), np.int8)
    q[..., 0::2] = (x << 4).view(np.int8) >> 4  # an arithmetic shift of the nibble as the high half: its sign
    q[..., 1::2] = x.view(np.int8) >> 4
    return q


def unpack_int4(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(qweight [..., N, K//2], scales [..., N, K//block]) -> W [..., N, K] in the scales' dtype (q * scale)."""
    return dequantize(int4_values(qweight), scales).astype(scales.dtype)


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Integers q [..., K] (INT4 values or pack_int8's INT8) with their block scales [..., K//block] -> W [..., K]
    float32, W = q * the scale of its block."""
    q, scales = np.asarray(q), np.asarray(scales)
    K = q.shape[-1]
    if scales.shape[:-1] != q.shape[:-1] or K % scales.shape[-1]:
        raise ValueError(f"scales {scales.shape} do not block q {q.shape} along its last axis")
    block = K // scales.shape[-1]
    return (q.reshape(*scales.shape, block).astype(np.float32) * scales.astype(np.float32)[..., None]).reshape(q.shape)


# ---- backend layouts of the same bytes ---------------------------------------------------------------------
# Each takes pack_int4's qweight [N, K//2] (element 2j of a row in the low nibble, two's complement) and
# returns what one consumer reads. Scales are shared unchanged except for DequantizeLinear's transpose.


def matmulnbits_layout(qweight: np.ndarray, block: int) -> np.ndarray:
    """onnxruntime MatMulNBits / GatherBlockQuantized B: uint8 [N, K//block, block//2], unsigned nibbles with the
    default zero point 8 (q + 8 = q XOR 8 per nibble), low nibble first. Scales: [N, K//block] as packed.
    A GatherBlockQuantized table takes the same bytes as [N, K//2]."""
    N, half = qweight.shape
    if block % 2 or (2 * half) % block:
        raise ValueError(f"block {block} does not divide K={2 * half}")
    return (np.asarray(qweight, np.uint8) ^ 0x88).reshape(N, 2 * half // block, block // 2)


def dequantize_linear_layout(qweight: np.ndarray, scales: np.ndarray) -> tuple[bytes, tuple[int, int], np.ndarray]:
    """ONNX DequantizeLinear (opset 21, INT4, axis 0, block_size) feeding MatMul's B [K, N]:
    (raw INT4 bytes of W^T [K, N], row-major, element 2j of the flat tensor in the low nibble, two's complement;
    its dims (K, N); scales^T [K//block, N])."""
    q = int4_values(qweight).T  # [K, N]
    flat = q.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    return pack_nibbles(flat).tobytes(), (q.shape[0], q.shape[1]), np.ascontiguousarray(np.asarray(scales).T)
