"""The graph `mixtrt build` gives TensorRT (export/tensorrt_build.py `tensorrt_graph`), made runnable by onnxruntime:
what each plugin node computes, as standard ONNX plus our ops' ONNX functions, so the TensorRT graph's weights and
wiring can be checked against the artifact's logits on the CPU (the plugins' kernels are checked against the op
references separately: tests/plugins/test_trt_plugin_launch.py).

- `SlidingWindowAttention` nodes: unchanged, their ONNX function attached again;
- `MoE` (stacked float [E, 2I, H] / [E, H, I]) and `MoEInt4` (INT32 words of plugins/int4.py's bytes + scales)
  nodes: the stacked weights read as the plugin's kernel reads them (the words' memory as bytes, low nibble first,
  two's complement, times the block's scale: `unpack_int4`), split per expert into initializers, and the float
  `mixtrt::MoE` node with its function; the state outputs are Identity of the state inputs (the kernel leaves the
  state zero);
- everything else (DequantizeLinear on INT4 / INT8, Gather, MatMul) is standard ONNX and runs as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixtrt.export.tensorrt_build import MOE_INT4
from mixtrt.plugins.int4 import unpack_int4
from mixtrt.plugins.onnx_common import attach_functions


def onnxruntime_model(trt_graph: Path) -> onnx.ModelProto:
    model = onnx.load(str(trt_graph), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    new_inits = []
    for node in graph.node:
        if node.domain != "mixtrt" or node.op_type not in ("MoE", MOE_INT4):
            nodes.append(node)
            continue
        arr = {n: numpy_helper.to_array(inits[n]) for n in node.input[2:-2]}
        if node.op_type == MOE_INT4:
            fc1w, fc1s, fc2w, fc2s = (arr[n] for n in node.input[2:6])
            fc1 = unpack_int4(np.ascontiguousarray(fc1w).view(np.uint8), fc1s)  # the words' bytes, as the kernel
            fc2 = unpack_int4(np.ascontiguousarray(fc2w).view(np.uint8), fc2s)
        else:
            fc1, fc2 = arr[node.input[2]], arr[node.input[3]]
        names = []
        for part, stacked in (("fc1", fc1), ("fc2", fc2)):
            for e, w in enumerate(stacked):
                names.append(f"{node.name}/ref_{part}_{e}")
                new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), names[-1]))
        k = next(a.i for a in node.attribute if a.name == "k")
        nodes.append(helper.make_node("MoE", [node.input[0], node.input[1], *names], [node.output[0]],
                                      name=node.name, domain="mixtrt", k=k, plugin_version="2",
                                      plugin_namespace="mixtrt"))
        nodes += [helper.make_node("Identity", [node.input[-2]], [node.output[1]]),
                  helper.make_node("Identity", [node.input[-1]], [node.output[2]])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    attach_functions(model)
    return model


def session(model: onnx.ModelProto | Path, directory: Path | None = None):
    """An onnxruntime session over `model` (a path, or a model saved to `directory` with its weights external),
    int4 matmuls in fp32."""
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        assert directory is not None
        path = directory / "reference.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="reference.onnx.data")
    else:
        path = model
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def prefill_feeds(sess, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of one prefill from an empty cache (the state inputs zero), logits at every position."""
    b, s = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids.astype(np.int64)
        elif i.name == "total_lengths":
            feeds[i.name] = np.full(b, s, np.int32)
        elif i.name == "logit_positions":
            feeds[i.name] = np.tile(np.arange(s, dtype=np.int64), (b, 1))
        else:
            shape = [b if not isinstance(d, int) else d for d in i.shape]
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32}[i.type]
            feeds[i.name] = np.zeros(shape, dtype)
    return feeds
