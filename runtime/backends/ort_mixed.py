"""The mixed step: one pass of the graph over the decoding rows' next tokens and one row's prompt chunk together.

A server that decodes n rows while a new prompt is prefilled would otherwise run two passes per step, each
reading every weight: the decode step and the prompt chunk. Only attention needs to know which tokens belong to
which row; everything else in the graph (embedding, norms, projections, the MoE, lm_head) works token by token.
So the onnxruntime backend can rewrite the causal-LM graph in memory (after ort_fusions) into one that takes a
flat run of tokens, `input_ids` [1, N] = n decode tokens (one per row, in cache-row order) followed by the S
tokens of one row's chunk, and runs every attention node twice: once over the first n tokens as a batch of n
rows of one token (`total_lengths` [n], the decode rows' cache), once over the last S tokens as one row
(`prefill_total_lengths` [1], that row's cache bound as the `prefill.` inputs and outputs). Either part may be
empty: n = 0 (`total_lengths` [0]) or no chunk (`prefill_total_lengths` [0], S = 0), so the one session serves
decode steps, prefills and mixed steps. `logit_positions` [1, P] indexes the N flat tokens.

Each token's arithmetic is the same as in a step of its own part (the same kernels per token; the batch-invariance
contract of DESIGN's Serving section covers GEMMs that see more rows), and the cache rows are updated in place as
in a plain step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixtrt.plugins.onnx_common import MS_DOMAIN
from mixtrt.runtime.backends.ort_fusions import SWA
from mixtrt.runtime.manifest import Manifest

PREFILL = "prefill."  # prefix of the chunk row's cache inputs / outputs
PREFILL_LENGTHS = "prefill_total_lengths"


def prefill_name(name: str) -> str:
    return PREFILL + name


class NotMixable(ValueError):
    """The graph has a form the rewrite does not know (the backend then runs plain steps)."""


def mixed(model: onnx.ModelProto, layers: int, q_width: int) -> None:
    """Rewrite a causal-LM graph (after ort_fusions.fuse) in place into the mixed-step form above (q_width: the
    attention output's width, heads x head dim).

    Raises NotMixable, leaving the model untouched, when an attention node or a user of `total_lengths` is not
    one this rewrite knows."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
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

    new: list[onnx.NodeProto] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in batch_shapes:  # Shape(total_lengths) (attributes start / end) -> the flat row's [1]
        start, end = (next((a.i for a in node.attribute if a.name == key), None) for key in ("start", "end"))
        value = numpy_helper.from_array(np.asarray([1][start:end], np.int64))
        replaced[id(node)] = [helper.make_node("Constant", [], list(node.output), value=value,
                                               name=f"{node.name}/flat_batch")]
    counter = iter(range(1 << 30))

    def name(base: str) -> str:
        return f"mixed/{base}_{next(counter)}"

    def const(value: list[int]) -> str:
        n = name("const")
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), n))
        return n

    # n (decode tokens) and the chunk row count (0 or 1), as int64 [1]
    n_dec, n_pre = name("n_decode"), name("n_prefill")
    shape_dec, shape_pre = name("shape"), name("shape")
    new += [helper.make_node("Shape", ["total_lengths"], [shape_dec]),
            helper.make_node("Shape", [PREFILL_LENGTHS], [shape_pre])]
    zero, one, two, three, big = const([0]), const([1]), const([2]), const([3]), const([1 << 62])
    new += [helper.make_node("Slice", [shape_dec, zero, one], [n_dec]),
            helper.make_node("Slice", [shape_pre, zero, one], [n_pre])]
    to_rows = const([-1, 1, 0])  # [1, n, X] -> [n, 1, X]

    def split(tensor: str) -> tuple[str, str]:
        """[1, N, X] -> the decode part [n, 1, X] and the chunk [b, S, X] (b = 0 or 1; no chunk: [0, 1, X])."""
        d, p, d_rows, s, s1, x, p_shape, p_rows = (name(tensor) for _ in range(8))
        shp = name("shape")
        new.extend([
            helper.make_node("Slice", [tensor, zero, n_dec, one], [d]),
            helper.make_node("Reshape", [d, to_rows], [d_rows]),
            helper.make_node("Slice", [tensor, n_dec, big, one], [p]),
            helper.make_node("Shape", [p], [shp]),
            helper.make_node("Slice", [shp, one, two], [s]),
            helper.make_node("Max", [s, one], [s1]),  # an empty chunk is [0, 1, X]: GroupQueryAttention wants S >= 1
            helper.make_node("Slice", [shp, two, three], [x]),
            helper.make_node("Concat", [n_pre, s1, x], [p_shape], axis=0),
            helper.make_node("Reshape", [p, p_shape], [p_rows], allowzero=1),
        ])
        return d_rows, p_rows

    # the chunk's lengths inputs: total_lengths itself, or the fused Sub / ReduceMax of it
    # (GroupQueryAttention refuses a total_sequence_length below 1, which the max of an empty part would be: the
    # max is taken with a 1 beside the lengths, the same value for a part with rows)
    prefill_of = {"total_lengths": PREFILL_LENGTHS}
    one_i32 = name("one_i32")
    graph.initializer.append(numpy_helper.from_array(np.asarray([1], np.int32), one_i32))
    for node in lengths_nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = name(node.name or node.op_type)
        copy.input[0] = PREFILL_LENGTHS
        del copy.output[:]
        for out in node.output:
            prefill_of[out] = name(out)
            copy.output.append(prefill_of[out])
        if node.op_type != "ReduceMax":
            new.append(copy)
            continue
        replaced[id(node)] = []
        for part in (node, copy):
            padded = name("lengths_or_one")
            replaced[id(node)] += [helper.make_node("Concat", [part.input[0], one_i32], [padded], axis=0), part]
            part.input[0] = padded
    cache_of = {p: prefill_name(p) for p in pasts}

    has_rows: dict[str, str] = {}
    for tag, count in (("decode", n_dec), ("prefill", n_pre)):
        has_rows[tag] = name(f"{tag}_has_rows")
        new.append(helper.make_node("Greater", [count, zero], [has_rows[tag]]))
    width = const([q_width])
    to_flat = const([1, -1, q_width])  # the attention output [b, s, q_width] -> [1, b*s, q_width]
    elem = next(v.type.tensor_type.elem_type for v in graph.input if v.name == Manifest.past_names(0)[0])

    def guarded(node: onnx.NodeProto, inputs: list[str], outputs: list[str], part: str) -> onnx.NodeProto:
        """The attention node on one part's inputs, inside an If on the part having rows (onnxruntime's
        GroupQueryAttention fails on a batch of 0). Without rows the If gives an empty output and the (empty)
        past as present; with rows the node writes the cache in place (the If's outputs are the bound buffers)."""
        inner = onnx.NodeProto()
        inner.CopyFrom(node)
        inner.name = f"{node.name or node.output[0]}/{part}"
        del inner.input[:]
        inner.input.extend(inputs)
        del inner.output[:]
        inner.output.extend(f"{o}/then" for o in outputs)
        then = helper.make_graph([inner], f"{inner.name}/then", [],
                                 [helper.make_tensor_value_info(o, elem, None) for o in inner.output])
        empty = [f"{o}/else" for o in outputs]
        otherwise = helper.make_graph(
            [helper.make_node("Slice", [inputs[0], zero, width, two], [empty[0]]),
             helper.make_node("Identity", [inputs[3]], [empty[1]]),
             helper.make_node("Identity", [inputs[4]], [empty[2]])],
            f"{inner.name}/else", [], [helper.make_tensor_value_info(o, elem, None) for o in empty])
        return helper.make_node("If", [has_rows[part]], outputs, name=f"{inner.name}/if",
                                then_branch=then, else_branch=otherwise)

    for node in attention:
        before = len(new)
        d_in, p_in = list(node.input), list(node.input)
        for i in range(3):  # the token inputs q, k, v (GroupQueryAttention packed: q only)
            if node.input[i]:
                d_in[i], p_in[i] = split(node.input[i])
        for i in range(3, len(node.input)):
            p_in[i] = cache_of.get(node.input[i], prefill_of.get(node.input[i], node.input[i]))
        d_out = [name(node.output[0]), *node.output[1:3]]
        p_out = [name(node.output[0]), *(prefill_name(o) for o in node.output[1:3])]
        new.append(guarded(node, d_in, d_out, "decode"))
        new.append(guarded(node, p_in, p_out, "prefill"))
        d_flat, p_flat = name("out"), name("out")
        new += [helper.make_node("Reshape", [d_out[0], to_flat], [d_flat]),
                helper.make_node("Reshape", [p_out[0], to_flat], [p_flat]),
                helper.make_node("Concat", [d_flat, p_flat], [node.output[0]], axis=1)]
        replaced[id(node)] = new[before:]
        new = new[:before]
    head = new  # the shared nodes (lengths, counts), placed first

    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(head)
    for node in nodes:
        graph.node.extend(replaced.get(id(node), [node]))
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
    graph.input.append(helper.make_tensor_value_info(PREFILL_LENGTHS, TensorProto.INT32, ["prefill_rows"]))
    for layer in range(layers):
        for past, present in zip(Manifest.past_names(layer), Manifest.present_names(layer), strict=True):
            d = dims(inputs[past])
            elem = inputs[past].type.tensor_type.elem_type
            graph.input.append(helper.make_tensor_value_info(prefill_name(past), elem, ["prefill_rows", *d[1:]]))
            d = dims(outputs[present])
            graph.output.append(helper.make_tensor_value_info(prefill_name(present), elem,
                                                              ["prefill_rows", *d[1:]]))
