"""The manifest's `quantization` record: how an int4 artifact's weights were quantized (torch-free).

An artifact of precision "int4" holds fp32 activations and KV cache, and INT4 weights: symmetric, signed,
one scale per block of `block_size` consecutive weights along each matrix's input dimension, zero point 0
(the packing: plugins/int4.py). Its manifest lists the feature "int4" and carries this record:

    {"version": 1, "method": "rtn", "bits": 4, "block_size": 128, "symmetric": true,
     "scale_dtype": "float32", "accuracy_level": 4,
     "calibration": null | {"source": "mixtrt/export/calibration.txt", "tokens": 4096},   # + "nearest"
     "blocks": {"lm.model.layers.0.attention.wq": 64, ...},    # tensors with another block (smaller, or INT8)
     "int8": ["embed_tokens", "lm_head"],                        # tensors stored as INT8 (blocks of up to 256)
     "float": {"lm.model.embed_tokens.weight": "embedding (--keep-float)", ...},   # kept float, why
     "graphs": {"onnxruntime": "model.onnx", "triton": "model.onnx"}}            # which graph serves which

`version` is the quantization format's own version: it changes when the meaning of a field or of the stored
bytes changes, and a runtime refuses a version it does not read (naming both), so an artifact is never
misread. `accuracy_level` is onnxruntime's MatMulNBits accuracy level the artifact was measured with
(4: int8 activations inside the int4 matmuls; 0: fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixtrt.runtime.errors import ArtifactError, NewerRecordError

QUANT_VERSION = 1
METHODS = ("rtn", "awq", "gptq")
BLOCK_SIZES = (32, 64, 128)
INT8_BLOCK = 256  # INT8 tensors' block: the largest power of two up to this dividing the input dimension
ACCURACY_LEVELS = (0, 4)
SCALE_DTYPES = ("float32", "float16")
FIELDS = ("version", "method", "bits", "block_size", "symmetric", "scale_dtype", "accuracy_level", "calibration",
          "blocks", "int8", "float", "graphs")


@dataclass(frozen=True)
class Quantization:
    method: str  # "rtn" (round to nearest) | "awq" (activation-aware scales) | "gptq" (Hessian-weighted rounding)
    block_size: int  # the block asked for; `blocks` lists the tensors that got a smaller one
    accuracy_level: int = 4
    bits: int = 4
    symmetric: bool = True
    scale_dtype: str = "float32"
    # {"source": str, "tokens": int} for calibrated methods; "nearest": [tensor, ...] when some experts met too few
    # calibration tokens and were rounded to nearest (gptq), or left without an activation-aware scale (awq)
    calibration: dict[str, Any] | None = None
    blocks: dict[str, int] = field(default_factory=dict)  # tensor -> its block size when not block_size
    int8: list[str] = field(default_factory=list)  # tensors stored as INT8 (symmetric, max|w| / 127; see INT8_BLOCK)
    kept_float: dict[str, str] = field(default_factory=dict)  # tensor kept in float -> the reason ("float")
    graphs: dict[str, str] = field(default_factory=lambda: {"onnxruntime": "model.onnx", "triton": "model.onnx"})
    version: int = QUANT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "method": self.method, "bits": self.bits, "block_size": self.block_size,
                "symmetric": self.symmetric, "scale_dtype": self.scale_dtype, "accuracy_level": self.accuracy_level,
                "calibration": self.calibration, "blocks": dict(self.blocks), "int8": list(self.int8),
                "float": dict(self.kept_float), "graphs": dict(self.graphs)}

    @classmethod
    def from_dict(cls, d: Any) -> Quantization:
        """Parse a manifest's record; any problem is one ArtifactError naming the field."""
        if not isinstance(d, dict):
            raise ArtifactError(f"quantization must be an object, got {d!r}")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ArtifactError(f"quantization.version must be an integer, got {version!r}")
        if version != QUANT_VERSION:
            hint = "upgrade mixtrt" if version > QUANT_VERSION else "export the checkpoint again"
            raise ArtifactError(f"quantization.version {version} is not the one this mixtrt reads "
                                f"({QUANT_VERSION}); {hint}")
        if set(d) != set(FIELDS):
            extra, missing = sorted(set(d) - set(FIELDS)), sorted(set(FIELDS) - set(d))
            if extra:
                raise NewerRecordError(f"quantization: unknown fields {extra} (written by a newer mixtrt, or edited)")
            raise ArtifactError(f"quantization: missing {missing}")
        checks = {
            "method": d["method"] in METHODS,
            "bits": d["bits"] == 4 and type(d["bits"]) is int,  # integers only: 4.0 == 4, True == 1
            "block_size": d["block_size"] in BLOCK_SIZES and type(d["block_size"]) is int,
            "symmetric": d["symmetric"] is True,
            "scale_dtype": d["scale_dtype"] in SCALE_DTYPES,
            "accuracy_level": d["accuracy_level"] in ACCURACY_LEVELS and type(d["accuracy_level"]) is int,
            "calibration": d["calibration"] is None or (
                isinstance(d["calibration"], dict) and {"source", "tokens"} <= set(d["calibration"])
                <= {"source", "tokens", "nearest"}
                and isinstance(d["calibration"]["source"], str) and _count(d["calibration"]["tokens"])
                and (isinstance(d["calibration"].get("nearest", []), list)
                     and all(isinstance(n, str) for n in d["calibration"].get("nearest", [])))),
            "blocks": isinstance(d["blocks"], dict) and all(
                isinstance(k, str) and _count(v) and v >= 2 and v % 2 == 0 for k, v in d["blocks"].items()),
            "int8": isinstance(d["int8"], list) and all(isinstance(k, str) for k in d["int8"]),
            "float": isinstance(d["float"], dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in d["float"].items()),
            "graphs": isinstance(d["graphs"], dict) and bool(d["graphs"]) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in d["graphs"].items()),
        }
        bad = [k for k, ok in checks.items() if not ok]
        newer = {"method": str, "scale_dtype": str, "block_size": int, "accuracy_level": int, "bits": int}
        if bad and bad[0] in newer and type(d[bad[0]]) is newer[bad[0]]:  # a value of the right kind, not known here
            raise NewerRecordError(f"quantization.{bad[0]} {d[bad[0]]!r} is not one this mixtrt knows (method in "
                                   f"{list(METHODS)}, block size in {list(BLOCK_SIZES)}, accuracy level in "
                                   f"{list(ACCURACY_LEVELS)}, scale dtype in {list(SCALE_DTYPES)}, 4 bits): written "
                                   "by a newer mixtrt, or edited")
        if bad:
            raise ArtifactError(f"quantization.{bad[0]} {d[bad[0]]!r} is not valid (INT4 symmetric, method in "
                                f"{list(METHODS)}, block size in {list(BLOCK_SIZES)}, accuracy level in "
                                f"{list(ACCURACY_LEVELS)})")
        return cls(method=d["method"], block_size=d["block_size"], accuracy_level=d["accuracy_level"],
                   bits=d["bits"], symmetric=True, scale_dtype=d["scale_dtype"],
                   calibration=dict(d["calibration"]) if d["calibration"] is not None else None,
                   blocks=dict(d["blocks"]), int8=list(d["int8"]), kept_float=dict(d["float"]),
                   graphs=dict(d["graphs"]), version=version)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
