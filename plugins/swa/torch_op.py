"""torch.ops.mixtrt.sliding_window_attention: the eager reference of mixtrt::SlidingWindowAttention.

Shapes: B batch, S new tokens, N query heads, K kv heads, D head dim, C cache capacity, P rope rows.

The reference keeps its cache as a ring: position p lives in slot p % C. Cache contents are private to
each backend (onnxruntime compacts instead); only the attention output is the contract. Example, C=4,
after 6 tokens: slots [p4, p5, p2, p3]; a 2-token step at positions 6, 7 reads p2..p5 and then writes
slots 2, 3 -> [p4, p5, p6, p7].
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half RoPE. x [.., S, D]; cos/sin [S, D/2] (the halves are repeated)."""
    cos = torch.cat((cos, cos), dim=-1).to(x.dtype)
    sin = torch.cat((sin, sin), dim=-1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_tables(head_dim: int, theta: float, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, D/2] in fp32 for positions 0..P-1 (the `cos_cache`/`sin_cache` op inputs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), inv_freq)  # [P, D/2]
    return freqs.cos(), freqs.sin()


@torch.library.custom_op("mixtrt::sliding_window_attention", mutates_args=())
def sliding_window_attention(
    q: torch.Tensor,  # [B, S, N*D] before RoPE
    k: torch.Tensor,  # [B, S, K*D] before RoPE
    v: torch.Tensor,  # [B, S, K*D]
    past_key: torch.Tensor,  # [B, K, C, D] post-RoPE keys
    past_value: torch.Tensor,  # [B, K, C, D]
    total_lengths: torch.Tensor,  # [B] int32: tokens of each row after this step (past + S)
    cos_cache: torch.Tensor,  # [P, D/2]
    sin_cache: torch.Tensor,  # [P, D/2]
    num_heads: int,
    kv_heads: int,
    window: int,  # <= 0 = full causal
    scale: float,  # 0.0 = 1/sqrt(D)
    windowed_cache: int = -1,  # the node's cache mode: 1 windowed, 0 linear, -1 = 1 iff window > 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference keeps a ring whatever `windowed_cache` says (it only sets the ONNX node's attribute)."""
    B, S, _ = q.shape
    C, D = past_key.shape[2], past_key.shape[3]
    group = num_heads // kv_heads
    sm_scale = scale if scale > 0 else D**-0.5
    qh = q.view(B, S, num_heads, D).transpose(1, 2)  # [B, N, S, D]
    kh = k.view(B, S, kv_heads, D).transpose(1, 2)  # [B, K, S, D]
    vh = v.view(B, S, kv_heads, D).transpose(1, 2)  # [B, K, S, D]
    present_key, present_value = past_key.clone(), past_value.clone()
    out = torch.empty_like(qh)
    for b in range(B):
        total = int(total_lengths[b])
        past = total - S
        if past < 0:
            raise ValueError(f"total_lengths[{b}]={total} is smaller than the {S} new tokens")
        if window <= 0 and total > C:
            raise ValueError(f"row {b}: {total} tokens do not fit a full-attention cache of capacity {C}")
        if window > 0 and past > C and C < window - 1:
            raise ValueError(f"row {b}: a ring of capacity {C} has lost keys still inside the window {window}")
        pos = torch.arange(past, total, device=q.device)  # [S]
        qb = apply_rope(qh[b], cos_cache[pos], sin_cache[pos])  # [N, S, D]
        kb = apply_rope(kh[b], cos_cache[pos], sin_cache[pos])  # [K, S, D]
        resident = torch.arange(max(0, past - C), past, device=q.device)  # positions still in the ring
        keys = torch.cat((present_key[b][:, resident % C], kb), dim=1)  # [K, L+S, D]
        vals = torch.cat((present_value[b][:, resident % C], vh[b]), dim=1)  # [K, L+S, D]
        kpos = torch.cat((resident, pos))  # [L+S]
        visible = kpos[None, :] <= pos[:, None]  # [S, L+S]
        if window > 0:
            visible &= pos[:, None] - kpos[None, :] < window
        keys = keys.repeat_interleave(group, dim=0)  # [N, L+S, D]
        vals = vals.repeat_interleave(group, dim=0)
        scores = (qb.float() @ keys.float().transpose(-1, -2)) * sm_scale  # [N, S, L+S]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[b] = (scores.softmax(dim=-1) @ vals.float()).to(out.dtype)
        keep = min(S, C)  # only the last C new positions survive in the ring
        slots = pos[S - keep :] % C
        present_key[b][:, slots] = kb[:, S - keep :]
        present_value[b][:, slots] = vh[b][:, S - keep :]
    return out.transpose(1, 2).reshape(B, S, num_heads * D), present_key, present_value


@sliding_window_attention.register_fake
def _(q, k, v, past_key, past_value, total_lengths, cos_cache, sin_cache, num_heads, kv_heads, window, scale,
      windowed_cache=-1):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


TORCH_OP = torch.ops.mixtrt.sliding_window_attention.default
