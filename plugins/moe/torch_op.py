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
    fc1: torch.Tensor,  # [E, 2I, H] rows interleaved: row 2j = gate_j (w1), row 2j+1 = up_j (w3)
    fc2: torch.Tensor,  # [E, H, I] (w2)
    top_k: int,
) -> torch.Tensor:  # [T, H]
    """sum over the top-k experts of renorm_softmax(logits)_e * w2_e(silu(w1_e x) * w3_e x), routing in fp32."""
    probs = router_logits.float().softmax(dim=-1)  # [T, E]
    weights, experts = probs.topk(top_k, dim=-1)  # [T, A]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(hidden)
    for e in experts.unique().tolist():
        tok, slot = (experts == e).nonzero(as_tuple=True)
        h = hidden[tok] @ fc1[e].t()  # [t, 2I]
        y = (F.silu(h[:, 0::2]) * h[:, 1::2]) @ fc2[e].t()  # [t, H]
        out.index_add_(0, tok, y * weights[tok, slot, None].to(hidden.dtype))
    return out


@moe.register_fake
def _(hidden, router_logits, fc1, fc2, top_k):
    return torch.empty_like(hidden)


def interleave_gate_up(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """[.., I, H] gate and up -> [.., 2I, H] with rows g0, u0, g1, u1, ... (onnxruntime's fc1 layout)."""
    return torch.stack((w1, w3), dim=-2).flatten(-3, -2)
