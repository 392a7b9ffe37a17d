"""Precisions an artifact can have: the name users pass (`--precision`) -> the numpy dtype name of its
weights, activations and KV cache. The one table (the exporter maps it to torch, backends to numpy)."""

PRECISIONS: dict[str, str] = {"fp32": "float32", "fp16": "float16", "int4": "float32"}
"""int4: INT4 weights (runtime/quantization.py), fp32 activations and cache."""
