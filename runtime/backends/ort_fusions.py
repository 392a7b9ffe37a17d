"""Rewrites the onnxruntime backend applies to an artifact's graph before creating its session.

model.onnx carries standard ops outside the two custom ops' bodies, because it also feeds the TensorRT build
and the triton backend's weight reader. onnxruntime runs two forms of it faster, and does not find them
itself, so the backend rewrites the graph in memory at load (the artifact's files are never touched):

- **Residual norms.** `s = a + b` followed by the exported RMSNorm of s (`Pow(s, 2)`, `ReduceMean` over the
  last axis, `+ eps`, `Sqrt`, `s / that`, `* weight`) becomes one `com.microsoft.SkipSimplifiedLayerNormalization
  (a, b, weight)` whose fourth output is s for the residual's other consumers. (onnxruntime's own fusion
  wants an Add with a single consumer; the residual sum always has two.)
- **Packed q/k/v.** The three projections of one attention node, MatMuls of the same input by three float
  initializers (or by three `DequantizeLinear`s of INT4/INT8 initializers with the same block layout), become
  one MatMul by their concatenation along the output axis: a `Concat` of float initializers, which onnxruntime
  folds at load; quantized ones (onnxruntime's Concat takes no INT4) are concatenated here and held in the graph,
  up to MAX_HELD_BYTES in all, and onnxruntime fuses their DequantizeLinear and the MatMul into one
  `MatMulNBits`. When the attention node's body is GroupQueryAttention with its own rotary (head dim % 16 == 0),
  the node becomes that GroupQueryAttention fed the packed projection (its `key` and `value` inputs empty);
  otherwise a `Split` restores q, k and v for the node.

Both are exact rearrangements of the same arithmetic, within float rounding (the sums and the norm are
computed in the same order per row, so batch invariance is kept; tests compare against the unrewritten graph).
Measured on the Mistral-shaped benchmark model: 176 -> 128 nodes per step (README, "Benchmarks").
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixtrt.plugins import DOMAIN
from mixtrt.plugins.onnx_common import MS_DOMAIN
from mixtrt.plugins.swa import OP_TYPE as SWA_OP

SWA = (DOMAIN, SWA_OP)
# Packed quantized q/k/v are held in the graph proto, which onnxruntime copies while it creates the session (the
# serialized bytes, its parsed model, then its pre-packed weights): about 3x these bytes at load. A model whose
# quantized q/k/v pass this (a 7B dense int4 model: ~500 MB) keeps them apart; the norms are fused anyway.
MAX_HELD_BYTES = 256 << 20


@dataclass
class FusionCounts:
    """How many of each rewrite the graph received (the backend keeps it as `OrtBackend.fusions`)."""

    residual_norms: int = 0
    packed_qkv: int = 0
    packed_attention: int = 0  # of packed_qkv: the attention node became GroupQueryAttention on the packed input
    held_bytes: int = 0  # quantized q/k/v bytes packed into the graph itself (MAX_HELD_BYTES at most)
    skipped: list[str] = field(default_factory=list)  # attention nodes left unpacked, and why


class _Graph:
    """Producer / consumer maps over a GraphProto's nodes, and the removals and insertions to apply."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.removed: set[int] = set()
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # id(node) -> new nodes placed before it

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def scalar(self, name: str) -> float | None:
        t = self.inits.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        value = numpy_helper.to_array(t)
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def ints(self, name: str) -> list[int] | None:
        t = self.inits.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]

    def commit(self) -> None:
        nodes = []
        for node in self.graph.node:
            nodes.extend(self.before.pop(id(node), []))
            if id(node) not in self.removed:
                nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)


def fuse(model: onnx.ModelProto, base_dir: str | Path) -> FusionCounts:
    """Apply both rewrites to `model` in place; returns what was done. Only the quantized q/k/v weights are
    read (from their external data under `base_dir`): the packed copy is held in the graph, and the three
    initializers it replaces leave it."""
    counts = FusionCounts()
    g = _Graph(model.graph)
    counts.residual_norms = _residual_norms(g)
    g.commit()
    g = _Graph(model.graph)
    _packed_qkv(g, model, counts, str(base_dir))
    g.commit()
    if counts.residual_norms or counts.packed_attention:
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _norm_after(g: _Graph, s: str) -> tuple[list[onnx.NodeProto], str, float, str] | None:
    """The exported RMSNorm of `s`: its nodes, weight initializer, epsilon and output, or None."""
    pow_ = div = None
    for user in g.consumers.get(s, []):
        if user.op_type == "Pow" and user.domain == "" and user.input[0] == s and g.scalar(user.input[1]) == 2.0:
            pow_ = user
        elif user.op_type == "Div" and user.domain == "" and user.input[0] == s:
            div = user
    if pow_ is None or div is None:
        return None
    mean = g.only_consumer(pow_.output[0])
    if mean is None or mean.op_type != "ReduceMean" or _attr(mean, "keepdims", 1) != 1:
        return None
    axes = g.ints(mean.input[1]) if len(mean.input) > 1 else _attr(mean, "axes")
    if list(axes or []) != [-1]:
        return None
    add_eps = g.only_consumer(mean.output[0])
    if add_eps is None or add_eps.op_type != "Add":
        return None
    eps_name = add_eps.input[1] if add_eps.input[0] == mean.output[0] else add_eps.input[0]
    eps = g.scalar(eps_name)
    sqrt = g.only_consumer(add_eps.output[0])
    if eps is None or sqrt is None or sqrt.op_type != "Sqrt" or list(div.input) != [s, sqrt.output[0]]:
        return None
    if g.only_consumer(sqrt.output[0]) is not div:
        return None
    mul = g.only_consumer(div.output[0])
    if mul is None or mul.op_type != "Mul":
        return None
    weight = mul.input[0] if mul.input[1] == div.output[0] else mul.input[1]
    w = g.inits.get(weight)
    if w is None or len(w.dims) != 1:
        return None
    return [pow_, mean, add_eps, sqrt, div, mul], weight, eps, mul.output[0]


def _residual_norms(g: _Graph) -> int:
    done = 0
    for add in list(g.graph.node):
        if add.op_type != "Add" or add.domain != "" or len(add.input) != 2 or add.input[0] in g.inits \
                or add.input[1] in g.inits:
            continue
        found = _norm_after(g, add.output[0])
        if found is None:
            continue
        nodes, weight, eps, out = found
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], weight],
                                 [out, "", "", add.output[0]], name=f"{add.name or out}_skip_norm",
                                 domain=MS_DOMAIN, epsilon=eps)
        g.before[id(add)].append(fused)
        g.removed.update(id(n) for n in (add, *nodes))
        done += 1
    return done


@dataclass
class _Projection:
    matmul: onnx.NodeProto
    weight: str  # float initializer [K, N], or the INT4/INT8 initializer a DequantizeLinear reads
    dq: onnx.NodeProto | None = None


def _projection(g: _Graph, name: str, swa: onnx.NodeProto) -> _Projection | None:
    mm = g.producer.get(name)
    if mm is None or mm.op_type != "MatMul" or mm.domain != "" or g.only_consumer(name) is not swa:
        return None
    b = mm.input[1]
    if b in g.inits:
        return _Projection(mm, b) if len(g.inits[b].dims) == 2 else None
    dq = g.producer.get(b)
    if dq is None or dq.op_type != "DequantizeLinear" or g.only_consumer(b) is not mm or len(dq.input) != 2:
        return None
    data, scales = dq.input
    if data not in g.inits or scales not in g.inits or len(g.inits[data].dims) != 2 or _attr(dq, "axis", 1) != 0:
        return None
    return _Projection(mm, data, dq)


def _packed_qkv(g: _Graph, model: onnx.ModelProto, counts: FusionCounts, base_dir: str) -> None:
    gqa_body = _gqa_body(model)
    lengths: dict[str, tuple[str, str]] = {}
    for swa in list(g.graph.node):
        if (swa.domain, swa.op_type) != SWA:
            continue
        label = swa.name or swa.output[0]
        found = [_projection(g, name, swa) for name in swa.input[:3]]
        projs = [p for p in found if p is not None]
        if len(projs) != 3:
            counts.skipped.append(f"{label}: q/k/v are not three MatMuls by initializers")
            continue
        q = projs[0]
        if len({p.matmul.input[0] for p in projs}) != 1:
            counts.skipped.append(f"{label}: q/k/v have different inputs")
            continue
        kinds = {(g.inits[p.weight].data_type, g.inits[p.weight].dims[0],
                  None if p.dq is None else (_attr(p.dq, "block_size", 0), g.inits[p.dq.input[1]].data_type,
                                             tuple(g.inits[p.dq.input[1]].dims)[:1]))
                 for p in projs}
        if len(kinds) != 1:
            counts.skipped.append(f"{label}: q/k/v weights differ in type or layout")
            continue
        widths = [int(g.inits[p.weight].dims[1]) for p in projs]
        if q.dq is not None:
            held = sum(_nbytes(g.inits[n]) for p in projs if p.dq is not None for n in (p.weight, p.dq.input[1]))
            if counts.held_bytes + held > MAX_HELD_BYTES:
                counts.skipped.append(f"{label}: the packed quantized copies would pass {MAX_HELD_BYTES >> 20} MiB "
                                      "held in the graph at load")
                continue
            counts.held_bytes += held
        base = f"{label}_qkv"
        if q.dq is None:  # float: a Concat of the initializers, folded by onnxruntime at load
            packed = f"{base}.weight"
            new = [helper.make_node("Concat", [p.weight for p in projs], [packed], axis=1, name=f"{base}_concat")]
        else:  # onnxruntime's Concat takes no INT4: the packed initializer is made here, held in the graph
            new = []
            data = _concat(g, [p.weight for p in projs], f"{base}.quantized", base_dir)
            scales = _concat(g, [p.dq.input[1] for p in projs if p.dq is not None], f"{base}.scales", base_dir)
            packed = f"{base}.w"
            new.append(helper.make_node("DequantizeLinear", [data, scales], [packed], name=f"{base}_dq",
                                        axis=0, block_size=_attr(q.dq, "block_size", 0)))
        qkv = f"{base}.out"
        new.append(helper.make_node("MatMul", [q.matmul.input[0], packed], [qkv], name=f"{base}_matmul"))
        if gqa_body is not None:
            new.extend(_packed_gqa(swa, qkv, gqa_body, lengths, g))
            g.removed.add(id(swa))
            counts.packed_attention += 1
        else:
            split = f"{base}.split"
            g.inits[split] = numpy_helper.from_array(np.asarray(widths, np.int64), split)
            g.graph.initializer.append(g.inits[split])
            new.append(helper.make_node("Split", [qkv, split], list(swa.input[:3]), axis=-1, name=f"{base}_split"))
        for p in projs:
            g.removed.add(id(p.matmul))
            if p.dq is not None:
                g.removed.add(id(p.dq))
        g.before[id(q.matmul)].extend(new)
        counts.packed_qkv += 1


def _nbytes(t: onnx.TensorProto) -> int:
    """A quantized or float initializer's stored bytes (its external data length, else its raw data)."""
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data)


def _concat(g: _Graph, names: list[str], out: str, base_dir: str) -> str:
    """A new initializer `out`: the initializers `names` concatenated along axis 1; they leave the graph when
    nothing else reads them."""
    arrays = [numpy_helper.to_array(g.inits[n], base_dir=base_dir) for n in names]
    tensor = numpy_helper.from_array(np.concatenate(arrays, axis=1), out)
    tensor.data_type = g.inits[names[0]].data_type
    g.inits[out] = tensor
    g.graph.initializer.append(tensor)
    for n in names:
        if len(g.consumers.get(n, [])) == 1 and n not in g.outputs:
            g.graph.initializer.remove(g.inits.pop(n))
    return out


@dataclass
class _GqaBody:
    node: onnx.NodeProto  # the body's GroupQueryAttention
    defaults: dict[str, onnx.AttributeProto]  # the function's default attribute values (an omitted `scale`)


def _gqa_body(model: onnx.ModelProto) -> _GqaBody | None:
    """The GroupQueryAttention node of the attention op's local function when that body is GroupQueryAttention
    with its own rotary on the op's q, k and v (the "gqa" body, plugins/swa/onnx_op.py), else None."""
    for f in model.functions:
        if (f.domain, f.name) != SWA:
            continue
        gqa = [n for n in f.node if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
        if len(gqa) == 1 and list(gqa[0].input[:3]) == ["q", "k", "v"] and _attr(gqa[0], "do_rotary") == 1:
            others = {n.op_type for n in f.node} - {"GroupQueryAttention", "Constant", "Sub", "ReduceMax"}
            return _GqaBody(gqa[0], {a.name: a for a in f.attribute_proto}) if not others else None
    return None


def _packed_gqa(swa: onnx.NodeProto, qkv: str, body: _GqaBody, lengths: dict[str, tuple[str, str]], g: _Graph
                ) -> list[onnx.NodeProto]:
    """The attention node as the body's GroupQueryAttention on the packed projection: the body's attribute
    references resolved against the node (else the function's defaults); seqlens_k and total_sequence_length
    are computed once for the graph from the node's total_lengths (`lengths` keeps them by that input's name)."""
    new: list[onnx.NodeProto] = []
    total_lengths = swa.input[5]
    if total_lengths not in lengths:
        one = f"{total_lengths}_one_i32"
        g.inits[one] = numpy_helper.from_array(np.asarray(1, np.int32), one)
        g.graph.initializer.append(g.inits[one])
        seqlens, total = f"{total_lengths}_seqlens_k", f"{total_lengths}_total"
        new.append(helper.make_node("Sub", [total_lengths, one], [seqlens], name=f"{total_lengths}_sub_one"))
        new.append(helper.make_node("ReduceMax", [total_lengths], [total], keepdims=0, name=f"{total_lengths}_max"))
        lengths[total_lengths] = (seqlens, total)
    seqlens, total = lengths[total_lengths]
    node = helper.make_node("GroupQueryAttention",
                            [qkv, "", "", swa.input[3], swa.input[4], seqlens, total, swa.input[6], swa.input[7]],
                            list(swa.output), name=f"{swa.name or swa.output[0]}_gqa", domain=MS_DOMAIN)
    values = {**body.defaults, **{a.name: a for a in swa.attribute}}
    for a in body.node.attribute:
        if not a.ref_attr_name:
            node.attribute.append(a)
        elif a.ref_attr_name in values:
            copy = onnx.AttributeProto()
            copy.CopyFrom(values[a.ref_attr_name])
            copy.name = a.name
            node.attribute.append(copy)
    new.append(node)
    return new
