"""GPTQ (`--method gptq`): each int4 linear is rounded column by column along its input dimension, and the error
each column's rounding leaves is spread over the columns not yet rounded, weighted by the inverse Hessian of
the layer's inputs on the calibration text (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), so the layer's outputs on that text move less than with round to nearest.

Per linear W [N, K] reading X [n, K] (the calibration tokens' inputs of that linear):

    H = 2 X^T X / n + damp I           damp = DAMP * mean(diag(H)) (x10, up to 3 times, until H is positive definite)
    U = cholesky(H^-1) (upper)
    for each column k (in batches of LAZY columns):
        at a block's first column: scale = -(the block's largest-magnitude weight, as updated so far) / 8
        q_k = clamp(round(W[:, k] / scale), -8, 7)
        e = (W[:, k] - q_k * scale) / U[k, k];  W[:, k+1:] -= e U[k, k+1:]

The format is the artifact's one (symmetric INT4 in blocks of the input dimension, one scale per block, zero
point 0: plugins/int4.py), with rtn's 16-level scales; only which integer each weight gets changes. An input
channel the calibration never excites (a zero of diag(H)) keeps its weights and rounds them to nearest (the
paper's reference code zeroes them; an expert that few calibration tokens reach would lose weights to that).

Layer by layer and in order within a layer (q/k/v, then o, then the MLP's or each expert's first and second
matrices), the inputs come from the layers and linears already rounded (the paper's "true sequential" order),
so each matrix corrects what the rounded ones before it changed. MoE experts are calibrated on the tokens the
float router sends them; an expert with fewer than `MIN_ROWS` such tokens is rounded to nearest (recorded in
the manifest's calibration record). The INT8 tensors stay INT8 (their round trip feeds the next inputs), the
router and the float tensors stay float, the embedding table (read by a Gather, no input) is rounded to nearest.

The pass runs before the streaming writer (it needs the plan's blocks) and keeps its results on disk, one file
per tensor beside the artifact being written (removed with it): memory is one layer's float weights, the
calibration activations and one Hessian; the writer's quantizer then reads each result and checks that the
float weight it streams is the one calibrated.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtrt.export.calibration import LayerWalk
from mixtrt.export.quantize import rtn
from mixtrt.plugins.int4 import dequantize, int4_values, pack_int8, pack_nibbles
from mixtrt.runtime.errors import ConfigError

DAMP = 0.01  # the paper's default dampening, relative to the mean of diag(H)
LAZY = 128  # columns updated together before the rest of the matrix (a multiple of every block)
MIN_ROWS = 16  # an expert reached by fewer calibration tokens is rounded to nearest


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / n for the inputs x [n, K] (float32; float64 accumulation would not change the choice of q)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return (x.T @ x) * (2.0 / max(len(x), 1))


def factor(h: torch.Tensor | None, what: str = "a weight") -> torch.Tensor | None:
    """U, upper triangular with U^T U = (H + damp I)^-1, for the input Hessian h [K, K] (None: None, round to
    nearest). h is consumed (damped, then overwritten by the inverse): pass a Hessian no one else reads. A channel
    never excited (a zero of diag(H)) gets 1 on the diagonal: no correlation, its weights rounded to nearest.
    Two [K, K] matrices at most are alive at once here (h and the factor, then h and U)."""
    if h is None:
        return None
    if not bool(torch.isfinite(h).all()):
        raise ConfigError(f"gptq: the calibration inputs of {what} are not finite (the checkpoint overflows in "
                          "fp32 on the calibration text)")
    diag = torch.diagonal(h)  # a view: damping h in place
    diag[diag == 0] = 1.0
    damp, added = DAMP * float(diag.mean()), 0.0
    for _ in range(4):
        diag += damp - added
        added = damp
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del diag
            inverse = torch.cholesky_inverse(lower, out=h)  # in h's memory: the caller's reference holds it anyway
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
            raise ConfigError(f"gptq: the inverse Hessian of {what} is not positive definite (damped by {damp:.3g})")
        damp *= 10
    raise ConfigError(f"gptq: the Hessian of {what} is not positive definite even damped by {added:.3g}")


def _quantize(col: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(col / scale) clamped to [-8, 7] (half to even), 0 where the scale is 0 (an all-zero block)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.zeros_like(col), torch.clamp(torch.round(col / safe), -8, 7))


def _block_scale(part: torch.Tensor) -> torch.Tensor:
    """rtn's 16-level signed scale of each row of a block [N, block]: -(its largest-magnitude weight) / 8."""
    return part.gather(-1, part.abs().argmax(-1, keepdim=True))[..., 0] / -8


def gptq(w: torch.Tensor, u: torch.Tensor | None, block: int) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] rounded to INT4 in blocks of `block` along K by GPTQ with u = factor(Hessian of its inputs) (None:
    round to nearest) -> (q int8 [N, K] in [-8, 7], scales float32 [N, K // block]), W ~= q * scales per block."""
    W = w.detach().to(torch.float32)
    N, K = W.shape
    if K % block or block % 2:
        raise ValueError(f"block {block} must be even and divide K={K}")
    if u is None:  # round to nearest: rtn's integers and scales
        qweight, scales = rtn("", W.numpy(), block)
        return int4_values(qweight), scales
    W = W.clone()
    Q = torch.zeros((N, K), dtype=torch.int8)
    S = torch.zeros((N, K // block), dtype=torch.float32)
    lazy = max(block, LAZY // block * block)
    for c1 in range(0, K, lazy):
        c2 = min(c1 + lazy, K)
        W1, E1, U1 = W[:, c1:c2].clone(), torch.zeros((N, c2 - c1), dtype=torch.float32), u[c1:c2, c1:c2]
        scale = torch.zeros(N, dtype=torch.float32)
        for i in range(c2 - c1):
            if (c1 + i) % block == 0:  # a block's scale from its weights as updated so far
                scale = S[:, (c1 + i) // block] = _block_scale(W1[:, i:i + block])
            col = W1[:, i]
            q = _quantize(col, scale)
            Q[:, c1 + i] = q.to(torch.int8)
            err = (col - q * scale) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, c2:] -= E1 @ u[c1:c2, c2:]
    return Q.numpy(), S.numpy()


def _digest(w: np.ndarray) -> str:
    """An exact fingerprint of W [N, K] as float32 in row-major order (any view of it gives the same)."""
    return hashlib.blake2b(np.ascontiguousarray(w, np.float32).data, digest_size=16).hexdigest()


class GptqResults:
    """The rounded tensors of a GPTQ pass, on disk under `folder` (label -> q packed as pack_int4 and scales),
    and `quantizer`: the int4 plan's quantizer that returns them (export/quantize.py Quantizer)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.digests: dict[str, str] = {}
        self.nearest: list[str] = []  # tensors rounded to nearest for want of calibration rows

    def _paths(self, label: str) -> tuple[Path, Path]:
        return self.folder / f"{label}.q.npy", self.folder / f"{label}.s.npy"

    def put(self, label: str, w: torch.Tensor, q: np.ndarray, s: np.ndarray) -> torch.Tensor:
        """Keep tensor `label`'s rounding (q [N, K], scales) and the fingerprint of its float weight w [N, K].
        Returns the dequantized weight (what the next inputs are computed with)."""
        qpath, spath = self._paths(label)
        np.save(qpath, pack_nibbles(q))
        np.save(spath, s)
        self.digests[label] = _digest(w.detach().numpy())
        return torch.from_numpy(dequantize(q, s))

    def quantizer(self, label: str, w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
        if label not in self.digests:
            raise ConfigError(f"gptq: no calibrated rounding for {label} (a tensor the pass did not reach)")
        qpath, spath = self._paths(label)
        q, s = np.load(qpath), np.load(spath)
        if q.shape != (w.shape[0], w.shape[1] // 2) or s.shape != (w.shape[0], w.shape[1] // block):
            raise ConfigError(f"gptq: {label}: the calibrated rounding {q.shape} / {s.shape} does not fit the "
                              f"weight written {w.shape} in blocks of {block}")
        if _digest(w) != self.digests[label]:
            raise ConfigError(f"gptq: {label}: the weight written is not the one calibrated (a transform hook "
                              "changed it)")
        qpath.unlink()
        spath.unlink()
        return q, s


def _labels(args: Any) -> set[str]:
    """Every linear the pass knows, by its int4 plan label."""
    ffn = [f"fc{j}.{e}" for j in (1, 2) for e in range(args.moe.num_experts)] if args.moe else ["w1", "w2", "w3"]
    return {"lm_head"} | {f"layers.{i}.{part}" for i, part in itertools.product(
        range(args.num_hidden_layers), [f"attention.{n}" for n in ("wq", "wk", "wv", "wo")]
        + [f"feed_forward.{n}" for n in ffn])}


def gptq_pass(checkpoint_dir: Path, plan: Any, seqs: list[list[int]], targets: dict[str, tuple[int, int]],
              folder: Path, say: Callable[[str], None],
              table: Callable[[np.ndarray], np.ndarray] | None = None) -> GptqResults:
    """Round the int4 linears of `targets` (label -> (block, bits); bits 8: the INT8 tensors, whose round trip
    the next inputs see) by GPTQ on the calibration sequences, layer by layer; results under `folder`.
    table: the embedding table's round trip where the artifact stores it quantized (Int4Plan.table_roundtrip: the
    walk starts from the table the artifact's lookups give)."""
    from mixtrt.export.checkpoint import open_checkpoint
    from mixtrt.export.model import MoeFeedForward

    folder.mkdir(parents=True, exist_ok=True)
    results = GptqResults(folder)

    def four(*labels: str) -> bool:
        return any(targets.get(lbl, (0, 0))[1] == 4 for lbl in labels)

    def shared(x: torch.Tensor, *labels: str) -> torch.Tensor | None:
        """The factor of x's Hessian for the linears `labels` that read x (None when none of them is INT4)."""
        return factor(hessian(x), ", ".join(labels)) if four(*labels) else None

    def round_(label: str, p: torch.Tensor, u: torch.Tensor | None) -> None:
        """Round parameter p (tensor `label`) in place as its target says, by GPTQ with the factor u of its
        inputs' Hessian (None: to nearest)."""
        if label not in targets:
            return  # float (kept, the router, no block)
        block, bits = targets[label]
        if bits == 8:
            p.copy_(torch.from_numpy(dequantize(*pack_int8(p.detach().numpy(), block))))
            return
        if u is None:
            results.nearest.append(label)
        p.copy_(results.put(label, p, *gptq(p, u, block)))

    with open_checkpoint(checkpoint_dir) as ck, torch.no_grad():
        args = ck.args
        unknown = sorted(lbl for lbl, (_, bits) in targets.items() if bits == 4 and lbl not in _labels(args))
        if unknown:  # before hours of work, not after
            raise ConfigError(f"gptq: no calibrated rounding for {', '.join(unknown)} (tensors the pass does not "
                              "know)")
        H, I = args.hidden_size, args.intermediate_size  # noqa: E741
        walk = LayerWalk(ck, plan, seqs, (lambda t: torch.from_numpy(table(t.numpy()))) if table else None)
        for i, layer in walk.layers():
            pre = f"layers.{i}."
            at, ff = layer.attention, layer.feed_forward
            a_in = layer.attention_norm(walk.x)
            qkv = [f"{pre}attention.{n}" for n in ("wq", "wk", "wv")]
            u = shared(a_in, *qkv)
            for lbl, n in zip(qkv, ("wq", "wk", "wv"), strict=True):
                round_(lbl, getattr(at, n).weight, u)
            _, o_in = walk.attention(layer, a_in)  # through the rounded q/k/v
            round_(f"{pre}attention.wo", at.wo.weight, shared(o_in, f"{pre}attention.wo"))
            f_in = layer.ffn_norm(walk.x + (o_in @ at.wo.weight.T).reshape(walk.x.shape)).reshape(-1, H)
            del a_in, o_in, u
            if isinstance(ff, MoeFeedForward):
                top = torch.topk(torch.softmax(ff.gate(f_in), -1), ff.top_k, dim=-1).indices  # [n, A]
                for e in range(len(ff.fc1)):
                    rows = f_in[(top == e).any(-1)]
                    enough = len(rows) >= MIN_ROWS
                    fc1, fc2 = f"{pre}feed_forward.fc1.{e}", f"{pre}feed_forward.fc2.{e}"
                    round_(fc1, ff.fc1[e], shared(rows, fc1) if enough else None)
                    g, up = (rows @ ff.fc1[e].T).split(I, dim=-1)
                    round_(fc2, ff.fc2[e], shared(torch.nn.functional.silu(g) * up, fc2) if enough else None)
                    del rows, g, up
                del top
            else:
                w13 = [f"{pre}feed_forward.w1", f"{pre}feed_forward.w3"]
                u = shared(f_in, *w13)
                round_(w13[0], ff.w1.weight, u)
                round_(w13[1], ff.w3.weight, u)
                act = torch.nn.functional.silu(f_in @ ff.w1.weight.T) * (f_in @ ff.w3.weight.T)
                round_(f"{pre}feed_forward.w2", ff.w2.weight, shared(act, f"{pre}feed_forward.w2"))
                del u, act
            walk.x = walk.run(layer)  # through the rounded layer
            del layer, at, ff, f_in
            say(f"  gptq: layer {i} rounded")
        if four("lm_head"):  # (an INT8 lm_head is last: no input after it to correct)
            lm_head = walk.read("model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight")
            round_("lm_head", lm_head, shared(walk.final_norm()(walk.x), "lm_head"))
    missing = sorted(lbl for lbl, (_, bits) in targets.items() if bits == 4 and lbl not in results.digests)
    if missing:
        raise ConfigError(f"gptq: no calibrated rounding for {', '.join(missing)} (tensors the pass did not reach)")
    return results
