"""mixtrt::MoE — top-k mixture of SwiGLU experts taking router logits. Spec: SPEC.md beside this file."""

OP_TYPE = "MoE"
VERSION = 2
