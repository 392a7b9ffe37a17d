"""The mixed step: one pass of the graph over the decoding rows' next tokens and one row's prompt chunk together.

A server that decodes n rows while a new prompt is prefilled would otherwise run two passes per step, each
reading every weight: the decode step and the prompt chunk. Only attention needs to know which tokens belong to
which row; everything else in the graph (embedding, norms, projections, the MoE, lm_head) works token by token.
So the onnxruntime backend can rewrite the causal-LM graph in memory (after ort_fusions) into one that takes a
flat run of tokens, `input_ids` [1, N] = n decode tokens (one per row, in cache-row order) followed by the S >= 1
tokens of one row (the chunk row), and runs every attention node twice: once over the first n tokens as a batch
of n rows of one token (`total_lengths` [n], the decode rows' cache), once over the last S tokens as one row
(`prefill_total_lengths` [1], that row's cache bound as the `prefill.` inputs and outputs). `logit_positions`
[1, P] indexes the N flat tokens.

No part is ever empty where attention sees it: onnxruntime's GroupQueryAttention fails on a batch of 0 (SIGFPE)
and on 0 new tokens, and an `If` around it cost more per step than the rest of the rewrite. The chunk row always
has a token (a decode step with no prompt chunk passes its last row as a chunk of one token: the same attention
over the same cache row). With no decoding rows (a prefill), the decode part's attention runs on a stand-in: the
chunk's first token, with length 1, over a scratch cache row the backend binds as the decode part's cache; its
output is dropped. So the one session serves decode steps, prefills and mixed steps without branches.

Each token's arithmetic is the same as in a step of its own part (the same kernels per token; the batch-invariance
contract of DESIGN's Serving section covers GEMMs that see more rows), and the cache rows are updated in place as
in a plain step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixtrt.plugins.onnx_common import MS_DOMAIN
from mixtrt.runtime.backends.ort_fusions import SWA, _Graph
from mixtrt.runtime.manifest import Manifest

PREFILL = "prefill."  # prefix of the chunk row's cache inputs / outputs
PREFILL_LENGTHS = "prefill_total_lengths"


def prefill_name(name: str) -> str:
    return PREFILL + name


class NotMixable(ValueError):
    """The graph has a form the rewrite does not know (the backend then runs plain steps)."""


def mixed(model: onnx.ModelProto, layers: int) -> None:
    """Rewrite a causal-LM graph (after ort_fusions.fuse) in place into the mixed-step form above.

    Raises NotMixable, leaving the model untouched, when an attention node or a user of `total_lengths` is not
    one this rewrite knows."""
    graph = model.graph
    g = _Graph(graph)
    consumers = g.consumers
    attention = [n for n in graph.node if (n.domain, n.op_type) == SWA
                 or (n.domain == MS_DOMAIN and n.op_type == "GroupQueryAttention")]
    if len(attention) != layers:
        raise NotMixable(f"{len(attention)} attention nodes for {layers} layers")
    # total_lengths feeds the attention nodes, (fused GroupQueryAttention) a Sub and a ReduceMax feeding them, and
    # Shapes giving the batch dimension to Reshapes (the flat row's batch is 1)
    lengths_nodes, batch_shapes = [], []
    for user in consumers.get("total_lengths", []):
        if user in attention:
            continue
        if user.op_type == "Shape":
            batch_shapes.append(user)
            continue
        if user.op_type not in ("Sub", "ReduceMax") or any(
                c not in attention for out in user.output for c in consumers.get(out, [])):
            raise NotMixable(f"total_lengths feeds a {user.op_type} node outside attention")
        lengths_nodes.append(user)
    pasts = {name for layer in range(layers) for name in Manifest.past_names(layer)}
    for node in attention:
        if node.input[3] not in pasts or node.input[4] not in pasts:
            raise NotMixable(f"attention node {node.name} does not read the cache inputs")

    counter = iter(range(1 << 30))

    def name(base: str) -> str:
        return f"mixed/{base}_{next(counter)}"

    def const(value: list[int], dtype: type = np.int64) -> str:
        n = name("const")
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), n))
        return n

    def replace(node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
        g.before[id(node)].extend(nodes)
        g.removed.add(id(node))

    for node in batch_shapes:  # Shape(total_lengths) (attributes start / end) -> the flat row's [1]
        start, end = (next((a.i for a in node.attribute if a.name == key), None) for key in ("start", "end"))
        value = numpy_helper.from_array(np.asarray([1][start:end], np.int64))
        replace(node, [helper.make_node("Constant", [], list(node.output), value=value,
                                        name=f"{node.name}/flat_batch")])

    # n (decode tokens), m = max(n, 1) (the decode part's rows as attention sees them), m - n (the stand-in's
    # output to drop), and the decode part's lengths: total_lengths, or [1] for the stand-in
    zero, one, big = const([0]), const([1]), const([1 << 62])
    shape, n_dec, m_dec, drop, padded, lengths = (name(x) for x in ("shape", "n", "m", "drop", "padded", "lengths"))
    new: list[onnx.NodeProto] = [
        helper.make_node("Shape", ["total_lengths"], [shape]),
        helper.make_node("Slice", [shape, zero, one], [n_dec]),
        helper.make_node("Max", [n_dec, one], [m_dec]),
        helper.make_node("Sub", [m_dec, n_dec], [drop]),
        helper.make_node("Concat", ["total_lengths", const([1], np.int32)], [padded], axis=0),
        helper.make_node("Slice", [padded, zero, m_dec], [lengths]),
    ]
    to_rows = const([-1, 1, 0])  # [1, m, X] -> [m, 1, X]
    to_flat = const([1, -1, 0])  # [m, 1, Y] -> [1, m, Y]

    def split(tensor: str) -> tuple[str, str]:
        """[1, N, X] -> the decode part [m, 1, X] (the first m tokens: with no decoding rows, the chunk's first
        token as the stand-in) and the chunk row's [1, S, X]."""
        d, d_rows, p = (name(tensor) for _ in range(3))
        new.extend([
            helper.make_node("Slice", [tensor, zero, m_dec, one], [d]),
            helper.make_node("Reshape", [d, to_rows], [d_rows]),
            helper.make_node("Slice", [tensor, n_dec, big, one], [p]),
        ])
        return d_rows, p

    # the lengths each part's attention reads: total_lengths (or the fused Sub / ReduceMax of it)
    decode_of, prefill_of = {"total_lengths": lengths}, {"total_lengths": PREFILL_LENGTHS}
    for node in lengths_nodes:
        parts = []
        for source, of in ((lengths, decode_of), (PREFILL_LENGTHS, prefill_of)):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = name(node.name or node.op_type)
            copy.input[0] = source
            del copy.output[:]
            for out in node.output:
                of[out] = name(out)
                copy.output.append(of[out])
            parts.append(copy)
        new.extend(parts)
    cache_of = {p: prefill_name(p) for p in pasts}

    def part(node: onnx.NodeProto, inputs: list[str], outputs: list[str], tag: str) -> onnx.NodeProto:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name or node.output[0]}/{tag}"
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        copy.output.extend(outputs)
        return copy

    for node in attention:
        before = len(new)
        d_in, p_in = list(node.input), list(node.input)
        for i in range(3):  # the token inputs q, k, v (GroupQueryAttention packed: q only)
            if node.input[i]:
                d_in[i], p_in[i] = split(node.input[i])
        for i in range(3, len(node.input)):
            d_in[i] = decode_of.get(node.input[i], node.input[i])
            p_in[i] = cache_of.get(node.input[i], prefill_of.get(node.input[i], node.input[i]))
        d_out = [name(node.output[0]), *node.output[1:3]]
        p_out = [name(node.output[0]), *(prefill_name(o) for o in node.output[1:3])]
        d_flat, both = name("out"), name("out")
        new += [part(node, d_in, d_out, "decode"), part(node, p_in, p_out, "chunk"),
                helper.make_node("Reshape", [d_out[0], to_flat], [d_flat]),
                helper.make_node("Concat", [d_flat, p_out[0]], [both], axis=1),
                helper.make_node("Slice", [both, drop, big, one], [node.output[0]])]  # the stand-in's row out
        replace(node, new[before:])
        del new[before:]
    for node in lengths_nodes:
        replace(node, [])  # replaced by the two parts' copies
    first = id(graph.node[0])
    g.before[first][:0] = new  # the shared nodes (counts, lengths), placed first
    g.commit()
    _mixed_io(graph, layers)


def _mixed_io(graph: onnx.GraphProto, layers: int) -> None:
    """The mixed graph's inputs and outputs: the plain ones (input_ids and logit_positions now one flat row) plus
    the chunk's lengths and cache."""
    def dims(value: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    for v in list(graph.input) + list(graph.output):
        if v.name in ("input_ids", "logit_positions", "logits"):
            v.type.tensor_type.shape.dim[0].ClearField("dim_param")
            v.type.tensor_type.shape.dim[0].dim_value = 1
    graph.input.append(helper.make_tensor_value_info(PREFILL_LENGTHS, TensorProto.INT32, [1]))
    for layer in range(layers):
        for past, present in zip(Manifest.past_names(layer), Manifest.present_names(layer), strict=True):
            d = dims(inputs[past])
            elem = inputs[past].type.tensor_type.elem_type
            graph.input.append(helper.make_tensor_value_info(prefill_name(past), elem, [1, *d[1:]]))
            d = dims(outputs[present])
            graph.output.append(helper.make_tensor_value_info(prefill_name(present), elem,
                                                              [1, *d[1:]]))
