"""manifest.json: the one file the runtime reads to learn what an artifact directory holds.

    engines/tiny/
      manifest.json      format version, features, ModelArgs, precision, cache plan, backends, graph IO,
                         chat format (tokenizer, template, generation defaults), graph summary, opsets,
                         versions, source, sha256 + size of every other file
      model.onnx         the graph (+ model.onnx.data when the weights pass 1 GiB)
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
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.cache import CachePlan
from mixtrt.runtime.chat_format import ChatFormat
from mixtrt.runtime.errors import ArtifactError, MixtrtError
from mixtrt.runtime.precision import PRECISIONS

FORMAT = "mixtrt-artifact"
FORMAT_VERSION = 2
FEATURES: frozenset[str] = frozenset()  # the features this runtime knows (none beyond the base format yet)
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "int32", "float32", "float16"
    shape: tuple[int | str, ...]  # ints are fixed, strings are named dynamic dims

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


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
    quantization: dict[str, Any] | None = None
    source: str | None = None
    features: tuple[str, ...] = ()
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
        """The graph inputs and outputs this mixtrt exports and runs (the exporter writes them, backends check
        an artifact's against them)."""
        dt = PRECISIONS[precision]
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
                         + [f"unknown {sorted(theirs - ours)}"] * bool(theirs - ours)) or "other shapes or dtypes"
        raise ArtifactError(f"{directory}/{MANIFEST}: the graph IO it lists does not match its model, cache and "
                            f"precision ({diff}); the manifest was edited or the artifact is damaged: export again")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "features": list(self.features),
            "model": self.args.to_dict(),
            "precision": self.precision,
            "quantization": self.quantization,
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
        }

    @classmethod
    def from_dict(cls, d: Any, *, source: str = MANIFEST) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ArtifactError(f"{source}: not a mixtrt manifest (format={got!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                raise ArtifactError(f"{source}: format_version {version} was written by a newer mixtrt (this one "
                                    f"reads {FORMAT_VERSION}); upgrade mixtrt")
            older = isinstance(version, int) and not isinstance(version, bool) and 1 <= version
            raise ArtifactError(f"{source}: format_version {version!r} "
                                + ("was written by an older mixtrt" if older else "is not one this mixtrt knows")
                                + f" (this one reads {FORMAT_VERSION}); export the checkpoint again")
        unknown = sorted(set(d) - set(cls._empty_fields()))
        if unknown:
            raise ArtifactError(f"{source}: unknown manifest fields {unknown} (written by a newer mixtrt, or edited)")
        if "chat" not in d:
            raise ArtifactError(f"{source}: no chat record (written by a mixtrt before the tokenizer and chat format "
                                "were recorded); export the checkpoint again")
        features = d.get("features") or []
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ArtifactError(f"{source}: features must be a list of strings, got {features!r}")
        new = sorted(set(features) - FEATURES)
        if new:
            raise ArtifactError(f"{source}: the artifact needs features {new} that this mixtrt does not know; "
                                "upgrade mixtrt")
        try:
            args = ModelArgs.from_dict(d["model"])
            precision = d["precision"]
            if precision not in PRECISIONS:
                raise ArtifactError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
            cache = CachePlan.from_dict(d["cache"], args.num_hidden_layers)
            if cache.dtype != PRECISIONS[precision]:
                raise ArtifactError(f"cache.dtype {cache.dtype} does not match precision {precision}")
            files = d["files"]
            if not isinstance(files, dict) or not all(
                    isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                    for v in files.values()):
                raise ArtifactError("files must map each file name to {sha256, bytes}")
            manifest = cls(
                args=args,
                precision=precision,
                max_context=_positive(d["max_context"], "max_context"),
                cache=cache,
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                opsets=dict(d["opsets"]),
                files=dict(files),
                chat=ChatFormat.from_dict(d["chat"]),
                backends=tuple(d["backends"]),
                summary=dict(d.get("summary") or {}),
                versions=dict(d.get("versions") or {}),
                quantization=d.get("quantization"),
                source=d.get("source"),
                features=tuple(features),
                format_version=version,
            )
        except MixtrtError as e:  # before ValueError: our errors are ValueErrors too, and already one line
            raise ArtifactError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ArtifactError(f"{source}: malformed manifest ({what})") from None
        for name in (MODEL_FILE, manifest.chat.tokenizer_file, *manifest.chat.files):
            if name not in manifest.files:
                raise ArtifactError(f"{source}: files does not list {name}")
        if (cache.windowed and cache.capacity > manifest.max_context) or (
                not cache.windowed and cache.capacity != manifest.max_context):
            raise ArtifactError(f"{source}: cache.capacity {cache.capacity} does not fit max_context "
                                f"{manifest.max_context} and layout {cache.layout}")
        return manifest

    @classmethod
    def _empty_fields(cls) -> tuple[str, ...]:
        return ("format", "format_version", "features", "model", "precision", "quantization", "max_context",
                "cache", "backends", "inputs", "outputs", "opsets", "summary", "versions", "source", "chat", "files")

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
            raise ArtifactError(f"{directory}: no such artifact directory")
        if not path.is_file():
            raise ArtifactError(f"{directory}: not an artifact directory (no {MANIFEST}); run `mixtrt export` first")
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read it ({e.strerror})") from None
        return cls.from_dict(data, source=str(path))

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
            raise ArtifactError(f"{directory}: files not listed in {MANIFEST}: {extra} (an artifact holds exactly "
                                "the files its manifest lists)")
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


def is_artifact(directory: Path) -> bool:
    """True only for a directory that is provably a mixtrt artifact: its manifest parses as ours (any format
    version this mixtrt can tell is a manifest) and it holds exactly the files the manifest lists."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_bytes())
        names = set(data["files"]) if isinstance(data, dict) and data.get("format") == FORMAT else None
        present = {p.name for p in Path(directory).iterdir()}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return names is not None and present == names | {MANIFEST} and all(
        (Path(directory) / n).is_file() and not (Path(directory) / n).is_symlink() for n in names)


def check_target(target: Path, *, overwrite: bool = False) -> None:
    """Refuse a target that is a file, an existing artifact (unless overwrite), or a non-empty directory
    that is not provably an artifact (never: replacing it would delete someone's files)."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ArtifactError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not is_artifact(target):
            raise ArtifactError(f"{target}: is a non-empty directory that is not a mixtrt artifact; refusing to "
                                "replace it (choose another --out)")
        if not overwrite:
            raise ArtifactError(f"{target}: already exists (pass --force / overwrite=True to replace it)")


@contextlib.contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; rename it to `target` only if the block succeeds.

    An interrupted or failed export leaves no directory at `target`, and an existing artifact stays whole
    until the new one is complete (if the final swap fails, the old one is put back).
    """
    target = Path(target)
    check_target(target, overwrite=overwrite)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as e:
        raise ArtifactError(f"{parent}: cannot write the artifact directory here ({e.strerror})") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; an artifact is as readable as any new folder
        check_target(target, overwrite=overwrite)  # what is there now may have changed during the export
        if target.exists():
            old = parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
