"""Hostile checkpoints: every bad weight file, index or tensor is one error naming the file (and the tensor),
nothing is cast or substituted quietly, no pickled code runs, and the checkpoint is left as it was."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtrt.export.checkpoint import load_checkpoint
from mixtrt.runtime.errors import CheckpointError, MixtrtError
from tests.export.test_checkpoint import hf_model, write_raw
from tests.hostile import one_line, tree

NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    hf_model("mistral").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def good_sharded(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded")
    hf_model("mistral").save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture(scope="module")
def good_raw(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw")
    write_raw(hf_model("mistral"), path, "pth")
    return path


def weights(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        sd = load_file(path / "model.safetensors")
        edit(sd)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return apply


def index(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        f = path / "model.safetensors.index.json"
        data = json.loads(f.read_text())
        out = edit(data)
        f.write_text(json.dumps(data if out is None else out))
    return apply


def raw_pth(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        f = path / "consolidated.00.pth"
        sd = torch.load(f, weights_only=True)
        out = edit(sd)
        torch.save(sd if out is None else out, f)
    return apply


def _huge_header(path: Path) -> None:
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")


def _dangling(path: Path) -> None:
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(path / "elsewhere.safetensors")


def _wrong_shard(d: dict) -> None:
    shards = sorted(set(d["weight_map"].values()))
    d["weight_map"][NORM] = next(s for s in shards if s != d["weight_map"][NORM])


class Payload:
    """Unpickling this would create a file: proof that loading ran pickled code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# (name, which checkpoint, how it is broken, error class, what the one line must name)
CASES = [
    ("int64 tensor", "good", weights(lambda sd: sd.__setitem__(NORM, torch.ones(64, dtype=torch.int64))),
     CheckpointError, ["model.safetensors", NORM, "I64"]),
    ("bool tensor", "good", weights(lambda sd: sd.__setitem__(NORM, torch.ones(64, dtype=torch.bool))),
     CheckpointError, ["model.safetensors", NORM, "BOOL"]),
    ("int8 embedding", "good", weights(lambda sd: sd.__setitem__(EMBED, sd[EMBED].to(torch.int8))),
     CheckpointError, ["model.safetensors", EMBED, "I8"]),
    ("fp8 tensor", "good", weights(lambda sd: sd.__setitem__(NORM, sd[NORM].to(torch.float8_e4m3fn))),
     CheckpointError, ["model.safetensors", NORM, "F8_E4M3"]),
    ("int pth tensor", "raw", raw_pth(lambda sd: sd.__setitem__("norm.weight", torch.ones(64, dtype=torch.int32))),
     CheckpointError, ["consolidated.00.pth", "norm.weight", "int32"]),
    ("pth list", "raw", raw_pth(lambda sd: list(sd.values())), CheckpointError,
     ["consolidated.00.pth", "flat dict of tensors"]),
    ("pth nested dict", "raw", raw_pth(lambda sd: {"model": sd}), CheckpointError,
     ["consolidated.00.pth", "flat dict of tensors"]),
    ("pth garbage", "raw", lambda p: (p / "consolidated.00.pth").write_bytes(b"PK\x03\x04 not a zip"),
     CheckpointError, ["consolidated.00.pth", "not a readable .pth file"]),
    ("empty safetensors", "good", lambda p: (p / "model.safetensors").write_bytes(b""), CheckpointError,
     ["model.safetensors", "not a readable safetensors file"]),
    ("huge header", "good", _huge_header, CheckpointError, ["model.safetensors", "not a readable safetensors"]),
    ("weights dir", "good", lambda p: ((p / "model.safetensors").unlink(), (p / "model.safetensors").mkdir()),
     CheckpointError, ["no model.safetensors"]),
    ("dangling weights link", "good", _dangling, CheckpointError, ["model.safetensors: a link to a missing file"]),
    ("pickled weights only", "good", lambda p: ((p / "model.safetensors").unlink(),
                                                (p / "pytorch_model.bin").write_bytes(b"never read")),
     CheckpointError, ["pytorch_model.bin holds pickled weights, which are never loaded",
                       "convert them to safetensors"]),
    ("index is a list", "sharded", index(lambda d: [d]), CheckpointError,
     ["model.safetensors.index.json", "not a safetensors index"]),
    ("weight_map is a list", "sharded", index(lambda d: d.__setitem__("weight_map", list(d["weight_map"]))),
     CheckpointError, ["model.safetensors.index.json", "weight_map"]),
    ("shard outside the dir", "sharded",
     index(lambda d: d["weight_map"].__setitem__(NORM, "../../etc/passwd")), CheckpointError,
     ["model.safetensors.index.json", "not a safetensors index"]),
    ("shard is a number", "sharded", index(lambda d: d["weight_map"].__setitem__(NORM, 3)), CheckpointError,
     ["model.safetensors.index.json"]),
    ("index not UTF-8", "sharded", lambda p: (p / "model.safetensors.index.json").write_bytes(b'{"\xff": 1}'),
     CheckpointError, ["model.safetensors.index.json", "not valid JSON"]),
    ("index NaN", "sharded", lambda p: (p / "model.safetensors.index.json").write_text('{"metadata": NaN}'),
     CheckpointError, ["model.safetensors.index.json", "NaN"]),
    ("tensor in the wrong shard", "sharded", index(_wrong_shard), CheckpointError,
     ["model.safetensors.index.json", NORM]),
    ("config not an object", "good", lambda p: (p / "config.json").write_text("[]"), MixtrtError,
     ["config.json", "expected a JSON object"]),
    ("config wrong type", "good",
     lambda p: (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()),
                                                           "hidden_size": "abc"})),
     MixtrtError, ["config.json", "hidden_size"]),
]


@pytest.mark.parametrize("name, which, breaks, cls, culprits", CASES, ids=[c[0] for c in CASES])
def test_hostile_checkpoint(tmp_path, request, name, which, breaks, cls, culprits):
    src = request.getfixturevalue({"good": "good", "sharded": "good_sharded", "raw": "good_raw"}[which])
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    breaks(ck)
    before = tree(tmp_path)
    with pytest.raises(cls) as e:
        load_checkpoint(ck)
    one_line(e.value, *culprits)
    assert tree(tmp_path) == before


def test_pickled_code_never_runs(tmp_path, good_raw):
    ck = tmp_path / "ck"
    shutil.copytree(good_raw, ck)
    marker = tmp_path / "pwned"
    sd = torch.load(ck / "consolidated.00.pth", weights_only=True)
    with open(ck / "consolidated.00.pth", "wb") as f:  # a plain pickle, as torch.save(_use_new_zipfile=False)
        pickle.dump({**sd, "x": Payload(str(marker))}, f)
    torch.save({**sd, "x": Payload(str(marker))}, ck / "consolidated.01.pth")
    for name in ("consolidated.00.pth", "consolidated.01.pth"):  # a plain pickle, then torch's zip format
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(ck)
        one_line(e.value, name)
        (ck / name).unlink()
    assert not marker.exists()


def test_good_checkpoints_load(good, good_sharded, good_raw):
    """The fixtures the table breaks are loadable as they are (so each failure above is the one edit)."""
    for path in (good, good_sharded, good_raw):
        args, w = load_checkpoint(path)
        assert args.vocab_size == 512 and all(t.is_floating_point() for t in w.values())
    sd = load_file(good / "model.safetensors")
    assert {str(t.dtype) for t in sd.values()} == {"torch.float32"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_float_dtype_is_accepted(tmp_path, good, dtype):
    ck = tmp_path / "ck"
    shutil.copytree(good, ck)
    weights(lambda sd: sd.__setitem__(NORM, sd[NORM].to(dtype)))(ck)
    _, w = load_checkpoint(ck)
    assert w[NORM].dtype == torch.float32
