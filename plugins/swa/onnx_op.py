"""ONNX side of mixtrt::SlidingWindowAttention: op schema, local-function body
(-> com.microsoft.GroupQueryAttention), export translation.

Spec: SPEC.md beside this file.
"""

from __future__ import annotations

import onnx
from onnx import helper
from onnx.defs import OpSchema

from mixtrt.plugins import DOMAIN
from mixtrt.plugins.onnx_common import (
    FLOAT_TYPES,
    MS_DOMAIN,
    make_function,
    plugin_attribute_schemas,
    register_op_schema,
)
from mixtrt.plugins.swa import OP_TYPE, VERSION

INPUTS = ("q", "k", "v", "past_key", "past_value", "total_lengths", "cos_cache", "sin_cache")
OUTPUTS = ("output", "present_key", "present_value")
ATTRIBUTES = ("num_heads", "kv_heads", "window", "windowed_cache", "scale")


def op_schema() -> OpSchema:
    P = OpSchema.FormalParameter
    A = OpSchema.Attribute
    INT = OpSchema.AttrType.INT
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        "GQA + RoPE (rotate_half) + sliding window over a fixed-capacity KV cache. See plugins/swa/SPEC.md.",
        inputs=[
            P("q", "T", "[B, S, N*D] before RoPE"),
            P("k", "T", "[B, S, K*D] before RoPE"),
            P("v", "T", "[B, S, K*D]"),
            P("past_key", "T", "[B, K, C, D] post-RoPE keys (backend-private layout)"),
            P("past_value", "T", "[B, K, C, D]"),
            P("total_lengths", "tensor(int32)", "[B] tokens per row after this step"),
            P("cos_cache", "T", "[P, D/2]"),
            P("sin_cache", "T", "[P, D/2]"),
        ],
        outputs=[
            P("output", "T", "[B, S, N*D]"),
            P("present_key", "T", "[B, K, C, D] (same buffer as past_key when bound in place)"),
            P("present_value", "T", "[B, K, C, D]"),
        ],
        type_constraints=[("T", list(FLOAT_TYPES), "activation and cache type")],
        attributes=[
            A("num_heads", INT, "query heads N"),
            A("kv_heads", INT, "key/value heads K"),
            A("window", INT, "keys per query including itself (W >= 1), or -1 = full causal"),
            A("windowed_cache", INT, "1: capacity C >= W, backend keeps recent positions; 0: row j = position j"),
            A("scale", helper.make_attribute("scale", 0.0), "softmax scale, 0 = 1/sqrt(D)"),
            *plugin_attribute_schemas(VERSION),
        ],
    )


def register_schema() -> None:
    """Register mixtrt::SlidingWindowAttention v1 with onnx.defs (idempotent)."""
    register_op_schema(op_schema())


def function_proto(opset: int = 18) -> onnx.FunctionProto:
    """Local-function body: seqlens_k = total_lengths - 1, total_sequence_length = max(total_lengths)
    (a 0-d int32 tensor), then com.microsoft.GroupQueryAttention with attributes referenced from the call."""
    one = helper.make_node(
        "Constant", [], ["one"], value=helper.make_tensor("one_value", onnx.TensorProto.INT32, [], [1])
    )
    seqlens = helper.make_node("Sub", ["total_lengths", "one"], ["seqlens_k"])
    total = helper.make_node("ReduceMax", ["total_lengths"], ["total_sequence_length"], keepdims=0)
    gqa = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        ["output", "present_key", "present_value"],
        domain=MS_DOMAIN,
        do_rotary=1,
        rotary_interleaved=0,
    )
    for ours, theirs, kind in (
        ("num_heads", "num_heads", onnx.AttributeProto.INT),
        ("kv_heads", "kv_num_heads", onnx.AttributeProto.INT),
        ("window", "local_window_size", onnx.AttributeProto.INT),
        ("windowed_cache", "sliding_window_cache", onnx.AttributeProto.INT),
        ("scale", "scale", onnx.AttributeProto.FLOAT),
    ):
        gqa.attribute.append(helper.make_attribute_ref(theirs, kind))
        gqa.attribute[-1].ref_attr_name = ours
    f = make_function(OP_TYPE, INPUTS, OUTPUTS, [one, seqlens, total, gqa], ATTRIBUTES, opset=opset,
                      doc="mixtrt::SlidingWindowAttention -> com.microsoft.GroupQueryAttention (onnxruntime)")
    # scale is optional on the node (default 0 = 1/sqrt(D)): declare it with a default value.
    f.attribute.remove("scale")
    f.attribute_proto.append(helper.make_attribute("scale", 0.0))
    return f


def function_for(nodes, opset: int) -> onnx.FunctionProto:
    """The body serving every SlidingWindowAttention node of one model (it does not depend on the node)."""
    return function_proto(opset=opset)


def node_attributes(num_heads: int, kv_heads: int, window: int, scale: float, windowed_cache: int = -1) -> dict:
    """The node attributes for the torch op's python arguments: window <= 0 -> -1 (full causal);
    windowed_cache -1 -> 1 iff there is a window (else the cache plan's layout, 0 or 1)."""
    w = int(window) if int(window) > 0 else -1
    return {
        "num_heads": int(num_heads),
        "kv_heads": int(kv_heads),
        "window": w,
        "windowed_cache": int(w > 0 and windowed_cache != 0),
        "scale": float(scale),
    }


register_schema()


def translate(q, k, v, past_key, past_value, total_lengths, cos_cache, sin_cache,
              num_heads: int, kv_heads: int, window: int, scale: float, windowed_cache: int = -1):
    """onnxscript translation of torch.ops.mixtrt.sliding_window_attention.default."""
    from onnxscript.values import Opset

    register_schema()
    mixtrt = Opset(DOMAIN, VERSION)
    return mixtrt.SlidingWindowAttention(
        q, k, v, past_key, past_value, total_lengths, cos_cache, sin_cache,
        **node_attributes(num_heads, kv_heads, window, scale, windowed_cache),
        plugin_version=str(VERSION), plugin_namespace=DOMAIN,
    )
