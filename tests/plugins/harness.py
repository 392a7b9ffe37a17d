"""Single-op models and in-place execution for the op tests (the runtime backend's binding, reused).

    model = single_op_model("SlidingWindowAttention", inputs, outputs, attributes)
    runner = InplaceRunner(make_session(model), {"present_key": "past_key", "present_value": "past_value"})
    out = runner.run(feeds, {"output": (shape, np.float32)})["output"]   # feeds["past_key"] updated in place
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from mixtrt.plugins import DOMAIN, op_module
from mixtrt.plugins.onnx_common import attach_functions
from mixtrt.runtime.backends.onnxruntime import bind_array

_NP_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
               np.dtype(np.int32): onnx.TensorProto.INT32, np.dtype(np.int64): onnx.TensorProto.INT64}


def single_op_model(
    op_type: str,
    inputs: Sequence[tuple[str, Any, Sequence[int | str]]],
    outputs: Sequence[tuple[str, Any, Sequence[int | str]]],
    attributes: Mapping[str, Any],
    opset: int = 18,
) -> onnx.ModelProto:
    """A graph holding one ``mixtrt::<op_type>`` node (with the plugin attributes) and its function."""
    node = helper.make_node(
        op_type,
        [name for name, _, _ in inputs],
        [name for name, _, _ in outputs],
        domain=DOMAIN,
        plugin_version=str(op_module(op_type, "onnx_op").VERSION),
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


def make_session(model: onnx.ModelProto, threads: int = 2) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class InplaceRunner:
    """Run a session on numpy buffers with IOBinding, binding some outputs onto input buffers.

    ``inplace`` maps an output name to the input name whose buffer it shares (``present_key`` ->
    ``past_key``): onnxruntime then updates the cache in place, exactly as the runtime's backend does.
    Buffers must be C-contiguous; a row slice ``buf[b:b+1]`` of a ``[B, ...]`` buffer is, so one row of a
    batched cache can be run through a batch-1 step (ragged prefill).
    """

    def __init__(self, session: Any, inplace: Mapping[str, str]) -> None:
        self.session = session
        self.inplace = dict(inplace)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, tuple[Sequence[int], Any]]
            ) -> dict[str, np.ndarray]:
        """``outputs``: name -> (shape, dtype) for the outputs that get fresh buffers."""
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            bind_array(binding, name, arr)
        results: dict[str, np.ndarray] = {}
        for out_name, in_name in self.inplace.items():
            bind_array(binding, out_name, feeds[in_name], output=True)
            results[out_name] = feeds[in_name]
        for name, (shape, dtype) in outputs.items():
            results[name] = np.empty(shape, dtype=dtype)
            bind_array(binding, name, results[name], output=True)
        self.session.run_with_iobinding(binding)
        return results
