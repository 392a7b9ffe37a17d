"""The int4 form of mixtrt::MoE on onnxruntime: the float body with each expert Gemm made a MatMulNBits.

Node inputs (E experts): ``hidden, router_logits, fc1_0 packed, fc1_0 scales, ..., fc1_{E-1} scales,
fc2_0 packed, fc2_0 scales, ...``; packed = plugins/int4.py `matmulnbits_layout` (uint8 [N, K/block, block/2],
unsigned nibbles with zero point 8), scales fp32 [N, K/block]. Rows and routing are the float op's
(SPEC.md): fc1_e rows [gate; up], fc2_e [H, I].
"""

from __future__ import annotations

import onnx
from onnx import helper

from mixtrt.plugins.onnx_common import MS_DOMAIN


def int4_input_names(num_experts: int) -> list[str]:
    names = ["hidden", "router_logits"]
    for fc in ("fc1", "fc2"):
        for e in range(num_experts):
            names += [f"{fc}_{e}_int4", f"{fc}_{e}_scales"]
    return names


def int4_function(body: onnx.FunctionProto, num_experts: int, *, hidden: int, inter: int, block_fc1: int,
                  block_fc2: int, accuracy_level: int) -> onnx.FunctionProto:
    """The float body `body` (inputs hidden, router_logits, fc1_0.., fc2_0..; expert matmuls
    Gemm(x, fc{1,2}_e, transB=1)) with every expert Gemm replaced by MatMulNBits on the packed weights."""
    E = num_experts
    shapes = {"fc1": (hidden, 2 * inter, block_fc1), "fc2": (inter, hidden, block_fc2)}  # K, N, block
    weights = {f"{fc}_{e}" for fc in ("fc1", "fc2") for e in range(E)}
    out = onnx.FunctionProto()
    out.CopyFrom(body)
    nodes = []
    replaced = 0
    for n in body.node:
        if n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in weights:
            trans = {a.name: a.i for a in n.attribute}
            if trans.get("transB") != 1 or trans.get("transA", 0) != 0 or len(n.input) > 2:
                raise ValueError(f"MoE body node {n.name or n.output[0]}: expected Gemm(x, {n.input[1]}, transB=1)")
            w = n.input[1]
            K, N, block = shapes[w[:3]]
            nodes.append(helper.make_node("MatMulNBits", [n.input[0], f"{w}_int4", f"{w}_scales"], list(n.output),
                                          name=n.name, domain=MS_DOMAIN, K=K, N=N, bits=4, block_size=block,
                                          accuracy_level=accuracy_level))
            replaced += 1
        else:
            nodes.append(n)
    if replaced != 2 * E:
        raise ValueError(f"MoE body: replaced {replaced} expert Gemms, expected {2 * E}")
    del out.node[:]
    out.node.extend(nodes)
    del out.input[:]
    out.input.extend(int4_input_names(E))
    out.doc_string = f"{body.doc_string} [int4: MatMulNBits per expert, blocks {block_fc1}/{block_fc2}]"
    return out
