"""manifest.json: format versions, features, tampering, the exact file list."""

from __future__ import annotations

import json
import shutil

import pytest

from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.errors import ArtifactError, MixtrtWarning
from mixtrt.runtime.manifest import Manifest


def _copy(tmp_path, exported, name: str = "mistral-window"):
    """A copy of a shared artifact (tests must not edit those) and its manifest as a dict."""
    _, art = exported[name]
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def test_artifact_from_before_logit_positions_is_refused(tmp_path, exported):
    old, manifest = _copy(tmp_path, exported, "mixtral-window")
    manifest["inputs"] = [t for t in manifest["inputs"] if t["name"] != "logit_positions"]
    manifest["format_version"] = 1  # what mixtrt 0.2 wrote
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 1 was written by an older mixtrt.*export the checkpoint "
                                            "again"):
        OrtBackend.load(old)


def test_edited_graph_io_is_refused_as_tampered(tmp_path, exported):
    edited, manifest = _copy(tmp_path, exported, "mixtral-window")
    manifest["inputs"] = [t for t in manifest["inputs"] if t["name"] != "logit_positions"]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"missing \['logit_positions'\]\); the manifest was edited"):
        OrtBackend.load(edited)


def test_tampered_model_detected_at_load(tmp_path, exported):
    copy, _ = _copy(tmp_path, exported)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        OrtBackend.load(copy)
    (copy / "model.onnx").write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match="size .* does not match"):
        OrtBackend.load(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        OrtBackend.load(copy)


def test_manifest_version_and_missing_dir_errors(tmp_path, exported):
    copy, d = _copy(tmp_path, exported)
    d["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="format_version 99"):
        Manifest.load(copy)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Manifest.load(tmp_path)
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        Manifest.load(tmp_path / "nope")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(features=["int4-weights"]), r"needs features \['int4-weights'\].*upgrade mixtrt"),
    (lambda d: d.update(extra_field=1), r"unknown manifest fields \['extra_field'\]"),
    (lambda d: d.update(files={}), "files does not list model.onnx"),
    (lambda d: d.update(precision="fp16"), "cache.dtype float32 does not match precision fp16"),
    (lambda d: d["cache"].update(layout="linear"), "capacity|window"),
    (lambda d: d["cache"].update(capacity=7), "graph IO it lists does not match"),
    (lambda d: d.update(max_context="128"), "max_context must be a positive integer"),
    (lambda d: d.pop("model"), "missing field 'model'"),
    (lambda d: d.update(files={"model.onnx": "x"}), "files must map"),
    (lambda d: d.update(format_version=True), r"format_version must be an integer, got True \(bool\): the manifest "
                                              "was edited"),
    (lambda d: d.update(format_version="2"), r"format_version must be an integer, got '2' \(str\)"),
    (lambda d: d.update(format_version=2.0), r"format_version must be an integer, got 2.0 \(float\)"),
    (lambda d: d.update(format_version=None), r"format_version must be an integer, got None"),
    # a record's field this mixtrt does not know: a newer mixtrt's, said as such (it was "malformed ... damaged")
    (lambda d: d["chat"]["generation"].update(top_n_sigma=1.0),
     r"chat.generation: unknown fields \['top_n_sigma'\] \(written by a newer mixtrt, or edited\); upgrade mixtrt"),
    (lambda d: d["chat"].update(reasoning="think"), r"unknown fields \['reasoning'\].*upgrade mixtrt"),
])
def test_edited_manifests_are_refused(tmp_path, exported, edit, match):
    copy, d = _copy(tmp_path, exported)
    edit(d)
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=match):
        OrtBackend.load(copy)


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{", "\xff"])
def test_manifest_that_is_not_an_object_is_one_line(tmp_path, exported, text):
    copy, _ = _copy(tmp_path, exported)
    (copy / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match="manifest.json: not (a mixtrt manifest|valid JSON)") as e:
        Manifest.load(copy)
    assert "\n" not in str(e.value)


def test_an_artifact_holds_exactly_the_listed_files(tmp_path, exported):
    from mixtrt.runtime.manifest import is_artifact

    copy, _ = _copy(tmp_path, exported)
    assert is_artifact(copy)
    (copy / "notes.txt").write_text("mine")
    assert not is_artifact(copy)
    with pytest.raises(ArtifactError, match=r"files not listed in manifest.json: \['notes.txt'\]"):
        Manifest.load(copy)
    (copy / "notes.txt").unlink()
    (copy / "tokenizer.model").unlink()
    (copy / "tokenizer.model").symlink_to(copy / "model.onnx")
    assert not is_artifact(copy)
    with pytest.raises(ArtifactError, match="tokenizer.model: listed in manifest.json but missing"):
        Manifest.load(copy)


def test_manifest_round_trip_and_summary(exported):
    _, art = exported["mixtral-window"]
    m = Manifest.load(art)
    assert Manifest.from_dict(m.to_dict()) == m
    assert m.backends == ("onnxruntime", "triton") and m.features == ("weight-index",) and m.format_version == 2
    assert m.summary["ops"]["mixtrt::MoE"] == 2 and m.summary["parameters"] > 0


def test_a_generation_default_its_exporter_did_not_use_is_named(tmp_path, exported):
    """An artifact whose exporter listed min_p as not used (a mixtrt before min_p): the value is not in its record,
    so this mixtrt cannot apply it; loading says so and to export again (it ran without it, silently)."""
    copy, d = _copy(tmp_path, exported)
    d["chat"]["generation"]["ignored"] = ["min_p", "typical_p"]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.warns(MixtrtWarning, match=r"generation_config.json sets min_p, which the mixtrt that exported this "
                                           "artifact did not use and this one would: export the checkpoint again"):
        Manifest.load(copy, verify=False)
