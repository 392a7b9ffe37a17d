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

    Routing in fp32: softmax, TopK(k), renormalise, scattered to dense weights [T, E]. Then per expert
    e: the rows routed to it (NonZero), Gemm with fc1_e (transB), SwiGLU on the two halves, Gemm with
    fc2_e, scaled by the routing weight and added into an fp32 accumulator (ScatterND add). An expert
    with no rows runs its Gemms on 0 rows, which costs nothing; fc1_e/fc2_e are the graph's
    initializers after inlining, so onnxruntime pre-packs them.
    """
    E = num_experts
    mk = helper.make_node
    n: list[onnx.NodeProto] = []
    k_scalar = mk("Constant", [], ["k_scalar"])
    k_scalar.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT))
    k_scalar.attribute[0].ref_attr_name = "k"
    n += [k_scalar, _const("one", [1]), _const("last", [-1]), _const("zero_f", np.float32(0.0))]
    zeros = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    n += [
        mk("Reshape", ["k_scalar", "one"], ["k"]),
        mk("Cast", ["router_logits"], ["logits_f"], to=TensorProto.FLOAT),
        mk("Softmax", ["logits_f"], ["probs"], axis=-1),
        mk("TopK", ["probs", "k"], ["top_p", "top_e"], axis=-1),
        mk("ReduceSum", ["top_p", "last"], ["top_sum"], keepdims=1),
        mk("Div", ["top_p", "top_sum"], ["top_w"]),
        mk("Shape", ["probs"], ["probs_shape"]),
        mk("ConstantOfShape", ["probs_shape"], ["probs_zeros"], value=zeros),
        mk("ScatterElements", ["probs_zeros", "top_e", "top_w"], ["dense"], axis=1),  # [T, E]
        mk("Transpose", ["dense"], ["dense_t"], perm=[1, 0]),  # [E, T]
        mk("Greater", ["dense_t", "zero_f"], ["routed_t"]),  # [E, T]
        mk("Shape", ["hidden"], ["hidden_shape"]),
        mk("ConstantOfShape", ["hidden_shape"], ["acc_0"], value=zeros),  # [T, H] fp32
    ]
    for e in range(E):
        n += [
            _const(f"e{e}", np.int64(e)),
            mk("Gather", ["routed_t", f"e{e}"], [f"routed_{e}"], axis=0),  # [T] bool
            mk("NonZero", [f"routed_{e}"], [f"nz_{e}"]),  # [1, n]
            mk("Transpose", [f"nz_{e}"], [f"rows_{e}"], perm=[1, 0]),  # [n, 1]
            mk("GatherND", ["hidden", f"rows_{e}"], [f"x_{e}"]),  # [n, H]
            mk("Gemm", [f"x_{e}", f"fc1_{e}"], [f"h_{e}"], transB=1),  # [n, 2I]
            mk("Split", [f"h_{e}"], [f"gate_{e}", f"up_{e}"], axis=-1, num_outputs=2),
            mk("Sigmoid", [f"gate_{e}"], [f"sig_{e}"]),
            mk("Mul", [f"gate_{e}", f"sig_{e}"], [f"silu_{e}"]),
            mk("Mul", [f"silu_{e}", f"up_{e}"], [f"act_{e}"]),
            mk("Gemm", [f"act_{e}", f"fc2_{e}"], [f"y_{e}"], transB=1),  # [n, H]
            mk("Cast", [f"y_{e}"], [f"yf_{e}"], to=TensorProto.FLOAT),
            mk("Gather", ["dense_t", f"e{e}"], [f"w_all_{e}"], axis=0),  # [T]
            mk("GatherND", [f"w_all_{e}", f"rows_{e}"], [f"w_row_{e}"]),  # [n]
            mk("Unsqueeze", [f"w_row_{e}", "last"], [f"w_{e}"]),  # [n, 1]
            mk("Mul", [f"yf_{e}", f"w_{e}"], [f"yw_{e}"]),
            mk("ScatterND", [f"acc_{e}", f"rows_{e}", f"yw_{e}"], [f"acc_{e + 1}"], reduction="add"),
        ]
    n.append(mk("CastLike", [f"acc_{E}", "hidden"], ["output"]))
    return make_function(OP_TYPE, input_names(E), ["output"], n, ATTRIBUTES, opset=opset,
                         doc=f"mixtrt::MoE v{VERSION}, {E} experts: routing + one Gemm pair per expert")


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
