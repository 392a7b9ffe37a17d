"""ONNX side of mixtrt::MoE: op schema, local-function body (-> com.microsoft.MoE), export translation.

Spec: SPEC.md beside this file.
"""

from __future__ import annotations

import onnx
from onnx import helper
from onnx.defs import OpSchema

from mixtrt.plugins import DOMAIN
from mixtrt.plugins.moe import OP_TYPE, VERSION
from mixtrt.plugins.onnx_functions import (
    FLOAT_TYPES,
    MS_DOMAIN,
    make_function,
    plugin_attribute_schemas,
    register_op_schema,
)

INPUTS = ("hidden", "router_logits", "fc1", "fc2")
OUTPUTS = ("output",)
ATTRIBUTES = ("k",)


def op_schema() -> OpSchema:
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        "Top-k mixture of SwiGLU experts over router logits (softmax, top-k, renormalise). See plugins/moe/SPEC.md.",
        inputs=[
            OpSchema.FormalParameter("hidden", "T", "[T, H]"),
            OpSchema.FormalParameter("router_logits", "T", "[T, E] raw logits"),
            OpSchema.FormalParameter("fc1", "T", "[E, 2I, H] gate/up rows interleaved"),
            OpSchema.FormalParameter("fc2", "T", "[E, H, I]"),
        ],
        outputs=[OpSchema.FormalParameter("output", "T", "[T, H]")],
        type_constraints=[("T", list(FLOAT_TYPES), "activation and weight type")],
        attributes=[
            OpSchema.Attribute("k", OpSchema.AttrType.INT, "experts per token"),
            *plugin_attribute_schemas(VERSION),
        ],
    )


def register_schema() -> None:
    """Register mixtrt::MoE v1 with onnx.defs (idempotent); onnxscript needs it to emit the node."""
    register_op_schema(op_schema())


def function_proto(opset: int = 18) -> onnx.FunctionProto:
    """Local-function body: com.microsoft.MoE(hidden, router_logits, fc1, "", fc2), k taken from the call."""
    moe = helper.make_node(
        "MoE",
        ["hidden", "router_logits", "fc1", "", "fc2"],
        ["output"],
        domain=MS_DOMAIN,
        activation_type="swiglu",
        swiglu_fusion=1,
        normalize_routing_weights=1,
    )
    moe.attribute.append(helper.make_attribute_ref("k", onnx.AttributeProto.INT))
    return make_function(OP_TYPE, INPUTS, OUTPUTS, [moe], ATTRIBUTES, opset=opset,
                         doc="mixtrt::MoE -> com.microsoft.MoE (onnxruntime CPU/CUDA)")


register_schema()


def translate(hidden, router_logits, fc1, fc2, top_k: int):
    """onnxscript translation of torch.ops.mixtrt.moe.default (custom_translation_table)."""
    from onnxscript.values import Opset

    register_schema()
    mixtrt = Opset(DOMAIN, VERSION)
    return mixtrt.MoE(
        hidden, router_logits, fc1, fc2, k=int(top_k), plugin_version=str(VERSION), plugin_namespace=DOMAIN
    )
