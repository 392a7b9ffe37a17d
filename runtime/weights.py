"""weights.json: where every weight of an artifact lives in model.onnx.data, read without the graph.

A backend that does not run the ONNX graph (a Triton or TensorRT one) maps the weights by name from the
index alone (numpy, no torch, no onnx):

    index = WeightIndex.read("engines/tiny")                   # checks the index against the data file
    wq = index.weight("model.layers.0.attention.wq.weight")    # np.memmap view, our layout [N*D, H]
    fc1 = index.stack("model.layers.0.feed_forward.fc1")       # [E, 2I, H], one contiguous region

The file, written by the exporter (export/weights_writer.py) beside the graph and listed in the manifest
(`weight_index`, feature "weight-index"):

    {"format": "mixtrt-weights", "version": 1, "alignment": 65536,
     "tensors": [{"name": "model.layers.0.attention.wq.weight.T", "of": "model.layers.0.attention.wq.weight",
                  "layout": "transposed", "dtype": "float32", "shape": [64, 64], "file": "model.onnx.data",
                  "offset": 65536, "nbytes": 16384}, ...],
     "stacks": [{"name": "model.layers.0.feed_forward.fc1", "tensors": ["...fc1.0", ..., "...fc1.3"],
                 "dtype": "float32", "shape": [4, 192, 64], "file": "model.onnx.data", "offset": ..., "nbytes": ...}]}

- `name` is the graph initializer's name. `of` is our parameter name (export/model.py) and `layout` how the
  stored tensor relates to it: "same", "transposed" (a Linear weight stored [in, out] as the graph's
  MatMul reads it), or "derived" (another tensor the export's transform hook made from it: scales of a
  quantized weight). Graph constants that are not parameters (rope tables) have `of` null.
- An int4 artifact's index is version 2: its quantized tensors carry `quant` = {"format": "dequantize_linear" |
  "matmulnbits" | "gather_block_quantized", "bits", "block_size", "axis", "scales": <the scales tensor's name>,
  "zero_point"} (dtype "int4" for DequantizeLinear's packed INT4, two elements a byte); each MoE layer's packed
  experts and their scales are stacks ("...fc1" and "...fc1.scales"). Layouts: docs/DESIGN.md, "weights.json
  of an int4 artifact"; `quantized(param)` reads one.
- Each tensor starts at a multiple of `alignment`, except inside a stack: a MoE layer's experts are written
  back to back in expert order (fc1_0 .. fc1_{E-1}, then fc2_0 ..), the stack starting aligned, so the
  stacked [E, ...] view is one region (its members are aligned too when their size is a multiple of the
  alignment, as in every real model). Padding bytes are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime.args import read_json
from mixtrt.runtime.errors import ArtifactError

WEIGHTS_FILE = "weights.json"
DATA_FILE = "model.onnx.data"
FORMAT = "mixtrt-weights"
VERSION = 1  # an index without quantized tensors
QUANT_VERSION = 2  # one with them (int4 artifacts): entries may carry "quant"
LAYOUTS = frozenset({"same", "transposed", "derived"})
DTYPES = frozenset({"float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "int4"})
# how a quantized tensor's bytes are laid out (docs/DESIGN.md "weights.json of an int4 artifact"):
QUANT_FORMATS = frozenset({"dequantize_linear", "matmulnbits", "gather_block_quantized"})
QUANT_KEYS = frozenset({"format", "bits", "block_size", "axis", "scales", "zero_point"})
# (format, bits) -> the stored dtype and zero point of a quantized tensor, as the exporter writes it
# (export/quantize.py) and the index's reader checks it (docs/DESIGN.md "weights.json of an int4 artifact")
QUANT_FORMS = {("dequantize_linear", 4): ("int4", 0), ("dequantize_linear", 8): ("int8", 0),
               ("gather_block_quantized", 4): ("uint8", 8), ("gather_block_quantized", 8): ("uint8", 128),
               ("matmulnbits", 4): ("uint8", 8), ("matmulnbits", 8): ("uint8", 128)}


@dataclass(frozen=True)
class WeightEntry:
    """One tensor of the data file (a graph initializer), or a stack of them (`members`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    of: str | None = None  # our parameter name; None for a graph constant
    layout: str = "same"
    members: tuple[str, ...] = ()  # a stack's tensors, in order
    quant: dict[str, Any] | None = None  # a quantized tensor: how to read it (QUANT_KEYS)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.members:
            d["tensors"] = list(self.members)
        else:
            d.update({"of": self.of, "layout": self.layout})
        d.update({"dtype": self.dtype, "shape": list(self.shape), "file": self.file, "offset": self.offset,
                  "nbytes": self.nbytes})
        if self.quant is not None:
            d["quant"] = dict(self.quant)
        return d


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor: int4 packs two elements a byte (the last one alone when the count is odd)."""
    n = math.prod(shape)
    return (n + 1) // 2 if dtype == "int4" else n * _itemsize(dtype)


def _quant(q: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(q, dict) or set(q) != QUANT_KEYS:
        raise ArtifactError(f"{where}: tensor {name!r} has quant {q!r}, not an object with the fields "
                            f"{sorted(QUANT_KEYS)}")
    if q["format"] not in QUANT_FORMATS or q["bits"] not in (4, 8) or not isinstance(q["scales"], str):
        raise ArtifactError(f"{where}: tensor {name!r} has quant {q!r} (format one of {sorted(QUANT_FORMATS)}, "
                            "bits 4 or 8, scales a tensor name)")
    for key in ("block_size", "axis", "zero_point"):
        v = q[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ArtifactError(f"{where}: tensor {name!r} has quant {key} {v!r}, not a non-negative integer")
    return q


def _check_quantized(e: WeightEntry, scales: WeightEntry, where: str) -> None:
    """A quantized entry's quant against its own dtype and shape and its scales' (docs/DESIGN.md "weights.json of an
    int4 artifact"): a block a power of two from 16 to 256, the stored dtype and zero point of its format and bits,
    and one fp32 scale per block (scales that are another tensor's have another shape)."""
    q = e.quant
    assert q is not None
    fmt, bits, b, shape = q["format"], q["bits"], q["block_size"], e.shape
    dtype, zero = QUANT_FORMS[(fmt, bits)]
    expected: tuple[int, ...] | None = None
    if not 16 <= b <= 256 or b & (b - 1):
        problem = f"block_size {b} (a power of two from 16 to 256)"
    elif (e.dtype, q["zero_point"]) != (dtype, zero):
        problem = f"dtype {e.dtype} and zero_point {q['zero_point']} ({fmt} at {bits} bits: {dtype}, {zero})"
    elif fmt == "dequantize_linear":  # [K, N], blocks along K
        ok = len(shape) == 2 and q["axis"] == 0 and shape[0] % b == 0
        expected = (shape[0] // b, shape[1]) if ok else None
        problem = f"shape {list(shape)} and axis {q['axis']} ([K, N] with K a multiple of the block, axis 0)"
    elif fmt == "gather_block_quantized":  # [V, H] (INT4: [V, H/2], two a byte), blocks along H
        width = shape[1] * (2 if bits == 4 else 1) if len(shape) == 2 else 0
        ok = len(shape) == 2 and q["axis"] == 1 and width % b == 0
        expected = (shape[0], width // b) if ok else None
        problem = f"shape {list(shape)} and axis {q['axis']} ([V, H] with H a multiple of the block, axis 1)"
    else:  # matmulnbits: [..., N, K/b, b*bits/8]
        ok = len(shape) >= 3 and shape[-1] == b * bits // 8
        expected = shape[:-1] if ok else None
        problem = f"shape {list(shape)} ([..., N, K/block, block x bits / 8])"
    if expected is not None:
        if scales.dtype == "float32" and scales.shape == expected:
            return
        problem = (f"scales {scales.name!r} {scales.dtype} {list(scales.shape)} (one float32 per block: "
                   f"{list(expected)})")
    raise ArtifactError(f"{where}: tensor {e.name!r} ({fmt}, {bits} bits) has {problem}")


def _entry(d: Any, where: str, stack: bool, quant_allowed: bool = False) -> WeightEntry:
    keys = {"name", "dtype", "shape", "file", "offset", "nbytes"} | ({"tensors"} if stack else {"of", "layout"})
    if isinstance(d, dict) and "quant" in d and quant_allowed:
        keys |= {"quant"}
    if not isinstance(d, dict) or set(d) != keys:
        raise ArtifactError(f"{where}: an entry must have exactly the fields {sorted(keys)}, got {d!r}")
    name, dtype, shape, file = d["name"], d["dtype"], d["shape"], d["file"]
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{where}: name must be a non-empty string, got {name!r}")
    if dtype not in DTYPES:
        raise ArtifactError(f"{where}: tensor {name!r} has dtype {dtype!r}, not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise ArtifactError(f"{where}: tensor {name!r} needs a shape of non-negative integers, got {shape!r}")
    if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
        raise ArtifactError(f"{where}: tensor {name!r} names the file {file!r}, not a plain file name")
    for key in ("offset", "nbytes"):
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ArtifactError(f"{where}: tensor {name!r} has {key} {v!r}, not a non-negative integer")
    if d["nbytes"] != _nbytes(dtype, shape):
        raise ArtifactError(f"{where}: tensor {name!r} has nbytes {d['nbytes']}, but {dtype} {shape} is "
                            f"{_nbytes(dtype, shape)} bytes")
    quant = _quant(d["quant"], name, where) if "quant" in d else None
    if stack:
        members = d["tensors"]
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ArtifactError(f"{where}: stack {name!r} needs a non-empty list of tensor names")
        return WeightEntry(name, dtype, tuple(shape), file, d["offset"], d["nbytes"], members=tuple(members),
                           quant=quant)
    of, layout = d["of"], d["layout"]
    if of is not None and (not isinstance(of, str) or not of):
        raise ArtifactError(f"{where}: tensor {name!r} has of {of!r}, not a parameter name or null")
    if layout not in LAYOUTS or (layout == "transposed" and len(shape) != 2):
        raise ArtifactError(f"{where}: tensor {name!r} has layout {layout!r} (one of {sorted(LAYOUTS)}; "
                            "transposed for a matrix only)")
    return WeightEntry(name, dtype, tuple(shape), file, d["offset"], d["nbytes"], of, layout, quant=quant)


@dataclass(frozen=True)
class WeightIndex:
    directory: Path
    alignment: int
    tensors: dict[str, WeightEntry]  # by initializer name, in file order
    stacks: dict[str, WeightEntry]

    def to_dict(self) -> dict[str, Any]:
        quantized = any(e.quant for e in (*self.tensors.values(), *self.stacks.values()))
        return {"format": FORMAT, "version": QUANT_VERSION if quantized else VERSION, "alignment": self.alignment,
                "tensors": [t.to_dict() for t in self.tensors.values()],
                "stacks": [s.to_dict() for s in self.stacks.values()]}

    @classmethod
    def from_dict(cls, d: Any, directory: Path, source: str) -> WeightIndex:
        """Parse and check an index: every field of its type, every region inside its file, no two tensors
        overlapping, each stack exactly its members back to back, every tensor outside a stack and every stack at a
        multiple of the alignment, each quantized entry consistent with its format and scales (_check_quantized).
        Problems: one ArtifactError naming `source`."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ArtifactError(f"{source}: not a mixtrt weight index (format={got!r})")
        if d.get("version") not in (VERSION, QUANT_VERSION):
            raise ArtifactError(f"{source}: weight index version {d.get('version')!r} is not {VERSION} or "
                                f"{QUANT_VERSION}; export the checkpoint again")
        quant = d.get("version") == QUANT_VERSION
        if set(d) != {"format", "version", "alignment", "tensors", "stacks"}:
            raise ArtifactError(f"{source}: fields {sorted(d)} are not those of a weight index")
        alignment = d["alignment"]
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            raise ArtifactError(f"{source}: alignment must be a positive integer, got {alignment!r}")
        for key in ("tensors", "stacks"):
            if not isinstance(d[key], list):
                raise ArtifactError(f"{source}: {key} must be a list")
        tensors: dict[str, WeightEntry] = {}
        for t in d["tensors"]:
            e = _entry(t, source, stack=False, quant_allowed=quant)
            if e.name in tensors:
                raise ArtifactError(f"{source}: tensor {e.name!r} is listed twice")
            tensors[e.name] = e
        sizes: dict[str, int] = {}
        for e in tensors.values():
            if e.file not in sizes:
                f = directory / e.file
                if not f.is_file():
                    raise ArtifactError(f"{source}: tensor {e.name!r} lies in {e.file}, which is missing")
                sizes[e.file] = f.stat().st_size
            if e.offset + e.nbytes > sizes[e.file]:
                raise ArtifactError(f"{source}: tensor {e.name!r} ends at byte {e.offset + e.nbytes}, past the end "
                                    f"of {e.file} ({sizes[e.file]} bytes)")
        by_file = sorted(tensors.values(), key=lambda e: (e.file, e.offset))
        for a, b in zip(by_file, by_file[1:], strict=False):
            if a.file == b.file and a.offset + a.nbytes > b.offset and a.nbytes and b.nbytes:
                raise ArtifactError(f"{source}: tensors {a.name!r} and {b.name!r} overlap in {a.file}")
        stacks: dict[str, WeightEntry] = {}
        for s in d["stacks"]:
            e = _entry(s, source, stack=True, quant_allowed=quant)
            members = [tensors.get(m) for m in e.members]
            if any(m is None for m in members):
                raise ArtifactError(f"{source}: stack {e.name!r} lists a tensor the index does not have")
            pos = e.offset
            for m in members:
                assert m is not None
                if (m.file, m.offset, m.dtype, (len(members), *m.shape)) != (e.file, pos, e.dtype, e.shape):
                    raise ArtifactError(f"{source}: stack {e.name!r} is not its tensors back to back "
                                        f"({m.name!r} does not follow at byte {pos})")
                pos += m.nbytes
            stacks[e.name] = e
        in_stack = {m for s in stacks.values() for m in s.members}
        for e in (*tensors.values(), *stacks.values()):
            if e.name not in in_stack and e.nbytes and e.offset % alignment:
                raise ArtifactError(f"{source}: tensor {e.name!r} starts at byte {e.offset}, not a multiple of the "
                                    f"index's alignment ({alignment})")
            if e.quant is None:
                if e.dtype == "int4":
                    raise ArtifactError(f"{source}: tensor {e.name!r} is int4 but has no quant field saying how "
                                        "to read it")
                continue
            scales = tensors.get(e.quant["scales"]) or stacks.get(e.quant["scales"])
            if scales is None:
                raise ArtifactError(f"{source}: tensor {e.name!r} names the scales {e.quant['scales']!r}, "
                                    "which the index does not have")
            _check_quantized(e, scales, source)
        return cls(directory, alignment, tensors, stacks)

    @classmethod
    def read(cls, directory: str | Path) -> WeightIndex:
        """Read directory/weights.json (the files' hashes are the manifest's to check: Manifest.load)."""
        directory = Path(directory)
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise ArtifactError(f"{directory}: no {WEIGHTS_FILE} (exported by an earlier mixtrt: export again)")
        return cls.from_dict(read_json(path, ArtifactError), directory, str(path))

    def save(self, directory: Path) -> Path:
        import json

        path = Path(directory) / WEIGHTS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def _map(self, e: WeightEntry) -> np.ndarray:
        """The stored bytes as an array of e.shape; int4: the packed bytes, uint8 [nbytes] (quant says how)."""
        dtype = np.dtype("uint16") if e.dtype == "bfloat16" else np.dtype("uint8") if e.dtype == "int4" \
            else np.dtype(e.dtype)  # bfloat16: raw bits
        shape = (e.nbytes,) if e.dtype == "int4" else e.shape
        if e.nbytes == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.directory / e.file, dtype=dtype, mode="r", offset=e.offset, shape=shape)

    def array(self, name: str) -> np.ndarray:
        """The stored tensor `name` (a graph initializer), memory-mapped read-only."""
        if name not in self.tensors:
            raise KeyError(f"{name!r} is not a tensor of {self.directory / WEIGHTS_FILE}")
        return self._map(self.tensors[name])

    def weight(self, name: str) -> np.ndarray:
        """Our parameter `name` in its own layout (export/model.py): a view of the stored tensor (the
        transpose of one stored transposed). A parameter stored twice (tied embeddings) gives its "same" copy."""
        found = sorted((e for e in self.tensors.values() if e.of == name and e.layout != "derived"),
                       key=lambda e: e.layout != "same")
        if not found:
            if any(e.of == name and e.quant is not None for e in self.tensors.values()):
                raise KeyError(f"{name!r} is stored quantized in {self.directory / WEIGHTS_FILE}: read it with "
                               "quantized()")
            tied = "model.embed_tokens.weight"
            if name == "lm_head.weight" and any(e.of == tied and e.layout == "transposed"
                                                for e in self.tensors.values()):
                raise KeyError(f"'lm_head.weight' is tied to {tied!r} in {self.directory / WEIGHTS_FILE}: read "
                               f"weight({tied!r})")
            raise KeyError(f"{name!r} is not a parameter of {self.directory / WEIGHTS_FILE}")
        a = self._map(found[0])
        return a.T if found[0].layout == "transposed" else a

    def quantized(self, name: str, form: str | None = None) -> tuple[WeightEntry, np.ndarray, np.ndarray]:
        """Our parameter `name` as quantized in an int4 artifact: (its entry, whose `quant` says the format,
        the stored bytes, the scales), both memory-mapped; KeyError when it is not stored quantized. A parameter
        stored quantized twice (a tied embedding: the lookup table and the lm_head) needs `form`, the entry's
        `quant["format"]` ("gather_block_quantized" for the lookup, "dequantize_linear" for the lm_head)."""
        found = [e for e in self.tensors.values() if e.of == name and e.quant is not None
                 and (form is None or e.quant["format"] == form)]
        if not found:
            tied = "model.embed_tokens.weight"
            if name == "lm_head.weight" and len([e for e in self.tensors.values() if e.of == tied and e.quant]) > 1:
                raise KeyError(f"'lm_head.weight' is tied to {tied!r} in {self.directory / WEIGHTS_FILE}: read "
                               f"quantized({tied!r}, form='dequantize_linear')")
            raise KeyError(f"{name!r} is not a quantized tensor of {self.directory / WEIGHTS_FILE}"
                           + (f" in the form {form!r}" if form else ""))
        if len(found) > 1:
            forms = ", ".join(f"{e.name} ({e.quant['format'] if e.quant else ''})" for e in found)
            raise KeyError(f"{name!r} is stored quantized {len(found)} times in {self.directory / WEIGHTS_FILE} "
                           f"({forms}): give form=")
        e = found[0]
        assert e.quant is not None
        return e, self._map(e), self.array(e.quant["scales"])

    def stack(self, name: str) -> np.ndarray:
        """A stack ("model.layers.0.feed_forward.fc1"): [E, ...], one memory-mapped region."""
        if name not in self.stacks:
            raise KeyError(f"{name!r} is not a stack of {self.directory / WEIGHTS_FILE}")
        return self._map(self.stacks[name])
