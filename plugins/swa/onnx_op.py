"""ONNX side of mixtrt::SlidingWindowAttention: op schema, the onnxruntime local-function bodies
(com.microsoft.GroupQueryAttention where it serves the head dim, standard ops elsewhere), export translation.

Spec: SPEC.md beside this file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


# onnxruntime's CPU GroupQueryAttention (measured on 1.32.0, fp32 and fp16, every cache mode) runs any head
# count, GQA ratio and head dim D up to 1024, but refuses at run time a D that is not a multiple of 8
# ("head_size must be a multiple of 8") and, with do_rotary=1, one that is not a multiple of 16 ("head_size
# shall be a multiple of 16"). So the body depends on D (SPEC.md, "onnxruntime bodies"):
PATHS = {
    "gqa": "GroupQueryAttention with its rotary (D % 16 == 0)",
    "gqa_rope": "RoPE in standard ops, then GroupQueryAttention without rotary (D % 16 == 8)",
    "standard": "standard ops only, ring cache (any other even D)",
}


def path_for(head_dim: int) -> str:
    """The onnxruntime body serving head dim D (a key of PATHS); an odd D has none (rotate_half needs halves).

    >>> path_for(128), path_for(24), path_for(12)
    ('gqa', 'gqa_rope', 'standard')
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r}: rotary embeddings need an even head dim >= 2")
    if head_dim % 16 == 0:
        return "gqa"
    return "gqa_rope" if head_dim % 8 == 0 else "standard"


def function_proto(opset: int = 18, path: str = "gqa") -> onnx.FunctionProto:
    """The local-function body `path` (a key of PATHS)."""
    bodies = {"gqa": _gqa_body, "gqa_rope": _gqa_rope_body, "standard": _standard_body}
    if path not in bodies:
        raise ValueError(f"no SlidingWindowAttention body {path!r}; known: {list(PATHS)}")
    b = bodies[path]()
    f = make_function(OP_TYPE, INPUTS, OUTPUTS, b.nodes, ATTRIBUTES, opset=opset,
                      doc=f"mixtrt::SlidingWindowAttention v{VERSION} on onnxruntime: {PATHS[path]}")
    # scale is optional on the node (default 0 = 1/sqrt(D)): declare it with a default value.
    f.attribute.remove("scale")
    f.attribute_proto.append(helper.make_attribute("scale", 0.0))
    return f


class _Body:
    """Nodes of a function body under construction: `op` appends a node and returns its output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def ops(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
        return outputs

    def const(self, name: str, values: list, dtype: int = onnx.TensorProto.INT64, dims: list[int] | None = None
              ) -> str:
        dims = [len(values)] if dims is None else dims
        return self.op("Constant", [], name, value=helper.make_tensor(f"{name}_value", dtype, dims, values))

    def attr(self, name: str, attr: str, floating: bool = False) -> str:
        """A scalar Constant holding the calling node's int (or float) attribute `attr`."""
        c = helper.make_node("Constant", [], [name])
        kind = onnx.AttributeProto.FLOAT if floating else onnx.AttributeProto.INT
        c.attribute.append(helper.make_attribute_ref("value_float" if floating else "value_int", kind))
        c.attribute[0].ref_attr_name = attr
        self.nodes.append(c)
        return name

    def gqa(self, q: str, k: str, rotary: bool) -> None:
        """com.microsoft.GroupQueryAttention on q, k (rotated by it when `rotary`), v and the past buffers:
        seqlens_k = total_lengths - 1, total_sequence_length = max(total_lengths) (a 0-d int32 tensor)."""
        one = self.const("one", [1], onnx.TensorProto.INT32, [])
        seqlens = self.op("Sub", ["total_lengths", one], "seqlens_k")
        total = self.op("ReduceMax", ["total_lengths"], "total_sequence_length", keepdims=0)
        rope = ["cos_cache", "sin_cache"] if rotary else []
        self.ops("GroupQueryAttention", [q, k, "v", "past_key", "past_value", seqlens, total, *rope],
                 ["output", "present_key", "present_value"], domain=MS_DOMAIN, do_rotary=int(rotary),
                 rotary_interleaved=0)
        gqa = self.nodes[-1]
        for ours, theirs, kind in (
            ("num_heads", "num_heads", onnx.AttributeProto.INT),
            ("kv_heads", "kv_num_heads", onnx.AttributeProto.INT),
            ("window", "local_window_size", onnx.AttributeProto.INT),
            ("windowed_cache", "sliding_window_cache", onnx.AttributeProto.INT),
            ("scale", "scale", onnx.AttributeProto.FLOAT),
        ):
            gqa.attribute.append(helper.make_attribute_ref(theirs, kind))
            gqa.attribute[-1].ref_attr_name = ours

    def head_counts(self) -> tuple[str, str]:
        """N and K as [1] int64 tensors (from the num_heads and kv_heads attributes)."""
        one = self.const("heads_1", [1])
        n, k = (self.op("Reshape", [self.attr(f"{a}_s", a), one], f"{a}_1") for a in ("num_heads", "kv_heads"))
        return n, k

    def positions(self) -> tuple[str, str]:
        """past [B] and qpos [B, S] int64: tokens cached before this step, and the new tokens' positions
        total_lengths - S + arange(S)."""
        s1 = self.op("Shape", ["q"], "s1", start=1, end=2)  # [1]
        past = self.op("Sub", [self.op("Cast", ["total_lengths"], "total", to=onnx.TensorProto.INT64), s1], "past")
        steps = self.op("Range", [self.const("r0", [0], dims=[]), self.op("Squeeze", [s1], "s"),
                                  self.const("r1", [1], dims=[])], "steps")  # [S]
        return past, self.op("Add", [self.op("Unsqueeze", [past, self.const("c1", [1])], "past_b1"), steps], "qpos")

    def rope(self, qpos: str, xs: list[tuple[str, str]]) -> list[str]:
        """Each (x [B, S, h*D], h) rotated at qpos (rotate_half, cos/sin from the tables), as [B, S, h, D]."""
        half = [self.op("Gather", [table, qpos], f"{table}_at") for table in ("cos_cache", "sin_cache")]  # [B, S, D/2]
        two = self.const("c2", [2])
        cos = self.op("Unsqueeze", [self.op("Concat", [half[0], half[0]], "cos_full", axis=-1), two], "cos4")
        sin = self.op("Unsqueeze", [self.op("Concat", [self.op("Neg", [half[1]], "neg_sin"), half[1]], "sin_signed",
                                             axis=-1), two], "sin4")  # [B, S, 1, D]: (-sin, sin)
        shape_tail = self.const("cm1", [-1])
        out = []
        for x, h in xs:
            x4 = self.op("Reshape", [x, self.op("Concat", [self.const(f"{x}_00", [0, 0]), h, shape_tail],
                                                 f"{x}_4d", axis=0)], f"{x}_heads")  # [B, S, h, D]
            lo, hi = self.ops("Split", [x4], [f"{x}_lo", f"{x}_hi"], axis=-1, num_outputs=2)
            swapped = self.op("Concat", [hi, lo], f"{x}_swapped", axis=-1)  # rotate_half = swapped * (-1, 1)
            out.append(self.op("Add", [self.op("Mul", [x4, cos], f"{x}_cos"),
                                       self.op("Mul", [swapped, sin], f"{x}_sin")], f"{x}_rope"))
        return out


def _gqa_body() -> _Body:
    """com.microsoft.GroupQueryAttention rotating q and k itself (do_rotary=1)."""
    b = _Body()
    b.gqa("q", "k", rotary=True)
    return b


def _gqa_rope_body() -> _Body:
    """q and k rotated with standard ops, then com.microsoft.GroupQueryAttention with do_rotary=0 (same cache)."""
    b = _Body()
    N, K = b.head_counts()
    _, qpos = b.positions()
    q4, k4 = b.rope(qpos, [("q", N), ("k", K)])  # [B, S, N|K, D]
    flat = b.const("flat", [0, 0, -1])
    b.gqa(b.op("Reshape", [q4, flat], "q_rot"), b.op("Reshape", [k4, flat], "k_rot"), rotary=False)
    return b


def _standard_body() -> _Body:
    """Standard ONNX ops only (opset 18+); the cache is a ring, slot = position mod C, written in place.

        pos = total_lengths - S + arange(S)                          [B, S]
        q, k = RoPE(q, k at pos)                                     [B, S, N|K, D]
        R = min(max(past), C): the slots holding a key in some row   keys = [ring[:, :, :R]; k]   [B, K, R+S, D]
        slot c holds position past-1 - ((past-1-c) mod C)            (< 0: empty)
        visible: 0 <= kpos <= qpos and qpos - kpos < W               fp32 softmax, head h reads kv head h // G
        present = ScatterElements(past, the last min(S, C) new keys at slot pos mod C)

    The scatter's updates are sliced out of the concatenated `keys`, so it runs after the old keys were
    read; with present bound to past's memory, ScatterElements writes the new slots in place (onnxruntime
    skips its copy when the output is the input's buffer). A linear cache (windowed_cache=0, total <= C) is
    a ring that never wraps (slot = position), so one body serves both layouts.
    """
    F32 = onnx.TensorProto.FLOAT
    b = _Body()
    op, const = b.op, b.const
    zero, one, two = const("a0", [0]), const("a1", [1]), const("a2", [2])
    last = const("last", [2**62])
    N, K = b.head_counts()
    W = b.attr("window_s", "window")  # scalar; -1 = full causal
    scale = b.attr("scale_s", "scale", floating=True)  # scalar; 0 = 1/sqrt(D)

    past, qpos = b.positions()  # [B], [B, S]
    B1, S1 = op("Shape", ["q"], "b1", end=1), op("Shape", ["q"], "s1_", start=1, end=2)
    C1, D1 = op("Shape", ["past_key"], "cap1", start=2, end=3), op("Shape", ["past_key"], "d1", start=3)
    C = op("Squeeze", [C1], "cap")
    q4, k4 = b.rope(qpos, [("q", N), ("k", K)])
    qh = op("Transpose", [q4], "qh", perm=[0, 2, 1, 3])  # [B, N, S, D]
    kh = op("Transpose", [k4], "kh", perm=[0, 2, 1, 3])  # [B, K, S, D]
    v4 = op("Reshape", ["v", op("Concat", [const("v_00", [0, 0]), K, const("v_m1", [-1])], "v_4d", axis=0)], "v4")
    vh = op("Transpose", [v4], "vh", perm=[0, 2, 1, 3])  # [B, K, S, D]

    # ---- the resident slots [0, R) of the ring, then the new tokens; every key's position
    R1 = op("Min", [op("ReduceMax", [past], "max_past", keepdims=1), C1], "resident")  # [1]
    keys = op("Concat", [op("Slice", ["past_key", zero, R1, two], "ring_k"), kh], "keys", axis=2)  # [B, K, R+S, D]
    vals = op("Concat", [op("Slice", ["past_value", zero, R1, two], "ring_v"), vh], "vals", axis=2)
    slots = op("Range", [const("z", [0], dims=[]), op("Squeeze", [R1], "r"), const("o", [1], dims=[])], "slots")
    newest = op("Unsqueeze", [op("Sub", [past, one], "past_m1"), one], "newest")  # [B, 1]
    age = op("Mod", [op("Sub", [newest, slots], "back"), C], "age")  # [B, R]
    kpos = op("Concat", [op("Sub", [newest, age], "ring_pos"), qpos], "kpos", axis=1)  # [B, R+S]

    kp = op("Unsqueeze", [kpos, one], "kp")  # [B, 1, R+S]
    dist = op("Sub", [op("Unsqueeze", [qpos, two], "qp"), kp], "dist")  # [B, S, R+S]
    reach = op("Where", [op("Greater", [W, const("w0", [0], dims=[])], "windowed"), W,
                         const("far", [2**62], dims=[])], "reach")
    visible = op("And", [op("And", [op("GreaterOrEqual", [kp, const("p0", [0], dims=[])], "filled"),
                                    op("GreaterOrEqual", [dist, const("d0", [0], dims=[])], "causal")], "seen"),
                         op("Less", [dist, reach], "in_window")], "visible")
    mask = op("Unsqueeze", [visible, const("a12", [1, 2])], "mask")  # [B, 1, 1, S, R+S]

    # ---- attention in fp32; head h reads kv head h // G: [B, N, S, D] -> [B, K, G, S, D]
    q5 = op("Reshape", [qh, op("Concat", [B1, K, const("g", [-1]), S1, D1], "q5_shape", axis=0)], "q5")
    qf = op("Cast", [q5], "qf", to=F32)
    kf = op("Cast", [op("Unsqueeze", [keys, two], "keys5")], "kf", to=F32)  # [B, K, 1, R+S, D]
    vf = op("Cast", [op("Unsqueeze", [vals, two], "vals5")], "vf", to=F32)
    scores = op("MatMul", [qf, op("Transpose", [kf], "kf_t", perm=[0, 1, 2, 4, 3])], "scores")  # [B, K, G, S, R+S]
    default_scale = op("Reciprocal", [op("Sqrt", [op("Cast", [D1], "d_f", to=F32)], "sqrt_d")], "inv_sqrt_d")
    scale_f = op("Where", [op("Greater", [scale, const("s0", [0.0], F32, [])], "scaled"), scale, default_scale],
                 "scale_f")
    masked = op("Where", [mask, op("Mul", [scores, scale_f], "scores_scaled"),
                          const("neg_inf", [float("-inf")], F32, [])], "scores_masked")
    o5 = op("MatMul", [op("Softmax", [masked], "probs", axis=-1), vf], "o5")  # [B, K, G, S, D]
    o4 = op("Reshape", [o5, op("Concat", [B1, N, S1, D1], "o4_shape", axis=0)], "o4")  # [B, N, S, D]
    flat = op("Reshape", [op("Transpose", [o4], "o_bsnd", perm=[0, 2, 1, 3]), const("flat", [0, 0, -1])], "o_flat")
    b.ops("CastLike", [flat, "q"], ["output"])  # [B, S, N*D]

    # ---- the last min(S, C) new tokens into their slots, in place
    keep = op("Neg", [op("Min", [S1, C1], "kept")], "neg_kept")  # [1]
    new_k = op("Slice", [keys, keep, last, two], "new_k")  # [B, K, S', D], out of `keys`: after the read
    new_v = op("Slice", [vals, keep, last, two], "new_v")
    slot = op("Mod", [op("Slice", [qpos, keep, last, one], "kept_pos"), C], "slot")  # [B, S']
    index = op("Expand", [op("Unsqueeze", [slot, const("a13", [1, 3])], "slot4"), op("Shape", [new_k], "new_shape")],
               "index")  # [B, K, S', D]
    b.ops("ScatterElements", ["past_key", index, new_k], ["present_key"], axis=2)
    b.ops("ScatterElements", ["past_value", index, new_v], ["present_value"], axis=2)
    return b


def head_dim(node: onnx.NodeProto, shapes: Mapping[str, Sequence[int | None]]) -> int:
    """D of a SlidingWindowAttention node: the last dim of its past_key (or q's width / num_heads)."""
    past_key = shapes.get(node.input[3]) or ()
    if past_key and past_key[-1]:
        return int(past_key[-1])
    q = shapes.get(node.input[0]) or ()
    heads = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
    if q and q[-1] and heads and q[-1] % heads == 0:
        return int(q[-1]) // heads
    raise ValueError(f"mixtrt::SlidingWindowAttention node {node.name!r}: its head dim is not in the graph "
                     f"(give {node.input[3]!r} a static last dimension); the onnxruntime body depends on it")


def function_for(nodes: Sequence[onnx.NodeProto], opset: int,
                 shapes: Mapping[str, Sequence[int | None]] | None = None) -> onnx.FunctionProto:
    """The body serving every SlidingWindowAttention node of one model, chosen by their head dim (they share
    one function, so they must share the path)."""
    paths = {path_for(head_dim(node, shapes or {})) for node in nodes}
    if len(paths) != 1:
        raise ValueError(f"mixtrt::SlidingWindowAttention nodes needing different bodies {sorted(paths)} in one model")
    return function_proto(opset=opset, path=paths.pop())


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
