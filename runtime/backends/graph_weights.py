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

INT4 artifacts (export/quantize.py) are read in the same names. Dense weights quantized in the graph are
dequantized here to float32 [out, in], found the same way through the node that uses them: a MatMul whose B is
a `DequantizeLinear` (INT4 / INT8 / UINT4 / UINT8, per tensor, per axis or blocked with `block_size`, zero point
optional), a `com.microsoft.MatMulNBits` (bits 4 or 8, default or given zero points), the embedding's
`com.microsoft.GatherBlockQuantized` (uint8 with the default zero point 2^(bits-1), or INT4). The experts of an
int4 MoE node (plugins/moe/SPEC.md "INT4 form": per expert the MatMulNBits bytes [N, K/block, block/2] and
scales [N, K/block]) stay packed, in the Triton kernels' layout (plugins/int4.py: the same bytes XOR 0x88):

    layers.{i}.fc1 uint8 [E, 2I, H/2] + layers.{i}.fc1_scales [E, 2I, H/block1]
    layers.{i}.fc2 uint8 [E, H, I/2]  + layers.{i}.fc2_scales [E, H, I/block2]
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


PACKABLE = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "lm_head")  # dense linears that may stay packed INT4


def read_graph_weights(model_path: Path, args: ModelArgs, packed_dense: bool = False) -> GraphWeights:
    """The weights of `model_path` (external data loaded) as GraphWeights; ArtifactError naming the tensor
    when a weight is missing or mis-shaped (a graph this mixtrt did not export, or a damaged one).

    packed_dense: a dense linear (PACKABLE) whose weight is symmetric INT4 in blocks along its input dimension (a
    MatMul fed by `DequantizeLinear` of an INT4 initializer [K, N] with axis 0, an even block_size and no zero point,
    or a 4-bit `MatMulNBits` without zero points) is returned packed as the dense INT4 kernel takes it
    (plugins/int4.py: `name` uint8 [N, K/2], `name_scales` float32 [N, K/block]) instead of dequantized."""
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

    def linear(prefix: str, packable: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """[out, in] of the MatMul / Gemm / MatMulNBits in module scope `prefix` (quantized forms dequantized, or
        with `packable` and packed_dense, symmetric blocked INT4 as (packed [N, K/2], scales [N, K/block]))."""
        for node in scope(prefix):
            if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
                if packable and packed_dense and (got := packed_nbits(node)) is not None:
                    return got
                return matmul_nbits(node)
            if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
                continue
            b, transposed = node.input[1], False
            if node.op_type == "Gemm":
                trans = {a.name: a.i for a in node.attribute}
                if trans.get("transA", 0):
                    continue
                transposed = bool(trans.get("transB", 0))
            w = init(b)
            if w is None and b in producers and producers[b].op_type == "DequantizeLinear":
                if packable and packed_dense and not transposed and (got := packed_dq(producers[b])) is not None:
                    return got
                w = dequantize_linear(producers[b])
            if w is None and b in producers and producers[b].op_type == "Transpose":
                perm = [list(a.ints) for a in producers[b].attribute if a.name == "perm"]
                if perm in ([], [[1, 0]]):
                    w, transposed = init(producers[b].input[0]), not transposed
            if w is not None and w.ndim == 2:
                return w if transposed else w.T
        raise ArtifactError(f"{model_path}: no weight for {prefix.lstrip('/')} (a MatMul/Gemm on an initializer "
                            "in that module's nodes); the graph was not exported by this mixtrt or is damaged")

    def attrs(node: Any) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def needed(node: Any, j: int) -> np.ndarray:
        x = init(node.input[j]) if len(node.input) > j and node.input[j] else None
        if x is None:
            raise ArtifactError(f"{model_path}: input {j} of {node.op_type} node {node.name} is not an initializer; "
                                "the graph was not exported by this mixtrt or is damaged")
        return x

    def optional(node: Any, j: int) -> np.ndarray | None:
        return needed(node, j) if len(node.input) > j and node.input[j] else None

    def dequantize_linear(node: Any) -> np.ndarray:
        """The float tensor a DequantizeLinear of initializers gives (any axis, per tensor / axis / block)."""
        a = attrs(node)
        try:
            return dequantize(needed(node, 0), needed(node, 1), optional(node, 2), int(a.get("axis", 1)),
                              int(a.get("block_size", 0)))
        except ValueError as e:
            raise ArtifactError(f"{model_path}: DequantizeLinear node {node.name}: {e}") from None

    def packed_dq(node: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """(packed [N, K/2], scales [N, K/block]) of an INT4 DequantizeLinear of W^T [K, N] along axis 0, or None."""
        a = attrs(node)
        src = inits.get(node.input[0])
        block = int(a.get("block_size", 0))
        if src is None or src.data_type != onnx.TensorProto.INT4 or int(a.get("axis", 1)) != 0 or block <= 0 \
                or block % 2 or (len(node.input) > 2 and node.input[2]):
            return None
        q, scales = needed(node, 0), needed(node, 1)
        if q.ndim != 2 or scales.shape != (q.shape[0] // block, q.shape[1]) or q.shape[0] % block:
            return None
        nib = np.ascontiguousarray(q.astype(np.int8).T).view(np.uint8) & 0x0F  # [N, K]
        return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8), np.ascontiguousarray(scales.T, np.float32)

    def packed_nbits(node: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """(packed [N, K/2], scales [N, K/block]) of a 4-bit MatMulNBits without zero points, g_idx or bias (its
        unsigned nibbles XOR 8: two's complement), or None."""
        a = attrs(node)
        n, k, block = int(a["N"]), int(a["K"]), int(a["block_size"])
        if int(a.get("bits", 4)) != 4 or k % block or block % 2 or any(node.input[3:]):
            return None
        packed = needed(node, 1).reshape(n, -1)
        if packed.dtype != np.uint8 or packed.shape[1] != k // 2:
            return None
        return packed ^ 0x88, np.asarray(needed(node, 2), np.float32).reshape(n, k // block)

    def matmul_nbits(node: Any) -> np.ndarray:
        """W [N, K] float32 of a MatMulNBits (B uint8 [N, K/block, block*bits/8], scales [N, K/block] or flat,
        zero points: none (2^(bits-1)) or uint8 / float per block)."""
        a = attrs(node)
        n, k, bits, block = int(a["N"]), int(a["K"]), int(a.get("bits", 4)), int(a["block_size"])
        if bits not in (4, 8) or block < 2 or k % block:
            raise ArtifactError(f"{model_path}: MatMulNBits node {node.name}: bits {bits}, block {block}, K {k} are "
                                "not read here (bits 4 or 8, a block dividing K)")
        if len(node.input) > 4 and any(node.input[4:]):
            raise ArtifactError(f"{model_path}: MatMulNBits node {node.name} has g_idx / bias inputs, not read here")
        q = _unsigned(needed(node, 1), bits).reshape(n, -1)[:, :k]
        scales = needed(node, 2).reshape(n, -1)
        zp = optional(node, 3)
        if zp is None:
            zero: np.ndarray = np.array(1 << (bits - 1))
        elif zp.dtype == np.uint8:
            zero = _unsigned(zp, bits).reshape(n, -1)[:, : scales.shape[1]]
        else:
            zero = zp.reshape(n, -1)
        try:
            return dequantize(q, scales, zero, 1, block)
        except ValueError as e:
            raise ArtifactError(f"{model_path}: MatMulNBits node {node.name}: {e}") from None

    def embedding() -> np.ndarray:
        nodes = [n for n in scope("/model/embed_tokens") if n.op_type in ("Gather", "GatherBlockQuantized")]
        if len(nodes) != 1:
            raise ArtifactError(f"{model_path}: expected one Gather or GatherBlockQuantized node in "
                                f"model/embed_tokens, found {len(nodes)}; the graph was not exported by this mixtrt "
                                "or is damaged")
        (node,) = nodes
        if node.op_type == "Gather":
            embed = init(node.input[0])
            if embed is None:
                raise ArtifactError(f"{model_path}: the embedding Gather does not read an initializer")
            return embed
        a = attrs(node)
        bits, block = int(a.get("bits", 4)), int(a["block_size"])
        if int(a.get("gather_axis", 0)) != 0 or int(a.get("quantize_axis", 1)) != 1 or bits not in (4, 8):
            raise ArtifactError(f"{model_path}: GatherBlockQuantized node {node.name} with {a} is not read here "
                                "(gather_axis 0, quantize_axis 1, bits 4 or 8)")
        table, scales, zp = needed(node, 0), needed(node, 2), optional(node, 3)
        zero: np.ndarray | None = None
        if table.dtype == np.uint8:  # unsigned, zero point 2^(bits-1) unless given
            q = _unsigned(table, bits).reshape(table.shape[0], -1)
            zero = np.array(1 << (bits - 1)) if zp is None else \
                _unsigned(zp, bits).reshape(scales.shape[0], -1)[:, : scales.shape[1]]
        else:  # INT4 / INT8 (signed, zero point 0 unless given)
            q, zero = table, zp
        try:
            return dequantize(q, scales, zero, 1, block)
        except ValueError as e:
            raise ArtifactError(f"{model_path}: GatherBlockQuantized node {node.name}: {e}") from None

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
    out["embed_tokens"] = embedding()
    out["norm"] = norm("/model/norm")
    def put(name: str, got: np.ndarray | tuple[np.ndarray, np.ndarray]) -> None:
        if isinstance(got, tuple):
            out[name], out[f"{name}_scales"] = got
        else:
            out[name] = got

    put("lm_head", linear("/lm_head", packable=True))
    weights = GraphWeights(out)
    for i in range(args.num_hidden_layers):
        p, L = f"/model/layers.{i}", f"layers.{i}"
        out[f"{L}.attention_norm"] = norm(f"{p}/attention_norm")
        out[f"{L}.ffn_norm"] = norm(f"{p}/ffn_norm")
        for w in ("wq", "wk", "wv", "wo"):
            put(f"{L}.{w}", linear(f"{p}/attention/{w}", packable=True))
        swa = single(f"{p}/attention", "SlidingWindowAttention")
        weights.attention.append({a.name: onnx.helper.get_attribute_value(a) for a in swa.attribute})
        for j, name in ((6, "rope_cos"), (7, "rope_sin")):
            table = init(swa.input[j]) if len(swa.input) > j else None
            if table is None:
                raise ArtifactError(f"{model_path}: the attention node of layer {i} has no {name} initializer")
            out.setdefault(name, table)
        if args.moe is None:
            for w in ("w1", "w2", "w3"):
                put(f"{L}.{w}", linear(f"{p}/feed_forward/{w}", packable=True))
        else:
            E = args.moe.num_experts
            put(f"{L}.gate", linear(f"{p}/feed_forward/gate"))
            moe = single(f"{p}/feed_forward", "MoE")
            experts = [init(n) for n in moe.input[2:]]
            if len(experts) not in (2 * E, 4 * E) or any(x is None for x in experts):
                raise ArtifactError(f"{model_path}: the MoE node of layer {i} needs {2 * E} expert initializers "
                                    f"(float) or {4 * E} (int4: packed + scales), has {len(moe.input) - 2} inputs "
                                    "after hidden and router logits")
            if len(experts) == 2 * E:
                out[f"{L}.fc1"] = np.stack(experts[:E])  # type: ignore[arg-type]
                out[f"{L}.fc2"] = np.stack(experts[E:])  # type: ignore[arg-type]
            else:  # per expert (packed, scales): MatMulNBits bytes [N, K/block, block/2] -> ours [N, K/2]
                for j, fc in enumerate(("fc1", "fc2")):
                    part = experts[2 * E * j: 2 * E * (j + 1)]
                    packed, scales = part[0::2], part[1::2]
                    if any(x.dtype != np.uint8 or x.ndim != 3 for x in packed) or any(  # type: ignore[union-attr]
                            s.ndim != 2 for s in scales):  # type: ignore[union-attr]
                        raise ArtifactError(f"{model_path}: the int4 MoE node of layer {i}: {fc} inputs are not "
                                            "uint8 [N, K/block, block/2] + scales [N, K/block] per expert")
                    out[f"{L}.{fc}"] = np.stack([x.reshape(x.shape[0], -1) ^ 0x88  # type: ignore[union-attr]
                                                 for x in packed])
                    out[f"{L}.{fc}_scales"] = np.stack(scales).astype(np.float32)  # type: ignore[arg-type]
            weights.moe_k.append(int(next(a.i for a in moe.attribute if a.name == "k")))
    check_shapes(out, args, str(model_path))
    return weights


def _unsigned(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> their unsigned `bits`-bit values (4: two per byte, element 2j in the low nibble) as uint8."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """ONNX DequantizeLinear on numpy arrays, float32: (x - zero) * scale, scale per tensor (scalar), per axis
    (1-D along `axis`) or per block (`block` > 0: scale's `axis` dimension is ceil(x's / block)). ValueError when
    the shapes do not fit."""
    xf = np.asarray(x).astype(np.float32)
    axis = axis % max(xf.ndim, 1)

    def expand(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t).astype(np.float32)
        if t.size == 1:
            return t.reshape(())
        if block > 0:
            if t.ndim != xf.ndim or -(-xf.shape[axis] // block) != t.shape[axis]:
                raise ValueError(f"scales {list(t.shape)} do not block {list(xf.shape)} by {block} on axis {axis}")
            return np.repeat(t, block, axis=axis).take(range(xf.shape[axis]), axis=axis)
        if t.ndim != 1 or t.shape[0] != xf.shape[axis]:
            raise ValueError(f"scales {list(t.shape)} are not per tensor or per axis {axis} of {list(xf.shape)}")
        return t.reshape([-1 if d == axis else 1 for d in range(xf.ndim)])

    if zero is not None:
        xf = xf - expand(zero)
    return xf * expand(scale)


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


def is_packed(t: Any) -> bool:
    """A numpy array or torch tensor of uint8: INT4 bytes (plugins/int4.py)."""
    return str(t.dtype).removeprefix("torch.") == "uint8"


def check_shapes(tensors: dict[str, Any], args: ModelArgs, where: str) -> None:
    """Every weight of the model present with its shape (rope tables: any number of rows); nothing else. MoE
    experts may be INT4 (fc1 / fc2 uint8 [E, N, K/2] with fc1_scales / fc2_scales [E, N, K/block], block even), and
    so may the dense linears of PACKABLE (uint8 [N, K/2] with `name_scales` [N, K/block])."""
    rows = tuple(tensors["rope_cos"].shape)[0] if "rope_cos" in tensors else 0
    want = expected_shapes(args, rows)
    for name, shape in list(want.items()):
        packable = name.endswith((".fc1", ".fc2")) or name.rsplit(".", 1)[-1] in PACKABLE
        if packable and name in tensors and is_packed(tensors[name]):
            want[name] = (*shape[:-1], shape[-1] // 2)
            scales = tensors.get(f"{name}_scales")
            blocks = tuple(scales.shape)[-1] if scales is not None and len(scales.shape) == len(shape) else 0
            if blocks == 0 or shape[-1] % blocks or (shape[-1] // blocks) % 2:
                dims = "E, N, K/block" if len(shape) == 3 else "N, K/block"
                raise ArtifactError(f"{where}: INT4 weight {name} needs {name}_scales [{dims}] with an even "
                                    f"block dividing K={shape[-1]}, got "
                                    f"{None if scales is None else list(scales.shape)}")
            want[f"{name}_scales"] = (*shape[:-1], blocks)
    missing, unknown = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unknown:
        raise ArtifactError(f"{where}: weights missing {missing[:4]}" + (f", unknown {unknown[:4]}" if unknown else ""))
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{where}: weight {name} is {list(tensors[name].shape)}, the model needs {list(shape)}")
