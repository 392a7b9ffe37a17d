"""Hostile artifacts: every malformed, edited or swapped manifest / file is one ArtifactError naming the
file and the field (an edit is called an edit, not an old export), and loading changes nothing on disk."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtrt.runtime.errors import ArtifactError, ConfigError, MixtrtError
from mixtrt.runtime.generation import Generator
from mixtrt.runtime.inspect import inspect_artifact
from mixtrt.runtime.manifest import GRAPH_METADATA, Manifest, sha256_file
from tests.hostile import linked_copy, one_line, replace_file, tree

EDITED = "the manifest was edited or the artifact is damaged"


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit of the manifest dict at a path ("cache/capacity"); value DROP removes the key."""
    keys = path.split("/")

    def edit(d: dict) -> None:
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d[k]
        if value is DROP:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    return edit


DROP = object()


def _fp16(d: dict) -> None:
    """Precision, cache dtype and every float IO dtype changed together: consistent, but not the graph."""
    d["precision"], d["cache"]["dtype"] = "fp16", "float16"
    for t in d["inputs"] + d["outputs"]:
        if t["dtype"] == "float32":
            t["dtype"] = "float16"


def _capacity(n: int) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d["cache"]["capacity"] = n
        for t in d["inputs"] + d["outputs"]:
            if t["name"].startswith(("past", "present")):
                t["shape"][2] = n
    return edit


def _reorder_outputs(d: dict) -> None:
    d["outputs"] = d["outputs"][::-1]


# (name, edit of the manifest dict, what the one line must say)
MANIFEST_EDITS = [
    ("files empty", _set("files", {}), ["files does not list model.onnx, tokenizer.model", EDITED]),
    ("files a list", _set("files", ["model.onnx"]), ["files must map", EDITED]),
    ("bytes a string", _set("files/model.onnx/bytes", "12"), ["files must map", "model.onnx", EDITED]),
    ("bytes negative", _set("files/model.onnx/bytes", -1), ["files must map", EDITED]),
    ("sha256 short", _set("files/model.onnx/sha256", "abc"), ["files must map", EDITED]),
    ("extra key in a file entry", _set("files/model.onnx/mode", "0644"), ["files must map", EDITED]),
    ("file name with a path", lambda d: d["files"].__setitem__("../model.onnx", d["files"]["model.onnx"]),
     ["'../model.onnx' is not a plain file name", EDITED]),
    ("manifest lists itself", lambda d: d["files"].__setitem__("manifest.json", d["files"]["model.onnx"]),
     ["'manifest.json' is not a plain file name"]),
    ("precision alone", _set("precision", "fp16"), ["cache.dtype float32 does not match precision fp16", EDITED]),
    ("precision unknown", _set("precision", "int3"), ["precision 'int3'", EDITED]),
    ("precision int4 without its record", _set("precision", "int4"),
     ["precision int4 needs the feature 'int4'", EDITED]),
    ("precision a list", _set("precision", ["fp32"]), ["precision ['fp32']", EDITED]),
    ("cache layout", _set("cache/layout", "linear"), ["cache.window 5 does not match", EDITED]),
    ("cache layout unknown", _set("cache/layout", "ring"), ["cache.layout 'ring'", EDITED]),
    ("cache not an object", _set("cache", "windowed"), ["cache must be an object", EDITED]),
    ("cache windows a string", _set("cache/windows", "5"), ["cache.windows must be a list", EDITED]),
    ("cache dtype missing", _set("cache/dtype", DROP), ["cache: missing field 'dtype'", EDITED]),
    ("capacity alone", _set("cache/capacity", 7), ["graph IO it lists does not match", EDITED]),
    ("max_context string", _set("max_context", "128"), ["max_context must be a positive integer", EDITED]),
    ("max_context bool", _set("max_context", True), ["max_context must be a positive integer"]),
    ("max_context past the model", _set("max_context", 10**6), ["max_context 1000000", "max_position_embeddings"]),
    ("model missing", _set("model", DROP), ["missing field 'model'", EDITED]),
    ("model a string", _set("model", "mistral"), ["model must be an object", EDITED]),
    ("model field wrong type", _set("model/hidden_size", "64"), ["hidden_size", EDITED]),
    ("model rope_theta zero", _set("model/rope_theta", 0), ["rope_theta", EDITED]),
    ("model eps negative", _set("model/rms_norm_eps", -1.0), ["rms_norm_eps", EDITED]),
    ("model eos outside vocab", _set("model/eos_token_ids", [32000]), ["eos_token_id 32000", EDITED]),
    ("model unknown field", _set("model/rope_scaling", None), ["unknown ModelArgs fields ['rope_scaling']"]),
    ("model moe on a mistral", _set("model/moe", {"num_experts": 4}), ["moe must be null or", EDITED]),
    ("inputs a string", _set("inputs", "input_ids"), ["inputs must be a list", EDITED]),
    ("input without shape", _set("inputs/0/shape", DROP), ["graph input/output must be {name, dtype, shape}"]),
    ("input dtype unknown", _set("inputs/0/dtype", "float64"), ["needs a string name, a dtype", EDITED]),
    ("input shape zero", _set("inputs/0/shape", ["batch", 0]), ["needs a string name", EDITED]),
    ("input dropped", lambda d: d["inputs"].pop(2), ["missing ['logit_positions']", EDITED]),
    ("backends a string", _set("backends", "onnxruntime"), ["backends must be a non-empty list", EDITED]),
    ("backends empty", _set("backends", []), ["backends must be a non-empty list"]),
    ("opsets a list", _set("opsets", []), ["opsets must map", EDITED]),
    ("opset a string", _set("opsets/ai.onnx", "20"), ["opsets must map", EDITED]),
    ("summary null", _set("summary", None), ["summary must be an object", EDITED]),
    ("summary parameters a string", _set("summary/parameters", "x"), ["summary.parameters must be an integer", EDITED]),
    ("summary op count negative", _set("summary/ops", {"Add": -5}), ["summary.ops must map op names to counts"]),
    ("summary op name an escape", _set("summary/ops", {"\u001b[31mRED": 1}), ["summary.ops must map", EDITED]),
    ("source an escape", _set("source", "ck\u001b[2J"), ["source must be a path (printable)", EDITED]),
    ("generation eos negative", lambda d: d["chat"].setdefault("generation", {}).update(eos_token_ids=[-1]),
     ["chat.generation: eos_token_ids must be an integer >= 0, got -1", EDITED]),
    ("generation top_k negative", lambda d: d["chat"].setdefault("generation", {}).update(top_k=-3),
     ["chat.generation: top_k must be an integer >= 0, got -3", EDITED]),
    ("generation temperature huge", lambda d: d["chat"].setdefault("generation", {}).update(temperature=1e308 * 10),
     ["Infinity is not a JSON number"]),
    ("versions numbers", _set("versions/onnx", 1.18), ["versions must map", EDITED]),
    ("quantization", _set("quantization", {"bits": 4}), ["quantization must be null", EDITED]),
    ("source a number", _set("source", 5), ["source must be a path (printable) or null", EDITED]),
    ("features a string", _set("features", "int4"), ["features must be a list of strings", EDITED]),
    ("feature unknown", _set("features", ["int4-weights"]), ["needs features ['int4-weights']", "upgrade mixtrt"]),
    ("format other", _set("format", "onnx"), ["not a mixtrt manifest (format='onnx')"]),
    ("format missing", _set("format", DROP), ["not a mixtrt manifest (format=None)"]),
    ("format_version older", _set("format_version", 1), ["written by an older mixtrt", "export the checkpoint again"]),
    ("format_version newer", _set("format_version", 3), ["written by a newer mixtrt", "upgrade mixtrt"]),
    ("format_version string", _set("format_version", "2"), ["format_version must be an integer, got '2' (str)",
                                                            "the manifest was edited"]),
    ("format_version float", _set("format_version", 2.0), ["format_version must be an integer, got 2.0 (float)"]),
    ("format_version missing", _set("format_version", DROP), ["manifest.json: has no format_version (this one reads 2)",
                                                             "export the checkpoint again"]),
    ("field missing", _set("opsets", DROP), ["missing field 'opsets'", EDITED]),
    ("field unknown", _set("engine", "x.plan"), ["unknown manifest fields ['engine']"]),
    # consistent edits only the graph itself can refute
    ("fp16 everywhere", _fp16, ["past_key_values.0.key is float32", "manifest says float16", EDITED]),
    ("capacity everywhere", _capacity(9), ["past_key_values.0.key is float32 ['batch', 2, 21, 16]",
                                           "['batch', 2, 9, 16]", EDITED]),
    ("outputs reordered", _reorder_outputs, ["graph IO it lists", "in another order", EDITED]),
    ("max_context up", _set("max_context", 100), ["max_context disagrees with the graph's own record", EDITED]),
    ("eos edited", _set("model/eos_token_ids", [5]), ["model disagrees with the graph's own record", EDITED]),
    ("rms_norm_eps edited", _set("model/rms_norm_eps", 1e-3), ["model disagrees with the graph", EDITED]),
    ("windows edited", lambda d: (d["cache"].__setitem__("windows", [4, 4]), d["cache"].__setitem__("window", 4),
                                  d["model"].__setitem__("sliding_window", 4)), ["disagree with the graph", EDITED]),
]


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    return exported["mistral-window"][1]


def _load_all(path: Path) -> None:
    """Everything a user's first call does: the manifest and the files (what Generator.load checks first, so
    most edits stop here, fast), then the graph and the tokenizer."""
    Manifest.load(path)
    Generator.load(path, threads=1)


def _hostile(tmp_path: Path, artifact: Path, edit: Callable[[dict], Any]) -> Path:
    copy = linked_copy(artifact, tmp_path / "art")
    d = json.loads((copy / "manifest.json").read_text())
    edit(d)
    replace_file(copy / "manifest.json", json.dumps(d))
    return copy


@pytest.mark.parametrize("name, edit, culprits", MANIFEST_EDITS, ids=[c[0] for c in MANIFEST_EDITS])
def test_edited_manifest(tmp_path, artifact, name, edit, culprits):
    copy = _hostile(tmp_path, artifact, edit)
    before = tree(tmp_path)
    with pytest.raises(ArtifactError) as e:
        _load_all(copy)
    line = one_line(e.value, *culprits)
    assert "manifest.json" in line or "model.onnx" in line
    if "older" not in name:
        assert "older mixtrt" not in line  # an edit is never excused as an old export
    with pytest.raises(ArtifactError) as e:  # `mixtrt inspect --verify` refuses what loading refuses
        inspect_artifact(copy, verify=True)
    assert one_line(e.value, *culprits) == line
    if any("graph IO it lists" in c for c in culprits):  # the manifest against itself: plain inspect refuses it too
        with pytest.raises(ArtifactError) as e:
            inspect_artifact(copy)
        assert one_line(e.value, *culprits) == line
    assert tree(tmp_path) == before


def test_verify_reads_the_tokenizer_and_chat_record_as_loading_does(tmp_path, artifact):
    """An edited generation eos id past the embeddings passes the manifest's and the graph's checks; loading
    refuses it where it reads the tokenizer: `inspect --verify` refuses it with the same line."""
    copy = _hostile(tmp_path, artifact, lambda d: d["chat"]["generation"].__setitem__("eos_token_ids", [99999]))
    with pytest.raises(ConfigError) as e:
        Generator.load(copy, threads=1)
    line = one_line(e.value, "eos_token_id [99999]", "chat.generation")
    with pytest.raises(ConfigError) as e:
        inspect_artifact(copy, verify=True)
    assert one_line(e.value) == line


def test_verify_reads_the_weight_index(tmp_path, artifact):
    """weights.json rewritten (its hash updated) with a tensor off its alignment: `inspect --verify` reads the index
    as its readers do (the onnxruntime backend does not read it) and refuses it, naming the file and tensor."""
    copy = linked_copy(artifact, tmp_path / "art")
    d = json.loads((copy / "weights.json").read_text())
    norm = next(t for t in d["tensors"] if "norm" in t["name"])  # a small tensor: +1 still ends before the next
    norm["offset"] += 1
    _rehash("weights.json", json.dumps(d).encode())(copy)
    with pytest.raises(ArtifactError) as e:
        inspect_artifact(copy, verify=True)
    one_line(e.value, "weights.json", repr(norm["name"]), "not a multiple of the index's alignment")
    assert inspect_artifact(copy)["model"]  # without --verify: the manifest's own checks only


def test_null_summary_counts(tmp_path, artifact):
    """The manifest takes null for a summary count it lacks: `inspect` shows what it has (no TypeError), and
    `bench`, which needs bytes_per_token or parameters + parameter_bytes to count a step's bytes, refuses in one line
    before it measures anything."""
    from mixtrt.runtime.benchmark import bench

    copy = _hostile(tmp_path, artifact, lambda d: d["summary"].update(parameters=None, parameter_bytes=None,
                                                                     bytes_per_token=None))
    info = inspect_artifact(copy)
    assert info["parameters"] == info["parameter_bytes"] == 0 and info["bytes_per_token"] is None
    with pytest.raises(ArtifactError) as e:
        bench(copy, prompt_tokens=4, new_tokens=3, threads=1)
    one_line(e.value, "manifest.json's summary has neither bytes_per_token nor parameters", "export it again")


def test_an_artifact_from_before_the_triton_backend_names_the_remedy(tmp_path, artifact):
    from mixtrt.runtime.backends import load_backend

    copy = _hostile(tmp_path, artifact, _set("backends", ["onnxruntime"]))
    with pytest.raises(ConfigError) as e:
        load_backend("triton", copy)
    one_line(e.value, "this artifact runs on onnxruntime, not on triton", "export it again")
    # no engine yet: the command that adds one, and what it needs installed
    with pytest.raises(ConfigError) as e:
        load_backend("tensorrt", copy)
    one_line(e.value, "not on tensorrt", f"`mixtrt build {copy}` adds a TensorRT engine",
             "pip install 'mixtrt[tensorrt]'")


def test_a_number_of_thousands_of_digits_is_one_line(tmp_path, artifact):
    """Python refuses to parse integers of more than 4300 digits: the manifest (and a checkpoint's config.json)
    with one is a one-line error naming the file, not a ValueError traceback."""
    copy = linked_copy(artifact, tmp_path / "art")
    text = (copy / "manifest.json").read_text()
    replace_file(copy / "manifest.json", re.sub(r'"max_context": \d+', '"max_context": ' + "9" * 5000, text))
    with pytest.raises(ArtifactError) as e:
        _load_all(copy)
    one_line(e.value, "manifest.json", "a number with more digits than any field takes")


def _nested(path: Path) -> None:
    replace_file(path, "[" * 100_000 + "]" * 100_000)


def _swap_graph(other: Path) -> Callable[[Path], None]:
    """The graph (model.onnx, its weights and their index) replaced by another artifact's, and the manifest's
    hashes and sizes updated to match."""
    def apply(copy: Path) -> None:
        d = json.loads((copy / "manifest.json").read_text())
        for name in ("model.onnx", "model.onnx.data", "weights.json"):
            replace_file(copy / name, (other / name).read_bytes())
            d["files"][name] = {"sha256": sha256_file(copy / name), "bytes": (copy / name).stat().st_size}
        replace_file(copy / "manifest.json", json.dumps(d))
    return apply


def _rehash(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(copy: Path) -> None:
        replace_file(copy / name, data)
        d = json.loads((copy / "manifest.json").read_text())
        d["files"][name] = {"sha256": sha256_file(copy / name), "bytes": len(data)}
        replace_file(copy / "manifest.json", json.dumps(d))
    return apply


def _flip_byte(copy: Path) -> None:
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace_file(copy / "model.onnx", bytes(data))


def _symlink(name: str) -> Callable[[Path], None]:
    def apply(copy: Path) -> None:
        target = copy.parent / f"elsewhere-{name}"
        shutil.copyfile(copy / name, target)
        (copy / name).unlink()
        (copy / name).symlink_to(target)
    return apply


# (name, how the artifact directory is broken, error class, what the one line must name)
FILE_CASES = [
    ("manifest not JSON", lambda c: replace_file(c / "manifest.json", "{"), ArtifactError,
     ["manifest.json", "not valid JSON"]),
    ("manifest NaN", lambda c: replace_file(c / "manifest.json", (c / "manifest.json").read_text()
                                            .replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')),
     ArtifactError, ["manifest.json", "NaN is not a JSON number"]),
    ("manifest not UTF-8", lambda c: replace_file(c / "manifest.json", b"\xff\xfe{}"), ArtifactError,
     ["manifest.json", "not valid JSON"]),
    ("manifest a list", lambda c: replace_file(c / "manifest.json", "[]"), ArtifactError,
     ["manifest.json", "not a mixtrt manifest"]),
    ("manifest nested", lambda c: _nested(c / "manifest.json"), ArtifactError, ["manifest.json", "nested too deeply"]),
    ("manifest a directory", lambda c: ((c / "manifest.json").unlink(), (c / "manifest.json").mkdir()),
     ArtifactError, ["not an artifact directory (no manifest.json)"]),
    ("manifest dangling link", lambda c: ((c / "manifest.json").unlink(),
                                          (c / "manifest.json").symlink_to(c / "gone")),
     ArtifactError, ["not an artifact directory (no manifest.json)"]),
    ("extra file", lambda c: (c / "notes.txt").write_text("x"), ArtifactError, ["files not listed", "notes.txt"]),
    ("extra directory", lambda c: (c / "sub").mkdir(), ArtifactError, ["files not listed", "'sub'"]),
    ("hidden leftover", lambda c: (c / ".model.onnx.swp").write_text("x"), ArtifactError,
     ["files not listed", ".model.onnx.swp"]),
    ("model missing", lambda c: (c / "model.onnx").unlink(), ArtifactError, ["model.onnx: listed", "missing"]),
    ("model a link", _symlink("model.onnx"), ArtifactError, ["model.onnx", "not a regular file"]),
    ("tokenizer a link", _symlink("tokenizer.model"), ArtifactError, ["tokenizer.model", "not a regular file"]),
    ("model truncated", lambda c: replace_file(c / "model.onnx", (c / "model.onnx").read_bytes()[:-10]),
     ArtifactError, ["model.onnx: size", "modified or truncated"]),
    ("model one byte flipped", _flip_byte, ArtifactError, ["model.onnx: sha256 does not match"]),
    ("tokenizer replaced", lambda c: replace_file(c / "tokenizer.model", b"x" * (c / "tokenizer.model").stat().st_size),
     ArtifactError, ["tokenizer.model: sha256 does not match"]),
    ("model not ONNX, hash updated", _rehash("model.onnx", b"not a graph"), ArtifactError,
     ["model.onnx: onnxruntime cannot load the graph"]),
    ("tokenizer garbage, hash updated", _rehash("tokenizer.model", b"garbage"), ConfigError,
     ["tokenizer.model", "not a sentencepiece tokenizer model"]),
]


@pytest.mark.parametrize("name, breaks, cls, culprits", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_broken_artifact_directory(tmp_path, artifact, name, breaks, cls, culprits):
    copy = linked_copy(artifact, tmp_path / "art")
    breaks(copy)
    before = tree(tmp_path)
    with pytest.raises(cls) as e:
        _load_all(copy)
    one_line(e.value, *culprits)
    assert tree(tmp_path) == before


def test_swapped_graph_is_refused(tmp_path, exported):
    """Another artifact's graph with the manifest's hash updated: the graph's own IO and record refute it."""
    for other, culprits in (("mistral-nowindow", ["past_key_values.0.key", "['batch', 2, 128, 16]"]),
                            ("mixtral-window", ["with the graph's own record"])):
        copy = linked_copy(exported["mistral-window"][1], tmp_path / other)
        _swap_graph(exported[other][1])(copy)
        with pytest.raises(ArtifactError) as e:
            _load_all(copy)
        one_line(e.value, *culprits, EDITED)


def test_graph_without_metadata_says_export_again(tmp_path, artifact):
    import onnx

    copy = linked_copy(artifact, tmp_path / "art")
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    assert GRAPH_METADATA in {p.key for p in model.metadata_props}
    del model.metadata_props[:]
    _rehash("model.onnx", model.SerializeToString())(copy)
    with pytest.raises(ArtifactError) as e:
        _load_all(copy)
    one_line(e.value, "model.onnx", "no mixtrt metadata", "export the checkpoint again")


def test_the_untouched_artifact_loads(artifact):
    """The table's artifact is good: each failure above is its one edit."""
    gen = Generator.load(artifact, threads=1)
    assert gen.generate([[1, 2, 3]], max_new_tokens=2)[0].stats.generated_tokens == 2


# ---- property: any JSON value anywhere in the manifest is a Manifest that agrees with itself, or one
# ArtifactError; nothing else ever escapes -------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d[:4]):
            out += _paths(v, (*prefix, i))
    return out


@pytest.fixture(scope="module")
def manifest_dict(artifact) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_anywhere_in_the_manifest(manifest_dict, data):
    d = json.loads(json.dumps(manifest_dict))
    path = data.draw(st.sampled_from(_paths(d)))
    value = data.draw(JSON)
    target = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    try:
        m = Manifest.from_dict(d, source="x/manifest.json")
    except ArtifactError as e:
        one_line(e, "x/manifest.json: ")
        return
    except MixtrtError as e:  # pragma: no cover - the assertion names what escaped
        raise AssertionError(f"{type(e).__name__} instead of ArtifactError: {e}") from None
    assert Manifest.from_dict(m.to_dict()) == m
