"""INT4 weight-only quantization of an export (precision "int4"), tensor by tensor while the streaming writer writes
the weights (`Int4Plan`: the float weights are never all in memory, nor written).

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
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from mixtrt.export.weights_writer import Stored
from mixtrt.plugins import DOMAIN
from mixtrt.plugins.int4 import (
    dequantize,
    dequantize_linear_layout,
    int4_values,
    matmulnbits_layout,
    pack_int4,
    pack_int8,
    rtn_dequantize_linear,
    signed_scales,
)
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.prompts import text_file_problem
from mixtrt.runtime.quantization import ACCURACY_LEVELS, BLOCK_SIZES, INT8_BLOCK, METHODS, Quantization
from mixtrt.runtime.weights import QUANT_FORMS, WeightIndex

MIN_BLOCK = 16  # MatMulNBits / QMoE: a power of two >= 16
QDQ_OPSET = 21  # DequantizeLinear with INT4 and block_size
ROUTER_REASON = "router: routing stays fp32"
ROPE_TABLES = ("rope_cos", "rope_sin")  # the graph's RoPE initializers (their names' ends)


@dataclass(frozen=True)
class Int4Options:
    """How to quantize: `mixtrt export --precision int4 [--block-size] [--method] [--calibration] [--keep-float]`."""

    method: str = "rtn"
    block_size: int = 32
    accuracy_level: int = 4
    keep_float: tuple[str, ...] = ()  # tensor labels or fnmatch patterns ("lm_head", "embed_tokens", "layers.0.*")
    # dense linears / the embedding stored as INT8 instead (blocks of up to INT8_BLOCK, scale max|w| / 127); None:
    # the vocabulary tables, as llama.cpp keeps its output table at 6 bits, and in a MoE model also the attention
    # k/v projections, as llama.cpp keeps them at 8 bits for 8-expert models (README "INT4" for the measurements)
    int8: tuple[str, ...] | None = None
    calibration: Path | None = None  # a UTF-8 text for the calibrated method (default: the packaged text; "-" stdin)

    def __post_init__(self) -> None:
        # the patterns as the CLI takes them: a str is its comma list ("lm_head, embed_tokens"), any sequence a
        # tuple; each pattern without the spaces around it, empty ones dropped
        for name in ("keep_float", "int8"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(value.split(","))
            elif value is not None and not isinstance(value, tuple):
                try:
                    value = tuple(value)
                except TypeError:
                    raise ConfigError(f"{name} must be a comma-separated str or a sequence of tensor patterns, "
                                      f"got {value!r}") from None
            if value is not None and not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be tensor patterns (str), got {value!r}")
            if value is not None:
                value = tuple(p.strip() for p in value if p.strip())
            object.__setattr__(self, name, value)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is not one of {list(METHODS)}")
        # integers only: 32.0 == 32 and 4.0 == 4 pass `in`, then break the packing and onnxruntime's setting
        for name, allowed, said in (("block_size", BLOCK_SIZES, "--block-size"),
                                    ("accuracy_level", ACCURACY_LEVELS, "accuracy_level")):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value not in allowed:
                raise ConfigError(f"{said} {value!r} is not one of {list(allowed)}")
            object.__setattr__(self, name, int(value))
        if self.calibration is not None and self.method == "rtn":
            raise ConfigError("--calibration needs a calibrated --method (awq or gptq); rtn uses no data")
        stdin = self.calibration is not None and str(self.calibration) == "-"  # read at the calibration, once
        problem = text_file_problem(Path(self.calibration)) if self.calibration is not None and not stdin else None
        if problem:
            raise ConfigError(f"--calibration {self.calibration}: {problem}")


INT8_DEFAULT = ("lm_head", "embed_tokens")
INT8_DEFAULT_MOE = INT8_DEFAULT + ("wk", "wv")  # small with grouped-query attention: +0.3% bytes on Mixtral-shaped


def int8_patterns(options: Int4Options, moe: bool) -> tuple[str, ...]:
    """The tensors (labels / patterns) an export stores as INT8: the options' own, else the default for the model."""
    if options.int8 is not None:
        return options.int8
    return INT8_DEFAULT_MOE if moe else INT8_DEFAULT


def int8_block(k: int) -> int | None:
    """The block of an INT8 tensor with input dimension k."""
    return block_for(k, INT8_BLOCK)


def experts_float(labels: Sequence[str], hidden: int, inter: int, options: Int4Options) -> tuple[str, bool]:
    """Why a MoE model's experts (their labels; fc1's input dimension `hidden`, fc2's `inter`) stay float, "" where
    they are INT4, and whether it is for want of a block (no --block-size helps): experts are quantized all or
    none, so one kept by --keep-float or a dimension no block divides keeps them all. The int4 plan's rule, which
    AWQ's scale search follows too."""
    if any(kept(lbl, options.keep_float) for lbl in labels):
        return "--keep-float (experts are quantized all or none)", False
    b1, b2 = block_for(hidden, options.block_size), block_for(inter, options.block_size)
    if b1 is not None and b2 is not None:
        return "", False
    bad = " and ".join(f"{which} ({name} {k})" for which, name, k, b in
                       (("fc1 input", "hidden", hidden, b1), ("fc2 input", "intermediate", inter, b2)) if b is None)
    verb, it = ("have", "them") if b1 is None and b2 is None else ("has", "it")
    return (f"the experts' {bad} {verb} no power-of-two block >= {MIN_BLOCK} dividing {it}, and experts are "
            "quantized all or none"), True


def linear_form(label: str, k: int, options: Int4Options, int8: Sequence[str]) -> tuple[int, int] | None:
    """How an export writes a dense linear or the table `label` (input dimension k): (block, bits), or None where
    it stays float (--keep-float, or no block divides k). `int8`: int8_patterns' answer. The int4 plan's rule, which
    AWQ's scale search follows too."""
    if kept(label, options.keep_float):
        return None
    bits = 8 if kept(label, int8) else 4
    b = int8_block(k) if bits == 8 else block_for(k, options.block_size)
    return None if b is None else (b, bits)


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
    """Whether a tensor label matches a pattern: the label, its last parts, or an fnmatch pattern; an expert's
    label ("layers.0.feed_forward.fc1.3") also by its matrix without the expert's index ("fc1")."""
    names = (name, base) if (base := re.sub(r"\.\d+$", "", name)) != name else (name,)
    return any(n == p or n.endswith("." + p) or fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


Quantizer = Callable[[str, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def rtn_max7(name: str, w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest with scale = max|w| / 7 (15 levels; pack_int4's default): what `--method awq` rounds its
    scaled weights with (its scale search measures this rounding; on the built-in model awq with 16 levels gave
    107.05-107.36 held-out perplexity against 106.91 with these)."""
    return pack_int4(w.astype(np.float32), block)


def rtn(name: str, w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest on all 16 levels: scale = -(the block's largest-magnitude weight) / 8 (signed_scales, as
    llama.cpp's q4_0; held-out perplexity of the built-in model 107.50 against 107.68 with max|w| / 7)."""
    w = np.asarray(w, np.float32)
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


@dataclass(frozen=True)
class _Item:
    """What the writer stores in place of one float weight: a dense linear (MatMul's B, stored [K, N]), the
    embedding table ([V, H]) or an expert matrix ([N, K]), quantized with `bits` in blocks of `block`."""

    kind: str  # "linear" | "table" | "expert"
    label: str
    block: int
    bits: int

    @property
    def tensor(self) -> str:
        return f"{self.label}.int{self.bits}"

    @property
    def scales(self) -> str:
        return f"{self.label}.scales"


def _quant(fmt: str, item: _Item, axis: int) -> dict:
    """weights.json's `quant` of a tensor the plan writes in `fmt` (its dtype and zero point: QUANT_FORMS)."""
    return {"format": fmt, "bits": item.bits, "block_size": item.block, "axis": axis, "scales": item.scales,
            "zero_point": QUANT_FORMS[(fmt, item.bits)][1]}


def check_patterns(options: Int4Options, model) -> None:
    """Every --keep-float / --int8 pattern the user gave names at least one tensor it can apply to (a typo, or a
    checkpoint's own name for a tensor, would otherwise quietly change nothing), checked on the model's module
    (export/model.py, on the meta device) before anything slow runs: a calibrated method's pass over the model,
    the trace. The labels are the ones the plan gives the traced graph's tensors: each Linear but the MoE router
    (dense), the embedding table, each expert's fc1 / fc2 (experts)."""
    from torch import nn

    from mixtrt.export.model import MoeFeedForward

    dense, experts = [], []
    routers = {id(m.gate) for m in model.modules() if isinstance(m, MoeFeedForward)}
    for name, module in model.named_modules():
        lbl = label("", name)
        if isinstance(module, MoeFeedForward):
            experts += [f"{lbl}.{fc}.{e}" for fc in ("fc1", "fc2") for e in range(len(getattr(module, fc)))]
        elif isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in routers:
            dense.append(lbl)
    _check_labels(options, dense, experts)


def _check_labels(options: Int4Options, dense: list[str], experts: list[str]) -> None:
    for flag, patterns, labels in (("--keep-float", options.keep_float, dense + experts),
                                   ("--int8", options.int8 or (), dense)):
        for p in patterns:
            if not any(kept(lbl, [p]) for lbl in labels):
                names = sorted({re.sub(r"\.\d+$", ".<e>", re.sub(r"^layers\.\d+\.", "layers.<i>.", lbl))
                                for lbl in labels})
                raise ConfigError(f"{flag} {p!r} matches no tensor {flag} applies to in this model (a label's "
                                  f"last parts, a full label or an fnmatch pattern such as 'layers.0.*'; the "
                                  f"labels: {', '.join(names)})")


class Int4Plan:
    """The int4 step of an export, in two halves around the streaming writer (export/weights_writer.py), so that
    no more than one float weight is in memory at a time:

    - `Int4Plan.of_graph` (before writing): from the traced graph's structure (which node reads each weight,
      the weights' shapes) decide per weight what it becomes, its block, and the manifest's record.
    - `transform` (the writer's per-weight hook): quantize the weight the writer streams and return the packed
      tensor and its scales in its place (the float weight is never written).
    - `rewrite` (on the graph proto, its external data not loaded): DequantizeLinear before each quantized
      MatMul, GatherBlockQuantized for the table, the MoE nodes' int4 inputs and body; the new initializers
      point at the tensors the writer wrote (the weight index); the opset raised to 21.
    """

    def __init__(self, options: Int4Options, quantizer: Quantizer) -> None:
        self.options, self.quantizer = options, quantizer
        self.items: dict[str, _Item] = {}  # graph value name -> what it becomes
        self.blocks: dict[str, int] = {}
        self.floats: dict[str, str] = {}
        self.experts_unblocked = ""  # why the experts stay float where no block fits them ("": they do not)
        self.eight: list[str] = []
        self.moe: tuple[int, int, int, int, int] | None = None  # E, hidden, inter, block fc1, block fc2

    def _choose(self, lbl: str, k: int, int8: Sequence[str]) -> tuple[int, int] | None:
        """linear_form, with what the record says of it: why a tensor stays float, a block other than the options'
        (smaller, or INT8's), the INT8 tensors."""
        form = linear_form(lbl, k, self.options, int8)
        if form is None:
            self.floats[lbl] = "--keep-float" if kept(lbl, self.options.keep_float) else \
                f"input dimension {k} has no power-of-two block >= {MIN_BLOCK} dividing it"
            return None
        if form[0] != self.options.block_size:
            self.blocks[lbl] = form[0]
        if form[1] == 8:
            self.eight.append(lbl)
        return form

    @classmethod
    def of_graph(cls, ir_model, weights: Sequence, options: Int4Options, quantizer: Quantizer,
                 node_label: Callable[[object], str]) -> Int4Plan:
        """The plan for the traced graph `ir_model` (onnx_ir) whose weights the writer is about to write
        (`weights`: weights_writer.GraphWeight); node_label(node) -> its module path ("layers.0.attention.wq")."""
        plan = cls(options, quantizer)
        shapes = {w.value.name: tuple(w.value.shape) for w in weights
                  if w.value.dtype is not None and w.value.dtype.is_floating_point()}
        users = Counter(i.name for n in ir_model.graph for i in n.inputs if i is not None)
        int8 = int8_patterns(options, any(node.domain == DOMAIN and node.op_type == "MoE" for node in ir_model.graph))
        moe_nodes = []
        for node in ir_model.graph:
            ins = [i.name if i is not None else "" for i in node.inputs]
            if node.op_type == "MatMul" and len(ins) == 2 and len(shapes.get(ins[1], ())) == 2 \
                    and users[ins[1]] == 1:
                lbl = node_label(node)
                form = plan._choose(lbl, shapes[ins[1]][0], int8)  # stored [K, N]
                if form is not None:
                    plan.items[ins[1]] = _Item("linear", lbl, *form)
            elif node.op_type == "Gather" and ins and len(shapes.get(ins[0], ())) == 2 and users[ins[0]] == 1 \
                    and node_label(node).endswith("embed_tokens"):
                lbl = node_label(node)
                form = plan._choose(lbl, shapes[ins[0]][1], int8)
                if form is not None:
                    plan.items[ins[0]] = _Item("table", lbl, *form)
            elif node.op_type == "Gemm" and len(ins) > 1 and ins[1] in shapes and "gate" in node_label(node):
                plan.floats[node_label(node)] = ROUTER_REASON
            elif node.domain == DOMAIN and node.op_type == "MoE":
                moe_nodes.append(ins)
        if moe_nodes:
            plan._plan_experts(moe_nodes, shapes)
        plan._check_patterns(moe_nodes)
        return plan

    def _check_patterns(self, moe_nodes: list[list[str]]) -> None:
        """Every --keep-float / --int8 pattern names a tensor of the traced graph (check_patterns did so on the
        module before tracing; this holds the plan itself to it)."""
        experts = [label("", n) for m in moe_nodes for n in m[2:]]
        expert_set = set(experts)
        dense = [item.label for item in self.items.values() if item.kind != "expert"]
        dense += [lbl for lbl, why in self.floats.items() if why != ROUTER_REASON and lbl not in expert_set]
        _check_labels(self.options, dense, experts)

    def _plan_experts(self, moe_nodes: list[list[str]], shapes: dict[str, tuple]) -> None:
        options = self.options
        E = (len(moe_nodes[0]) - 2) // 2
        hidden = shapes[moe_nodes[0][2]][1]
        inter = shapes[moe_nodes[0][2 + E]][1]
        b1 = block_for(hidden, options.block_size)
        b2 = block_for(inter, options.block_size)
        reason, unblocked = experts_float([label("", n) for m in moe_nodes for n in m[2:]], hidden, inter, options)
        if unblocked:
            self.experts_unblocked = reason
        for m in moe_nodes:
            for i, n in enumerate(m[2:]):
                lbl = label("", n)
                if reason:
                    self.floats[lbl] = reason
                    continue
                b = b1 if i < E else b2
                assert b is not None
                self.items[n] = _Item("expert", lbl, b, 4)
                if b != options.block_size:
                    self.blocks[lbl] = b
        if not reason:
            assert b1 is not None and b2 is not None
            self.moe = (E, hidden, inter, b1, b2)

    def transform(self, name: str, array: np.ndarray) -> list[tuple[str, np.ndarray | Stored]]:
        """The writer's hook: weight `name` (float, stored layout) -> the tensors to write in its place."""
        item = self.items.get(name)
        if item is None:
            return [(name, array)]
        b, lbl = item.block, item.label
        if item.kind == "linear":
            w = array.T  # W [N, K] (nn.Linear [out, in]) from MatMul's B [K, N]
            K, N = array.shape
            if item.bits == 8:
                q8, s = pack_int8(w, b)
                return [(item.tensor, Stored(np.ascontiguousarray(q8.T), "int8", (K, N),
                                             _quant("dequantize_linear", item, 0))),
                        (item.scales, np.ascontiguousarray(s.T))]
            if self.quantizer is rtn:  # the same bytes without transposing W there and its INT4 values back
                raw, dims, st = rtn_dequantize_linear(array, b)
            else:
                q, s = self.quantizer(lbl, np.ascontiguousarray(w), b)
                raw, dims, st = dequantize_linear_layout(q, s)
            return [(item.tensor, Stored(np.frombuffer(raw, np.uint8), "int4", tuple(dims),
                                         _quant("dequantize_linear", item, 0))),
                    (item.scales, st.astype(np.float32))]
        if item.kind == "table":
            q, s = self._table(item, array)
            if item.bits == 8:  # uint8 = int8 + 128 (GatherBlockQuantized's default zero point for 8 bits)
                packed = q.view(np.uint8) ^ 0x80
            else:
                packed = matmulnbits_layout(q, b).reshape(q.shape)
            return [(item.tensor, Stored(packed, "uint8", packed.shape,
                                         _quant("gather_block_quantized", item, 1))),
                    (item.scales, s.astype(np.float32))]
        q, s = self.quantizer(lbl, array, b)  # an expert [N, K]
        packed = matmulnbits_layout(q, b)
        return [(item.tensor, Stored(packed, "uint8", packed.shape, _quant("matmulnbits", item, 1))),
                (item.scales, s.astype(np.float32))]

    def _table(self, item: _Item, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The embedding table [V, H] quantized as written: (INT8 values, scales) or (pack_int4's qweight, scales).
        No input activations to calibrate a Gather on: gptq rounds it to nearest, awq searches its block scales."""
        if item.bits == 8:
            return pack_int8(array, item.block)
        return (clipped if self.options.method == "awq" else rtn)(item.label, array, item.block)

    def table_roundtrip(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """table [V, H] -> the float table the artifact's lookups give (its quantized form dequantized), where
        the plan quantizes the embedding; None where it stays float."""
        item = next((i for i in self.items.values() if i.kind == "table"), None)
        if item is None:
            return None
        table = item

        def roundtrip(array: np.ndarray) -> np.ndarray:
            q, s = self._table(table, array)
            return dequantize(q if table.bits == 8 else int4_values(q), s)

        return roundtrip

    def rewrite(self, model: onnx.ModelProto, index: WeightIndex) -> None:
        """Rewrite the written graph `model` (proto, external data not loaded; nodes named) into its int4 form,
        the quantized tensors pointing at `index`'s entries."""
        graph = model.graph
        new_inits: list[TensorProto] = []
        new_nodes: list[onnx.NodeProto] = []

        def add(item: _Item) -> None:
            new_inits.extend(_external(index, n) for n in (item.tensor, item.scales))

        for node in graph.node:
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in self.items:
                item = self.items[node.input[1]]
                add(item)
                new_nodes.append(helper.make_node("DequantizeLinear", [item.tensor, item.scales],
                                                  [f"{item.label}.w"], name=f"{node.name}/DequantizeLinear",
                                                  axis=0, block_size=item.block))
                node.input[1] = f"{item.label}.w"
            elif node.op_type == "Gather" and node.input and node.input[0] in self.items:
                item = self.items[node.input[0]]
                add(item)
                gq = helper.make_node("GatherBlockQuantized", [item.tensor, node.input[1], item.scales],
                                      list(node.output), name=node.name, domain="com.microsoft",
                                      gather_axis=0, quantize_axis=1, block_size=item.block, bits=item.bits)
                node.CopyFrom(gq)
            elif node.domain == DOMAIN and node.op_type == "MoE" and self.moe is not None:
                names = list(node.input)
                inputs = names[:2]
                for n in names[2:]:
                    item = self.items[n]
                    add(item)
                    inputs += [item.tensor, item.scales]
                del node.input[:]
                node.input.extend(inputs)
        if self.moe is not None:
            from mixtrt.plugins.moe.int4_onnx import int4_function

            E, hidden, inter, b1, b2 = self.moe
            funcs = [f for f in model.functions if not (f.domain == DOMAIN and f.name == "MoE")]
            old = next(f for f in model.functions if f.domain == DOMAIN and f.name == "MoE")
            del model.functions[:]
            model.functions.extend(funcs + [int4_function(old, E, hidden=hidden, inter=inter, block_fc1=b1,
                                                          block_fc2=b2, accuracy_level=self.options.accuracy_level)])
        kept_nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + kept_nodes)  # the DequantizeLinear nodes read initializers only
        _topological(graph)
        graph.initializer.extend(new_inits)
        for opsets in [model.opset_import] + [f.opset_import for f in model.functions]:
            for o in opsets:
                if o.domain in ("", "ai.onnx"):
                    o.version = max(o.version, QDQ_OPSET)

    def record(self, calibration: dict | None, graph_name: str) -> Quantization:
        """The manifest's quantization record."""
        return Quantization(method=self.options.method, block_size=self.options.block_size,
                            accuracy_level=self.options.accuracy_level, blocks=dict(self.blocks),
                            kept_float=dict(self.floats), int8=sorted(self.eight), calibration=calibration,
                            graphs={"onnxruntime": graph_name, "triton": graph_name})

    def targets(self) -> dict[str, tuple[int, int]]:
        """The linears (dense and experts) the plan rounds: label -> (block, bits)."""
        return {i.label: (i.block, i.bits) for i in self.items.values() if i.kind != "table"}

    @property
    def int4_tensors(self) -> int:
        return sum(1 for i in self.items.values() if i.bits == 4)

    def summary(self) -> str:
        n4 = self.int4_tensors
        blocks = sorted({i.block for i in self.items.values() if i.bits == 4})  # the blocks the INT4 tensors use
        return (f"  int4: {n4} tensor{'s' * (n4 != 1)}, {len(self.floats)} kept float, blocks {blocks}"
                + (f", experts block {self.moe[3:]}" if self.moe else ""))


_ONNX_TYPES = {"int4": TensorProto.INT4, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
               "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def _external(index: WeightIndex, name: str) -> TensorProto:
    """An initializer whose data is the index's entry `name` in the data file (ONNX external data)."""
    e = index.tensors[name]
    t = TensorProto()
    t.name = name
    t.data_type = _ONNX_TYPES[e.dtype]
    t.dims.extend(e.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", e.file), ("offset", str(e.offset)), ("length", str(e.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


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
    """Op counts, parameters and their bytes (INT4 counted as half a byte), for the summary. A quantized
    weight's scales are bytes, not parameters, and the RoPE tables neither: the count is the checkpoint's, whatever
    the precision."""
    graph = model.graph
    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in graph.node)
    params = 0
    nbytes = 0
    for t in graph.initializer:
        n = int(np.prod(t.dims))
        if t.name.endswith(ROPE_TABLES):  # tables the graph computes from the config, not weights
            continue
        if t.name.endswith(".scales"):  # _Item.scales
            nbytes += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        elif t.data_type == TensorProto.INT4:
            params += n
            nbytes += (n + 1) // 2
        else:
            size = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            nbytes += n * size
            params += n * (2 if t.name.endswith(".int4") else 1)  # packed uint8: two weights a byte
    return {"ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))), "parameters": params,
            "parameter_bytes": nbytes}


def bytes_per_token(model: onnx.ModelProto, top_k: int | None, num_experts: int | None) -> int:
    """Weight bytes a decode step reads: every initializer once, except the tables read by row (the embedding,
    the RoPE cos / sin: one row each) and the experts (top_k of num_experts per layer)."""
    total = 0.0
    expert = {i for n in model.graph.node if n.domain == DOMAIN and n.op_type == "MoE" for i in n.input[2:]}
    table = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    table |= {n.input[2] for n in model.graph.node if n.op_type == "GatherBlockQuantized"}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims))
        size = 0.5 * n if t.data_type == TensorProto.INT4 else \
            n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        if t.name in table or t.name.endswith(ROPE_TABLES):
            size /= max(1, t.dims[0])
        elif t.name in expert and top_k and num_experts:
            size *= top_k / num_experts
        total += size
    return int(math.ceil(total))
