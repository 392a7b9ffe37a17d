"""manifest.json: the one file the runtime reads to learn what an artifact directory holds.

    engines/tiny/
      manifest.json      format version, features, ModelArgs, precision, cache plan, backends, graph IO,
                         chat format (tokenizer, template, generation defaults), graph summary, opsets,
                         versions, source, sha256 + size of every other file
      model.onnx         the graph; its initializers point into model.onnx.data
      model.onnx.data    every weight, each start aligned (runtime/weights.py)
      weights.json       where each weight lives in model.onnx.data (`weight_index`, runtime/weights.py)
      tokenizer.model    the checkpoint's tokenizer file (or tokenizer.model.v3, tekken.json, ...: `chat`)

Nothing is inferred from file names. An artifact directory is written under a temporary name and renamed
when complete (`atomic_dir`), and it holds exactly the files its manifest lists.

Versions. `format_version` changes when the meaning of an existing field changes; a runtime reads its
own format version only, and refuses an older one ("export again") or a newer one ("upgrade mixtrt").
A capability that adds fields without changing the old ones (int4 weights, a chat template, another
head, a TensorRT engine) adds its name to `features` instead: a runtime refuses an artifact that lists a
feature it does not know, naming it, so an older runtime never runs an artifact it would misread, and
an artifact without new features stays readable by older runtimes of the same format version. Unknown
top-level fields are refused the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixtrt.runtime.args import MAX_JSON_BYTES, ModelArgs, read_json
from mixtrt.runtime.cache import CachePlan
from mixtrt.runtime.chat_format import ChatFormat
from mixtrt.runtime.errors import ArtifactError, MixtrtError, MixtrtWarning, NewerRecordError, Terminated
from mixtrt.runtime.precision import PRECISIONS
from mixtrt.runtime.quantization import QUANT_VERSION, Quantization
from mixtrt.runtime.weights import WEIGHTS_FILE

FORMAT = "mixtrt-artifact"
FORMAT_VERSION = 2
# "heads": the model is not a causal LM (base model, sequence / token classification, question answering):
# its graph has no KV cache and other outputs (Manifest.graph_io).
HEADS_FEATURE = "heads"
# "tensorrt_engine": `mixtrt build` added a TensorRT plan (ENGINE_FILE) and its build config (ENGINE_CONFIG: the
# profile shapes, optimisation level, TensorRT and Polygraphy versions) and the backend "tensorrt".
TENSORRT_FEATURE = "tensorrt_engine"
ENGINE_FILE = "engine.plan"
ENGINE_CONFIG = "engine.json"
# "weight-index": the artifact holds a weight index (`weight_index`, runtime/weights.py): every weight's
# name, dtype, shape and place in model.onnx.data, for backends that do not run the graph.
WEIGHT_INDEX_FEATURE = "weight-index"
# "int4": INT4 weights (precision "int4"), described by the `quantization` record (runtime/quantization.py).
INT4_FEATURE = "int4"
FEATURES: frozenset[str] = frozenset({HEADS_FEATURE, TENSORRT_FEATURE, WEIGHT_INDEX_FEATURE, INT4_FEATURE})  # known
# Fields a manifest may leave out (older exports of the same format version): their default applies.
OPTIONAL_FIELDS = frozenset({"weight_index"})
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
DTYPES = frozenset({"int64", "int32", "float32", "float16"})  # of graph inputs and outputs
# The graph's metadata_props key holding the manifest fields a runtime checks against the graph itself.
GRAPH_METADATA = "mixtrt.manifest"
EDITED = ("the manifest was edited or the artifact is damaged (or another export replaced it while it was read: "
          "retry): export again")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "int32", "float32", "float16"
    shape: tuple[int | str, ...]  # ints are fixed, strings are named dynamic dims

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any) -> TensorSpec:
        if not isinstance(d, dict) or set(d) != {"name", "dtype", "shape"}:
            raise ArtifactError(f"a graph input/output must be {{name, dtype, shape}}, got {d!r}")
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or dtype not in DTYPES or not isinstance(shape, list) or not all(
                isinstance(n, str) or (isinstance(n, int) and not isinstance(n, bool) and n >= 1) for n in shape):
            raise ArtifactError(f"graph input/output {d!r} needs a string name, a dtype in {sorted(DTYPES)} and a "
                                "shape of positive integers and dimension names")
        return cls(name, dtype, tuple(shape))


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}  # onnx TensorProto types -> numpy names


def graph_specs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, str]]:
    """An onnx ModelProto's inputs and outputs as the manifest writes graph IO (a dynamic dimension becomes its
    name, or "?"), and its metadata_props: what Manifest.check_graph takes."""
    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return TensorSpec(v.name, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), dims)

    return ([spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output],
            {p.key: p.value for p in model.metadata_props})


@dataclass(frozen=True)
class Manifest:
    args: ModelArgs
    precision: str  # "fp32" | "fp16"
    max_context: int  # positions the artifact serves (rope table / linear cache length)
    cache: CachePlan
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opsets: dict[str, int]
    files: dict[str, dict[str, Any]]  # name -> {"sha256": ..., "bytes": ...}, every file but manifest.json
    chat: ChatFormat  # the tokenizer, chat format and generation defaults (runtime/chat_format.py)
    backends: tuple[str, ...] = ("onnxruntime",)  # backends that can run this artifact
    summary: dict[str, Any] = field(default_factory=dict)  # graph facts for `mixtrt inspect`: ops, parameters
    versions: dict[str, str | None] = field(default_factory=dict)
    quantization: Quantization | None = None  # precision "int4" only (feature "int4")
    source: str | None = None
    features: tuple[str, ...] = ()
    weight_index: str | None = None  # the weight index file (weights.json) with the "weight-index" feature
    format_version: int = FORMAT_VERSION

    # ---- IO names shared by exporter and backends ----------------------------------------------
    @staticmethod
    def past_names(layer: int) -> tuple[str, str]:
        return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"

    @staticmethod
    def present_names(layer: int) -> tuple[str, str]:
        return f"present.{layer}.key", f"present.{layer}.value"

    @staticmethod
    def graph_io(args: ModelArgs, capacity: int, precision: str
                 ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The graph inputs and outputs this mixtrt exports and runs for the model's head (the exporter writes
        them, backends check an artifact's against them).

        causal_lm: input_ids, total_lengths, logit_positions and the KV cache -> logits and the cache (below).
        The other heads score whole texts, so their graphs have no cache: input_ids [batch, sequence] (rows
        right-padded, any id: attention is causal, so a real token never sees the padding) ->
            base                     last_hidden_state [batch, sequence, hidden]
            sequence_classification  logits [batch, labels]  (at each row's last token != pad_token_id, as
                                     transformers; the last token when the model has no pad id)
            token_classification     logits [batch, sequence, labels]
            question_answering       start_logits, end_logits [batch, sequence]
        """
        dt = PRECISIONS[precision]
        if args.head != "causal_lm":
            ids = (TensorSpec("input_ids", "int64", ("batch", "sequence")),)
            B, T = "batch", "sequence"
            heads = {
                "base": (TensorSpec("last_hidden_state", dt, (B, T, args.hidden_size)),),
                "sequence_classification": (TensorSpec("logits", dt, (B, args.num_labels)),),
                "token_classification": (TensorSpec("logits", dt, (B, T, args.num_labels)),),
                "question_answering": (TensorSpec("start_logits", dt, (B, T)), TensorSpec("end_logits", dt, (B, T))),
            }
            return ids, heads[args.head]
        kv = ("batch", args.num_key_value_heads, capacity, args.head_dim)
        inputs = [TensorSpec("input_ids", "int64", ("batch", "sequence")),
                  TensorSpec("total_lengths", "int32", ("batch",)),
                  TensorSpec("logit_positions", "int64", ("batch", "positions"))]
        outputs = [TensorSpec("logits", dt, ("batch", "positions", args.vocab_size))]
        for i in range(args.num_hidden_layers):
            inputs += [TensorSpec(n, dt, kv) for n in Manifest.past_names(i)]
            outputs += [TensorSpec(n, dt, kv) for n in Manifest.present_names(i)]
        return tuple(inputs), tuple(outputs)

    def check_graph_io(self, directory: str | Path) -> None:
        """Refuse an artifact whose graph IO is not what its model, cache and precision say (tampered)."""
        inputs, outputs = Manifest.graph_io(self.args, self.cache.capacity, self.precision)
        if (self.inputs, self.outputs) == (inputs, outputs):
            return
        ours, theirs = {t.name for t in inputs + outputs}, {t.name for t in self.inputs + self.outputs}
        diff = ", ".join([f"missing {sorted(ours - theirs)}"] * bool(ours - theirs)
                         + [f"unknown {sorted(theirs - ours)}"] * bool(theirs - ours))
        if not diff:
            same = sorted(inputs + outputs, key=lambda t: t.name) == sorted(self.inputs + self.outputs,
                                                                             key=lambda t: t.name)
            diff = "in another order" if same else "other shapes or dtypes"
        raise ArtifactError(f"{directory}/{MANIFEST}: the graph IO it lists does not match its model, cache and "
                            f"precision ({diff}); {EDITED}")

    @staticmethod
    def graph_metadata(args: ModelArgs, precision: str, max_context: int, cache: CachePlan) -> dict[str, str]:
        """What the exporter writes into the graph's metadata_props: the manifest fields that decide how the
        graph must be run (model, precision, max context, cache plan). The runtime compares them with the
        manifest when it opens the graph (`check_graph`), so an edited manifest cannot make it misread one."""
        facts = {"model": args.to_dict(), "precision": precision, "max_context": max_context,
                 "cache": cache.to_dict()}
        return {GRAPH_METADATA: json.dumps(facts, sort_keys=True)}

    def check_graph(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                    metadata: dict[str, str]) -> None:
        """Refuse a graph whose IO (names, dtypes, fixed dimensions) or metadata disagree with this manifest.

        A dimension the manifest names ("batch") must be dynamic in the graph; a number must be the same number
        (the cache buffers' capacity, heads and head dim, the vocabulary).
        """
        for kind, got, want in (("inputs", inputs, self.inputs), ("outputs", outputs, self.outputs)):
            if [t.name for t in got] != [t.name for t in want]:
                raise ArtifactError(f"{path}: graph {kind} {[t.name for t in got]} do not match the manifest's "
                                    f"{[t.name for t in want]}; {EDITED}")
            for g, w in zip(got, want, strict=True):
                same = g.dtype == w.dtype and len(g.shape) == len(w.shape) and all(
                    isinstance(gd, str) if isinstance(wd, str) else gd == wd
                    for gd, wd in zip(g.shape, w.shape, strict=True))
                if not same:
                    raise ArtifactError(f"{path}: graph {kind[:-1]} {g.name} is {g.dtype} {list(g.shape)} but the "
                                        f"manifest says {w.dtype} {list(w.shape)}; {EDITED}")
        facts = metadata.get(GRAPH_METADATA)
        if facts is None:
            raise ArtifactError(f"{path}: the graph carries no mixtrt metadata (exported by an earlier mixtrt): "
                                "export the checkpoint again")
        expected = json.loads(Manifest.graph_metadata(self.args, self.precision, self.max_context,
                                                     self.cache)[GRAPH_METADATA])
        try:
            recorded = json.loads(facts)
        except (ValueError, RecursionError):
            recorded = None
        if not isinstance(recorded, dict) or recorded != expected:
            fields = sorted(k for k in expected if not isinstance(recorded, dict) or recorded.get(k) != expected[k])
            raise ArtifactError(f"{path.parent}/{MANIFEST}: {', '.join(fields) or 'its fields'} "
                                f"{'disagrees' if len(fields) == 1 else 'disagree'} with the graph's own record; "
                                f"{EDITED}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "features": list(self.features),
            "model": self.args.to_dict(),
            "precision": self.precision,
            "quantization": self.quantization.to_dict() if self.quantization is not None else None,
            "max_context": self.max_context,
            "cache": self.cache.to_dict(),
            "backends": list(self.backends),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "opsets": self.opsets,
            "summary": self.summary,
            "versions": self.versions,
            "source": self.source,
            "chat": self.chat.to_dict(),
            "files": self.files,
            "weight_index": self.weight_index,
        }

    @classmethod
    def from_dict(cls, d: Any, *, source: str = MANIFEST) -> Manifest:
        """Parse and check a manifest dict: every field of its type, every file name plain, the fields that
        depend on each other consistent. Any problem is one ArtifactError naming `source` and the field."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ArtifactError(f"{source}: not a mixtrt manifest (format={got!r})")
        version = d.get("format_version")
        if "format_version" in d and (not isinstance(version, int) or isinstance(version, bool)):
            raise ArtifactError(f"{source}: format_version must be an integer, got {version!r} "
                                f"({type(version).__name__}): the manifest was edited")
        if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                raise ArtifactError(f"{source}: format_version {version} was written by a newer mixtrt (this one "
                                    f"reads {FORMAT_VERSION}); upgrade mixtrt")
            older = isinstance(version, int) and not isinstance(version, bool) and 1 <= version
            what = "has no format_version" if "format_version" not in d else f"format_version {version!r} " + (
                "was written by an older mixtrt" if older else "is not one this mixtrt knows")
            raise ArtifactError(f"{source}: {what}"
                                + f" (this one reads {FORMAT_VERSION}); export the checkpoint again")
        unknown = sorted(set(d) - set(cls._empty_fields()))
        if unknown:
            raise ArtifactError(f"{source}: unknown manifest fields {unknown} (written by a newer mixtrt, or edited)")
        if "chat" not in d:
            raise ArtifactError(f"{source}: no chat record (written by a mixtrt before the tokenizer and chat format "
                                "were recorded); export the checkpoint again")
        features = d.get("features")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ArtifactError(f"{source}: features must be a list of strings, got {features!r}; {EDITED}")
        new = sorted(set(features) - FEATURES)
        if new:
            raise ArtifactError(f"{source}: the artifact needs features {new} that this mixtrt does not know; "
                                "upgrade mixtrt")
        missing = sorted(set(cls._empty_fields()) - set(d) - OPTIONAL_FIELDS)
        if missing:
            raise ArtifactError(f"{source}: missing field {missing[0]!r}; {EDITED}")
        quant = d["quantization"]
        if isinstance(quant, dict) and isinstance(quant.get("version"), int) and quant["version"] != QUANT_VERSION:
            raise ArtifactError(f"{source}: quantization version {quant['version']} is not the one this mixtrt reads "
                                f"({QUANT_VERSION}); " + ("upgrade mixtrt" if quant["version"] > QUANT_VERSION
                                                          else "export the checkpoint again"))
        try:
            return cls._parse(d, features, version)
        except NewerRecordError as e:
            raise ArtifactError(f"{source}: {e}; upgrade mixtrt (or export the checkpoint again with this one)"
                                ) from None
        except MixtrtError as e:
            raise ArtifactError(f"{source}: {e}; {EDITED}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a shape no check above foresaw
            raise ArtifactError(f"{source}: malformed manifest ({type(e).__name__}: {e}); {EDITED}") from None

    @classmethod
    def _parse(cls, d: dict[str, Any], features: list[str], version: int) -> Manifest:
        args = ModelArgs.from_dict(d["model"])
        precision = d["precision"]
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ArtifactError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
        if not isinstance(d["cache"], dict):
            raise ArtifactError(f"cache must be an object, got {d['cache']!r}")
        try:
            cache = CachePlan.from_dict(d["cache"], args.num_hidden_layers)
        except KeyError as e:
            raise ArtifactError(f"cache: missing field {e}") from None
        if cache.dtype != PRECISIONS[precision]:
            raise ArtifactError(f"cache.dtype {cache.dtype} does not match precision {precision}")
        max_context = _positive(d["max_context"], "max_context")
        if max_context > args.max_position_embeddings:
            raise ArtifactError(f"max_context {max_context} is past the model's max_position_embeddings "
                                f"{args.max_position_embeddings}")
        if (cache.windowed and cache.capacity > max_context) or (not cache.windowed and cache.capacity != max_context):
            raise ArtifactError(f"cache.capacity {cache.capacity} does not fit max_context {max_context} and layout "
                                f"{cache.layout}")
        files = d["files"]
        if not isinstance(files, dict):
            raise ArtifactError(f"files must map each file name to {{sha256, bytes}}, got {files!r}")
        for name, info in files.items():
            if not isinstance(name, str) or Path(name).name != name or name in (".", "..", MANIFEST):
                raise ArtifactError(f"files: {name!r} is not a plain file name")
            if not isinstance(info, dict) or set(info) != {"sha256", "bytes"} or not _is_sha256(info["sha256"]) \
                    or not isinstance(info["bytes"], int) or isinstance(info["bytes"], bool) or info["bytes"] < 0:
                raise ArtifactError(f"files must map each file name to {{sha256, bytes}}: {name!r} has {info!r}")
        chat = ChatFormat.from_dict(d["chat"])
        absent = [n for n in (MODEL_FILE, chat.tokenizer_file, *chat.files) if n not in files]
        if absent:
            raise ArtifactError(f"files does not list {', '.join(dict.fromkeys(absent))}")
        tensors = []
        for key in ("inputs", "outputs"):
            if not isinstance(d[key], list):
                raise ArtifactError(f"{key} must be a list, got {d[key]!r}")
            tensors.append(tuple(TensorSpec.from_dict(t) for t in d[key]))
        backends = d["backends"]
        if not isinstance(backends, list) or not backends or not all(isinstance(b, str) for b in backends):
            raise ArtifactError(f"backends must be a non-empty list of names, got {backends!r}")
        opsets = d["opsets"]
        if not isinstance(opsets, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                   for v in opsets.values()):
            raise ArtifactError(f"opsets must map each domain to its version, got {opsets!r}")
        for key in ("summary", "versions"):
            if not isinstance(d[key], dict):
                raise ArtifactError(f"{key} must be an object, got {d[key]!r}")
        if not all(isinstance(k, str) and k.isprintable() and (v is None or isinstance(v, str) and v.isprintable())
                   for k, v in d["versions"].items()):
            raise ArtifactError(f"versions must map each library to a version string or null, got {d['versions']!r}")
        _check_summary(d["summary"])
        int4 = precision == "int4"
        if int4 != (INT4_FEATURE in features):
            raise ArtifactError(f"precision {precision} " + ("needs" if int4 else "cannot list")
                                + f" the feature {INT4_FEATURE!r}")
        if int4 != (d["quantization"] is not None):
            raise ArtifactError("quantization must be " + ("a record" if int4 else "null")
                                + f" for precision {precision}, got {d['quantization']!r}")
        quantization = Quantization.from_dict(d["quantization"]) if int4 else None
        if d["source"] is not None and not (isinstance(d["source"], str) and d["source"].isprintable()):
            raise ArtifactError(f"source must be a path (printable) or null, got {d['source']!r}")
        engine = ENGINE_FILE in files and ENGINE_CONFIG in files and "tensorrt" in backends
        if (TENSORRT_FEATURE in features) != engine or (not engine and ({ENGINE_FILE, ENGINE_CONFIG} & set(files)
                                                                         or "tensorrt" in backends)):
            raise ArtifactError(f"the feature {TENSORRT_FEATURE!r}, the files {ENGINE_FILE} + {ENGINE_CONFIG} and "
                                "the backend 'tensorrt' go together (all or none)")
        if (args.head != "causal_lm") != (HEADS_FEATURE in features):
            verb = "cannot list" if args.head == "causal_lm" else "needs"
            raise ArtifactError(f"a {args.head} model {verb} the feature {HEADS_FEATURE!r}")
        weight_index = d.get("weight_index")
        if weight_index is not None and (weight_index != WEIGHTS_FILE or weight_index not in files):
            raise ArtifactError(f"weight_index must be null or {WEIGHTS_FILE!r}, a file the manifest lists, got "
                                f"{weight_index!r}")
        if (weight_index is not None) != (WEIGHT_INDEX_FEATURE in features):
            raise ArtifactError(f"weight_index {weight_index!r} and the feature {WEIGHT_INDEX_FEATURE!r} go together")
        return cls(
            args=args, precision=precision, max_context=max_context, cache=cache, inputs=tensors[0],
            outputs=tensors[1], opsets=dict(opsets), files=dict(files), chat=chat, backends=tuple(backends),
            summary=dict(d["summary"]), versions=dict(d["versions"]), quantization=quantization, source=d["source"],
            features=tuple(features), weight_index=weight_index, format_version=version,
        )

    @classmethod
    def _empty_fields(cls) -> tuple[str, ...]:
        return ("format", "format_version", "features", "model", "precision", "quantization", "max_context",
                "cache", "backends", "inputs", "outputs", "opsets", "summary", "versions", "source", "chat", "files",
                "weight_index")

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Parse directory/manifest.json without looking at the other files."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise ArtifactError(f"{directory}: " + ("not a directory, so not an artifact" if directory.exists()
                                                    else "no such artifact directory" + _moved_aside(directory)))
        if not path.is_file():
            leftover = _leftover_inside(directory)
            raise ArtifactError(f"{directory}: " + (leftover if leftover is not None else
                                                    f"not an artifact directory (no {MANIFEST}); run `mixtrt export` "
                                                    "first"))
        return cls.from_dict(read_json(path, ArtifactError), source=str(path))

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> Manifest:
        """Read manifest.json and check the directory holds exactly the listed files, each of its size;
        with verify, of its sha256 too."""
        manifest = cls.read(directory)
        manifest.verify_files(Path(directory), hashes=verify)
        return manifest

    def verify_files(self, directory: Path, *, hashes: bool = True) -> None:
        extra = sorted(p.name for p in Path(directory).iterdir() if p.name != MANIFEST and p.name not in self.files)
        if extra:
            staged = all(n.startswith(f".{Path(directory).absolute().name}.tmp-") for n in extra)
            raise ArtifactError(f"{directory}: files not listed in {MANIFEST}: {extra} (an artifact holds exactly "
                                "the files its manifest lists" + ("; this is the staging folder of an export that "
                                "was killed: the next export of this folder removes it" if staged else "") + ")")
        for name, info in self.files.items():
            f = Path(directory) / name
            if Path(name).name != name or name == MANIFEST:
                raise ArtifactError(f"{directory}/{MANIFEST}: file name {name!r} is not a plain file name")
            if not f.is_file() or f.is_symlink():
                raise ArtifactError(f"{f}: listed in {MANIFEST} but missing (or not a regular file)")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise ArtifactError(f"{f}: size {size} does not match the manifest ({info['bytes']}); the file was "
                                    "modified or truncated")
            if hashes and sha256_file(f) != info["sha256"]:
                raise ArtifactError(f"{f}: sha256 does not match the manifest; the file was modified")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArtifactError(f"{name} must be a positive integer, got {value!r}")
    return value


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names}


def _check_summary(summary: dict) -> None:
    """The graph facts `mixtrt inspect` and `mixtrt bench` print and compute with: counts are integers >= 0, op
    names printable (no terminal escapes), the attention body a name."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63

    for key in ("parameters", "parameter_bytes", "bytes_per_token"):
        if summary.get(key) is not None and not count(summary[key]):
            raise ArtifactError(f"summary.{key} must be an integer >= 0, got {summary[key]!r}")
    ops = summary.get("ops", {})
    if not isinstance(ops, dict) or not all(isinstance(k, str) and k.isprintable() and count(v)
                                            for k, v in ops.items()):
        raise ArtifactError(f"summary.ops must map op names to counts, got {ops!r}"[:300])
    body = summary.get("attention_body")
    if body is not None and not (isinstance(body, str) and body.isprintable()):
        raise ArtifactError(f"summary.attention_body must be a name, got {body!r}")


def is_artifact(directory: Path, besides: Path | None = None) -> bool:
    """True only for a directory that is provably a mixtrt artifact: its manifest parses as ours (any format
    version this mixtrt can tell is a manifest) and it holds exactly the files the manifest lists (and
    `besides`, an export's staging directory inside it, where given)."""
    return _not_an_artifact(Path(directory), besides) is None


def _not_an_artifact(directory: Path, besides: Path | None = None) -> str | None:
    """Why `directory` is not provably an artifact (is_artifact), in words for an error; None when it is one."""
    generic = "is a non-empty directory that is not a mixtrt artifact"
    path = directory / MANIFEST
    try:
        if directory.is_symlink() or not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_JSON_BYTES:
            return generic
        data = json.loads(path.read_bytes())
        files = data.get("files") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(files, dict) or not all(isinstance(n, str) and n and Path(n).name == n for n in files):
            return generic
        present = {p.name for p in directory.iterdir() if p != besides}
        extra, missing = sorted(present - set(files) - {MANIFEST}), sorted(set(files) - present)
        if extra:
            more = ", ..." if len(extra) > 3 else ""
            return (f"holds files its {MANIFEST} does not list ({', '.join(extra[:3])}{more}), so it is not only a "
                    "mixtrt artifact (move them out to replace it)")
        if missing:
            return f"lacks files its {MANIFEST} lists ({', '.join(missing[:3])}): not a whole mixtrt artifact"
        if not all((directory / n).is_file() and not (directory / n).is_symlink() for n in files):
            return f"{generic} (a file its {MANIFEST} lists is a folder or a link)"
        return None
    except (OSError, ValueError, RecursionError):
        return generic


def check_target(target: Path, *, overwrite: bool = False) -> None:
    """Refuse a target that is a file or a link, lies inside an artifact, is an existing artifact (unless
    overwrite), or is a non-empty directory that is not provably an artifact (never: replacing it would
    delete someone's files). A dead export's leftovers (its staging folder, beside or inside the target; an old
    artifact it moved aside) are cleaned first, so they do not make the target look like something else."""
    target = Path(target)
    _clean_stale(Path(os.path.abspath(target)))
    if target.is_symlink():
        raise ArtifactError(f"{target}: is a symbolic link; refusing to replace it (choose another --out)")
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"{target}: exists and is not a directory; refusing to replace it (choose another --out)")
    blocking = _file_in_the_way(target.absolute().parent)
    if blocking is not None:
        raise ArtifactError(f"{target}: {blocking} is a file, not a folder (choose another --out)")
    real = Path(os.path.realpath(target.absolute().parent))  # a link on the way leads into another folder
    for parent in dict.fromkeys([*target.absolute().parents, real, *real.parents]):
        if is_artifact(parent):
            raise ArtifactError(f"{target}: lies inside the artifact {parent}, which holds only its own files "
                                "(choose another --out)")
    if target.is_dir() and any(target.iterdir()):
        leftover = _leftover_inside(target)
        if leftover is not None:
            raise ArtifactError(f"{target}: {leftover}")
        problem = _not_an_artifact(target)
        if problem is not None:
            raise ArtifactError(f"{target}: {problem}; refusing to replace it (choose another --out)")
        if not overwrite:
            raise ArtifactError(f"{target}: already exists (pass --force / overwrite=True to replace it)")


def _leftover_inside(target: Path) -> str | None:
    """What to tell about a folder holding the staging folder of an export killed (kill -9) while it moved its
    files into the folder in place (an empty folder filled, a mount point replaced): None if it holds none."""
    for entry in sorted(target.iterdir()):
        rest = entry.name.removeprefix(f".{target.name}.tmp-")
        if rest == entry.name or entry.is_symlink() or not entry.is_dir() or (entry / PARTIAL_MARKER).exists():
            continue
        pid = rest.split("-", 1)[0]
        if not _gone(pid):
            continue
        if _all_moved_in(target, entry):
            return (f"holds the staging folder of an export that was killed after it moved its files in "
                    f"({entry.name}, process {pid}, no longer running): the artifact is whole, and an export "
                    f"removes the folder once it is {UNRENAMED_S:.0f} s old (a process of another host sharing "
                    f"the folder could still own it until then); or remove {entry} yourself")
        aside = entry / ".replaced"
        old = (f"; the files of the artifact it was replacing are in {aside}" if aside.is_dir() and any(aside.iterdir())
               else "")
        return (f"holds the files of an export that was killed while it moved them in ({entry.name}, process {pid}, "
                f"no longer running){old}: it is not a whole artifact; empty the folder (keeping what you need "
                "from it) and export again")
    return None


def _moved_aside(directory: Path) -> str:
    """For a missing artifact directory: where an export killed while replacing it left the old artifact ("" if
    nowhere): `.NAME.old-PID` beside it."""
    directory = Path(os.path.abspath(directory))
    try:
        entries = sorted(directory.parent.glob(f".{directory.name}.old-*"))
    except OSError:
        return ""
    for entry in entries:
        if _gone(entry.name.rsplit("-", 1)[1]) and is_artifact(entry):
            return (f"; {entry} holds the artifact an export killed while replacing it had moved aside (the next "
                    f"export to {directory.name} puts it back; or rename it to {directory.name})")
    return ""


def _manifest_last(names: list[str]) -> list[str]:
    """`names` with the manifest (if there) moved to the end: the order files go into an artifact, so the folder
    is an artifact only once all of them are in (reversed: the order they leave it)."""
    return [n for n in names if n != MANIFEST] + [n for n in names if n == MANIFEST]


def _move_in(tmp: Path, target: Path) -> None:
    """Move every file of `tmp` into `target`, the manifest last."""
    for name in _manifest_last(sorted(p.name for p in tmp.iterdir())):
        os.replace(tmp / name, target / name)


def _check_in_place(target: Path, tmp: Path, overwrite: bool) -> None:
    """check_target for a target that holds its own staging directory `tmp`: what else it holds now must be
    nothing, or an artifact to overwrite."""
    others = [p for p in target.iterdir() if p != tmp]
    if not others:
        return
    if not overwrite:
        raise ArtifactError(f"{target}: files appeared in it during the export ({others[0].name}); nothing was "
                            "replaced")
    problem = _not_an_artifact(target, besides=tmp)
    if problem is not None:
        raise ArtifactError(f"{target}: {problem}; refusing to replace it (choose another --out)")


def _replace_in_place(target: Path, tmp: Path) -> None:
    """Replace what `target` holds besides `tmp` (nothing, or an artifact) by tmp's files: the old files moved
    aside into tmp (the manifest first, so the folder is never an artifact of mixed files), the new ones moved
    in (the manifest last), the old ones removed; if a move fails, the old files are put back."""
    aside = tmp / ".replaced"
    aside.mkdir()
    old = sorted(p.name for p in target.iterdir() if p != tmp)
    new = sorted(p.name for p in tmp.iterdir() if p != aside)
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in reversed(_manifest_last(old)):
            os.replace(target / name, aside / name)
            moved_out.append(name)
        for name in _manifest_last(new):
            os.replace(tmp / name, target / name)
            moved_in.append(name)
    except OSError:
        for name in moved_in:
            with contextlib.suppress(OSError):
                os.unlink(target / name)
        for name in reversed(moved_out):
            with contextlib.suppress(OSError):
                os.replace(aside / name, target / name)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


# Written into an export's temporary directory (and removed before the rename): proves to a later export of
# the same target that a leftover directory is a partial artifact of a process that died.
PARTIAL_MARKER = ".mixtrt-partial"


@contextlib.contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; rename it to `target` only if the block succeeds.

    An interrupted or failed export leaves no directory at `target`, and an existing artifact stays whole
    until the new one is complete (if the final swap fails, the old one is put back). In detail:
    - the temporary directory is `.NAME.tmp-PID-XXXX` beside the target and holds a marker naming the
      target, the host and the process; the marker is removed just before the rename;
    - an exception (disk full included: an ArtifactError naming the file) removes it; SIGTERM and SIGHUP
      become `Terminated` while the block runs (main thread only, and only where the process has not set
      handlers of its own), so they remove it too, and none of SIGINT/SIGTERM/SIGHUP can land between the
      two renames of the swap (they are delivered right after it);
    - kill -9 cannot be caught: the next export of the same target removes the leftovers it can prove are
      a dead process's partial artifacts (the marker's target and host are ours, its process is gone), and
      puts back an old artifact a dead process had moved aside to `.NAME.old-PID` when the target is missing;
    - an empty directory (`--out .` in a new folder, say) is filled in place, the manifest last: the folder
      itself stays, so a shell inside it sees the artifact (a swap would leave it in a deleted directory). Its
      temporary directory is made inside it, so the files move within one file system: the folder may be a
      mount point (a container's volume), which no rename from beside it can reach;
    - an artifact that is a mount point is replaced in place likewise (staged inside it; its files moved
      aside, the old manifest first, then the new files moved in, the manifest last; put back if a move fails;
      a kill -9 during those moves leaves a folder without a manifest, which nothing takes for an artifact).
    """
    # "." and ".." by their names: the target is the folder they name (staged beside it, or inside it when empty)
    target = Path(os.path.abspath(target))
    parent = target.parent
    _clean_stale(target)
    check_target(target, overwrite=overwrite)
    inside = target.is_dir() and not target.is_symlink() and (not any(target.iterdir()) or is_mount(target))
    with _signals_raise() as critical, _staging(target, "cannot write the artifact directory here",
                                                 "the export failed", "nothing was left behind",
                                                 home=target if inside else parent) as tmp:
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; an artifact is as readable as any new folder
        if inside:
            _check_in_place(target, tmp, overwrite)
        else:
            check_target(target, overwrite=overwrite)  # what is there now may have changed during the export
        with critical():
            if inside:
                _replace_in_place(target, tmp)
            elif target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
                _move_in(tmp, target)
                tmp.rmdir()
            elif target.exists():
                old = parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except OSError:
                    os.replace(old, target)
                    raise
                _remove_replaced(old, target)
            else:
                os.replace(tmp, target)


MOUNTINFO = "/proc/self/mountinfo"  # Linux's mount table of this process's namespace


def is_mount(path: Path) -> bool:
    """`path` is a mount point: os.path.ismount's test (another device, or the root), or, on Linux, a bind mount
    of a folder of the same file system, which only the kernel's mount table names (a rename cannot replace it)."""
    if os.path.ismount(path):
        return True
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            points = {_unescaped(line.split()[4]) for line in f if len(line.split()) > 4}
    except OSError:  # no such table (not Linux): the first test is all there is
        return False
    return os.path.realpath(path) in points


def _unescaped(field: str) -> str:
    """A mountinfo path field: space, tab, newline and backslash are written as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


# Written into an artifact a swap moved aside (`.NAME.old-PID`) before it is removed, and removed last: what is left
# of it after a kill -9 during the removal is provably such a leftover, which the next export of NAME removes.
REPLACED_MARKER = ".mixtrt-replaced"


def _remove_replaced(old: Path, target: Path) -> None:
    """Remove the artifact a swap moved aside, its marker (REPLACED_MARKER) last; where the file system refuses (a
    write-protected artifact's files), say where it stayed instead of leaving it hidden and silent."""
    errors: list[str] = []
    def failed(_f: Any, path: str, info: Any) -> None:  # onerror (Python 3.11 has no onexc)
        errors.append(f"{path}: {getattr(info[1], 'strerror', None) or info[1]}")

    marker = old / REPLACED_MARKER
    with contextlib.suppress(OSError):  # where it cannot be written, nothing else can be removed either
        marker.write_text(json.dumps(_owner(target)))
    for entry in list(old.iterdir()) if old.is_dir() else []:
        if entry != marker:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, onerror=failed)
            else:
                try:
                    entry.unlink()
                except OSError as e:
                    errors.append(f"{entry}: {e.strerror or e}")
    if not errors:
        with contextlib.suppress(OSError):
            marker.unlink()
        shutil.rmtree(old, onerror=failed)
    if old.exists():
        warnings.warn(f"{target}: replaced, but the old artifact moved aside to {old} could not be removed "
                      f"({errors[0] if errors else 'unknown reason'}); delete it to free its space",
                      MixtrtWarning, stacklevel=4)


@contextlib.contextmanager
def artifact_update(directory: Path) -> Iterator[Path]:
    """Add or replace files of the existing artifact `directory` so that it is never seen half-updated.

    Yields a staging directory beside the artifact (`.NAME.tmp-PID-XXXX`, with the partial marker, so a dead
    process's leftover is cleaned like an export's); the block writes the new files there and the new
    `manifest.json` (listing every file the artifact will hold). After the block the staged files are moved in,
    the manifest last, with SIGINT / SIGTERM / SIGHUP deferred during the moves; files they replace are kept
    aside until the manifest is in place and put back if a move fails. An exception or signal during the block
    leaves the artifact exactly as it was. Only kill -9 (or a power cut) during the moves themselves can leave
    a new file the old manifest does not list; the artifact is then refused at load ("files not listed") and
    the next update or export repairs it.
    """
    directory = Path(directory)
    if not is_artifact(directory):
        raise ArtifactError(f"{directory}: not an artifact (its manifest must list exactly the files it holds)")
    _clean_stale(directory)
    inside = is_mount(directory)  # a rename from beside a mount point cannot reach into it
    with _signals_raise() as critical, _staging(directory, "cannot write beside the artifact", "the update failed",
                                                 "the artifact is as it was",
                                                 home=directory if inside else None) as tmp:
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        staged = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
        if not (tmp / MANIFEST).is_file() or set(Manifest.read(tmp).files) != (
                {p.name for p in directory.iterdir() if p.name != MANIFEST and p != tmp} | set(staged)):
            raise ArtifactError(f"{directory}: the new manifest must list exactly the artifact's files and the "
                                "staged ones")
        aside = tmp / ".replaced"
        aside.mkdir()
        with critical():
            moved: list[str] = []
            try:
                for name in staged:
                    if (directory / name).exists():
                        os.replace(directory / name, aside / name)
                    os.replace(tmp / name, directory / name)
                    moved.append(name)
                os.replace(tmp / MANIFEST, directory / MANIFEST)
            except OSError:
                for name in moved:
                    with contextlib.suppress(OSError):
                        os.unlink(directory / name)
                for old in aside.iterdir():
                    with contextlib.suppress(OSError):
                        os.replace(old, directory / old.name)
                raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _staging(target: Path, cannot: str, failed: str, outcome: str, home: Path | None = None) -> Iterator[Path]:
    """A staging directory `.NAME.tmp-PID-XXXX` in `home` (default: beside `target`), holding the partial marker
    that names its owner.

    Any exception in the block removes it; an OSError (a full disk among them) becomes one ArtifactError that
    names the file being written and, for a full disk, what to do. On success the caller moves it or removes it.
    """
    home = target.parent if home is None else home
    made = [p for p in (home, *home.parents) if not p.exists()]  # folders made for it, removed again on failure
    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=home))
    except OSError as e:
        _remove_empty(made)
        blocking = _file_in_the_way(home)
        reason = f"{blocking} is a file, not a folder" if blocking is not None else e.strerror
        raise ArtifactError(f"{home}: {cannot} ({reason})") from None
    try:
        (tmp / PARTIAL_MARKER).write_text(json.dumps(_owner(target)))
        yield tmp
    except OSError as e:
        where = _culprit(tmp, e)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise ArtifactError(f"{target}: {failed} writing {where}: {e.strerror or e}; {outcome}"
                            + (" (free some space and try again)" if e.errno == errno.ENOSPC else "")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


def _file_in_the_way(folder: Path) -> Path | None:
    """The file (not a folder) at `folder` or at one of its parents, which stops a folder being made there."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (innermost first) that are still empty: the ones a failed write made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _culprit(tmp: Path, e: OSError) -> str:
    """The file an OSError of a write names, relative to the artifact; a failed write() names none, so the
    file written last is the one (what a disk-full error needs to say)."""
    path = Path(e.filename) if e.filename else None
    if path is not None and not path.is_relative_to(tmp):
        # a copy names its source first (shutil's sendfile): the file written is the destination, or, when the
        # disk filled, the one written last
        if e.filename2 and Path(e.filename2).is_relative_to(tmp):
            path = Path(e.filename2)
        elif e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            path = None
    if path is None:
        with contextlib.suppress(OSError):
            files = [p for p in tmp.rglob("*") if p.is_file() and p.name != PARTIAL_MARKER]
            path = max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    if path is None:
        return str(tmp)
    return str(path.relative_to(tmp)) if path.is_relative_to(tmp) else str(path)


def _owner(target: Path) -> dict[str, Any]:
    return {"target": str(target.absolute()), "host": socket.gethostname(), "pid": os.getpid()}


def _gone(pid: str) -> bool:
    """`pid` (from a leftover's name) is a process id, and that process no longer runs."""
    return pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# A staging folder that lost its marker (removed just before the rename) this long ago by a process that is gone is
# a finished export killed between the two: far longer than the rename takes, on any host sharing the folder.
UNRENAMED_S = 60.0


def _unrenamed(entry: Path, rest: str) -> bool:
    """`entry` (named .NAME.tmp-`rest`, rest = PID-XXXX) is a whole artifact staged by a process that is gone and that
    removed its marker more than UNRENAMED_S ago: an export killed between the marker's removal and the rename."""
    pid = rest.split("-", 1)[0]
    try:
        old = time.time() - entry.stat().st_mtime > UNRENAMED_S
    except OSError:
        return False
    return old and _gone(pid) and is_artifact(entry)


def _finished_in_place(target: Path, entry: Path) -> bool:
    """`entry`, inside `target`, is the staging folder of a replace in place (or an update) whose process is gone
    after moving every file in, the manifest last: it lost its marker before the moves, holds nothing but what it
    moved aside (`.replaced`: old files on their way out; an update killed part way still holds staged files or
    its new manifest), was last changed over UNRENAMED_S ago (a peer on another host sharing the folder has its
    own pids), and `target` besides it is a whole artifact."""
    rest = entry.name.removeprefix(f".{target.name}.tmp-")
    if rest == entry.name or not entry.is_dir() or entry.is_symlink() or not _gone(rest.split("-", 1)[0]):
        return False
    try:
        old = time.time() - entry.stat().st_mtime > UNRENAMED_S
    except OSError:  # not ours to read: not ours to remove
        return False
    return old and _all_moved_in(target, entry)


def _all_moved_in(target: Path, staging: Path) -> bool:
    """A replace in place's `staging` folder holds nothing but what it moved aside (`.replaced`) and `target` beside
    it is a whole artifact: every file went in, the manifest last (False where the folder cannot be read)."""
    try:
        left = {p.name for p in staging.iterdir()}
    except OSError:
        return False
    return left <= {".replaced"} and is_artifact(target, besides=staging)


def _empty(folder: Path) -> bool:
    """An empty folder (False where it cannot be read)."""
    try:
        return not any(folder.iterdir())
    except OSError:
        return False


def _replaced_by(entry: Path) -> str | None:
    """The target named by the REPLACED_MARKER in `entry`, if it holds a readable one."""
    marker = entry / REPLACED_MARKER
    try:
        owner = json.loads(marker.read_text()) if marker.is_file() and not marker.is_symlink() else None
    except (OSError, ValueError):
        return None
    return owner.get("target") if isinstance(owner, dict) and isinstance(owner.get("target"), str) else None


def _clean_stale(target: Path) -> None:
    """Remove the partial artifacts of dead exports of `target` (and put back an old artifact a dead export
    moved aside). Only what is provably such a leftover is touched; anything else is left alone."""
    parent, me = target.parent, _owner(target)
    if not parent.is_dir():
        return
    inside = list(target.iterdir()) if target.is_dir() and not target.is_symlink() else []
    for entry in inside:  # a replace in place killed after its last move: the artifact is whole
        if _finished_in_place(target, entry):
            shutil.rmtree(entry, ignore_errors=True)
    inside = [e for e in inside if e.exists()]
    for entry in list(parent.iterdir()) + [e for e in inside if e.name.startswith(f".{target.name}.tmp-")]:
        try:
            _clean_entry(entry, target, me)
        except OSError:  # a folder this process cannot read (another user's): not provably ours, left alone
            continue


def _clean_entry(entry: Path, target: Path, me: dict[str, Any]) -> None:
    """_clean_stale for one entry beside (or inside) the target."""
    name = entry.name
    if entry.is_symlink() or not entry.is_dir():
        return
    if name.startswith(f".{target.name}.tmp-"):
        marker = entry / PARTIAL_MARKER
        try:
            owner = json.loads(marker.read_text()) if marker.is_file() and not marker.is_symlink() else None
        except (OSError, ValueError):
            owner = None
        if (isinstance(owner, dict) and owner.get("target") == me["target"] and owner.get("host") == me["host"]
                and isinstance(owner.get("pid"), int) and not _alive(owner["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
        elif owner is None and not marker.exists() and _unrenamed(entry, name.removeprefix(f".{target.name}.tmp-")):
            shutil.rmtree(entry, ignore_errors=True)
    elif name.startswith(f".{target.name}.old-") and _gone(name.rsplit("-", 1)[1]):
        if is_artifact(entry):
            if target.exists() or target.is_symlink():
                _remove_replaced(entry, target)
            else:
                with contextlib.suppress(OSError):
                    os.replace(entry, target)
        elif _replaced_by(entry) == me["target"] or _empty(entry):
            _remove_replaced(entry, target)  # what a removal killed part way left of a replaced artifact


@contextlib.contextmanager
def _signals_raise() -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """While the block runs, SIGTERM / SIGHUP raise Terminated (SIGINT keeps raising KeyboardInterrupt), and
    the `critical()` context it yields defers all three to its end. Only in the main thread, and only for
    signals whose handler is Python's default (a program with handlers of its own keeps them)."""
    state = _SignalState()

    def handler(signum: int, frame: Any) -> None:
        state.received = signum
        if state.critical:
            state.pending = signum
            return
        _raise_for(signum)

    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is None:
                continue
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                installed[sig] = current
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def critical() -> Iterator[None]:
        if state.received is not None:
            # the handler ran but its exception did not come out: raised inside a callback whose exceptions Python
            # prints and drops (a garbage collector's weakref callback under torch): the signal still ends the work
            _raise_for(state.received)
        state.critical = True
        try:
            yield
        finally:
            state.critical = False
        if state.pending is not None:
            _raise_for(state.pending)

    try:
        yield critical
        if state.received is not None:  # a swallowed signal in a block that made no swap
            _raise_for(state.received)
    except (Terminated, KeyboardInterrupt):
        raise
    except BaseException:
        # the handler's exception raised inside an extension's code (safetensors reading a tensor) can come out as
        # that code's own error: the signal is still what ended the work
        if state.received is not None:
            _raise_for(state.received)
        raise
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


@dataclass
class _SignalState:
    critical: bool = False  # inside the swap: signals wait
    pending: int | None = None  # the signal that arrived meanwhile
    received: int | None = None  # the last signal the handler took


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)
