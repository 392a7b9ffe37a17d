"""mixtrt::SlidingWindowAttention — GQA + RoPE + sliding window over a fixed-capacity KV cache.

Spec: SPEC.md beside this file.
"""

OP_TYPE = "SlidingWindowAttention"
VERSION = 1
