"""INT4 weight-only quantization of an exported graph (precision "int4"): a pass over model.onnx after the fp32
graph is written, tensor by tensor.

What becomes INT4 (symmetric, one fp32 scale per block of the input dimension; packing: plugins/int4.py):

    dense linear (q/k/v/o, Mistral's w1/w2/w3, lm_head)   MatMul(x, W^T)  ->  MatMul(x, DequantizeLinear(Wq^T, s^T))
        INT4 initializer [K, N], axis 0, block_size (opset 21): the form TensorRT parses; onnxruntime fuses the
        pair into MatMulNBits at session creation (accuracy level from the session option
        `session.qdq_matmulnbits_accuracy_level`, which the backend sets from the manifest)
    embedding table                                        Gather(E, ids)  ->  com.microsoft.GatherBlockQuantized
        (a DequantizeLinear + Gather would dequantize the whole table every step on onnxruntime: 94 ms per
        step for 32000 x 768, against 6 us for either Gather)
    experts of mixtrt::MoE                                 per expert fc1_e [2I, H], fc2_e [H, I]  ->  packed
        uint8 + scales per expert, the op's int4 form (plugins/moe/SPEC.md), body: MatMulNBits per expert
    router (the MoE gate)                                  stays float: routing is fp32

A block size that does not divide a tensor's input dimension is replaced, for that tensor, by the largest
power of two >= 16 below it that does (hidden 192 with block 128 -> 64), recorded in the manifest's
quantization.blocks; a dimension no such block divides keeps the tensor float, recorded with the reason.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixtrt.plugins import DOMAIN
from mixtrt.plugins.int4 import dequantize_linear_layout, matmulnbits_layout, pack_int4, pack_int8, signed_scales
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.quantization import ACCURACY_LEVELS, BLOCK_SIZES, METHODS, Quantization

MIN_BLOCK = 16  # MatMulNBits / QMoE: a power of two >= 16
QDQ_OPSET = 21  # DequantizeLinear with INT4 and block_size
ROUTER_REASON = "router: routing stays fp32"


@dataclass(frozen=True)
class Int4Options:
    """How to quantize: `mixtrt export --precision int4 [--block-size] [--method] [--calibration] [--keep-float]`."""

    method: str = "rtn"
    block_size: int = 32
    accuracy_level: int = 4
    keep_float: tuple[str, ...] = ()  # tensor labels or fnmatch patterns ("lm_head", "embed_tokens", "layers.0.*")
    # dense linears / the embedding stored as INT8 instead (blocks of block_size, scale max|w| / 127): the vocabulary
    # tables by default, as llama.cpp keeps its output table at 6 bits (README "INT4" for the measurements)
    int8: tuple[str, ...] = ("lm_head", "embed_tokens")
    calibration: Path | None = None  # a UTF-8 text for the calibrated method (default: the packaged text)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is not one of {list(METHODS)}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"--block-size {self.block_size!r} is not one of {list(BLOCK_SIZES)}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"accuracy_level {self.accuracy_level!r} is not one of {list(ACCURACY_LEVELS)}")
        if self.calibration is not None and self.method == "rtn":
            raise ConfigError("--calibration needs a calibrated --method (awq); rtn uses no data")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise ConfigError(f"--calibration {self.calibration}: no such file")


def block_for(k: int, block: int) -> int | None:
    """The block size used for an input dimension k: `block` if it divides k, else the largest power of two
    in [16, block) that does; None when none does (the tensor stays float)."""
    b = block
    while b >= MIN_BLOCK:
        if k % b == 0:
            return b
        b //= 2
    return None


def label(node_name: str, tensor: str = "") -> str:
    """A tensor's user-facing name: "/model/layers.0/attention/wq/MatMul_0" -> "layers.0.attention.wq",
    "model.layers.0.feed_forward.fc1.3" (an initializer's name; an "lm." prefix allowed) ->
    "layers.0.feed_forward.fc1.3"."""
    if tensor:
        parts = tensor.removeprefix("lm.").split(".")
        return ".".join(parts[1:] if parts and parts[0] == "model" else parts)
    parts = [p for p in node_name.split("/") if p][:-1]
    return ".".join(parts[1:] if parts and parts[0] == "model" else parts)


def kept(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


Quantizer = Callable[[str, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def rtn_max7(name: str, w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest with scale = max|w| / 7 (15 levels; pack_int4's default): what `--method awq` rounds its
    scaled weights with (its scale search measures this rounding; on the built-in model awq with 16 levels gave
    107.05-107.36 held-out perplexity against 106.91 with these)."""
    return pack_int4(w.astype(np.float32), block)


def rtn(name: str, w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest on all 16 levels: scale = -(the block's largest-magnitude weight) / 8 (signed_scales, as
    llama.cpp's q4_0; held-out perplexity of the built-in model 107.50 against 107.68 with max|w| / 7)."""
    w = w.astype(np.float32)
    return pack_int4(w, block, signed_scales(w, block))


CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(11))  # 1.0 .. 0.75 (down to 0.5 chose the same)


def clipped(name: str, w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest with each block's scale searched: scale = r * max|w| / 7 for r in CLIP_RATIOS, the r of
    least squared error of the block's round trip (AWQ's clipping step)."""
    w = w.astype(np.float32)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    base = np.abs(blocks).max(axis=-1) / 7
    best = np.full(base.shape, np.inf, np.float32)
    scales = base
    for r in CLIP_RATIOS:
        s = (base * r)[..., None]
        q = np.clip(np.rint(np.divide(blocks, s, out=np.zeros_like(blocks), where=s != 0)), -8, 7)
        err = ((q * s - blocks) ** 2).sum(axis=-1)
        better = err < best
        best = np.where(better, err, best)
        scales = np.where(better, s[..., 0], scales)
    return pack_int4(w, block, scales.astype(np.float32))


def quantize_graph(path: Path, options: Int4Options, quantizer: Quantizer = rtn,
                   say: Callable[[str], None] = lambda _m: None) -> tuple[Quantization, dict]:
    """Rewrite the fp32 graph at `path` (an exported causal LM, function bodies attached) into its int4 form in
    place; return the manifest's record and the graph facts for the summary (ops, parameters, bytes, bytes per
    decoded token). `quantizer(label, W [N, K], block)` -> (qweight, scales) quantizes one matrix."""
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = Counter(i for n in graph.node for i in n.input)
    patterns = options.keep_float
    blocks: dict[str, int] = {}
    floats: dict[str, str] = {}
    new_inits: list[TensorProto] = []
    drop: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    producers = {o: n for n in graph.node for o in n.output}
    moe_nodes = [n for n in graph.node if n.domain == DOMAIN and n.op_type == "MoE"]

    def matrix(name: str) -> np.ndarray | None:
        t = inits.get(name)
        if t is None or t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(t.dims) != 2:
            return None
        return numpy_helper.to_array(t)

    def choose(lbl: str, k: int) -> int | None:
        if kept(lbl, patterns):
            floats[lbl] = "--keep-float"
            return None
        b = block_for(k, options.block_size)
        if b is None:
            floats[lbl] = f"input dimension {k} has no power-of-two block >= {MIN_BLOCK} dividing it"
        elif b != options.block_size:
            blocks[lbl] = b
        return b

    eight: list[str] = []  # tensors stored as INT8 (options.int8)
    transposed: set[str] = set()  # Transpose outputs of a weight that a MatMul reads (the tied lm_head)
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits and users[node.output[0]] == 1 \
                and [list(a.ints) for a in node.attribute if a.name == "perm"] in ([[1, 0]], []):
            transposed.add(node.output[0])

    for node in graph.node:
        if node.op_type == "MatMul" and (node.input[1] in inits or node.input[1] in transposed):
            src = node.input[1]
            tproduced = src in transposed
            wname = producers[src].input[0] if tproduced else src
            w = matrix(wname)
            lbl = label(node.name)
            if w is not None:
                w = w if tproduced else w.T  # W [N, K] (nn.Linear [out, in])
                b = choose(lbl, w.shape[1])
                if b is not None and kept(lbl, options.int8):
                    q8, s = pack_int8(w, b)
                    base = f"{lbl}.int8"
                    eight.append(lbl)
                    new_inits += [numpy_helper.from_array(np.ascontiguousarray(q8.T), base),  # [K, N]
                                  numpy_helper.from_array(np.ascontiguousarray(s.T), f"{lbl}.scales")]
                elif b is not None:
                    q, s = quantizer(lbl, w, b)
                    raw, dims, st = dequantize_linear_layout(q, s)
                    base = f"{lbl}.int4"
                    new_inits += [helper.make_tensor(base, TensorProto.INT4, list(dims), raw, raw=True),
                                  numpy_helper.from_array(st.astype(np.float32), f"{lbl}.scales")]
                if b is not None:
                    new_nodes.append(helper.make_node("DequantizeLinear", [base, f"{lbl}.scales"], [f"{lbl}.w"],
                                                      name=f"{node.name}/DequantizeLinear", axis=0, block_size=b))
                    node.input[1] = f"{lbl}.w"
                    if tproduced:
                        drop.add(producers[src].name)
        elif node.op_type == "Gather" and node.input[0] in inits and label(node.name).endswith("embed_tokens"):
            w = matrix(node.input[0])
            lbl = label(node.name)
            if w is not None:
                b = choose(lbl, w.shape[1])
                if b is not None:
                    bits = 8 if kept(lbl, options.int8) else 4
                    if bits == 8:  # uint8 = int8 + 128 (GatherBlockQuantized's default zero point for 8 bits)
                        q8, s = pack_int8(w, b)
                        packed = q8.view(np.uint8) ^ 0x80
                        eight.append(lbl)
                    else:
                        q, s = (clipped if options.method == "awq" else quantizer)(lbl, w, b)
                        packed = matmulnbits_layout(q, b).reshape(q.shape)
                    table = f"{lbl}.int{bits}"
                    new_inits += [numpy_helper.from_array(packed, table),
                                  numpy_helper.from_array(s.astype(np.float32), f"{lbl}.scales")]
                    gq = helper.make_node("GatherBlockQuantized", [table, node.input[1], f"{lbl}.scales"],
                                          list(node.output), name=node.name, domain="com.microsoft",
                                          gather_axis=0, quantize_axis=1, block_size=b, bits=bits)
                    node.CopyFrom(gq)
        elif node.op_type == "Gemm" and any(i in inits for i in node.input[1:2]) and "gate" in node.name:
            floats[label(node.name)] = ROUTER_REASON
    expert_blocks = _quantize_experts(moe_nodes, inits, options, quantizer, floats, blocks, new_inits, model)

    kept_nodes = [n for n in graph.node if n.name not in drop]
    del graph.node[:]
    graph.node.extend(new_nodes + kept_nodes)  # the DequantizeLinear nodes read initializers only
    _topological(graph)
    used = {i for n in graph.node for i in n.input} | {i for f in model.functions for n in f.node for i in n.input}
    keep_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + new_inits)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, QDQ_OPSET)
    for f in model.functions:
        for o in f.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, QDQ_OPSET)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    say(f"  int4: {sum(1 for t in new_inits if t.name.endswith('.int4'))} tensors, "
        f"{len(floats)} kept float, blocks {sorted(set(blocks.values()) | {options.block_size})}"
        + (f", experts block {expert_blocks}" if expert_blocks else ""))
    record = Quantization(method=options.method, block_size=options.block_size,
                          accuracy_level=options.accuracy_level, blocks=blocks, kept_float=floats,
                          int8=sorted(eight),
                          graphs={"onnxruntime": path.name, "triton": path.name})
    return record, graph_facts(model)


def _quantize_experts(moe_nodes, inits, options: Int4Options, quantizer: Quantizer, floats: dict[str, str],
                      blocks: dict[str, int], new_inits: list, model) -> tuple[int, int] | None:
    """The experts of every mixtrt::MoE node -> the op's int4 form: inputs hidden, router_logits, then per
    expert e fc1_e packed, fc1_e scales ... , then fc2 likewise; the body's Gemms become MatMulNBits."""
    from mixtrt.plugins.moe.int4_onnx import int4_function

    if not moe_nodes:
        return None
    E = (len(moe_nodes[0].input) - 2) // 2
    fc1 = [numpy_helper.to_array(inits[n]) for n in moe_nodes[0].input[2:2 + E]]
    fc2 = [numpy_helper.to_array(inits[n]) for n in moe_nodes[0].input[2 + E:]]
    hidden = fc1[0].shape[1]
    inter = fc2[0].shape[1]
    b1 = block_for(hidden, options.block_size)
    b2 = block_for(inter, options.block_size)
    if any(kept(label("", n), options.keep_float) for m in moe_nodes for n in m.input[2:]):
        reason = "--keep-float (experts are quantized all or none)"
    elif b1 is None or b2 is None:
        reason = f"an expert input dimension ({hidden} or {inter}) has no power-of-two block >= {MIN_BLOCK} dividing it"
    else:
        reason = ""
    if reason:
        for m in moe_nodes:
            for n in m.input[2:]:
                floats[label("", n)] = reason
        return None
    assert b1 is not None and b2 is not None
    for m in moe_nodes:
        names = list(m.input)
        new_inputs = names[:2]
        for fc, b in (("fc1", b1), ("fc2", b2)):
            part = names[2:2 + E] if fc == "fc1" else names[2 + E:]
            for n in part:
                lbl = label("", n)
                w = numpy_helper.to_array(inits[n])
                q, s = quantizer(lbl, w, b)
                new_inits += [numpy_helper.from_array(matmulnbits_layout(q, b), f"{lbl}.int4"),
                              numpy_helper.from_array(s.astype(np.float32), f"{lbl}.scales")]
                new_inputs += [f"{lbl}.int4", f"{lbl}.scales"]
                if b != options.block_size:
                    blocks[lbl] = b
        del m.input[:]
        m.input.extend(new_inputs)
    funcs = [f for f in model.functions if not (f.domain == DOMAIN and f.name == "MoE")]
    old = next(f for f in model.functions if f.domain == DOMAIN and f.name == "MoE")
    del model.functions[:]
    model.functions.extend(funcs + [int4_function(old, E, hidden=hidden, inter=inter, block_fc1=b1, block_fc2=b2,
                                                  accuracy_level=options.accuracy_level)])
    return b1, b2


def _topological(graph: onnx.GraphProto) -> None:
    """Order the nodes so each comes after the producers of its inputs (stable otherwise)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # inputs from initializers added later: keep the order
            ordered += rest
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def graph_facts(model: onnx.ModelProto) -> dict:
    """Op counts, parameters and their bytes (INT4 counted as half a byte), for the summary."""
    graph = model.graph
    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in graph.node)
    params = 0
    nbytes = 0
    for t in graph.initializer:
        n = int(np.prod(t.dims))
        if t.data_type == TensorProto.INT4:
            params += n
            nbytes += (n + 1) // 2
        else:
            size = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            nbytes += n * size
            params += n * (2 if t.name.endswith(".int4") else 1)  # packed uint8: two weights a byte
    return {"ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))), "parameters": params,
            "parameter_bytes": nbytes}


def bytes_per_token(model: onnx.ModelProto, top_k: int | None, num_experts: int | None) -> int:
    """Weight bytes a decode step reads: every initializer once, except the embedding table (one row) and the
    experts (top_k of num_experts per layer)."""
    total = 0.0
    expert = {i for n in model.graph.node if n.domain == DOMAIN and n.op_type == "MoE" for i in n.input[2:]}
    table = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    table |= {n.input[2] for n in model.graph.node if n.op_type == "GatherBlockQuantized"}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims))
        size = 0.5 * n if t.data_type == TensorProto.INT4 else \
            n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        if t.name in table:
            size /= max(1, t.dims[0])
        elif t.name in expert and top_k and num_experts:
            size *= top_k / num_experts
        total += size
    return int(math.ceil(total))


def quantize_artifact(directory: Path, top_k: int | None, num_experts: int | None, options: Int4Options,
                      say: Callable[[str], None], calibration: dict | None = None
                      ) -> tuple[Quantization, dict, dict[str, int]]:
    """The int4 step of an export, on the artifact's temporary directory holding the fp32 model.onnx and its
    model.onnx.data: quantize, rewrite both in place (the data file rewritten whole); return the record, the
    summary facts and the opsets."""
    from mixtrt.runtime.manifest import MODEL_FILE
    from mixtrt.runtime.weights import DATA_FILE

    options.check()
    path = directory / MODEL_FILE
    # awq has moved activation scales into the float weights already (export/awq.py)
    quantizer: Quantizer = rtn if options.method == "rtn" else rtn_max7
    say(f"quantizing to int4 ({options.method}, block {options.block_size})")
    record, facts = quantize_graph(path, options, quantizer, say)
    if calibration is not None:
        record = Quantization(**{**record.__dict__, "calibration": calibration})
    model = onnx.load(str(path))
    facts["bytes_per_token"] = bytes_per_token(model, top_k, num_experts)
    (directory / DATA_FILE).unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=DATA_FILE, size_threshold=1024)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return record, facts, opsets
