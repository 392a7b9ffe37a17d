"""Other int4 forms than the exporter writes, made in an artifact's graph for tests of its readers (the TensorRT
rewrite, the triton backend's weight reading)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixtrt.plugins.int4 import matmulnbits_layout, pack_int4


def int4_table(graph: onnx.GraphProto, gather: onnx.NodeProto, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Replace the table of the `GatherBlockQuantized` node `gather` (INT8 by default) by a random [V, H] table
    in 4 bits (same block); its int4 values and scales (what a reader must give back: unpack_int4(q, s))."""
    block = next(a.i for a in gather.attribute if a.name == "block_size")
    table = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    q4, s4 = pack_int4(table, block)
    graph.initializer.extend([numpy_helper.from_array(matmulnbits_layout(q4, block).reshape(q4.shape), "table4"),
                              numpy_helper.from_array(s4, "scales4")])
    gather.CopyFrom(helper.make_node("GatherBlockQuantized", ["table4", gather.input[1], "scales4"],
                                     list(gather.output), name=gather.name, domain="com.microsoft", gather_axis=0,
                                     quantize_axis=1, block_size=block, bits=4))
    return q4, s4
