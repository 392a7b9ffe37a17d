"""Precisions an artifact can have: the name users pass (`--precision`) -> the numpy dtype name of its
weights, activations and KV cache. The one table (the exporter maps it to torch, backends to numpy)."""

PRECISIONS: dict[str, str] = {"fp32": "float32", "fp16": "float16"}
