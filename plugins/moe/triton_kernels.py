"""Triton kernels for mixtrt::MoE (semantics: SPEC.md; kernel plan: SPEC.md "Triton kernels").

T tokens, H hidden, I expert intermediate, E experts, k = TOP_K active experts, pair = t*k + j (the j-th
expert of token t).

This module imports triton; nothing else in mixtrt imports it at import time (callers import this module
lazily). Set ``TRITON_INTERPRET=1`` before importing it to run the kernels on CPU tensors.

Weights are stacked: fc1 [E, 2I, H] (rows [gate; up]), fc2 [E, H, I]; or INT4 (``mixtrt.plugins.int4``):
fc1 uint8 [E, 2I, H/2] + scales [E, 2I, H/block1], fc2 uint8 [E, H, I/2] + scales [E, H, I/block2],
dequantised in the kernels. Routing (softmax over E, top-k, renormalise) runs in fp32 inside the kernels;
the expert matmuls accumulate in fp32 and round gate, up, silu(gate)*up and the expert output to the I/O
dtype as the reference does; the weighted sum over the k experts is fp32, rounded once.

Decode (few tokens), one kernel:

- ``moe_decode_kernel`` grid ``(cdiv(I, BLOCK_I), T*k)``. Program (i, pair) routes its token, computes the
  BLOCK_I rows of silu(gate)*up from the matching fc1 gate and up rows (all of H), multiplies them into the
  BLOCK_I columns of fc2 (all of H) and adds weight * partial output into an fp32 accumulator [T, H] with
  atomics. Every weight of a selected expert is read once, spread over cdiv(I, BLOCK_I) programs per pair.
  The last program of a token (per-token atomic counter) reads the sums, resets them to zero, writes the
  output and resets the counter: the accumulator and counter must be zero before the first call and are
  zero again after every call.

Prefill (many tokens), tokens grouped by expert, four kernels:

- ``moe_align_kernel`` grid ``(1,)``: routes every token, stores the pair weights, counts pairs per expert,
  lays the pairs out grouped by expert with each expert's run padded to BLOCK_M (``sorted_pairs``, pad = T*k)
  and writes the expert of every BLOCK_M block (``block_expert``, E = unused block).
- ``moe_fc1_kernel`` grid ``(max_blocks, cdiv(I, BLOCK_N))``: act[pair] = silu(x fc1_g^T) * (x fc1_u^T) for a
  block of pairs of one expert (tl.dot tiles), stored by pair id.
- ``moe_fc2_kernel`` grid ``(max_blocks, cdiv(H, BLOCK_N))``: y[pair] = weight * act[pair] fc2^T in fp32.
- ``moe_sum_kernel`` grid ``(T, cdiv(H, BLOCK_H))``: out[t] = sum_j y[t*k + j], rounded to the I/O dtype.

max_blocks = cdiv(T*k, BLOCK_M) + E bounds the number of padded blocks; blocks past the used ones return.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# T <= this runs the decode kernel, else the grouped ones: measured on an H200 at Mixtral-8x7B shapes (H 4096, I 14336,
# 8 experts top-2; benchmarks/tune_gpu.py's crossover). fp16: decode 0.51 ms vs grouped 0.40 at T=2; at T=1 0.28 vs
# 0.25, but decode is one launch where grouped is four with three buffers, and its tuned tiles (docs/DESIGN.md) take
# 0.22, so one token keeps it. INT4: decode 3.3 ms vs grouped 3.6 at T=4, 6.4 vs 4.0 at T=8.
DECODE_MAX_TOKENS = 1
DECODE_MAX_TOKENS_INT4 = 4


@triton.jit
def _route(logits_ptr, rows, row_ok, E, j, E_P2: tl.constexpr, TOP_K: tl.constexpr):
    """Expert and renormalised fp32 weight of the j-th choice of tokens ``rows`` ([R] each).

    softmax over the E logits in fp32, the TOP_K largest (ties: lowest index), weight = p_j / sum(p_top_k)."""
    e = tl.arange(0, E_P2)
    ok = row_ok[:, None] & (e[None, :] < E)
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + e[None, :], mask=ok, other=0.0).to(tl.float32)
    x = tl.where(e[None, :] < E, x, float("-inf"))  # padding rows route on zeros (never used), not NaN
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    rest = tl.where(e[None, :] < E, p, -1.0)  # padding lanes can never be chosen
    chosen_sum = tl.zeros_like(tl.max(p, axis=1))
    expert_j = tl.zeros_like(tl.argmax(rest, axis=1))
    p_j = tl.zeros_like(chosen_sum)
    for i in tl.static_range(TOP_K):
        best = tl.argmax(rest, axis=1)
        p_best = tl.max(rest, axis=1)
        chosen_sum += p_best
        expert_j = tl.where(i == j, best, expert_j)
        p_j = tl.where(i == j, p_best, p_j)
        rest = tl.where(e[None, :] == best[:, None], -1.0, rest)
    return expert_j.to(tl.int32), p_j / chosen_sum


@triton.jit
def _weight_tile(w_ptr, scale_ptr, expert, n, n_ok, k0, N, K, BLOCK_K: tl.constexpr, INT4: tl.constexpr,
                 QBLOCK: tl.constexpr, dtype: tl.constexpr):
    """W[expert, n, k0 : k0+BLOCK_K] as [R, BLOCK_K] in ``dtype`` (zeros outside), W = stacked [E, N, K].

    INT4: bytes [R, BLOCK_K/2] of qweight [E, N, K/2], element 2j from the low nibble, sign-extended,
    times scales[expert, n, k // QBLOCK] (k0 even)."""
    if INT4:
        jb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = n_ok[:, None] & (jb[None, :] < K // 2)
        row = expert.to(tl.int64) * N + n
        byte = tl.load(w_ptr + row[:, None] * (K // 2) + jb[None, :], mask=mask, other=0).to(tl.int32)
        lo = byte & 15
        hi = byte >> 4
        q = tl.reshape(tl.join(lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)), [n.shape[0], BLOCK_K])
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = n_ok[:, None] & (kk[None, :] < K)
        scale = tl.load(scale_ptr + row[:, None] * (K // QBLOCK) + kk[None, :] // QBLOCK, mask=kmask, other=0.0)
        w = (q.to(tl.float32) * scale.to(tl.float32)).to(dtype)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (kk[None, :] < K)
        w = tl.load(w_ptr + (expert.to(tl.int64) * N + n)[:, None] * K + kk[None, :], mask=mask, other=0.0)
    return w


@triton.jit
def _swiglu(g, u, dtype: tl.constexpr):
    """silu(gate) * up from fp32 accumulators, rounded to ``dtype`` where the reference rounds."""
    g = g.to(dtype).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype)
    return silu * u.to(dtype)


@triton.jit
def moe_decode_kernel(
    hidden_ptr, logits_ptr, fc1_ptr, fc1_scale_ptr, fc2_ptr, fc2_scale_ptr,  # inputs (scales: None unless INT4)
    T, H, I, E,
    out_ptr, acc_ptr, count_ptr,  # output [T, H]; fp32 [T, H] and int32 [T] zeroed state (zero again after)
    TOP_K: tl.constexpr, E_P2: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    INT4: tl.constexpr, QBLOCK1: tl.constexpr, QBLOCK2: tl.constexpr,
):
    dtype: tl.constexpr = hidden_ptr.dtype.element_ty
    pid_i = tl.program_id(0)
    pair = tl.program_id(1)
    t = pair // TOP_K
    tok = t + tl.arange(0, 1)
    e1, w1 = _route(logits_ptr, tok, tok < T, E, pair % TOP_K, E_P2, TOP_K)
    expert = tl.sum(e1, axis=0)
    weight = tl.sum(w1, axis=0)

    n = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    n_ok = n < I
    g = tl.zeros([BLOCK_I], dtype=tl.float32)
    u = tl.zeros([BLOCK_I], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(hidden_ptr + t.to(tl.int64) * H + kk, mask=kk < H, other=0.0).to(tl.float32)
        wg = _weight_tile(fc1_ptr, fc1_scale_ptr, expert, n, n_ok, k0, 2 * I, H, BLOCK_K, INT4, QBLOCK1, dtype)
        wu = _weight_tile(fc1_ptr, fc1_scale_ptr, expert, n + I, n_ok, k0, 2 * I, H, BLOCK_K, INT4, QBLOCK1, dtype)
        g += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
        u += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
    act = _swiglu(g, u, dtype).to(tl.float32)  # [BLOCK_I]; zero on padding rows (their weights were zero)

    for h0 in range(0, H, BLOCK_K):
        h = h0 + tl.arange(0, BLOCK_K)
        w2 = _weight_tile(fc2_ptr, fc2_scale_ptr, expert, h, h < H, pid_i * BLOCK_I, H, I, BLOCK_I, INT4, QBLOCK2,
                          dtype)  # [BLOCK_K (h), BLOCK_I (i)]
        y = tl.sum(w2.to(tl.float32) * act[None, :], axis=1)
        tl.atomic_add(acc_ptr + t.to(tl.int64) * H + h, weight * y, mask=h < H)

    # the last of the cdiv(I, BLOCK_I) * TOP_K programs of token t finishes the row and resets the state
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + t, 1)
    if arrived == tl.cdiv(I, BLOCK_I) * TOP_K - 1:
        for h0 in range(0, H, BLOCK_K):
            h = h0 + tl.arange(0, BLOCK_K)
            row = t.to(tl.int64) * H + h
            total = tl.atomic_add(acc_ptr + row, tl.zeros([BLOCK_K], dtype=tl.float32), mask=h < H)  # read via L2
            tl.store(out_ptr + row, total.to(dtype), mask=h < H)
            tl.store(acc_ptr + row, tl.zeros([BLOCK_K], dtype=tl.float32), mask=h < H)
        tl.atomic_xchg(count_ptr + t, 0)


@triton.jit
def moe_decode_aliased_kernel(
    hidden_ptr, logits_ptr, fc1_ptr, fc1_scale_ptr, fc2_ptr, fc2_scale_ptr, acc_in_ptr, count_in_ptr,
    T, H, I, E,
    out_ptr, acc_ptr, count_ptr,
    TOP_K: tl.constexpr, E_P2: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    INT4: tl.constexpr, QBLOCK1: tl.constexpr, QBLOCK2: tl.constexpr,
):
    """``moe_decode_kernel`` with the argument order of a TensorRT plugin whose state is an aliased input/output
    pair (inputs, then the int32 arguments, then the outputs): acc_in/count_in are the same memory as
    acc/count and are not read through these pointers."""
    moe_decode_kernel(hidden_ptr, logits_ptr, fc1_ptr, fc1_scale_ptr, fc2_ptr, fc2_scale_ptr, T, H, I, E, out_ptr,
                      acc_ptr, count_ptr, TOP_K, E_P2, BLOCK_I, BLOCK_K, INT4, QBLOCK1, QBLOCK2)


@triton.jit
def moe_tiled_kernel(
    hidden_ptr, logits_ptr, fc1_ptr, fc1_scale_ptr, fc2_ptr, fc2_scale_ptr,  # as moe_decode_kernel
    T, H, I, E,
    out_ptr, acc_ptr, count_ptr,  # output [T, H]; the decode kernel's zeroed state (zero again after)
    TOP_K: tl.constexpr, E_P2: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    INT4: tl.constexpr, QBLOCK1: tl.constexpr, QBLOCK2: tl.constexpr,
):
    """One kernel for many tokens: program (i, expert, token block) takes the BLOCK_T tokens of its block that route
    to its expert (none: it returns at once), computes their BLOCK_I rows of silu(gate)*up and the partial output
    with tl.dot tiles, and adds weight * partial into the accumulator, finishing a token's row as the decode kernel
    does (its last arriving program). An expert's weights are read once per token block instead of once per
    (token, expert) pair; same state contract, same arguments as moe_decode_kernel."""
    dtype: tl.constexpr = hidden_ptr.dtype.element_ty
    pid_i = tl.program_id(0)
    expert = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    weight = tl.zeros([BLOCK_T], dtype=tl.float32)
    sel = rows < 0
    for j in tl.static_range(TOP_K):
        ex, w = _route(logits_ptr, rows, row_ok, E, j, E_P2, TOP_K)
        hit = row_ok & (ex == expert)
        weight = tl.where(hit, w, weight)
        sel = sel | hit
    if tl.sum(sel.to(tl.int32), axis=0) == 0:
        return
    n = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    n_ok = n < I
    g = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
    u = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(hidden_ptr + rows[:, None].to(tl.int64) * H + kk[None, :], mask=sel[:, None] & (kk[None, :] < H),
                    other=0.0)
        wg = _weight_tile(fc1_ptr, fc1_scale_ptr, expert, n, n_ok, k0, 2 * I, H, BLOCK_K, INT4, QBLOCK1, dtype)
        wu = _weight_tile(fc1_ptr, fc1_scale_ptr, expert, n + I, n_ok, k0, 2 * I, H, BLOCK_K, INT4, QBLOCK1, dtype)
        g = tl.dot(x, tl.trans(wg), g, input_precision="tf32x3")
        u = tl.dot(x, tl.trans(wu), u, input_precision="tf32x3")
    act = _swiglu(g, u, dtype)  # [BLOCK_T, BLOCK_I]; zero on padding rows / columns
    for h0 in range(0, H, BLOCK_K):
        h = h0 + tl.arange(0, BLOCK_K)
        w2 = _weight_tile(fc2_ptr, fc2_scale_ptr, expert, h, h < H, pid_i * BLOCK_I, H, I, BLOCK_I, INT4, QBLOCK2,
                          dtype)  # [BLOCK_K (h), BLOCK_I (i)]
        y = tl.dot(act, tl.trans(w2), input_precision="tf32x3")  # [BLOCK_T, BLOCK_K] fp32
        tl.atomic_add(acc_ptr + rows[:, None].to(tl.int64) * H + h[None, :], weight[:, None] * y,
                      mask=sel[:, None] & (h[None, :] < H))

    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + rows, tl.full([BLOCK_T], 1, tl.int32), mask=sel)
    done = sel & (arrived == tl.cdiv(I, BLOCK_I) * TOP_K - 1)
    if tl.sum(done.to(tl.int32), axis=0) > 0:
        for h0 in range(0, H, BLOCK_K):
            h = h0 + tl.arange(0, BLOCK_K)
            at = rows[:, None].to(tl.int64) * H + h[None, :]
            m = done[:, None] & (h[None, :] < H)
            total = tl.atomic_add(acc_ptr + at, tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32), mask=m)  # via L2
            total = tl.where(m, total, 0.0)  # masked lanes return no value (the interpreter gives garbage)
            tl.store(out_ptr + at, total.to(dtype), mask=m)
            tl.store(acc_ptr + at, tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32), mask=m)
        tl.atomic_xchg(count_ptr + rows, tl.zeros([BLOCK_T], dtype=tl.int32), mask=done)


@triton.jit
def moe_tiled_aliased_kernel(
    hidden_ptr, logits_ptr, fc1_ptr, fc1_scale_ptr, fc2_ptr, fc2_scale_ptr, acc_in_ptr, count_in_ptr,
    T, H, I, E,
    out_ptr, acc_ptr, count_ptr,
    TOP_K: tl.constexpr, E_P2: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    INT4: tl.constexpr, QBLOCK1: tl.constexpr, QBLOCK2: tl.constexpr,
):
    """``moe_tiled_kernel`` in the TensorRT plugin's argument order (as ``moe_decode_aliased_kernel``)."""
    moe_tiled_kernel(hidden_ptr, logits_ptr, fc1_ptr, fc1_scale_ptr, fc2_ptr, fc2_scale_ptr, T, H, I, E, out_ptr,
                     acc_ptr, count_ptr, TOP_K, E_P2, BLOCK_I, BLOCK_K, BLOCK_T, INT4, QBLOCK1, QBLOCK2)


@triton.jit
def moe_align_kernel(
    logits_ptr,
    T, E,
    pair_weight_ptr, sorted_pairs_ptr, block_expert_ptr,  # fp32 [T*k]; int32 [max_blocks*BLOCK_M]; int32 [max_blocks]
    TOP_K: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    e = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = rows < T
        for j in tl.static_range(TOP_K):
            ex, w = _route(logits_ptr, rows, ok, E, j, E_P2, TOP_K)
            tl.store(pair_weight_ptr + rows * TOP_K + j, w, mask=ok)
            counts += tl.sum(((ex[:, None] == e[None, :]) & ok[:, None]).to(tl.int32), axis=0)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded

    max_blocks = tl.cdiv(T * TOP_K, BLOCK_M) + E
    for b0 in range(0, max_blocks, BLOCK_T):
        blk = b0 + tl.arange(0, BLOCK_T)
        # expert of a block = number of experts whose padded run ends at or before the block's first row
        owner = tl.sum(((ends[None, :] <= blk[:, None] * BLOCK_M) & (e[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blk, owner, mask=blk < max_blocks)
    for r0 in range(0, max_blocks * BLOCK_M, BLOCK_T):
        r = r0 + tl.arange(0, BLOCK_T)
        tl.store(sorted_pairs_ptr + r, tl.full([BLOCK_T], 0, tl.int32) + T * TOP_K, mask=r < max_blocks * BLOCK_M)
    tl.debug_barrier()  # the pad fill above and the scatter below may touch the same rows from different threads

    cursor = starts
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = rows < T
        for j in tl.static_range(TOP_K):
            ex, w = _route(logits_ptr, rows, ok, E, j, E_P2, TOP_K)
            onehot = ((ex[:, None] == e[None, :]) & ok[:, None]).to(tl.int32)
            rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # among this tile's pairs of its expert
            dst = tl.sum(onehot * cursor[None, :], axis=1) + rank
            tl.store(sorted_pairs_ptr + dst, rows * TOP_K + j, mask=ok)
            cursor += tl.sum(onehot, axis=0)


@triton.jit
def moe_fc1_kernel(
    hidden_ptr, fc1_ptr, fc1_scale_ptr, sorted_pairs_ptr, block_expert_ptr,
    T, H, I, E,
    act_ptr,  # [T*k, I] in the I/O dtype, by pair
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INT4: tl.constexpr, QBLOCK: tl.constexpr,
):
    dtype: tl.constexpr = hidden_ptr.dtype.element_ty
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= E:
        return
    pair = tl.load(sorted_pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    ok = pair < T * TOP_K
    tok = (pair // TOP_K).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(hidden_ptr + tok[:, None] * H + kk[None, :], mask=ok[:, None] & (kk[None, :] < H), other=0.0)
        wg = _weight_tile(fc1_ptr, fc1_scale_ptr, expert, n, n_ok, k0, 2 * I, H, BLOCK_K, INT4, QBLOCK, dtype)
        wu = _weight_tile(fc1_ptr, fc1_scale_ptr, expert, n + I, n_ok, k0, 2 * I, H, BLOCK_K, INT4, QBLOCK, dtype)
        acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision="tf32x3")
        acc_u = tl.dot(x, tl.trans(wu), acc_u, input_precision="tf32x3")
    act = _swiglu(acc_g, acc_u, dtype)
    tl.store(act_ptr + pair[:, None].to(tl.int64) * I + n[None, :], act, mask=ok[:, None] & n_ok[None, :])


@triton.jit
def moe_fc2_kernel(
    act_ptr, fc2_ptr, fc2_scale_ptr, sorted_pairs_ptr, block_expert_ptr, pair_weight_ptr,
    T, H, I, E,
    y_ptr,  # fp32 [T*k, H]: weight * expert output, by pair
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INT4: tl.constexpr, QBLOCK: tl.constexpr,
):
    dtype: tl.constexpr = act_ptr.dtype.element_ty
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= E:
        return
    pair = tl.load(sorted_pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    ok = pair < T * TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(act_ptr + pair[:, None].to(tl.int64) * I + kk[None, :], mask=ok[:, None] & (kk[None, :] < I),
                    other=0.0)
        w = _weight_tile(fc2_ptr, fc2_scale_ptr, expert, n, n_ok, k0, H, I, BLOCK_K, INT4, QBLOCK, dtype)
        acc = tl.dot(a, tl.trans(w), acc, input_precision="tf32x3")
    weight = tl.load(pair_weight_ptr + pair, mask=ok, other=0.0)
    y = acc.to(dtype).to(tl.float32) * weight[:, None]
    tl.store(y_ptr + pair[:, None].to(tl.int64) * H + n[None, :], y, mask=ok[:, None] & n_ok[None, :])


@triton.jit
def moe_sum_kernel(y_ptr, T, H, out_ptr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        total += tl.load(y_ptr + (t * TOP_K + j) * H + h, mask=h < H, other=0.0)
    tl.store(out_ptr + t * H + h, total.to(out_ptr.dtype.element_ty), mask=h < H)


# --- host side -----------------------------------------------------------------------------------------------

DECODE_BLOCK_I, DECODE_BLOCK_K = 32, 128
TILED_BLOCK_T = 16  # tokens a program of moe_tiled_kernel takes (tl.dot's least M)
GROUP_BLOCK_M, GROUP_BLOCK_N, GROUP_BLOCK_K, ALIGN_BLOCK_T, SUM_BLOCK_H = 16, 64, 64, 64, 256


def stack_experts(fc1: list[torch.Tensor], fc2: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's per-expert lists -> the stacked fc1 [E, 2I, H], fc2 [E, H, I] the kernels take."""
    return torch.stack(fc1).contiguous(), torch.stack(fc2).contiguous()


class DecodeState:
    """The decode kernel's accumulator (fp32 [T, H]) and per-token counters (int32 [T]): zero between calls.

    Kept per (device, H) and grown on demand so a decode loop allocates once. One state serves every layer
    because each call leaves it zero; calls on concurrent CUDA streams would need one state each."""

    def __init__(self) -> None:
        self._bufs: dict = {}

    def get(self, T: int, H: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        acc, count = self._bufs.get((device, H), (None, None))
        if acc is None or acc.shape[0] < T:
            acc = torch.zeros(T, H, dtype=torch.float32, device=device)
            count = torch.zeros(T, dtype=torch.int32, device=device)
            self._bufs[(device, H)] = (acc, count)
        return acc, count


_STATE = DecodeState()


def _int4_blocks(fc1, fc2, fc1_scales, fc2_scales, H: int, I: int) -> tuple[int, int]:
    if fc1_scales is None or fc2_scales is None:
        raise ValueError("uint8 (INT4) weights need fc1_scales and fc2_scales")
    if fc1_scales.shape[:2] != fc1.shape[:2] or fc2_scales.shape[:2] != fc2.shape[:2]:
        raise ValueError(f"scales {tuple(fc1_scales.shape)}, {tuple(fc2_scales.shape)} do not match the weights")
    q1, q2 = H // fc1_scales.shape[2], I // fc2_scales.shape[2]
    if q1 * fc1_scales.shape[2] != H or q2 * fc2_scales.shape[2] != I or q1 % 2 or q2 % 2:
        raise ValueError(f"INT4 blocks must be even divisors of H={H} and I={I}")
    return q1, q2


def moe(hidden: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, top_k: int, *,
        fc1_scales: torch.Tensor | None = None, fc2_scales: torch.Tensor | None = None,
        path: str | None = None) -> torch.Tensor:
    """mixtrt::MoE on stacked weights: hidden [T, H], router_logits [T, E] -> [T, H] in hidden's dtype.

    fc1 [E, 2I, H] ([gate; up] rows), fc2 [E, H, I] in hidden's dtype; or INT4: fc1 uint8 [E, 2I, H/2] with
    fc1_scales [E, 2I, H/block1], fc2 uint8 [E, H, I/2] with fc2_scales [E, H, I/block2] (``plugins.int4``).
    ``path``: "decode" (one kernel, weights read once per token-expert pair), "tiled" (one kernel, weights read
    once per expert and block of 16 tokens: the TensorRT plugin's prefill tactic), "grouped" (tokens grouped by
    expert, four kernels) or None (decode for T <= DECODE_MAX_TOKENS, DECODE_MAX_TOKENS_INT4 for INT4 weights, else
    grouped).
    """
    T, H = hidden.shape
    E = router_logits.shape[-1]
    int4 = fc1.dtype == torch.uint8
    I = fc2.shape[2] * (2 if int4 else 1)
    if router_logits.shape != (T, E) or fc1.shape[0] != E or fc2.shape[0] != E or not 1 <= top_k <= E:
        raise ValueError(f"router_logits {tuple(router_logits.shape)}, fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)},"
                         f" top_k {top_k}: expected [T, E], [E, ...], 1 <= top_k <= E")
    if fc1.shape[1:] != (2 * I, H // 2 if int4 else H) or fc2.shape[1] != H:
        raise ValueError(f"fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} do not match H={H}, I={I}")
    q1, q2 = _int4_blocks(fc1, fc2, fc1_scales, fc2_scales, H, I) if int4 else (0, 0)  # 0: not INT4
    if int4 and fc1_scales is not None and fc2_scales is not None:  # _int4_blocks checked both are given
        if fc1_scales.dtype != hidden.dtype or fc2_scales.dtype != hidden.dtype:
            raise ValueError("INT4 scales must be in the activation dtype")
        fc1_scales, fc2_scales = fc1_scales.contiguous(), fc2_scales.contiguous()
    elif fc1.dtype != hidden.dtype or fc2.dtype != hidden.dtype:
        raise ValueError(f"weights {fc1.dtype}/{fc2.dtype} must be in hidden's dtype {hidden.dtype}")
    elif fc1_scales is not None or fc2_scales is not None:
        raise ValueError("scales go with uint8 (INT4) weights only")
    if len({t.device for t in (hidden, router_logits, fc1, fc2)}) != 1:
        raise ValueError("all tensors must be on one device")
    hidden, router_logits = hidden.contiguous(), router_logits.contiguous()
    fc1, fc2 = fc1.contiguous(), fc2.contiguous()
    out = torch.empty_like(hidden)
    if T == 0:
        return out
    path = path or ("decode" if T <= (DECODE_MAX_TOKENS_INT4 if int4 else DECODE_MAX_TOKENS) else "grouped")
    common = {"TOP_K": top_k, "INT4": int4}
    opts = launch_options(hidden.dtype)
    e_p2 = triton.next_power_of_2(E)
    if path == "decode":
        acc, count = _STATE.get(T, H, hidden.device)
        grid = (triton.cdiv(I, DECODE_BLOCK_I), T * top_k)
        moe_decode_kernel[grid](hidden, router_logits, fc1, fc1_scales, fc2, fc2_scales, T, H, I, E, out, acc, count,
                                E_P2=e_p2, BLOCK_I=DECODE_BLOCK_I, BLOCK_K=DECODE_BLOCK_K, QBLOCK1=q1, QBLOCK2=q2,
                                **common, **opts)
        return out
    if path == "tiled":
        acc, count = _STATE.get(T, H, hidden.device)
        grid3 = (triton.cdiv(I, DECODE_BLOCK_I), E, triton.cdiv(T, TILED_BLOCK_T))
        moe_tiled_kernel[grid3](hidden, router_logits, fc1, fc1_scales, fc2, fc2_scales, T, H, I, E, out, acc, count,
                               E_P2=e_p2, BLOCK_I=DECODE_BLOCK_I, BLOCK_K=DECODE_BLOCK_K, BLOCK_T=TILED_BLOCK_T,
                               QBLOCK1=q1, QBLOCK2=q2, **common, **opts)
        return out
    if path != "grouped":
        raise ValueError(f"path must be 'decode', 'tiled', 'grouped' or None, got {path!r}")
    bm = GROUP_BLOCK_M
    max_blocks = triton.cdiv(T * top_k, bm) + E
    dev = hidden.device
    pair_weight = torch.empty(T * top_k, dtype=torch.float32, device=dev)
    sorted_pairs = torch.empty(max_blocks * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    moe_align_kernel[(1,)](router_logits, T, E, pair_weight, sorted_pairs, block_expert, TOP_K=top_k, E_P2=e_p2,
                           BLOCK_M=bm, BLOCK_T=ALIGN_BLOCK_T, **opts)
    act = torch.empty(T * top_k, I, dtype=hidden.dtype, device=dev)
    tiles = {"BLOCK_M": bm, "BLOCK_N": GROUP_BLOCK_N, "BLOCK_K": GROUP_BLOCK_K, **common}
    moe_fc1_kernel[(max_blocks, triton.cdiv(I, GROUP_BLOCK_N))](
        hidden, fc1, fc1_scales, sorted_pairs, block_expert, T, H, I, E, act, QBLOCK=q1, **tiles, **opts)
    y = torch.empty(T * top_k, H, dtype=torch.float32, device=dev)
    moe_fc2_kernel[(max_blocks, triton.cdiv(H, GROUP_BLOCK_N))](
        act, fc2, fc2_scales, sorted_pairs, block_expert, pair_weight, T, H, I, E, y, QBLOCK=q2, **tiles, **opts)
    moe_sum_kernel[(T, triton.cdiv(H, SUM_BLOCK_H))](y, T, H, out, TOP_K=top_k, BLOCK_H=SUM_BLOCK_H, **opts)
    return out


def launch_options(dtype: torch.dtype) -> dict:
    """num_warps / num_stages of every launch (fp32 tiles unpipelined: three stages would need ~74 KB of shared
    memory in moe_fc1_kernel)."""
    return {"num_warps": 4, "num_stages": 1 if dtype == torch.float32 else 3}


# --- ahead-of-time specialisations (compiled by plugins/triton_aot.py) ----------------------------------------

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16"}


def _weights_sig(dtype: torch.dtype, int4: bool, names: tuple[str, ...]) -> dict:
    """Weight pointer types: the I/O dtype, or uint8 bytes + scales in the I/O dtype (None when not INT4)."""
    sig = {}
    for w in names:
        sig[f"{w}_ptr"] = "*u8" if int4 else _PTR[dtype]
        sig[f"{w}_scale_ptr"] = _PTR[dtype] if int4 else "constexpr"
    return sig


def _with_constexprs(kernel, dtype: torch.dtype, sig: dict, meta: dict, int4: bool, names: tuple) -> tuple:
    if not int4:
        meta.update({f"{w}_scale_ptr": None for w in names})
    sig.update({name: "constexpr" for name in meta if name not in sig})
    return kernel, sig, meta, launch_options(dtype)


def decode_spec(dtype: torch.dtype, num_experts: int, top_k: int, qblocks: tuple[int, int] | None = None) -> tuple:
    """The ``moe_decode_kernel`` spec; ``qblocks`` = INT4 blocks of fc1, fc2 (None: weights in ``dtype``)."""
    t, int4 = _PTR[dtype], qblocks is not None
    q1, q2 = qblocks if qblocks is not None else (0, 0)
    sig = {"hidden_ptr": t, "logits_ptr": t, **_weights_sig(dtype, int4, ("fc1", "fc2")), "T": "i32", "H": "i32",
           "I": "i32", "E": "i32", "out_ptr": t, "acc_ptr": "*fp32", "count_ptr": "*i32"}
    meta = {"TOP_K": top_k, "E_P2": triton.next_power_of_2(num_experts), "BLOCK_I": DECODE_BLOCK_I,
            "BLOCK_K": DECODE_BLOCK_K, "INT4": int4, "QBLOCK1": q1, "QBLOCK2": q2}
    return _with_constexprs(moe_decode_kernel, dtype, sig, meta, int4, ("fc1", "fc2"))


def aliased_decode_spec(dtype: torch.dtype, num_experts: int, top_k: int,
                        qblocks: tuple[int, int] | None = None) -> tuple:
    """The ``moe_decode_aliased_kernel`` spec (the TensorRT plugin's): ``decode_spec`` with the state inputs."""
    _, sig, meta, opts = decode_spec(dtype, num_experts, top_k, qblocks)
    order = list(sig)
    at = order.index("T")
    sig = {**{k: sig[k] for k in order[:at]}, "acc_in_ptr": "*fp32", "count_in_ptr": "*i32",
           **{k: sig[k] for k in order[at:]}}
    return moe_decode_aliased_kernel, sig, meta, opts


def tiled_spec(dtype: torch.dtype, num_experts: int, top_k: int, qblocks: tuple[int, int] | None = None,
               aliased: bool = False) -> tuple:
    """The ``moe_tiled_kernel`` spec (``aliased``: ``moe_tiled_aliased_kernel``, the TensorRT plugin's order)."""
    _, sig, meta, opts = aliased_decode_spec(dtype, num_experts, top_k, qblocks) if aliased else \
        decode_spec(dtype, num_experts, top_k, qblocks)
    sig = {**sig, "BLOCK_T": "constexpr"}
    return (moe_tiled_aliased_kernel if aliased else moe_tiled_kernel), sig, {**meta, "BLOCK_T": TILED_BLOCK_T}, opts


def grouped_specs(dtype: torch.dtype, num_experts: int, top_k: int, qblocks: tuple[int, int] | None = None) -> list:
    """The specs of the four grouped-path kernels, in launch order."""
    t, int4 = _PTR[dtype], qblocks is not None
    q1, q2 = qblocks if qblocks is not None else (0, 0)
    tiles = {"TOP_K": top_k, "BLOCK_M": GROUP_BLOCK_M, "BLOCK_N": GROUP_BLOCK_N, "BLOCK_K": GROUP_BLOCK_K,
             "INT4": int4}
    align = (moe_align_kernel,
             {"logits_ptr": t, "T": "i32", "E": "i32", "pair_weight_ptr": "*fp32", "sorted_pairs_ptr": "*i32",
              "block_expert_ptr": "*i32", "TOP_K": "constexpr", "E_P2": "constexpr", "BLOCK_M": "constexpr",
              "BLOCK_T": "constexpr"},
             {"TOP_K": top_k, "E_P2": triton.next_power_of_2(num_experts), "BLOCK_M": GROUP_BLOCK_M,
              "BLOCK_T": ALIGN_BLOCK_T}, launch_options(dtype))
    groups = {"sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32"}
    dims = {"T": "i32", "H": "i32", "I": "i32", "E": "i32"}
    fc1 = _with_constexprs(
        moe_fc1_kernel, dtype, {"hidden_ptr": t, **_weights_sig(dtype, int4, ("fc1",)), **groups, **dims, "act_ptr": t},
        {**tiles, "QBLOCK": q1}, int4, ("fc1",))
    fc2 = _with_constexprs(
        moe_fc2_kernel, dtype,
        {"act_ptr": t, **_weights_sig(dtype, int4, ("fc2",)), **groups, "pair_weight_ptr": "*fp32", **dims,
         "y_ptr": "*fp32"},
        {**tiles, "QBLOCK": q2}, int4, ("fc2",))
    total = (moe_sum_kernel, {"y_ptr": "*fp32", "T": "i32", "H": "i32", "out_ptr": t, "TOP_K": "constexpr",
                              "BLOCK_H": "constexpr"}, {"TOP_K": top_k, "BLOCK_H": SUM_BLOCK_H}, launch_options(dtype))
    return [align, fc1, fc2, total]


def _unique(specs: list[tuple]) -> list[tuple]:
    seen, out = set(), []
    for spec in specs:
        kernel, sig, meta, opts = spec
        key = (kernel.__name__, tuple(sig.items()), tuple(sorted(meta.items())), tuple(sorted(opts.items())))
        if key not in seen:
            seen.add(key)
            out.append(spec)
    return out


def _specs(models) -> list[tuple]:
    return _unique([decode_spec(*m) for m in models] + [s for m in models for s in grouped_specs(*m)])


# (kernel, signature, constexprs, options) embedded in TensorRT's AOT plugins (fp16 and INT4 engines): Mixtral-8x7B
# (E=8, k=2, INT4 blocks 128/128) and the built-in tiny model (E=4, k=2, H=192: INT4 blocks 64/128). T, H, I and E
# are runtime arguments: one specialisation serves every size with the same E_P2, k and INT4 blocks.
AOT_SPECS: list[tuple] = _specs(((torch.float16, 8, 2, None), (torch.float16, 8, 2, (128, 128)),
                                 (torch.float16, 4, 2, None), (torch.float16, 4, 2, (64, 128))))
# The TensorRT plugins' kernel (plugins/trt_plugins.py: the decode kernel with its state as aliased inputs): fp16 for
# MoE, and for MoEInt4 fp32 activations (an int4 artifact computes in fp32) with the default block 32 and Mixtral's 128.
AOT_SPECS += [aliased_decode_spec(torch.float16, e, 2) for e in (8, 4)]
AOT_SPECS += [aliased_decode_spec(torch.float32, 8, 2, (128, 128)), aliased_decode_spec(torch.float32, 4, 2, (32, 32))]
# Their prefill tactic (moe_tiled_aliased_kernel: the same arguments, another grid), the same forms.
AOT_SPECS += [tiled_spec(torch.float16, e, 2, aliased=True) for e in (8, 4)]
AOT_SPECS += [tiled_spec(torch.float32, 8, 2, (128, 128), aliased=True),
              tiled_spec(torch.float32, 4, 2, (32, 32), aliased=True)]
# Launched by the torch wrapper only (fp32 is not a TensorRT engine precision here): compiled by the AOT test.
JIT_SPECS: list[tuple] = _specs(((torch.float32, 8, 2, None), (torch.float32, 4, 1, (32, 32))))
JIT_SPECS += [tiled_spec(torch.float32, 8, 2), tiled_spec(torch.float32, 4, 1, (32, 32))]
