"""ONNX plumbing shared by the mixtrt custom ops.

- ``register_op_schema``: idempotent ``onnx.defs.register_schema`` (onnxscript needs the schema to emit
  the node during ``torch.onnx.export``).
- ``attach_functions(model)``: adds the local-function body of every mixtrt op the graph uses, plus
  the ``com.microsoft`` opset import, so onnxruntime runs the exported model as is.
- ``custom_translation_table()``: the ``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``.
- ``single_op_model`` / ``InplaceRunner``: a one-node model and a runner that binds past/present KV
  buffers to the same memory with IOBinding (the way the runtime must run the cache in place).

Imports onnx at module level (an exporter-side module); the runner needs numpy + onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.defs import OpSchema

from mixtrt.plugins import DOMAIN

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


def _ops() -> dict[str, Any]:
    from mixtrt.plugins.moe import onnx_op as moe_onnx_op
    from mixtrt.plugins.swa import onnx_op as swa_onnx_op

    return {moe_onnx_op.OP_TYPE: moe_onnx_op, swa_onnx_op.OP_TYPE: swa_onnx_op}


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
    ops = _ops()
    unknown = set(used) - set(ops)
    if unknown:
        raise ValueError(f"no function body for mixtrt ops {sorted(unknown)}")
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend(keep)
    for op_type in sorted(used):
        model.functions.append(ops[op_type].function_for(used[op_type], opset=default))
    _set_opset(model.opset_import, DOMAIN, max(ops[op_type].VERSION for op_type in used))
    _set_opset(model.opset_import, MS_DOMAIN, 1)


def custom_translation_table() -> dict:
    """{torch op overload: onnxscript translation} for ``torch.onnx.export(..., dynamo=True)``."""
    import torch

    import mixtrt.plugins.moe.torch_op  # noqa: F401  (registers torch.ops.mixtrt.moe)
    import mixtrt.plugins.swa.torch_op  # noqa: F401  (registers torch.ops.mixtrt.sliding_window_attention)
    from mixtrt.plugins.moe import onnx_op as moe_onnx_op
    from mixtrt.plugins.swa import onnx_op as swa_onnx_op

    moe_onnx_op.register_schema()
    swa_onnx_op.register_schema()
    return {
        torch.ops.mixtrt.moe.default: moe_onnx_op.translate,
        torch.ops.mixtrt.sliding_window_attention.default: swa_onnx_op.translate,
    }


# ---------------------------------------------------------------------------------------------
# single-op models and in-place execution (tests; a template for the runtime's backend)

_NP_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
               np.dtype(np.int32): onnx.TensorProto.INT32, np.dtype(np.int64): onnx.TensorProto.INT64}


def single_op_model(
    op_type: str,
    inputs: Sequence[tuple[str, np.dtype, Sequence[int | str]]],
    outputs: Sequence[tuple[str, np.dtype, Sequence[int | str]]],
    attributes: Mapping[str, Any],
    opset: int = 18,
) -> onnx.ModelProto:
    """A graph holding one ``mixtrt::<op_type>`` node (with the plugin attributes) and its function."""
    node = helper.make_node(
        op_type,
        [name for name, _, _ in inputs],
        [name for name, _, _ in outputs],
        domain=DOMAIN,
        plugin_version=str(_ops()[op_type].VERSION),
        plugin_namespace=DOMAIN,
        **attributes,
    )
    vi = [helper.make_tensor_value_info(n, _NP_TO_ONNX[np.dtype(t)], list(s)) for n, t, s in inputs]
    vo = [helper.make_tensor_value_info(n, _NP_TO_ONNX[np.dtype(t)], list(s)) for n, t, s in outputs]
    graph = helper.make_graph([node], f"single_{op_type}", vi, vo)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    attach_functions(model)
    return model


def make_session(model: onnx.ModelProto, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class InplaceRunner:
    """Run a session on numpy buffers with IOBinding, binding some outputs onto input buffers.

    ``inplace`` maps an output name to the input name whose buffer it shares (``present_key`` ->
    ``past_key``): onnxruntime then sees one OrtValue address for both and updates the cache in place,
    exactly as a runtime holding one fixed-capacity buffer per layer must do. Buffers must be
    C-contiguous; a row slice ``buf[b:b+1]`` of a ``[B, ...]`` buffer is contiguous, so one row of a
    batched cache can be run through a batch-1 step (ragged prefill).

        runner = InplaceRunner(session, {"present_key": "past_key", "present_value": "past_value"})
        out = runner.run(feeds, {"output": (shape, np.float32)})["output"]   # feeds["past_key"] updated
    """

    def __init__(self, session, inplace: Mapping[str, str]):
        self.session = session
        self.inplace = dict(inplace)

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        outputs: Mapping[str, tuple[Sequence[int], Any]],
    ) -> dict[str, np.ndarray]:
        """``outputs``: name -> (shape, dtype) for the outputs that get fresh buffers."""
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            if not arr.flags.c_contiguous:
                raise ValueError(f"input {name} must be C-contiguous to be bound in place")
            binding.bind_input(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
        results: dict[str, np.ndarray] = {}
        for out_name, in_name in self.inplace.items():
            arr = feeds[in_name]
            binding.bind_output(out_name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
            results[out_name] = arr
        for name, (shape, dtype) in outputs.items():
            arr = np.empty(shape, dtype=dtype)
            binding.bind_output(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
            results[name] = arr
        self.session.run_with_iobinding(binding)
        return results
