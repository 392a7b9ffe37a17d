"""ONNX side of mixtrt::MoE: op schema, local-function body (per-expert Gemms), export translation.

Spec: SPEC.md beside this file. The node's inputs are ``hidden, router_logits, fc1_0 .. fc1_{E-1},
fc2_0 .. fc2_{E-1}``: one initializer per expert matrix, so onnxruntime pre-packs each for its Gemm at
session creation and a token reads only the experts it is routed to, with both threads of the
Gemm working on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from mixtrt.plugins import DOMAIN
from mixtrt.plugins.moe import OP_TYPE, VERSION
from mixtrt.plugins.onnx_common import (
    FLOAT_TYPES,
    make_function,
    plugin_attribute_schemas,
    register_op_schema,
)

ATTRIBUTES = ("k",)


def input_names(num_experts: int) -> list[str]:
    return ["hidden", "router_logits", *(f"fc1_{e}" for e in range(num_experts)),
            *(f"fc2_{e}" for e in range(num_experts))]


def num_experts(node: onnx.NodeProto) -> int:
    """E of a mixtrt::MoE node, from its input count (2 + 2E)."""
    n = len(node.input)
    if n < 4 or n % 2:
        raise ValueError(f"mixtrt::MoE node {node.name!r} has {n} inputs; expected hidden, router_logits, "
                         "then E fc1 and E fc2 tensors")
    return (n - 2) // 2


def op_schema() -> OpSchema:
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        "Top-k mixture of SwiGLU experts over router logits (softmax, top-k, renormalise). See plugins/moe/SPEC.md.",
        inputs=[
            OpSchema.FormalParameter(
                "inputs", "T",
                "hidden [T, H], router_logits [T, E], fc1_0..fc1_{E-1} [2I, H] ([gate; up] rows), "
                "fc2_0..fc2_{E-1} [H, I]",
                param_option=OpSchema.FormalParameterOption.Variadic, min_arity=4,
            ),
        ],
        outputs=[OpSchema.FormalParameter("output", "T", "[T, H]")],
        type_constraints=[("T", list(FLOAT_TYPES), "activation and weight type")],
        attributes=[
            OpSchema.Attribute("k", OpSchema.AttrType.INT, "experts per token"),
            *plugin_attribute_schemas(VERSION),
        ],
    )


def register_schema() -> None:
    """Register mixtrt::MoE with onnx.defs (idempotent); onnxscript needs it to emit the node."""
    register_op_schema(op_schema())


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def function_proto(num_experts: int, opset: int = 18) -> onnx.FunctionProto:
    """Local-function body for E = num_experts (a model's MoE nodes share one E).

    Routing once, in fp32: softmax, TopK(k), renormalise. The T*k (token, slot) pairs are sorted by
    expert once, so each expert's rows are one contiguous run of the sorted rows: one Split by the
    per-expert counts gives each expert its rows for its Gemm with fc1_e (transB); SwiGLU runs once over all
    pairs (the fc1 outputs concatenated, still sorted), and the same Split gives each expert its rows for its
    Gemm with fc2_e. An expert with no rows gets an empty piece and its Gemms cost nothing. The expert
    outputs are concatenated, scaled by their routing weights and added into their tokens' rows of an fp32
    accumulator (one ScatterND add). fc1_e/fc2_e are the graph's initializers after inlining, so onnxruntime
    pre-packs them.

        router_logits ─► Softmax ─► TopK(k) ─► w [T, k], e [T, k] ─► pairs sorted by expert (TopK ascending)
        hidden ─► Gather(sorted pairs' tokens) ─► Split(counts) ─► Gemm fc1_e per expert ─► Concat ─► SwiGLU
               ─► Split(counts) ─► Gemm fc2_e per expert ─► Concat ─► * w(sorted) ─► ScatterND(add) into [T, H]
    """
    E = num_experts
    mk = helper.make_node
    n: list[onnx.NodeProto] = []
    k_scalar = mk("Constant", [], ["k_scalar"])
    k_scalar.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT))
    k_scalar.attribute[0].ref_attr_name = "k"
    zeros = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    n += [k_scalar, _const("one", [1]), _const("last", [-1]), _const("axis0", [0]),
          _const("experts", np.arange(E, dtype=np.int64)), _const("col", [-1, 1])]
    n += [
        mk("Reshape", ["k_scalar", "one"], ["k"]),
        mk("Cast", ["router_logits"], ["logits_f"], to=TensorProto.FLOAT),
        mk("Softmax", ["logits_f"], ["probs"], axis=-1),
        mk("TopK", ["probs", "k"], ["top_p", "top_e"], axis=-1),  # [T, k]
        mk("ReduceSum", ["top_p", "last"], ["top_sum"], keepdims=1),
        mk("Div", ["top_p", "top_sum"], ["top_w"]),  # [T, k] renormalised
        # pair p = t * k + j: its expert, weight and token
        mk("Reshape", ["top_e", "last"], ["pair_e"]),  # [P]
        mk("Reshape", ["top_w", "col"], ["pair_w"]),  # [P, 1]
        mk("Shape", ["pair_e"], ["num_pairs"]),
        mk("TopK", ["pair_e", "num_pairs"], ["sorted_e", "order"], axis=0, largest=0, sorted=1),  # by expert
        mk("Div", ["order", "k_scalar"], ["sorted_t"]),  # [P] token of each sorted pair
        mk("Gather", ["hidden", "sorted_t"], ["x_sorted"], axis=0),  # [P, H]
        mk("Gather", ["pair_w", "order"], ["w_sorted"], axis=0),  # [P, 1]
        mk("Unsqueeze", ["sorted_t", "last"], ["rows"]),  # [P, 1]
        # expert e's rows are the next counts[e] sorted rows: one Split (empty pieces allowed) gives every x_e
        mk("Unsqueeze", ["sorted_e", "last"], ["sorted_e_col"]),  # [P, 1]
        mk("Equal", ["sorted_e_col", "experts"], ["is_e"]),  # [P, E]
        mk("Cast", ["is_e"], ["is_e_i"], to=TensorProto.INT64),
        mk("ReduceSum", ["is_e_i", "axis0"], ["counts"], keepdims=0),  # [E]
        mk("Split", ["x_sorted", "counts"], [f"x_{e}" for e in range(E)], axis=0),  # E x [n_e, H]
    ]
    # fc1 per expert, then SwiGLU once over all pairs (the experts' rows concatenated back in sorted order),
    # then fc2 per expert on the same pieces: 2 nodes per expert instead of 6
    n += [mk("Gemm", [f"x_{e}", f"fc1_{e}"], [f"h_{e}"], transB=1) for e in range(E)]  # [n_e, 2I]
    n += [
        mk("Concat", [f"h_{e}" for e in range(E)], ["h_sorted"], axis=0),  # [P, 2I]
        mk("Split", ["h_sorted"], ["gate", "up"], axis=-1, num_outputs=2),
        mk("Sigmoid", ["gate"], ["sig"]),
        mk("Mul", ["gate", "sig"], ["silu"]),
        mk("Mul", ["silu", "up"], ["act"]),  # [P, I]
        mk("Split", ["act", "counts"], [f"act_{e}" for e in range(E)], axis=0),
    ]
    n += [mk("Gemm", [f"act_{e}", f"fc2_{e}"], [f"y_{e}"], transB=1) for e in range(E)]  # [n_e, H]
    n += [
        mk("Concat", [f"y_{e}" for e in range(E)], ["y_sorted"], axis=0),  # [P, H]
        mk("Cast", ["y_sorted"], ["y_f"], to=TensorProto.FLOAT),
        mk("Mul", ["y_f", "w_sorted"], ["y_w"]),
        mk("Shape", ["hidden"], ["hidden_shape"]),
        mk("ConstantOfShape", ["hidden_shape"], ["acc"], value=zeros),  # [T, H] fp32
        mk("ScatterND", ["acc", "rows", "y_w"], ["sum"], reduction="add"),
        mk("CastLike", ["sum", "hidden"], ["output"]),
    ]
    return make_function(OP_TYPE, input_names(E), ["output"], n, ATTRIBUTES, opset=opset,
                         doc=f"mixtrt::MoE v{VERSION}, {E} experts: routing, pairs sorted by expert, "
                             "one Gemm pair per expert on its rows, SwiGLU once over all rows")


def function_for(nodes: Sequence[onnx.NodeProto], opset: int, shapes: Mapping | None = None) -> onnx.FunctionProto:
    """The body serving every MoE node of one model (they must agree on E, read from the input count; the
    graph's `shapes` are not needed)."""
    counts = {num_experts(node) for node in nodes}
    if len(counts) != 1:
        raise ValueError(f"mixtrt::MoE nodes with different expert counts {sorted(counts)} in one model")
    return function_proto(counts.pop(), opset=opset)


register_schema()


def translate(hidden, router_logits, fc1, fc2, top_k: int):
    """onnxscript translation of torch.ops.mixtrt.moe.default (custom_translation_table)."""
    from onnxscript.values import Opset

    register_schema()
    mixtrt = Opset(DOMAIN, VERSION)
    # one variadic formal parameter: onnxscript binds mixed fixed + variadic parameters wrongly
    return mixtrt.MoE(*[hidden, router_logits, *fc1, *fc2], k=int(top_k), plugin_version=str(VERSION),
                      plugin_namespace=DOMAIN)
