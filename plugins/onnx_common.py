"""ONNX plumbing shared by the mixtrt custom ops.

- ``register_op_schema``: idempotent ``onnx.defs.register_schema`` (onnxscript needs the schema to emit
  the node during ``torch.onnx.export``).
- ``attach_functions(model)``: adds the local-function body of every mixtrt op the graph uses, plus
  the ``com.microsoft`` opset import, so onnxruntime runs the exported model as is.
- ``custom_translation_table()``: the ``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``.

Imports onnx at module level (an exporter-side module). Each op's onnx_op module imports this one; this
one reaches the op modules only through `OPS` when called, so every module imports alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import helper
from onnx.defs import OpSchema

from mixtrt.plugins import DOMAIN, OPS, op_module

MS_DOMAIN = "com.microsoft"
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
PLUGIN_ATTRIBUTES = ("plugin_version", "plugin_namespace")
"""String attributes on every mixtrt node, read by TensorRT's fallback plugin importer."""


def plugin_attribute_schemas(version: int) -> list[OpSchema.Attribute]:
    return [
        OpSchema.Attribute("plugin_version", helper.make_attribute("plugin_version", str(version)), "plugin version"),
        OpSchema.Attribute("plugin_namespace", helper.make_attribute("plugin_namespace", DOMAIN), "plugin namespace"),
    ]


def register_op_schema(schema: OpSchema) -> None:
    """Register ``schema`` unless a schema of that name/domain/version is already known (idempotent)."""
    try:
        existing = onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
    except onnx.defs.SchemaError:
        existing = None
    if existing is not None and existing.since_version == schema.since_version:
        return
    onnx.defs.register_schema(schema)


def make_function(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    nodes: Sequence[onnx.NodeProto],
    attributes: Sequence[str],
    opset: int = 18,
    doc: str = "",
) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN,
        name,
        list(inputs),
        list(outputs),
        list(nodes),
        [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        attributes=list(attributes) + list(PLUGIN_ATTRIBUTES),
        doc_string=doc,
    )


def _used_nodes(graph: onnx.GraphProto, functions: Iterable[onnx.FunctionProto]) -> dict[str, list[onnx.NodeProto]]:
    """op_type -> the mixtrt nodes of that type, in the graph, its subgraphs and other functions."""
    used: dict[str, list[onnx.NodeProto]] = {}

    def visit(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            if node.domain == DOMAIN:
                used.setdefault(node.op_type, []).append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(graph.node)
    for f in functions:
        if f.domain != DOMAIN:
            visit(f.node)
    return used


def static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | None, ...]]:
    """name -> shape (None for a dynamic dim) of the graph's inputs, outputs and value_info: what an op's
    body may depend on (mixtrt::SlidingWindowAttention's body depends on the head dim)."""
    shapes = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def _set_opset(opsets, domain: str, version: int) -> None:
    """Import `domain` at `version` (an existing import of the domain is set to it)."""
    for o in opsets:
        if o.domain == domain:
            o.version = version
            return
    opsets.append(helper.make_opsetid(domain, version))


def attach_functions(model: onnx.ModelProto) -> None:
    """Add the function body of every mixtrt op used in ``model`` (in place), plus the opset imports.

    An existing function of the same (domain, name) is replaced, so re-attaching is idempotent. The
    body's default-domain opset is set to the model's own, as onnxruntime wants one version per domain.
    """
    used = _used_nodes(model.graph, model.functions)
    if not used:
        return
    unknown = set(used) - set(OPS)
    if unknown:
        raise ValueError(f"no function body for mixtrt ops {sorted(unknown)}")
    ops = {op_type: op_module(op_type, "onnx_op") for op_type in used}
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend(keep)
    shapes = static_shapes(model.graph)
    for op_type in sorted(used):
        model.functions.append(ops[op_type].function_for(used[op_type], opset=default, shapes=shapes))
    _set_opset(model.opset_import, DOMAIN, max(ops[op_type].VERSION for op_type in used))
    _set_opset(model.opset_import, MS_DOMAIN, 1)


def custom_translation_table() -> dict:
    """{torch op overload: onnxscript translation} for ``torch.onnx.export(..., dynamo=True)``."""
    table = {}
    for op_type in OPS:
        onnx_op = op_module(op_type, "onnx_op")
        onnx_op.register_schema()
        table[op_module(op_type, "torch_op").TORCH_OP] = onnx_op.translate
    return table
