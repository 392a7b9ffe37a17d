"""mixtrt.export: checkpoint loading, the PyTorch reference model, ONNX export, the CLI.

Heavy imports (torch, onnx) happen on first use, so ``mixtrt --help`` stays fast.
"""

from typing import Any

__all__ = ["load_model", "load_checkpoint", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "load_checkpoint"):
        from mixtrt.export import checkpoint

        return getattr(checkpoint, name)
    if name == "export_onnx":
        from mixtrt.export.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(name)
