"""AWQ-style activation-aware scaling (`--method awq`): before the int4 pass, move per-input-channel scales from
the activations into the weights wherever that is exact in float, so the channels that carry large activations
lose less to rounding. The float model computes the same function afterwards; the int4 pass then rounds the
scaled weights to nearest (export/quantize.py).

Per layer, from the layer's inputs on the calibration tokens (layer by layer: memory is one layer's
activations), for each group of linears that read one tensor X [n, K]:

    s = mean|X|^a / sqrt(max * min)           a in 0, 0.1, .., 1 (a = 0: plain RTN)
    error(a) = || X W^T - (X / s) Q(W * s)^T ||^2    Q = the round trip the export writes (INT4 at its block,
                                                     INT8 for the tensors it keeps INT8)
    keep the a of least error; fold 1/s into what produces X, s into the group's weight columns

| group (reads X) | 1/s folded into |
|---|---|
| wq, wk, wv | attention_norm.weight |
| Mistral w1, w3 (and the MoE router, exactly compensated: it stays float) / every expert's fc1 | ffn_norm.weight |
| w2 / each expert's fc2 (X = silu(gate) * up) | the up rows of w3 / of that expert's fc1 |
| lm_head (not when tied to the embedding: the graph holds one table) | the final norm's weight |

wo keeps round-to-nearest: its input channels come from wv's rows shared by a group of query heads, and the
gain measured on the built-in model did not need it. Calibration text and the layer walk: export/calibration.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtrt.export.calibration import LayerWalk
from mixtrt.export.gptq import MIN_ROWS
from mixtrt.export.quantize import Int4Options, block_for, experts_float, int8_patterns, linear_form
from mixtrt.plugins.int4 import dequantize, pack_int4, pack_int8, unpack_int4

ALPHAS = tuple(i / 10 for i in range(11))
SEARCH_ROWS = 2048  # calibration rows each error is measured on
SEARCH_ELEMENTS = 1 << 24  # outputs [rows, N] computed at a time by the search (64 MiB in fp32)


def _roundtrip(w: torch.Tensor, block: int, bits: int = 4) -> torch.Tensor:
    """W -> its int4 round trip with scale max|w| / 7 (pack_int4), or with bits 8 its INT8 one (pack_int8: what
    the export writes for the tensors it keeps INT8)."""
    a = w.detach().numpy().astype(np.float32)
    if bits == 8:
        return torch.from_numpy(dequantize(*pack_int8(a, block)))
    return torch.from_numpy(unpack_int4(*pack_int4(a, block)))


Form = tuple[int, int] | None  # how the export writes a linear: (block, bits), or None: it stays float


def _search(x: torch.Tensor, weights: list[torch.Tensor], forms: list[Form]) -> torch.Tensor:
    """The scale s [K] of least output error for the linears `weights` [N_i, K] reading x [n, K], each rounded as
    the export writes it (`forms`: (block, bits) per weight; a weight that stays float computes exactly whatever
    s is, and adds no error). The error is summed over chunks of output rows (SEARCH_ELEMENTS outputs at a time),
    so the search's memory does not grow with the number of linears searched together (a MoE layer's experts)."""
    x = x[torch.linspace(0, len(x) - 1, min(len(x), SEARCH_ROWS)).long()] if len(x) > SEARCH_ROWS else x
    mean = x.abs().mean(0).clamp(min=1e-8)
    scales = []
    for a in ALPHAS:
        s = mean.pow(a)
        scales.append(s / (s.max() * s.min()).sqrt())
    errors = [0.0] * len(ALPHAS)
    step = max(1, SEARCH_ELEMENTS // len(x))
    for w, form in zip(weights, forms, strict=True):
        if form is None:
            continue
        b, bits = form
        for r in range(0, len(w), step):
            part = w[r:r + step]
            ref = x @ part.T
            for i, s in enumerate(scales):
                errors[i] += float(((x / s) @ _roundtrip(part * s, b, bits).T - ref).pow(2).sum())
    best = min(range(len(ALPHAS)), key=lambda i: errors[i])  # the first of least error
    return scales[best]


class _Scaling:
    """The scalings chosen for each parameter, in the order they were applied: (op, first row, s) with op "mul"
    (W * s along the last axis) or "div" (W / s along the last axis; from row `first` on, W[first:] / s[:, None]
    along the rows when first >= 0). Applied to the module being calibrated now and replayed later on the
    weight the writer streams, with the same torch operations: the written weight is bit for bit the one
    calibrated."""

    def __init__(self) -> None:
        self.ops: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
        self.nearest: list[str] = []  # experts too few calibration tokens reached: left unscaled

    def mul(self, name: str, p: torch.Tensor, s: torch.Tensor) -> None:
        p.mul_(s)
        self.ops.setdefault(name, []).append(("mul", -1, s))

    def div(self, name: str, p: torch.Tensor, s: torch.Tensor) -> None:
        p.div_(s)
        self.ops.setdefault(name, []).append(("div", -1, s))

    def div_rows(self, name: str, p: torch.Tensor, first: int, s: torch.Tensor) -> None:
        p[first:].div_(s[:, None])
        self.ops.setdefault(name, []).append(("div", first, s))

    def replay(self, name: str, w: torch.Tensor) -> torch.Tensor:
        for op, first, s in self.ops.get(name, ()):
            if op == "mul":
                w.mul_(s)
            elif first >= 0:
                w[first:].div_(s[:, None])
            else:
                w.div_(s)
        return w


def awq_scalings(checkpoint_dir: Path, plan: Any, seqs: list[list[int]], options: Int4Options,
                 say: Callable[[str], None]) -> _Scaling:
    """Choose the scalings layer by layer: one layer's float weights in memory at a time (read from the
    checkpoint tensor by tensor), the calibration activations carried from layer to layer."""
    from mixtrt.export.checkpoint import open_checkpoint
    from mixtrt.export.model import MoeFeedForward

    scaling = _Scaling()
    with open_checkpoint(checkpoint_dir) as ck:
        args = ck.args
        H, I = args.hidden_size, args.intermediate_size  # noqa: E741

        int8 = int8_patterns(options, args.moe is not None)
        n_experts = 0 if args.moe is None else args.moe.num_experts
        experts = [f"layers.{i}.feed_forward.{fc}.{e}" for i in range(args.num_hidden_layers)
                   for fc in ("fc1", "fc2") for e in range(n_experts)]
        kept_float = bool(experts_float(experts, H, I, options)[0])  # the int4 plan's all-or-none rule

        def form(label: str, k: int) -> Form:
            """How the export writes the linear `label` (input dimension k): as the int4 plan decides it."""
            if re.search(r"\.fc[12]\.\d+$", label):
                return None if kept_float else (block_for(k, options.block_size) or 0, 4)
            return linear_form(label, k, options, int8)

        def search(x: torch.Tensor, weights: list[torch.Tensor], labels: list[str], k: int) -> torch.Tensor | None:
            """_search's scale for the group, or None where the whole group stays float (nothing to gain)."""
            forms = [form(lbl, k) for lbl in labels]
            return None if all(f is None for f in forms) else _search(x, weights, forms)

        with torch.no_grad():
            walk = LayerWalk(ck, plan, seqs)
            for i, layer in walk.layers():
                pre = f"model.layers.{i}."
                at, ff = layer.attention, layer.feed_forward
                a_in = layer.attention_norm(walk.x)
                y = walk.run(layer)  # the next layer's input, from the unscaled weights
                h = walk.x + walk.attention(layer, a_in)[0]
                f_in = layer.ffn_norm(h).reshape(-1, H)
                s = search(a_in.reshape(-1, H), [at.wq.weight, at.wk.weight, at.wv.weight],
                           [f"layers.{i}.attention.{n}" for n in ("wq", "wk", "wv")], H)
                if s is not None:
                    scaling.div(pre + "attention_norm.weight", layer.attention_norm.weight, s)
                    for n in ("wq", "wk", "wv"):
                        scaling.mul(f"{pre}attention.{n}.weight", getattr(at, n).weight, s)
                ffp = pre + "feed_forward."
                if isinstance(ff, MoeFeedForward):
                    logits = ff.gate(f_in)
                    top = torch.topk(torch.softmax(logits, -1), ff.top_k, dim=-1).indices  # [n, A]
                    for e in range(len(ff.fc1) if not kept_float else 0):
                        rows = f_in[(top == e).any(-1)]
                        if len(rows) < MIN_ROWS:  # a scale searched on a handful of tokens fits them, not the expert
                            scaling.nearest.append(f"layers.{i}.feed_forward.fc2.{e}")
                            continue
                        g, u = (rows @ ff.fc1[e].T).split(I, dim=-1)
                        s = search(torch.nn.functional.silu(g) * u, [ff.fc2[e]], [f"layers.{i}.feed_forward.fc2.{e}"],
                                   I)
                        if s is not None:
                            scaling.div_rows(f"{ffp}fc1.{e}", ff.fc1[e], I, s)
                            scaling.mul(f"{ffp}fc2.{e}", ff.fc2[e], s)
                    s = search(f_in, list(ff.fc1), [f"layers.{i}.feed_forward.fc1.{e}" for e in range(len(ff.fc1))], H)
                    if s is not None:
                        scaling.div(pre + "ffn_norm.weight", layer.ffn_norm.weight, s)
                        scaling.mul(ffp + "gate.weight", ff.gate.weight, s)
                        for e in range(len(ff.fc1)):
                            scaling.mul(f"{ffp}fc1.{e}", ff.fc1[e], s)
                else:
                    act = torch.nn.functional.silu(f_in @ ff.w1.weight.T) * (f_in @ ff.w3.weight.T)
                    s = search(act, [ff.w2.weight], [f"layers.{i}.feed_forward.w2"], I)
                    if s is not None:
                        scaling.div_rows(ffp + "w3.weight", ff.w3.weight, 0, s)
                        scaling.mul(ffp + "w2.weight", ff.w2.weight, s)
                    s = search(f_in, [ff.w1.weight, ff.w3.weight],
                               [f"layers.{i}.feed_forward.{n}" for n in ("w1", "w3")], H)
                    if s is not None:
                        scaling.div(pre + "ffn_norm.weight", layer.ffn_norm.weight, s)
                        scaling.mul(ffp + "w1.weight", ff.w1.weight, s)
                        scaling.mul(ffp + "w3.weight", ff.w3.weight, s)
                walk.x = y
                del layer, at, ff, a_in, h, f_in
                say(f"  awq: layer {i} scaled")
            # one table in the graph when tied: it cannot take s alone
            if not args.tie_word_embeddings and form("lm_head", H) is not None:
                norm = walk.final_norm()
                final = norm(walk.x).reshape(-1, H)
                s = _search(final, [walk.read("lm_head.weight")], [form("lm_head", H)])
                scaling.div("model.norm.weight", norm.weight, s)
                scaling.ops.setdefault("lm_head.weight", []).append(("mul", -1, s))
    return scaling


def awq_transform(checkpoint_dir: Path, plan: Any, seqs: list[list[int]], options: Int4Options,
                  say: Callable[[str], None], then: Callable | None = None) -> tuple[Callable, list[str]]:
    """The exporter's per-weight hook (export/weights_writer.py) that writes the AWQ-scaled float weights: the
    scalings are chosen first (awq_scalings, layer by layer), then replayed on each weight the writer streams
    (in the writer's layout: a Linear's [in, out] "<param>.T" is the transpose). `then`: a hook to apply after
    this one. Also returns the experts left unscaled (too few calibration tokens reached them)."""
    scaling = awq_scalings(checkpoint_dir, plan, seqs, options, say)

    def transform(name: str, array: Any) -> list[tuple[str, Any]]:
        key = name.removeprefix("lm.")
        param = key.removesuffix(".T")
        if param in scaling.ops:
            w = torch.from_numpy(np.array(array, dtype=np.float32))
            w = scaling.replay(param, w.T if key.endswith(".T") else w)  # the param's own layout, a view
            out = [(name, (w.T if key.endswith(".T") else w).numpy().astype(array.dtype))]
        else:  # not a parameter AWQ scales (a graph constant, the embedding, wo)
            out = [(name, array)]
        return [r for n, a in out for r in (then(n, a) if then else [(n, a)])]

    return transform, scaling.nearest
