"""The streaming export (export/weights_writer.py): the same logits as an export of the model held in memory,
the weights where weights.json says, bad weights refused by name with nothing left behind, progress in
three modes, and (slow) memory that does not grow with the model."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtrt.export import export_onnx, load_model
from mixtrt.export.checkpoint import load_checkpoint
from mixtrt.export.progress import Progress, is_terminal
from mixtrt.runtime.errors import ArtifactError, CheckpointError, ConfigError
from mixtrt.runtime.manifest import Manifest
from mixtrt.runtime.weights import WeightIndex
from tests.checkpoints import make_checkpoint, make_hf_model, mistral_tokenizer_path
from tests.export.test_checkpoint import write_raw
from tests.hostile import one_line, tree

W = 5


def _in_memory_export(ck: Path, out: Path) -> Path:
    """The graph as the exporter wrote it before streaming: the real model traced, torch's optimizer folding
    the weights, everything inside model.onnx."""
    from mixtrt.export.onnx_export import _finish_graph, _trace, resolve_max_context
    from mixtrt.plugins.onnx_common import custom_translation_table
    from mixtrt.runtime.backends import EXPORT_BACKENDS, window_slack
    from mixtrt.runtime.cache import CachePlan

    model = load_model(ck)
    args = model.args
    plan = CachePlan.for_model(args, resolve_max_context(args, None), "float32", slack=window_slack(EXPORT_BACKENDS))
    inputs, outputs = Manifest.graph_io(args, plan.capacity, "fp32")
    program = _trace(model, args, plan.capacity, custom_translation_table(), [t.name for t in inputs],
                     [t.name for t in outputs], optimize=True)
    out.mkdir()
    program.save(str(out / "model.onnx"))
    _finish_graph(out / "model.onnx", {})
    return out / "model.onnx"


def _run(graph: Path, steps: list[np.ndarray], kv: tuple[int, int, int]) -> list[np.ndarray]:
    """Logits of every step (all positions), the presents fed back as the next step's past."""
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past = {n: np.zeros((1, *kv), np.float32) for n in names[3:]}
    total, out = 0, []
    for ids in steps:
        total += ids.shape[1]
        feed = {"input_ids": ids, "total_lengths": np.array([total], np.int32),
                "logit_positions": np.arange(ids.shape[1], dtype=np.int64)[None], **past}
        logits, *presents = sess.run(None, feed)
        past = dict(zip(names[3:], presents, strict=True))
        out.append(logits)
    return out


def _checkpoint(tmp: Path, layout: str) -> Path:
    ck = tmp / "ck"
    if layout == "mistral-sharded":
        make_checkpoint(ck, "mistral", sliding_window=W, max_shard_size="300KB")
        assert len(list(ck.glob("model-*.safetensors"))) > 1
    elif layout == "mixtral-fused":  # transformers 5 names: one gate_up_proj [E, 2I, H] per layer
        make_checkpoint(ck, "mixtral", sliding_window=W)
        hf = make_hf_model("mixtral", sliding_window=W)
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, ck / "model.safetensors")
        assert any(k.endswith("gate_up_proj") for k in load_file(ck / "model.safetensors"))
    else:  # raw Mistral .pth: interleaved rope rows, experts as w1/w3/w2
        hf = make_hf_model("mixtral", sliding_window=W, rope_theta=10000.0)
        write_raw(hf, ck, "pth")
        shutil.copy(mistral_tokenizer_path(), ck / "tokenizer.model")
    return ck


@pytest.mark.parametrize("layout", ["mistral-sharded", "mixtral-fused", "mixtral-raw-pth"])
def test_streaming_export_equals_in_memory_export(tmp_path, layout):
    """Logit for logit (bitwise) the graph of the model held in memory, through a prefill past the window
    and single-token decodes; and within 1e-4 of the PyTorch reference (relative to its largest logit)."""
    ck = _checkpoint(tmp_path, layout)
    art = export_onnx(ck, tmp_path / "art", progress=None)
    m = Manifest.load(art)
    kv = (m.args.num_key_value_heads, m.cache.capacity, m.args.head_dim)
    ids = torch.randint(3, 32000, (1, 12 + 4), generator=torch.Generator().manual_seed(1))
    steps = [ids[:, :12].numpy()] + [ids[:, t:t + 1].numpy() for t in range(12, 16)]
    streamed = _run(art / "model.onnx", steps, kv)
    in_memory = _run(_in_memory_export(ck, tmp_path / "mem"), steps, kv)
    for a, b in zip(streamed, in_memory, strict=True):
        assert np.array_equal(a, b)
    with torch.no_grad():
        want = load_model(ck)(ids).numpy()
    assert np.abs(np.concatenate(streamed, axis=1) - want).max() / np.abs(want).max() <= 1e-4


def test_weight_index_round_trip_and_alignment(exported):
    """Every weight memory-mapped by name from weights.json equals the checkpoint's tensor; tensors start
    aligned (a MoE layer's experts back to back, their stack aligned) and the padding is zero."""
    ck, art = exported["mixtral-window"]
    index = WeightIndex.read(art)
    _, weights = load_checkpoint(ck)
    for name, tensor in weights.items():
        assert np.array_equal(index.weight(name), tensor.numpy()), name
    E = Manifest.load(art).args.moe.num_experts
    stack = index.stack("model.layers.1.feed_forward.fc1")
    assert stack.shape == (E, *weights["model.layers.1.feed_forward.fc1.0"].shape)
    for e in range(E):
        assert np.array_equal(stack[e], weights[f"model.layers.1.feed_forward.fc1.{e}"].numpy())
    assert index.tensors["model.layers.0.attention.wq.weight.T"].layout == "transposed"
    stacked = {m for s in index.stacks.values() for m in s.members[1:]}
    entries = sorted(index.tensors.values(), key=lambda e: e.offset)
    assert all(e.offset % index.alignment == 0 for e in entries if e.name not in stacked)
    assert all(s.offset % index.alignment == 0 for s in index.stacks.values())
    raw = (art / "model.onnx.data").read_bytes()
    used = np.zeros(len(raw), bool)
    for e in entries:
        used[e.offset:e.offset + e.nbytes] = True
    assert not any(np.frombuffer(raw, np.uint8)[~used])  # padding is zero
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    assert {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == set(index.tensors)


def test_weight_index_of_a_tied_model_names_the_table_for_the_lm_head(tmp_path):
    """A tied model stores the table and its transpose, no lm_head: asking for lm_head.weight says where it is."""
    art = export_onnx(make_checkpoint(tmp_path / "ck", "mistral", tie_word_embeddings=True), tmp_path / "art",
                      progress=None)
    index = WeightIndex.read(art)
    with pytest.raises(KeyError, match=r"'lm_head.weight' is tied to 'model.embed_tokens.weight' in .*weights.json: "
                                       r"read weight\('model.embed_tokens.weight'\)"):
        index.weight("lm_head.weight")
    assert index.weight("model.embed_tokens.weight").shape[0] == Manifest.read(art).args.vocab_size


def test_weight_index_tampering_is_refused(tmp_path, exported):
    _, art = exported["mistral-window"]
    d = json.loads((art / "weights.json").read_text())
    d["tensors"][1]["offset"] = d["tensors"][0]["offset"]
    with pytest.raises(ArtifactError, match="overlap"):
        WeightIndex.from_dict(d, art, "weights.json")
    d = json.loads((art / "weights.json").read_text())
    d["tensors"][-1]["offset"] = (art / "model.onnx.data").stat().st_size
    with pytest.raises(ArtifactError, match="past the end"):
        WeightIndex.from_dict(d, art, "weights.json")
    manifest = json.loads((art / "manifest.json").read_text())
    for edit, message in ((lambda m: m.update(weight_index="tokenizer.json"), "weight_index"),
                          (lambda m: m.update(weight_index="model.onnx"), "must be null or 'weights.json'"),
                          (lambda m: m["features"].remove("weight-index"), "go together")):
        m = json.loads(json.dumps(manifest))
        edit(m)
        with pytest.raises(ArtifactError, match=message):
            Manifest.from_dict(m)
    old = {k: v for k, v in manifest.items() if k != "weight_index"}  # an export from before the index
    old["features"] = [f for f in old["features"] if f != "weight-index"]
    assert Manifest.from_dict(old).weight_index is None


@pytest.mark.parametrize("precision, value, problem", [("fp32", float("nan"), "NaN or infinite"),
                                                      ("fp16", 1e6, "beyond the float16 range")])
def test_bad_weight_is_refused_by_name_and_leaves_nothing(tmp_path, precision, value, problem):
    ck = make_checkpoint(tmp_path / "ck", "mistral", sliding_window=W)
    sd = load_file(ck / "model.safetensors")
    sd["model.layers.1.self_attn.k_proj.weight"][3, 4] = value
    save_file(sd, ck / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    before = tree(out)
    with pytest.raises(CheckpointError) as e:
        export_onnx(ck, out / "art", precision=precision, progress=None)
    one_line(e.value, "'model.layers.1.self_attn.k_proj.weight'", "model.safetensors", problem)
    assert tree(out) == before


# ---- progress ----------------------------------------------------------------------------------------

def test_progress_modes(capsys):
    quiet = Progress(None, bar=True)
    quiet("stage")
    with quiet.bytes(100, "writing") as tick:
        tick(100)
    assert capsys.readouterr() == ("", "")
    lines: list[str] = []
    plain = Progress(lines.append, bar=False)
    with plain.bytes(100, "writing") as tick:
        for _ in range(10):
            tick(10)
    assert [line.split(" (")[0] for line in lines] == [f"  writing: {p}%" for p in (25, 50, 75, 100)]
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert is_terminal(terminal)
        bar = Progress(print, stream=terminal)  # bar=None: decided by the stream
        assert bar.bar
        with bar.bytes(3 << 20, "writing") as tick:
            for _ in range(3):
                tick(1 << 20)
        terminal.flush()
        shown = b""
        while select.select([master], [], [], 1.0)[0]:
            shown += os.read(master, 1 << 16)
    os.close(master)
    text = shown.decode()
    assert "writing" in text and "B/s" in text and "\r" in text, text


def test_cli_quiet_prints_nothing(exported, tmp_path):
    ck, _ = exported["mistral-window"]
    r = subprocess.run([sys.executable, "-m", "mixtrt", "export", str(ck), "--out", str(tmp_path / "art"),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == ("", "") and (tmp_path / "art" / "weights.json").is_file()


# ---- memory ----------------------------------------------------------------------------------------

# VmHWM, not getrusage's ru_maxrss: that one keeps the high-water mark of the forked parent (pytest) across exec.
_PEAK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mixtrt.export import export_onnx
    export_onnx(sys.argv[1], sys.argv[2], progress=None)
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) * 1024)
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_layer_count(tmp_path):
    """Exporting 4 and then 8 layers of ~48 MB each: the peak RSS grows by far less than the 190 MB of
    weights added (a constant + a few tensors), and stays under the checkpoint's size."""
    peaks, sizes = [], []
    for layers in (4, 8):
        ck = make_checkpoint(tmp_path / f"ck{layers}", "mixtral", sliding_window=64, hidden_size=512,
                             intermediate_size=1792, num_hidden_layers=layers, num_attention_heads=8,
                             num_key_value_heads=2, initializer_range=0.02)
        sizes.append(sum(f.stat().st_size for f in ck.glob("*.safetensors")))
        r = subprocess.run([sys.executable, "-c", _PEAK, str(ck), str(tmp_path / f"art{layers}")],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        peaks.append(int(r.stdout.split()[-1]))
    added = sizes[1] - sizes[0]
    assert peaks[1] - peaks[0] < 0.25 * added, (peaks, sizes)
    assert peaks[1] < peaks[0] + sizes[1], (peaks, sizes)


def test_transform_hook_sees_each_weight_and_adds_tensors(exported, tmp_path):
    """The per-tensor hook (where INT4 quantization plugs in): called once per weight with the array as it
    would be written; what it returns is written and indexed, and the graph still runs."""
    ck, _ = exported["mistral-window"]
    seen: list[str] = []

    def absmax(name: str, a: np.ndarray) -> list[tuple[str, np.ndarray]]:
        seen.append(name)
        return [(name, a), (f"{name}.absmax", np.abs(a).max(axis=0))] if name.endswith(".T") else [(name, a)]

    art = export_onnx(ck, tmp_path / "art", progress=None, transform=absmax)
    index = WeightIndex.read(art)
    assert len(seen) == len(set(seen)) == sum(e.of is not None for e in index.tensors.values()) - sum(
        n.endswith(".absmax") for n in index.tensors)
    wq = index.weight("model.layers.0.attention.wq.weight")  # [N*D, H]; stored transposed [H, N*D]
    assert np.array_equal(index.array("model.layers.0.attention.wq.weight.T.absmax"), np.abs(wq).max(axis=1))
    from mixtrt.runtime.backends.onnxruntime import OrtBackend

    backend = OrtBackend.load(art)
    assert np.isfinite(backend.step(backend.new_cache(1), np.arange(3, 9)[None])).all()


def test_a_hook_that_makes_experts_unalike_is_refused(exported, tmp_path):
    """A MoE layer's experts are written back to back as one stack: a hook that changes one expert's shape would
    leave tensors outside any stack unaligned, so the export fails naming the stack and leaves nothing."""
    ck, _ = exported["mixtral-window"]

    def grow(name: str, a: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return [(name, np.concatenate([a, a]) if name.endswith("fc1.1") else a)]

    with pytest.raises(ConfigError, match=r"feed_forward\.fc1: its tensors differ in dtype, shape or quantization "):
        export_onnx(ck, tmp_path / "art", progress=None, transform=grow)
    assert not (tmp_path / "art").exists()


def test_library_export_leaves_stdout_and_the_hosts_logging_alone(exported, tmp_path, capsys):
    """export_onnx called as a library with its defaults: progress on stderr only (a host's stdout may carry JSON),
    and the torch.onnx logger it quiets during the export is put back as the host had it."""
    import logging

    from mixtrt.export import export_onnx

    ck, _ = exported["mistral-window"]
    logger = logging.getLogger("torch.onnx")
    logger.setLevel(logging.INFO)
    try:
        export_onnx(ck, tmp_path / "art", progress_bar=False)
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(logging.NOTSET)
    out, err = capsys.readouterr()
    assert out == "" and "wrote" in err
