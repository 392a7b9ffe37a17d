"""mixtrt.plugins: one folder per custom op, all with the same files.

    plugins/<op>/__init__.py     OP_TYPE (the ONNX op_type = TensorRT plugin name) and VERSION
    plugins/<op>/SPEC.md         the contract: inputs, attributes, semantics, traps, backend mappings
    plugins/<op>/torch_op.py     the eager reference (a torch custom op the exporter traces)
    plugins/<op>/onnx_op.py      ONNX schema, local-function body for onnxruntime, export translation

Every op lives in the ONNX domain ``mixtrt``. `OPS` is the one list of them (op_type -> its package).
"""

from __future__ import annotations

import importlib
from types import ModuleType

DOMAIN = "mixtrt"
OPS: dict[str, str] = {
    "MoE": "mixtrt.plugins.moe",
    "SlidingWindowAttention": "mixtrt.plugins.swa",
}


def op_module(op_type: str, part: str) -> ModuleType:
    """The `part` module ("torch_op", "onnx_op", ...) of the op named `op_type`."""
    if op_type not in OPS:
        raise KeyError(f"no mixtrt op {op_type!r}; known: {sorted(OPS)}")
    return importlib.import_module(f"{OPS[op_type]}.{part}")
