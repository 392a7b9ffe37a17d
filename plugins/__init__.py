"""mixtrt.plugins: one folder per custom op (spec, reference, ONNX function body, emitter).

Every op lives in the ONNX domain ``mixtrt``; the op_type is the TensorRT plugin name.
"""

DOMAIN = "mixtrt"
