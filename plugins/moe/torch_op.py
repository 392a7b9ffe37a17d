"""torch.ops.mixtrt.moe: the eager reference of mixtrt::MoE, opaque to torch.export.

Shapes: T tokens, H hidden, I expert intermediate, E experts, A active experts (top_k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("mixtrt::moe", mutates_args=())
def moe(
    hidden: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E] raw logits (the op applies the softmax)
    fc1: list[torch.Tensor],  # E x [2I, H]: rows [gate (w1); up (w3)]
    fc2: list[torch.Tensor],  # E x [H, I] (w2)
    top_k: int,
) -> torch.Tensor:  # [T, H]
    """sum over the top-k experts of renorm_softmax(logits)_e * w2_e(silu(w1_e x) * w3_e x).

    Routing and the weighted sum of the expert outputs in fp32; the expert matmuls in the I/O dtype.
    """
    if len(fc1) != len(fc2) or len(fc1) != router_logits.shape[-1]:
        raise ValueError(f"mixtrt::moe: {len(fc1)} fc1 and {len(fc2)} fc2 tensors for "
                         f"{router_logits.shape[-1]} router logits")
    probs = router_logits.float().softmax(dim=-1)  # [T, E]
    weights, experts = probs.topk(top_k, dim=-1)  # [T, A]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in experts.unique().tolist():
        tok, slot = (experts == e).nonzero(as_tuple=True)
        gate, up = (hidden[tok] @ fc1[e].t()).chunk(2, dim=-1)  # [t, 2I] -> 2 x [t, I]
        y = (F.silu(gate) * up) @ fc2[e].t()  # [t, H]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(hidden.dtype)


@moe.register_fake
def _(hidden, router_logits, fc1, fc2, top_k):
    return torch.empty_like(hidden)


TORCH_OP = torch.ops.mixtrt.moe.default
