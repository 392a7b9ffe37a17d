"""Triton kernels for mixtrt::SlidingWindowAttention (semantics: SPEC.md; kernel plan: SPEC.md "Triton kernels").

B batch, S new tokens, N query heads, K kv heads, G = N/K, D head dim, C cache capacity, W window, P rope rows.

This module imports triton; nothing else in mixtrt imports it at import time (callers import this module
lazily). Set ``TRITON_INTERPRET=1`` before importing it to run the kernels on CPU tensors.

The cache is the reference's ring: position p lives in slot p % C of ``[B, K, C, D]`` (post-RoPE keys).
Example, C=4, W=3, after 6 tokens: slots [p4, p5, p2, p3]; a 1-token step at position 6 attends p4, p5
(from the cache) and p6 (rotated from ``k`` directly, never from the cache), then writes p6 into slot 2.

Kernels (each argument list is: the op's input pointers, int32 scalars, output pointers; TensorRT's AOT
plugins launch kernels with arguments in that order):

- ``swa_attention_kernel`` grid ``(cdiv(S, BLOCK_S), B*K, NUM_SPLITS)``. One program = BLOCK_S new tokens x
  the G query heads sharing kv head k (BLOCK_M = BLOCK_S * G_P2 rows, so each key/value tile serves the whole
  GQA group), streaming keys in BLOCK_N tiles with an online softmax: first the cached positions still in the
  window (ring slots), then the new positions (k/v of this step, rotated in the kernel). With
  ``WRITE_CACHE`` the split-0 program also writes its tokens' rotated keys and values into their ring slots
  (only where no program of the step can still read the overwritten slot: see ``fused_write_is_safe``).
  With ``NUM_SPLITS > 1`` (decode with few programs) each split covers a contiguous slice of the key range
  and writes (acc, m, l) partials; ``swa_combine_kernel`` merges them.
- ``swa_combine_kernel`` grid ``(B*S*N,)``: merges the NUM_SPLITS partials of one query row.
- ``swa_cache_write_kernel`` grid ``(cdiv(S, BLOCK_S), B*K)``: the ring write when it cannot be fused
  (a windowed prefill chunk with S > C - W + 1), launched after the attention kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile


@triton.jit
def _load_rotated(ptr, row_off, row_ok, pos, cos_ptr, sin_ptr, HALF: tl.constexpr, HALF_P2: tl.constexpr):
    """Rows [R] of D elements at ``row_off`` rotated at positions ``pos`` -> halves ([R, HALF_P2], [R, HALF_P2]).

    HF rotate_half in the I/O dtype op by op, as the reference (``x * cos + rotate_half(x) * sin``), so the
    keys written to the cache are the reference's keys.
    """
    d = tl.arange(0, HALF_P2)
    mask = row_ok[:, None] & (d[None, :] < HALF)
    x1 = tl.load(ptr + row_off[:, None] + d[None, :], mask=mask, other=0.0)
    x2 = tl.load(ptr + row_off[:, None] + HALF + d[None, :], mask=mask, other=0.0)
    c = tl.load(cos_ptr + pos[:, None] * HALF + d[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptr + pos[:, None] * HALF + d[None, :], mask=mask, other=0.0)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _load_halves(ptr, row_off, row_ok, HALF: tl.constexpr, HALF_P2: tl.constexpr):
    d = tl.arange(0, HALF_P2)
    mask = row_ok[:, None] & (d[None, :] < HALF)
    return (tl.load(ptr + row_off[:, None] + d[None, :], mask=mask, other=0.0),
            tl.load(ptr + row_off[:, None] + HALF + d[None, :], mask=mask, other=0.0))


@triton.jit
def _attend(acc1, acc2, m_i, l_i, q1, q2, qpos, k1, k2, v1, v2, kpos, k_ok, qk_scale, WINDOW: tl.constexpr):
    """One key tile of the online softmax (base 2). Masked scores are a finite -1e30, so a row with no visible
    key yet carries garbage weighted by exp2(-1e30 - m) = 0 once its first visible key arrives (every query
    sees at least itself)."""
    qk = tl.dot(q1, tl.trans(k1), input_precision="tf32x3") + tl.dot(q2, tl.trans(k2), input_precision="tf32x3")
    visible = k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
    if WINDOW > 0:
        visible = visible & (qpos[:, None] - kpos[None, :] < WINDOW)
    qk = tl.where(visible, qk * qk_scale, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v1.dtype)
    acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision="tf32x3")
    acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision="tf32x3")
    return acc1, acc2, m_new, l_i


@triton.jit
def _write_ring(k_ptr, v_ptr, cos_ptr, sin_ptr, present_key_ptr, present_value_ptr, b, kvh, past, S, C, s0,
                KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_S: tl.constexpr):
    """Rotated keys and values of new tokens s0 .. s0+BLOCK_S-1 -> ring slots (past + s) % C; only the last C
    new tokens are written (earlier ones would be overwritten by later ones of the same step)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    s = s0 + tl.arange(0, BLOCK_S)
    ok = (s < S) & (s >= S - C)
    pos = past + s
    src = (b * S + s).to(tl.int64) * (KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM
    k1, k2 = _load_rotated(k_ptr, src, ok, pos, cos_ptr, sin_ptr, HALF, HALF_P2)
    v1, v2 = _load_halves(v_ptr, src, ok, HALF, HALF_P2)
    dst = ((b * KV_HEADS + kvh).to(tl.int64) * C + pos % C) * HEAD_DIM
    d = tl.arange(0, HALF_P2)
    mask = ok[:, None] & (d[None, :] < HALF)
    dst2 = dst[:, None] + d[None, :]
    tl.store(present_key_ptr + dst2, k1, mask=mask)
    tl.store(present_key_ptr + dst2 + HALF, k2, mask=mask)
    tl.store(present_value_ptr + dst2, v1, mask=mask)
    tl.store(present_value_ptr + dst2 + HALF, v2, mask=mask)


@triton.jit
def swa_attention_kernel(
    q_ptr, k_ptr, v_ptr, past_key_ptr, past_value_ptr, lengths_ptr, cos_ptr, sin_ptr,  # op inputs 0..7
    S, C,  # new tokens, cache capacity
    out_ptr, present_key_ptr, present_value_ptr,  # op outputs (present_* alias past_*)
    part_ptr,  # fp32 [B, S, N, NUM_SPLITS, D + 2] partials (acc, m, l); None when NUM_SPLITS == 1
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
    SCALE: tl.constexpr, GROUP_P2: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, WRITE_CACHE: tl.constexpr,
):
    GROUP: tl.constexpr = NUM_HEADS // KV_HEADS
    HALF: tl.constexpr = HEAD_DIM // 2
    BLOCK_M: tl.constexpr = BLOCK_S * GROUP_P2
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // KV_HEADS
    kvh = bh % KV_HEADS
    past = tl.load(lengths_ptr + b) - S

    # query rows: (token s, head g of the group); padded rows compute a valid position and are not stored
    r = tl.arange(0, BLOCK_M)
    s_idx = pid_m * BLOCK_S + r // GROUP_P2
    g = r % GROUP_P2
    row_ok = (s_idx < S) & (g < GROUP)
    qpos = past + tl.minimum(s_idx, S - 1)
    q_off = (b * S + tl.minimum(s_idx, S - 1)).to(tl.int64) * (NUM_HEADS * HEAD_DIM) + (kvh * GROUP + g) * HEAD_DIM
    q1, q2 = _load_rotated(q_ptr, q_off, row_ok, qpos, cos_ptr, sin_ptr, HALF, HALF_P2)

    # key positions this block needs: [lo, hi) = still in the ring, inside the first query's window, causal
    first = past + pid_m * BLOCK_S
    hi = past + tl.minimum(pid_m * BLOCK_S + BLOCK_S, S)
    lo = tl.maximum(past - C, 0)
    if WINDOW > 0:
        lo = tl.maximum(lo, first - WINDOW + 1)
    if NUM_SPLITS > 1:
        per = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = lo + split * per
        hi = tl.minimum(hi, lo + per)

    acc1 = tl.zeros([BLOCK_M, HALF_P2], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF_P2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    qk_scale = SCALE * 1.4426950408889634  # log2(e): the softmax runs in base 2
    cache_base = (b * KV_HEADS + kvh).to(tl.int64) * C * HEAD_DIM

    # cached positions [lo, min(hi, past)): ring slots as they were before this step
    old_hi = tl.minimum(hi, past)
    for start in range(lo, old_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < old_hi
        off = cache_base + (kpos % C).to(tl.int64) * HEAD_DIM
        k1, k2 = _load_halves(past_key_ptr, off, k_ok, HALF, HALF_P2)
        v1, v2 = _load_halves(past_value_ptr, off, k_ok, HALF, HALF_P2)
        acc1, acc2, m_i, l_i = _attend(acc1, acc2, m_i, l_i, q1, q2, qpos, k1, k2, v1, v2, kpos, k_ok,
                                       qk_scale, WINDOW)
    # new positions [max(lo, past), hi): this step's k (rotated here) and v
    for start in range(tl.maximum(lo, past), hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < hi
        off = (b * S + kpos - past).to(tl.int64) * (KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM
        k1, k2 = _load_rotated(k_ptr, off, k_ok, kpos, cos_ptr, sin_ptr, HALF, HALF_P2)
        v1, v2 = _load_halves(v_ptr, off, k_ok, HALF, HALF_P2)
        acc1, acc2, m_i, l_i = _attend(acc1, acc2, m_i, l_i, q1, q2, qpos, k1, k2, v1, v2, kpos, k_ok,
                                       qk_scale, WINDOW)

    d = tl.arange(0, HALF_P2)
    mask = row_ok[:, None] & (d[None, :] < HALF)
    if NUM_SPLITS == 1:
        o = q_off[:, None] + d[None, :]
        tl.store(out_ptr + o, (acc1 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + o + HALF, (acc2 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (q_off // HEAD_DIM) * NUM_SPLITS + split  # ((b*S + s)*N + head)*NUM_SPLITS + split
        p = row * (HEAD_DIM + 2)
        tl.store(part_ptr + p[:, None] + d[None, :], acc1, mask=mask)
        tl.store(part_ptr + p[:, None] + HALF + d[None, :], acc2, mask=mask)
        tl.store(part_ptr + p + HEAD_DIM, m_i, mask=row_ok)
        tl.store(part_ptr + p + HEAD_DIM + 1, l_i, mask=row_ok)

    if WRITE_CACHE:
        if split == 0:
            _write_ring(k_ptr, v_ptr, cos_ptr, sin_ptr, present_key_ptr, present_value_ptr, b, kvh, past, S, C,
                        pid_m * BLOCK_S, KV_HEADS, HEAD_DIM, HALF_P2, BLOCK_S)


@triton.jit
def swa_combine_kernel(part_ptr, out_ptr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       SPLITS_P2: tl.constexpr, D_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b*S + s)*N + head
    sp = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, D_P2)
    sp_ok = sp < NUM_SPLITS
    base = (row * NUM_SPLITS + sp) * (HEAD_DIM + 2)
    m = tl.load(part_ptr + base + HEAD_DIM, mask=sp_ok, other=-1.0e30)
    l = tl.load(part_ptr + base + HEAD_DIM + 1, mask=sp_ok, other=0.0)
    acc = tl.load(part_ptr + base[:, None] + d[None, :], mask=sp_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def swa_cache_write_kernel(
    k_ptr, v_ptr, lengths_ptr, cos_ptr, sin_ptr,
    S, C,
    present_key_ptr, present_value_ptr,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(1) // KV_HEADS
    kvh = tl.program_id(1) % KV_HEADS
    past = tl.load(lengths_ptr + b) - S
    _write_ring(k_ptr, v_ptr, cos_ptr, sin_ptr, present_key_ptr, present_value_ptr, b, kvh, past, S, C,
                tl.program_id(0) * BLOCK_S, KV_HEADS, HEAD_DIM, HALF_P2, BLOCK_S)


# --- host side -----------------------------------------------------------------------------------------------


def fused_write_is_safe(S: int, C: int, window: int) -> bool:
    """Whether the attention kernel may write the ring while other programs of the same step still read it.

    A step overwrites the slots of positions p - C for its new positions p; the oldest key any of its queries
    reads is past - W + 1. With C >= W + S - 1 no overwritten position is visible to the step. A linear cache
    (window <= 0, total <= C) never overwrites a resident position.
    """
    return window <= 0 or C >= window + S - 1


def block_sizes(S: int, group: int) -> tuple[int, int]:
    """(GROUP_P2, BLOCK_S): query rows per program BLOCK_S * GROUP_P2 in [16, max(64, GROUP_P2)] (tl.dot needs
    16 rows; decode pads the rows, a prefill tile takes 64)."""
    group_p2 = triton.next_power_of_2(group)
    block_s = max(1, min(triton.next_power_of_2(S), 64 // group_p2))
    return group_p2, max(block_s, 16 // group_p2)


def attention_constexprs(num_heads: int, kv_heads: int, head_dim: int, window: int, scale: float, S: int,
                         num_splits: int = 1, write_cache: bool = True, block_n: int = BLOCK_N) -> dict:
    """The constexpr arguments of ``swa_attention_kernel`` (one definition for the launcher and AOT_SPECS)."""
    group_p2, block_s = block_sizes(S, num_heads // kv_heads)
    return {"NUM_HEADS": num_heads, "KV_HEADS": kv_heads, "HEAD_DIM": head_dim, "WINDOW": window if window > 0 else -1,
            "SCALE": float(scale) if scale > 0 else head_dim**-0.5, "GROUP_P2": group_p2,
            "HALF_P2": max(16, triton.next_power_of_2(head_dim // 2)), "BLOCK_S": block_s, "BLOCK_N": block_n,
            "NUM_SPLITS": num_splits, "WRITE_CACHE": write_cache}


def _default_splits(q: torch.Tensor, programs: int, key_span: int, block_n: int) -> int:
    """Flash-decoding split of the key range when the grid is too small to fill the GPU."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(key_span, 2 * block_n), 16))


def swa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, total_lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, kv_heads: int, window: int, scale: float, *,
                  num_splits: int | None = None, fused_write: bool | None = None,
                  block_n: int = BLOCK_N) -> torch.Tensor:
    """mixtrt::SlidingWindowAttention; returns out [B, S, N*D] and updates the ring caches in place.

    q [B,S,N*D], k/v [B,S,K*D] before RoPE; key_cache/value_cache [B,K,C,D] (contiguous, updated in place);
    total_lengths [B] int32 (tokens per row after the step); cos/sin [P, D/2]; window <= 0 = full causal;
    scale 0 = 1/sqrt(D). ``num_splits`` (default: 1 on CPU, enough to fill the GPU on CUDA) splits the key
    range of each program; ``fused_write`` (default: ``fused_write_is_safe``; forcing True where that is
    False races on a GPU) writes the ring from the attention kernel instead of a second launch; ``block_n``
    keys per tile (a power of two >= 16).
    Lengths are not checked against the cache (that would need a host sync): rows must satisfy the
    reference's contract (linear cache total <= C, ring C >= W - 1).
    """
    B, S, _ = q.shape
    C, D = key_cache.shape[2], key_cache.shape[3]
    if num_heads % kv_heads or D % 2:
        raise ValueError(f"num_heads {num_heads} must be a multiple of kv_heads {kv_heads}; head dim {D} even")
    if q.shape != (B, S, num_heads * D) or k.shape != (B, S, kv_heads * D) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         f"{num_heads}/{kv_heads} heads of {D}")
    if key_cache.shape != (B, kv_heads, C, D) or value_cache.shape != key_cache.shape:
        raise ValueError(f"caches {tuple(key_cache.shape)}, {tuple(value_cache.shape)}: expected {(B, kv_heads, C, D)}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the caches are updated in place and must be contiguous")
    if len({q.dtype, k.dtype, v.dtype, key_cache.dtype, value_cache.dtype}) != 1:
        raise ValueError("q, k, v and the caches must share one dtype")
    if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != D // 2:
        raise ValueError(f"cos/sin {tuple(cos.shape)}/{tuple(sin.shape)}: expected [P, {D // 2}]")
    if total_lengths.shape != (B,) or total_lengths.dtype != torch.int32:
        raise ValueError("total_lengths must be int32 [B]")
    if len({t.device for t in (q, k, v, key_cache, value_cache, total_lengths, cos, sin)}) != 1:
        raise ValueError("all tensors must be on one device")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()
    out = torch.empty_like(q)
    if S == 0 or B == 0:
        return out
    fused = fused_write_is_safe(S, C, window) if fused_write is None else fused_write
    _, block_s = block_sizes(S, num_heads // kv_heads)
    m_blocks = triton.cdiv(S, block_s)
    if num_splits is None:
        span = min(C + S, (window + block_s - 1) if window > 0 else C + S)
        num_splits = _default_splits(q, m_blocks * B * kv_heads, span, block_n)
    meta = attention_constexprs(num_heads, kv_heads, D, window, scale, S, num_splits, fused, block_n)
    opts = launch_options(q.dtype)
    part = None
    if num_splits > 1:
        part = torch.empty(B * S * num_heads * num_splits * (D + 2), dtype=torch.float32, device=q.device)
    swa_attention_kernel[(m_blocks, B * kv_heads, num_splits)](
        q, k, v, key_cache, value_cache, total_lengths, cos, sin, S, C, out, key_cache, value_cache, part, **meta,
        **opts)
    if num_splits > 1:
        swa_combine_kernel[(B * S * num_heads,)](part, out, **combine_constexprs(D, num_splits), **opts)
    if not fused:
        write_cache(k, v, key_cache, value_cache, total_lengths, cos, sin)
    return out


def write_cache(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                total_lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The ring write alone (``swa_cache_write_kernel``): rotated k and v of the step into slots pos % C."""
    B, S, _ = k.shape
    K, C, D = key_cache.shape[1:]
    meta = write_constexprs(K, D)
    swa_cache_write_kernel[(triton.cdiv(S, meta["BLOCK_S"]), B * K)](
        k, v, total_lengths, cos.to(k.dtype).contiguous(), sin.to(k.dtype).contiguous(), S, C, key_cache,
        value_cache, **meta, **launch_options(k.dtype))


def write_constexprs(kv_heads: int, head_dim: int) -> dict:
    return {"KV_HEADS": kv_heads, "HEAD_DIM": head_dim, "HALF_P2": max(16, triton.next_power_of_2(head_dim // 2)),
            "BLOCK_S": 16}


def combine_constexprs(head_dim: int, num_splits: int) -> dict:
    return {"HEAD_DIM": head_dim, "NUM_SPLITS": num_splits, "SPLITS_P2": triton.next_power_of_2(num_splits),
            "D_P2": triton.next_power_of_2(head_dim)}


def launch_options(dtype: torch.dtype) -> dict:
    """num_warps / num_stages of every launch. fp32 tiles are not software-pipelined: three stages of fp32
    key/value tiles would need ~220 KB of shared memory at D=128."""
    return {"num_warps": 4, "num_stages": 1 if dtype == torch.float32 else 3}


# --- ahead-of-time specialisations (compiled by plugins/triton_aot.py) ----------------------------------------

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16"}


def _attention_spec(dtype: torch.dtype, num_heads: int, kv_heads: int, head_dim: int, window: int, S: int,
                    num_splits: int = 1) -> tuple:
    t = _PTR[dtype]
    sig = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "past_key_ptr": t, "past_value_ptr": t, "lengths_ptr": "*i32",
           "cos_ptr": t, "sin_ptr": t, "S": "i32", "C": "i32", "out_ptr": t, "present_key_ptr": t,
           "present_value_ptr": t, "part_ptr": "*fp32" if num_splits > 1 else "constexpr"}
    meta = attention_constexprs(num_heads, kv_heads, head_dim, window, 0.0, S, num_splits, True)
    if num_splits == 1:
        meta["part_ptr"] = None
    sig.update({name: "constexpr" for name in meta if name not in sig})
    return swa_attention_kernel, sig, meta, launch_options(dtype)


def _write_spec(dtype: torch.dtype, kv_heads: int, head_dim: int) -> tuple:
    t = _PTR[dtype]
    sig = {"k_ptr": t, "v_ptr": t, "lengths_ptr": "*i32", "cos_ptr": t, "sin_ptr": t, "S": "i32", "C": "i32",
           "present_key_ptr": t, "present_value_ptr": t}
    meta = write_constexprs(kv_heads, head_dim)
    sig.update({name: "constexpr" for name in meta})
    return swa_cache_write_kernel, sig, meta, launch_options(dtype)


def _combine_spec(dtype: torch.dtype, head_dim: int, num_splits: int) -> tuple:
    meta = combine_constexprs(head_dim, num_splits)
    sig = {"part_ptr": "*fp32", "out_ptr": _PTR[dtype], **{name: "constexpr" for name in meta}}
    return swa_combine_kernel, sig, meta, launch_options(dtype)


# (kernel, signature, constexprs, options) embedded in TensorRT's AOT plugins (fp16 engines): Mistral-7B /
# Mixtral-8x7B attention (32/8 heads of 128, window 4096 or full causal) and the built-in tiny model (6/2 heads
# of 32, window 64), a decode tile (S=1: BLOCK_S = 16 // G_P2) and a prefill tile (S >= 64: BLOCK_S = 64 // G_P2),
# the fused ring write (NUM_SPLITS=1, WRITE_CACHE), plus the separate ring write. Other models compile the same
# way from attention_constexprs(...) of their attributes.
AOT_SPECS: list[tuple] = [
    _attention_spec(torch.float16, n, kv, d, w, S)
    for (n, kv, d, w) in ((32, 8, 128, 4096), (32, 8, 128, -1), (6, 2, 32, 64))
    for S in (1, 64)
] + [_write_spec(torch.float16, kv, d) for (kv, d) in ((8, 128), (2, 32))]

# Launched by the torch wrapper only (flash-decoding splits need the combine kernel, a second launch; fp32 is
# not a TensorRT engine precision here): compiled by the AOT test too, so every kernel and dtype is checked.
JIT_SPECS: list[tuple] = [
    _attention_spec(torch.float16, 32, 8, 128, 4096, 1, num_splits=4),
    _combine_spec(torch.float16, 128, 4),
    _attention_spec(torch.float32, 32, 8, 128, 4096, 1),
    _attention_spec(torch.float32, 32, 8, 128, -1, 64),
    _attention_spec(torch.float32, 6, 2, 32, 64, 1, num_splits=2),
    _combine_spec(torch.float32, 32, 2),
    _write_spec(torch.float32, 2, 32),
]

__all__ = ["AOT_SPECS", "JIT_SPECS", "attention_constexprs", "fused_write_is_safe", "launch_options", "swa_attention",
           "write_cache", "swa_attention_kernel", "swa_combine_kernel", "swa_cache_write_kernel"]
