"""Write an artifact's weights tensor by tensor: the graph is traced on the meta device (no weights in
memory), then each initializer is read from the checkpoint, checked, cast, laid out and appended to
model.onnx.data, and the graph points at it. Peak memory is a few tensors, whatever the model's size.

    trace (meta) ─► prepare_graph ─► for each weight: read ─► finite? ─► cast ─► finite? ─► transpose? ─►
                    (parameters       (checkpoint,   (NaN/inf    (fp32 /   (fp16       (Linear: the graph's
                     out of the        one tensor)    refused)    fp16)     overflow)   MatMul wants [in, out])
                     optimizer's way,
                     Transpose(W)                  ─► transform hook ─► WeightsWriter: aligned, hashed,
                     folded into W.T)                 (name, array) ->   indexed (weights.json)
                                                      [(name, array)]

The transform hook is where a later step (INT4 quantization: export/quantize.py `Int4Plan`) plugs in: it gets
each weight as written (name, numpy array in the artifact's precision and stored layout) and returns the
tensors to write in its place (a `Stored` for bytes numpy has no dtype for: INT4); a hook that renames or adds
tensors rewires the graph itself (a renamed weight is not registered as an initializer). Inside a stack of
experts the first tensor a hook returns goes into the stack and the others after it. See docs/DESIGN.md, "Export".
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from mixtrt.runtime.errors import CheckpointError, ConfigError
from mixtrt.runtime.weights import DATA_FILE, WeightEntry, WeightIndex

ALIGNMENT = 1 << 16  # each tensor's start: memory-mappable at any page size (Windows' allocation granularity)
INLINE_BYTES = 1024  # graph constants (not weights) smaller than this stay inside model.onnx


@dataclass(frozen=True)
class Stored:
    """A tensor a transform hook returns whose bytes are not a numpy dtype of their own (INT4: `data` is the
    packed uint8 bytes; `dtype` "int4" and `shape` the logical shape), with how to read it (`quant`: see
    runtime/weights.py)."""

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    quant: dict[str, Any] | None = None


Transform = Callable[[str, np.ndarray], list[tuple[str, "np.ndarray | Stored"]]]


class WeightsWriter:
    """Appends tensors to one file: each starts at a multiple of `alignment` (zero padding before it), except
    inside `stack()`, where each follows the previous one; sha256 and size are computed as it writes (no
    second pass over the file)."""

    def __init__(self, directory: Path, file: str = DATA_FILE, alignment: int = ALIGNMENT) -> None:
        self.path = Path(directory) / file
        self.file, self.alignment = file, alignment
        self.sha = hashlib.sha256()
        self.size = 0
        self.tensors: dict[str, WeightEntry] = {}
        self.stacks: dict[str, WeightEntry] = {}
        self._f: BinaryIO = open(self.path, "xb")  # noqa: SIM115 - closed by close()
        self._stack: list[str] | None = None
        self._deferred: list[tuple[str, np.ndarray | Stored, str | None, str]] | None = None

    def _put(self, data: bytes | memoryview) -> None:
        hashing = threading.Thread(target=self.sha.update, args=(data,))  # both release the GIL: in parallel
        hashing.start()
        try:
            self._f.write(data)
        finally:
            hashing.join()
        self.size += len(data)

    def _align(self) -> None:
        pad = -self.size % self.alignment
        if pad:
            self._put(bytes(pad))

    def add(self, name: str, array: np.ndarray | Stored, of: str | None = None, layout: str = "same"
            ) -> WeightEntry:
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} written twice")
        if self._stack is None or not self._stack:
            self._align()
        if isinstance(array, Stored):
            a = np.ascontiguousarray(array.data)
            dtype, shape, quant = array.dtype, array.shape, array.quant
        else:
            a = np.ascontiguousarray(array)
            dtype, shape, quant = str(a.dtype), tuple(a.shape), None
        entry = WeightEntry(name, dtype, shape, self.file, self.size, a.nbytes, of, layout, quant=quant)
        self._put(a.reshape(-1).view(np.uint8).data)
        self.tensors[name] = entry
        if self._stack is not None:
            self._stack.append(name)
        return entry

    def defer(self, name: str, array: np.ndarray | Stored, of: str | None = None, layout: str = "same") -> None:
        """Inside `stack()`: add the tensor after the stack (a quantized expert's scales, so that the packed
        experts stay back to back and the scales form a stack of their own); outside: add it now."""
        if self._deferred is None:
            self.add(name, array, of, layout)
        else:
            self._deferred.append((name, array, of, layout))

    @contextmanager
    def stack(self, name: str) -> Iterator[None]:
        """Tensors added in the block go back to back and the index records their stacked [n, ...] view as `name`
        (they must share dtype, shape and quantization: _record_stack). Deferred ones (`defer`) follow, stacked
        as `name.<suffix>` (the suffix of their names after the first member's: "scales")."""
        self._stack, self._deferred = [], []
        try:
            yield
            members = [self.tensors[m] for m in self._stack]
            deferred = self._deferred
        finally:
            self._stack, self._deferred = None, None
        self._record_stack(name, members)
        if deferred:
            self._stack = []
            try:
                for args in deferred:
                    self.add(*args)
                later = [self.tensors[m] for m in self._stack]
            finally:
                self._stack = None
            suffix = later[0].name.rsplit(".", 1)[-1]
            self._record_stack(f"{name}.{suffix}", later)

    def _record_stack(self, name: str, members: list[WeightEntry]) -> None:
        """The stack of `members`, written back to back: they must be alike (one dtype, shape and quant form), or
        the index would hold unaligned tensors outside any stack (WeightIndex refuses those)."""
        forms = {(m.dtype, m.shape, repr(m.quant and {**m.quant, "scales": ""})) for m in members}
        if len(forms) > 1:
            raise ConfigError(f"{name}: its tensors differ in dtype, shape or quantization ({len(forms)} forms: a "
                              "transform hook changed some of them), so they cannot be stored as one stack")
        if members:
            first = members[0]
            quant = None
            if first.quant is not None:  # the stack's scales: the stack of its members' scales
                quant = {**first.quant, "scales": f"{name}.{first.quant['scales'].rsplit('.', 1)[-1]}"}
            self.stacks[name] = WeightEntry(name, first.dtype, (len(members), *first.shape), self.file,
                                            first.offset, sum(m.nbytes for m in members),
                                            members=tuple(m.name for m in members), quant=quant)

    def close(self) -> tuple[str, int]:
        """(sha256, size) of the file."""
        self._f.close()
        return self.sha.hexdigest(), self.size

    def index(self, directory: Path) -> WeightIndex:
        return WeightIndex(Path(directory), self.alignment, dict(self.tensors), dict(self.stacks))


@dataclass
class GraphWeight:
    """One initializer of the traced graph that comes from the checkpoint: `value` (an onnx_ir Value) is
    our parameter `of`, stored transposed when `transposed`."""

    value: Any
    of: str
    transposed: bool


def our_name(initializer: str, wrapper: str, base_model: bool) -> str:
    """"lm.model.layers.0.attention.wq.weight" (the traced wrapper's attribute first) -> our checkpoint name;
    a bare base model's parameters gain "model." as export/checkpoint.py names them."""
    name = initializer.removeprefix(f"{wrapper}.")
    return f"model.{name}" if base_model else name


def prepare_graph(ir_model: Any, parameters: dict[str, str], constants: dict[str, np.ndarray]) -> list[GraphWeight]:
    """Optimize a graph traced on the meta device and return the weights to write, in writing order.

    parameters: initializer name -> our parameter name, in the order to write them (the module's order:
    a MoE layer's fc1 experts, then its fc2 experts). constants: initializer name -> real value (the rope
    tables); every other initializer must be one of `parameters`.

    The parameters leave the graph's initializers while the optimizer runs (as graph inputs, which it
    never folds: their values are not there), then `Transpose(W, perm=[1, 0])` of a parameter becomes an
    initializer `W.T` written transposed (what the optimizer would have folded), and each parameter
    comes back as an initializer whose value the writer sets.
    """
    import onnx_ir as ir
    import onnxscript

    graph = ir_model.graph
    params = {}
    for name, value in list(graph.initializers.items()):
        if name in parameters:
            del graph.initializers[name]
            value.const_value = None
            graph.inputs.append(value)
            params[name] = value
        elif name in constants:
            value.const_value = ir.tensor(constants[name], name=name)
        else:
            raise AssertionError(f"initializer {name} is neither a parameter nor a known constant")
    onnxscript.optimizer.optimize_ir(ir_model)
    onnxscript.rewriter.onnx_fusions.fuse(ir_model)
    out: list[GraphWeight] = []
    taken: set[str] = set()
    for name, of in parameters.items():
        value = params.get(name)
        if value is None:
            continue
        transposed = None
        for use in list(value.uses()):
            node = use.node
            perm = node.attributes.get("perm")
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or perm is None \
                    or tuple(perm.as_ints()) != (1, 0):
                continue
            if transposed is None:
                transposed = ir.Value(name=f"{of}.T", shape=ir.Shape(list(value.shape)[::-1]), type=value.type)
            ir.convenience.replace_all_uses_with(node.outputs[0], transposed)
            graph.remove(node, safe=True)
        graph.inputs.remove(value)
        if value.uses():
            if of not in taken:  # named as our parameter (a tied one may come twice: keep torch's name)
                value.name = of
            out.append(GraphWeight(value, of, False))
        if transposed is not None:
            if transposed.name in taken:
                transposed.name = f"{name}.T"
            out.append(GraphWeight(transposed, of, True))
        taken.update(w.value.name for w in out[-2:])
    return out


_EXPERT = re.compile(r"^(.*\.fc[12])\.\d+$")


def write_weights(ir_model: Any, weights: list[GraphWeight], read: Callable[[str], torch.Tensor],
                  describe: Callable[[str], str], dtype: torch.dtype, directory: Path,
                  on_bytes: Callable[[int], None] | None = None, transform: Transform | None = None
                  ) -> tuple[WeightIndex, str, int]:
    """Write every weight (then every graph constant of INLINE_BYTES or more) to directory/model.onnx.data
    and point the graph's initializers at it; return the index, the file's sha256 and size.

    read(of) -> the stored tensor; describe(of) -> where it comes from (for errors). A weight holding NaN
    or inf, or one that overflows `dtype`, is refused with a CheckpointError naming it (the caller's
    atomic directory then leaves nothing behind). on_bytes(n): after each weight, its n bytes as the graph
    declares it (what a transform writes instead, INT4 or INT8, is smaller), so progress is through the model.
    """
    import onnx_ir as ir

    graph = ir_model.graph
    writer = WeightsWriter(directory)
    declared = on_bytes or (lambda _n: None)
    try:
        groups: list[tuple[str | None, list[GraphWeight]]] = []
        for w in weights:  # consecutive experts of one matrix form a stack
            m = _EXPERT.match(w.of) if not w.transposed else None
            key = m.group(1) if m else None
            if key is not None and groups and groups[-1][0] == key:
                groups[-1][1].append(w)
            else:
                groups.append((key, [w]))
        for key, members in groups:
            if key is None:
                _write_one(writer, graph, members[0], read, describe, dtype, transform)
                declared(weight_bytes(members[0]))
                continue
            with writer.stack(key):
                for w in members:
                    _write_one(writer, graph, w, read, describe, dtype, transform)
                    declared(weight_bytes(w))
        for name, value in list(graph.initializers.items()):  # constants the optimizer made (rope tables ...)
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) or tensor is None or tensor.nbytes < INLINE_BYTES:
                continue
            entry = writer.add(name, tensor.numpy())
            value.const_value = _external(entry, value, directory)
    finally:
        sha, size = writer.close()
    return writer.index(directory), sha, size


def weight_bytes(w: GraphWeight) -> int:
    """The bytes of `w` as the graph declares it (its shape and dtype before any transform)."""
    return int(math.prod(w.value.shape) * w.value.dtype.itemsize)


def _write_one(writer: WeightsWriter, graph: Any, w: GraphWeight, read: Callable[[str], torch.Tensor],
               describe: Callable[[str], str], dtype: torch.dtype, transform: Transform | None) -> None:
    t = read(w.of)
    cast = t.to(dtype)
    array = (cast.t() if w.transposed else cast).contiguous().numpy()
    del cast
    if not np.isfinite(array).all():  # numpy's check: several times torch's speed on CPU
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{describe(w.of)} holds NaN or infinite values; refusing to export it")
        raise CheckpointError(f"{describe(w.of)} has values beyond the {str(dtype).removeprefix('torch.')} "
                              "range (they would become inf); export in a wider precision")
    del t
    outs = transform(w.value.name, array) if transform else [(w.value.name, array)]
    del array
    for i, (name, a) in enumerate(outs):
        layout = "derived" if name != w.value.name else "transposed" if w.transposed else "same"
        if i == 0:
            entry = writer.add(name, a, w.of, layout)
        else:  # a derived tensor after the first (a quantized expert's scales): after its stack
            writer.defer(name, a, w.of, layout)
            continue
        if name == w.value.name:
            w.value.const_value = _external(entry, w.value, writer.path.parent)
            graph.register_initializer(w.value)


def _external(entry: WeightEntry, value: Any, directory: Path) -> Any:
    import onnx_ir as ir

    return ir.ExternalTensor(entry.file, entry.offset, entry.nbytes, value.dtype or ir.DataType.FLOAT,
                             shape=ir.Shape(list(entry.shape)), name=entry.name, base_dir=directory)
