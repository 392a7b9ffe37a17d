"""AWQ-style activation-aware scaling (`--method awq`): before the int4 pass, move per-input-channel scales from
the activations into the weights wherever that is exact in float, so the channels that carry large activations
lose less to rounding. The float model computes the same function afterwards; the int4 pass then rounds the
scaled weights to nearest (export/quantize.py).

Per layer, from the layer's inputs on the calibration tokens (layer by layer: memory is one layer's
activations), for each group of linears that read one tensor X [n, K]:

    s = mean|X|^a / sqrt(max * min)           a in 0, 0.1, .., 1 (a = 0: plain RTN)
    error(a) = || X W^T - (X / s) Q(W * s)^T ||^2    Q = the int4 round trip with the export's block
    keep the a of least error; fold 1/s into what produces X, s into the group's weight columns

| group (reads X) | 1/s folded into |
|---|---|
| wq, wk, wv | attention_norm.weight |
| Mistral w1, w3 (and the MoE router, exactly compensated: it stays float) / every expert's fc1 | ffn_norm.weight |
| w2 / each expert's fc2 (X = silu(gate) * up) | the up rows of w3 / of that expert's fc1 |
| lm_head (not when tied to the embedding: the graph holds one table) | the final norm's weight |

wo keeps round-to-nearest: its input channels come from wv's rows shared by a group of query heads, and the
gain measured on the built-in model did not need it. Calibration: UTF-8 text (default: export/calibration.txt,
the first 23.8 KB of *Persuasion*, which the built-in model was trained on; never its held-out *Northanger
Abbey*), [BOS] + tokens, cut into sequences of 256 tokens, at most `MAX_TOKENS` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtrt.export.quantize import Int4Options, block_for, kept
from mixtrt.plugins.int4 import pack_int4, unpack_int4
from mixtrt.runtime.errors import ConfigError

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.txt"
MAX_TOKENS = 4096
SEQUENCE = 256
ALPHAS = tuple(i / 10 for i in range(11))
SEARCH_ROWS = 2048  # calibration rows each error is measured on


def calibration_ids(path: Path | None, tokenizer: Any) -> tuple[list[list[int]], str, int]:
    """Sequences of token ids from the calibration text; its source (as recorded) and token count."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"--calibration {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--calibration {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    ids = tokenizer.encode(text)[:MAX_TOKENS]
    if len(ids) < 2 * 16:
        raise ConfigError(f"--calibration {path}: {len(ids)} tokens; at least 32 are needed")
    seqs = [ids[i:i + SEQUENCE] for i in range(0, len(ids), SEQUENCE)]
    seqs = [s for s in seqs if len(s) == SEQUENCE] or [ids]
    source = "mixtrt/export/calibration.txt" if path == DEFAULT_CALIBRATION else str(path)
    return seqs, source, sum(len(s) for s in seqs)


def _roundtrip(w: torch.Tensor, block: int) -> torch.Tensor:
    """W -> its int4 round trip with scale max|w| / 7 (pack_int4)."""
    return torch.from_numpy(unpack_int4(*pack_int4(w.detach().numpy().astype(np.float32), block)))


def _search(x: torch.Tensor, weights: list[torch.Tensor], block: int) -> torch.Tensor:
    """The scale s [K] of least output error for the linears `weights` [N_i, K] reading x [n, K]."""
    x = x[torch.linspace(0, len(x) - 1, min(len(x), SEARCH_ROWS)).long()] if len(x) > SEARCH_ROWS else x
    w = torch.cat(weights)
    ref = x @ w.T
    mean = x.abs().mean(0).clamp(min=1e-8)
    best, best_s = None, torch.ones_like(mean)
    for a in ALPHAS:
        s = mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = float(((x / s) @ _roundtrip(w * s, block).T - ref).pow(2).sum())
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def apply_awq(model: torch.nn.Module, seqs: list[list[int]], options: Int4Options,
              say: Callable[[str], None]) -> None:
    """Scale `model`'s weights in place (the CausalLM the exporter traces next), layer by layer."""
    from mixtrt.export.model import Block, CausalLM, MoeFeedForward

    assert isinstance(model, CausalLM)
    args, tf = model.args, model.model
    H, I = args.hidden_size, args.intermediate_size  # noqa: E741

    def blk(k: int) -> int | None:
        return block_for(k, options.block_size)

    ids = torch.tensor(seqs)  # [B, T]
    B, T = ids.shape
    lengths = torch.full((B,), T, dtype=torch.int32)
    with torch.no_grad():
        x = tf.embed_tokens(ids)
        cos, sin = tf.rope_cos.to(x.dtype), tf.rope_sin.to(x.dtype)
        past = tf.empty_past(B, T)
        for i, layer in enumerate(tf.layers):
            assert isinstance(layer, Block)
            at, ff = layer.attention, layer.feed_forward
            a_in = layer.attention_norm(x)
            y, _, _, _ = layer(x, lengths, past[i][0], past[i][1], cos, sin)
            h = x + at(a_in, lengths, past[i][0], past[i][1], cos, sin)[0]
            f_in = layer.ffn_norm(h).reshape(-1, H)
            if (b := blk(H)) is not None:
                s = _search(a_in.reshape(-1, H), [at.wq.weight, at.wk.weight, at.wv.weight], b)
                layer.attention_norm.weight.div_(s)
                for lin in (at.wq, at.wk, at.wv):
                    lin.weight.mul_(s)
            if isinstance(ff, MoeFeedForward):
                logits = ff.gate(f_in)
                top = torch.topk(torch.softmax(logits, -1), ff.top_k, dim=-1).indices  # [n, A]
                if (b2 := blk(I)) is not None:
                    for e in range(len(ff.fc1)):
                        rows = f_in[(top == e).any(-1)]
                        if len(rows) == 0:
                            continue
                        g, u = (rows @ ff.fc1[e].T).split(I, dim=-1)
                        s = _search(torch.nn.functional.silu(g) * u, [ff.fc2[e]], b2)
                        ff.fc1[e][I:].div_(s[:, None])
                        ff.fc2[e].mul_(s)
                if (b := blk(H)) is not None:
                    s = _search(f_in, list(ff.fc1), b)
                    layer.ffn_norm.weight.div_(s)
                    ff.gate.weight.mul_(s)
                    for e in range(len(ff.fc1)):
                        ff.fc1[e].mul_(s)
            else:
                if (b2 := blk(I)) is not None:
                    act = torch.nn.functional.silu(f_in @ ff.w1.weight.T) * (f_in @ ff.w3.weight.T)
                    s = _search(act, [ff.w2.weight], b2)
                    ff.w3.weight.div_(s[:, None])
                    ff.w2.weight.mul_(s)
                if (b := blk(H)) is not None:
                    s = _search(f_in, [ff.w1.weight, ff.w3.weight], b)
                    layer.ffn_norm.weight.div_(s)
                    ff.w1.weight.mul_(s)
                    ff.w3.weight.mul_(s)
            x = y
            say(f"  awq: layer {i} scaled")
        tied = model.lm_head.weight is tf.embed_tokens.weight  # one table in the graph: it cannot take s alone
        if (b := blk(H)) is not None and not tied and not kept("lm_head", options.keep_float):
            final = tf.norm(x).reshape(-1, H)
            s = _search(final, [model.lm_head.weight], b)
            tf.norm.weight.div_(s)
            model.lm_head.weight.mul_(s)


def awq_transform(checkpoint_dir: Path, plan: Any, seqs: list[list[int]], options: Int4Options,
                  say: Callable[[str], None], then: Callable | None = None) -> Callable:
    """The exporter's per-weight hook (export/weights_writer.py) that writes the AWQ-scaled float weights: the
    float model is loaded once, scaled in place by apply_awq, and each weight the writer streams is replaced by
    the scaled parameter of the same name (in the writer's layout: a Linear's [in, out] is the transpose).
    `then`: a hook to apply after this one."""
    from mixtrt.export.checkpoint import load_model

    model = load_model(checkpoint_dir, dtype=torch.float32, plan=plan)
    apply_awq(model, seqs, options, say)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}

    def transform(name: str, array: Any) -> list[tuple[str, Any]]:
        key = name.removeprefix("lm.")
        p = params.get(key.removesuffix(".T"))
        if p is None:  # not a parameter AWQ knows (a graph constant)
            out = [(name, array)]
        else:
            p = np.ascontiguousarray(p.T) if key.endswith(".T") else p  # "<param>.T": a Linear stored [in, out]
            if p.shape != array.shape:
                raise ConfigError(f"awq: weight {name} is {tuple(array.shape)} in the graph, {p.shape} in the model")
            out = [(name, p.astype(array.dtype))]
        return [r for n, a in out for r in (then(n, a) if then else [(n, a)])]

    return transform
