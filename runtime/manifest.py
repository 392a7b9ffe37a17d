"""manifest.json: the one file the runtime reads to learn what an artifact directory holds.

    engines/tiny/
      manifest.json      format version, ModelArgs, precision, cache, IO, opsets, versions, sha256 of files
      model.onnx         the graph (+ model.onnx.data when weights pass 2 GB)
      tokenizer.model    sentencepiece model

Nothing is inferred from file names. An artifact directory is written under a temporary name and
renamed when complete (see `atomic_dir`), so a directory with a manifest is a whole artifact.
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
from mixtrt.runtime.errors import ArtifactError, MixtrtError

FORMAT = "mixtrt-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
class CacheSpec:
    capacity: int  # C: rows per layer
    layout: str  # "windowed" (sliding window, backend keeps the recent positions) | "linear" (row = position)
    window: int | None  # W for windowed layers
    dtype: str

    @property
    def windowed(self) -> bool:
        return self.layout == "windowed"


@dataclass(frozen=True)
class Manifest:
    args: ModelArgs
    precision: str  # "fp32" | "fp16"
    max_context: int  # positions the artifact serves (rope table / linear cache length)
    cache: CacheSpec
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opsets: dict[str, int]
    files: dict[str, dict[str, Any]]  # name -> {"sha256": ..., "bytes": ...}
    versions: dict[str, str | None] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    source: str | None = None
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
        dt = "float16" if precision == "fp16" else "float32"
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
        """Refuse an artifact whose graph IO is not what this mixtrt runs (exported by another version)."""
        inputs, outputs = Manifest.graph_io(self.args, self.cache.capacity, self.precision)
        if (self.inputs, self.outputs) == (inputs, outputs):
            return
        ours, theirs = {t.name for t in inputs + outputs}, {t.name for t in self.inputs + self.outputs}
        diff = ", ".join([f"missing {sorted(ours - theirs)}"] * bool(ours - theirs)
                         + [f"unknown {sorted(theirs - ours)}"] * bool(theirs - ours)) or "other shapes or dtypes"
        raise ArtifactError(f"{directory}: exported by an older mixtrt or a newer one (graph IO: {diff}); "
                            "export the checkpoint again")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model": self.args.to_dict(),
            "precision": self.precision,
            "quantization": self.quantization,
            "max_context": self.max_context,
            "cache": {"capacity": self.cache.capacity, "layout": self.cache.layout,
                      "window": self.cache.window, "dtype": self.cache.dtype},
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "opsets": self.opsets,
            "versions": self.versions,
            "source": self.source,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = MANIFEST) -> Manifest:
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{source}: not a mixtrt manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: format_version {version} is not supported by this mixtrt (expects {FORMAT_VERSION}); "
                "re-export the model"
            )
        try:
            return cls(
                args=ModelArgs.from_dict(d["model"]),
                precision=d["precision"],
                max_context=int(d["max_context"]),
                cache=CacheSpec(**d["cache"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                opsets=dict(d["opsets"]),
                files=dict(d["files"]),
                versions=dict(d.get("versions") or {}),
                quantization=d.get("quantization"),
                source=d.get("source"),
                format_version=version,
            )
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from None
        except MixtrtError as e:
            raise ArtifactError(f"{source}: {e}") from None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> Manifest:
        """Read manifest.json and check every listed file's size; with verify, its sha256 too."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise ArtifactError(f"{directory}: no such artifact directory")
        if not path.is_file():
            raise ArtifactError(f"{directory}: not an artifact directory (no {MANIFEST}); run `mixtrt export` first")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: not valid JSON ({e})") from None
        manifest = cls.from_dict(data, source=str(path))
        manifest.verify_files(directory, hashes=verify)
        return manifest

    def verify_files(self, directory: Path, *, hashes: bool = True) -> None:
        for name, info in self.files.items():
            f = Path(directory) / name
            if not f.is_file():
                raise ArtifactError(f"{f}: listed in {MANIFEST} but missing")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise ArtifactError(f"{f}: size {size} does not match the manifest ({info['bytes']}); the file was "
                                    "modified or truncated")
            if hashes and sha256_file(f) != info["sha256"]:
                raise ArtifactError(f"{f}: sha256 does not match the manifest; the file was modified")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names}


def check_target(target: Path, *, overwrite: bool = False) -> None:
    """Refuse a target that is a file, a non-empty directory (unless overwrite), or a non-empty directory
    that is not an artifact (never: replacing it would delete someone's files)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not (target / MANIFEST).is_file():
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
