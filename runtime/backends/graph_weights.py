"""An artifact's weights read back from its graph's initializers, under the reference model's parameter names.

The one place the GPU backends get weights from an artifact (numpy + onnx; onnx is imported inside).
torch.onnx's optimiser renames and transposes initializers (`wq.weight` [N*D, H] becomes `val_10` [H, N*D]
feeding a MatMul; identical RMSNorm weights are merged into one), so weights are found by the node that
uses them: the exporter names every node after its module path (`/model/layers.3/attention/wq/MatMul_0`,
export/onnx_export.py `_name_nodes`), and each weight is the initializer input of the node(s) in its
module's scope, oriented back to nn.Linear's [out, in]. Every tensor is checked against the model's shape.

Names returned (the export/model.py contract, plus the stacked MoE form the Triton kernels take):

    embed_tokens [V, H]   norm [H]   lm_head [V, H]   rope_cos / rope_sin [P, D/2] (the graph's tables)
    layers.{i}.attention_norm [H]   layers.{i}.wq/wk/wv/wo [out, in]   layers.{i}.ffn_norm [H]
    dense: layers.{i}.w1/w2/w3 [out, in]
    moe:   layers.{i}.gate [E, H], layers.{i}.fc1 [E, 2I, H] ([gate; up] rows), layers.{i}.fc2 [E, H, I]

plus the attributes of every attention node (`layers.{i}.attention` -> num_heads, kv_heads, window, scale)
and every MoE node (`layers.{i}.moe_k`), which the backend checks against the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.errors import ArtifactError


@dataclass
class GraphWeights:
    tensors: dict[str, np.ndarray]
    attention: list[dict[str, Any]] = field(default_factory=list)  # per layer: the SWA node's attributes
    moe_k: list[int] = field(default_factory=list)  # per MoE layer: the node's k


def read_graph_weights(model_path: Path, args: ModelArgs) -> GraphWeights:
    """The weights of `model_path` (external data loaded) as GraphWeights; ArtifactError naming the tensor
    when a weight is missing or mis-shaped (a graph this mixtrt did not export, or a damaged one)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(model_path), load_external_data=True)
    except Exception as e:  # noqa: BLE001 - protobuf / onnx errors: an unreadable graph
        raise ArtifactError(f"{model_path}: cannot read the graph: {e}") from None
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    cache: dict[str, np.ndarray] = {}

    def init(name: str) -> np.ndarray | None:
        if name not in inits:
            return None
        if name not in cache:
            cache[name] = numpy_helper.to_array(inits[name])
        return cache[name]

    def scope(prefix: str) -> list[Any]:
        return [n for n in graph.node if n.name.startswith(prefix + "/")
                and "/" not in n.name[len(prefix) + 1:]]

    def linear(prefix: str) -> np.ndarray:
        """[out, in] of the MatMul / Gemm in module scope `prefix`."""
        for node in scope(prefix):
            if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
                continue
            b, transposed = node.input[1], False
            if node.op_type == "Gemm":
                trans = {a.name: a.i for a in node.attribute}
                if trans.get("transA", 0):
                    continue
                transposed = bool(trans.get("transB", 0))
            w = init(b)
            if w is None and b in producers and producers[b].op_type == "Transpose":
                perm = [list(a.ints) for a in producers[b].attribute if a.name == "perm"]
                if perm in ([], [[1, 0]]):
                    w, transposed = init(producers[b].input[0]), not transposed
            if w is not None and w.ndim == 2:
                return w if transposed else w.T
        raise ArtifactError(f"{model_path}: no weight for {prefix.lstrip('/')} (a MatMul/Gemm on an initializer "
                            "in that module's nodes); the graph was not exported by this mixtrt or is damaged")

    def norm(prefix: str) -> np.ndarray:
        found = [w for n in scope(prefix) if n.op_type == "Mul" for i in n.input
                 if (w := init(i)) is not None and w.shape == (args.hidden_size,)]
        if len(found) != 1:
            raise ArtifactError(f"{model_path}: no single norm weight in {prefix.lstrip('/')}; the graph was not "
                                "exported by this mixtrt or is damaged")
        return found[0]

    def single(prefix: str, op_type: str) -> Any:
        nodes = [n for n in scope(prefix) if n.op_type == op_type]
        if len(nodes) != 1:
            raise ArtifactError(f"{model_path}: expected one {op_type} node in {prefix.lstrip('/')}, found "
                                f"{len(nodes)}; the graph was not exported by this mixtrt or is damaged")
        return nodes[0]

    out: dict[str, np.ndarray] = {}
    gather = single("/model/embed_tokens", "Gather")
    embed = init(gather.input[0])
    if embed is None:
        raise ArtifactError(f"{model_path}: the embedding Gather does not read an initializer")
    out["embed_tokens"] = embed
    out["norm"] = norm("/model/norm")
    out["lm_head"] = linear("/lm_head")
    weights = GraphWeights(out)
    for i in range(args.num_hidden_layers):
        p, L = f"/model/layers.{i}", f"layers.{i}"
        out[f"{L}.attention_norm"] = norm(f"{p}/attention_norm")
        out[f"{L}.ffn_norm"] = norm(f"{p}/ffn_norm")
        for w in ("wq", "wk", "wv", "wo"):
            out[f"{L}.{w}"] = linear(f"{p}/attention/{w}")
        swa = single(f"{p}/attention", "SlidingWindowAttention")
        weights.attention.append({a.name: onnx.helper.get_attribute_value(a) for a in swa.attribute})
        for j, name in ((6, "rope_cos"), (7, "rope_sin")):
            table = init(swa.input[j]) if len(swa.input) > j else None
            if table is None:
                raise ArtifactError(f"{model_path}: the attention node of layer {i} has no {name} initializer")
            out.setdefault(name, table)
        if args.moe is None:
            for w in ("w1", "w2", "w3"):
                out[f"{L}.{w}"] = linear(f"{p}/feed_forward/{w}")
        else:
            E = args.moe.num_experts
            out[f"{L}.gate"] = linear(f"{p}/feed_forward/gate")
            moe = single(f"{p}/feed_forward", "MoE")
            experts = [init(n) for n in moe.input[2:]]
            if len(experts) != 2 * E or any(x is None for x in experts):
                raise ArtifactError(f"{model_path}: the MoE node of layer {i} needs {2 * E} expert initializers, "
                                    f"has {len(moe.input) - 2} inputs after hidden and router logits")
            out[f"{L}.fc1"] = np.stack(experts[:E])  # type: ignore[arg-type]
            out[f"{L}.fc2"] = np.stack(experts[E:])  # type: ignore[arg-type]
            weights.moe_k.append(int(next(a.i for a in moe.attribute if a.name == "k")))
    check_shapes(out, args, str(model_path))
    return weights


def expected_shapes(args: ModelArgs, positions: int) -> dict[str, tuple[int, ...]]:
    """name -> shape of every weight of `args` (GraphWeights names; rope tables of `positions` rows)."""
    H, V, D = args.hidden_size, args.vocab_size, args.head_dim
    N, K, I = args.num_attention_heads, args.num_key_value_heads, args.intermediate_size  # noqa: E741
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (V, H), "norm": (H,), "lm_head": (V, H),
                                          "rope_cos": (positions, D // 2), "rope_sin": (positions, D // 2)}
    for i in range(args.num_hidden_layers):
        L = f"layers.{i}"
        shapes.update({f"{L}.attention_norm": (H,), f"{L}.ffn_norm": (H,), f"{L}.wq": (N * D, H),
                       f"{L}.wk": (K * D, H), f"{L}.wv": (K * D, H), f"{L}.wo": (H, N * D)})
        if args.moe is None:
            shapes.update({f"{L}.w1": (I, H), f"{L}.w2": (H, I), f"{L}.w3": (I, H)})
        else:
            E = args.moe.num_experts
            shapes.update({f"{L}.gate": (E, H), f"{L}.fc1": (E, 2 * I, H), f"{L}.fc2": (E, H, I)})
    return shapes


def check_shapes(tensors: dict[str, Any], args: ModelArgs, where: str) -> None:
    """Every weight of the model present with its shape (rope tables: any number of rows); nothing else."""
    rows = tuple(tensors["rope_cos"].shape)[0] if "rope_cos" in tensors else 0
    want = expected_shapes(args, rows)
    missing, unknown = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unknown:
        raise ArtifactError(f"{where}: weights missing {missing[:4]}" + (f", unknown {unknown[:4]}" if unknown else ""))
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{where}: weight {name} is {list(tensors[name].shape)}, the model needs {list(shape)}")
