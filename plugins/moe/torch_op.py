"""The eager reference of mixtrt::MoE, in the contract's form (`reference`), and torch.ops.mixtrt.moe, the export
hook in the onnxruntime graph's per-expert form (opaque to torch.export), both computing the same thing.

Shapes: T tokens, H hidden, I expert intermediate, E experts, A active experts (top_k).

    >>> T, H, I, E = 3, 4, 2, 4
    >>> fc1, fc2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    >>> hidden, logits = torch.randn(T, H), torch.randn(T, E)
    >>> out = reference(hidden, logits, fc1, fc2, top_k=2)  # the contract: stacked [E, 2I, H] / [E, H, I]
    >>> out.shape
    torch.Size([3, 4])
    >>> torch.equal(out, torch.ops.mixtrt.moe(hidden, logits, list(fc1), list(fc2), 2))  # one input per expert
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def reference(
    hidden: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E] raw logits (the op applies the softmax)
    fc1: torch.Tensor,  # [E, 2I, H]: per expert rows [gate (w1); up (w3)]
    fc2: torch.Tensor,  # [E, H, I] (w2)
    top_k: int,
) -> torch.Tensor:  # [T, H]
    """mixtrt::MoE on the contract's fixed inputs (plugins/moe/SPEC.md, "The contract for every backend"):
    sum over the top-k experts of renorm_softmax(logits)_e * w2_e(silu(w1_e x) * w3_e x).

    Routing and the weighted sum of the expert outputs in fp32; the expert matmuls in the I/O dtype.
    """
    if fc1.dim() != 3 or fc2.dim() != 3:
        raise ValueError(f"mixtrt::moe: fc1 must be [E, 2I, H] and fc2 [E, H, I], got shapes {tuple(fc1.shape)} "
                         f"and {tuple(fc2.shape)}")
    E, two_i, H = fc1.shape
    if tuple(fc2.shape) != (E, H, two_i // 2) or two_i % 2:
        raise ValueError(f"mixtrt::moe: fc2 {tuple(fc2.shape)} does not fit fc1 {tuple(fc1.shape)} "
                         f"(expected [{E}, {H}, {two_i // 2}])")
    return _moe(hidden, router_logits, fc1, fc2, top_k)


def _moe(hidden: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor | Sequence[torch.Tensor],
         fc2: torch.Tensor | Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """The computation, reading expert e's matrices as fc1[e] / fc2[e]: a stacked tensor or one tensor per expert
    (the same values, so the same result; nothing is stacked or copied)."""
    if len(fc1) != len(fc2) or len(fc1) != router_logits.shape[-1]:
        raise ValueError(f"mixtrt::moe: {len(fc1)} fc1 and {len(fc2)} fc2 experts for "
                         f"{router_logits.shape[-1]} router logits")
    if hidden.shape[-1] != fc1[0].shape[-1]:
        raise ValueError(f"mixtrt::moe: hidden size {hidden.shape[-1]} but fc1 experts take {fc1[0].shape[-1]}")
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


@torch.library.custom_op("mixtrt::moe", mutates_args=())
def moe(
    hidden: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E]
    fc1: list[torch.Tensor],  # E x [2I, H]: fc1[e] of the contract
    fc2: list[torch.Tensor],  # E x [H, I]: fc2[e] of the contract
    top_k: int,
) -> torch.Tensor:  # [T, H]
    """`reference` with one tensor per expert matrix: the form the exporter traces, so that every expert matrix
    becomes its own initializer (the onnxruntime graph's lowering, plugins/moe/SPEC.md)."""
    return _moe(hidden, router_logits, fc1, fc2, top_k)


@moe.register_fake
def _(hidden, router_logits, fc1, fc2, top_k):
    return torch.empty_like(hidden)


TORCH_OP = torch.ops.mixtrt.moe.default
