"""--method gptq: the rounding against an independent plain implementation of the paper's algorithm, what it
gains over round to nearest (one layer, and the whole model's logits on tiny Mistral and Mixtral checkpoints),
the manifest's record, and the writer's check that it writes the weight calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtrt.export import export_onnx
from mixtrt.export.gptq import factor, gptq, hessian
from mixtrt.export.quantize import Int4Options, rtn
from mixtrt.plugins.int4 import int4_values, pack_nibbles
from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.errors import ArtifactError, ConfigError
from mixtrt.runtime.manifest import Manifest
from mixtrt.runtime.quantization import Quantization
from tests.checkpoints import make_checkpoint

TEXT = ("It was a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
        "the rightful property of some one or other of their daughters. ") * 3


def _correlated(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs [n, k] as a layer's activations are: channels of unequal size, mostly in a subspace of rank k/4
    (the same subspace for every seed: draws of one distribution)."""
    basis = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k // 4, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)
    return z * torch.linspace(0.2, 3.0, k)


def _plain_gptq(w: torch.Tensor, h: torch.Tensor, block: int, damp: float = 0.01):
    """The paper's Algorithm 1 without lazy batches, in float64: every column's error updates the whole rest of
    the matrix at once; a block's scale from its weights as updated when its first column comes."""
    W = w.double().clone()
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(len(h), dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    Q = torch.zeros_like(W)
    S = torch.zeros(W.shape[0], W.shape[1] // block, dtype=torch.float64)
    for k in range(W.shape[1]):
        if k % block == 0:
            part = W[:, k:k + block]
            S[:, k // block] = part.gather(1, part.abs().argmax(1, keepdim=True))[:, 0] / -8
        s = S[:, k // block]
        Q[:, k] = torch.clamp(torch.round(W[:, k] / s), -8, 7)
        err = (W[:, k] - Q[:, k] * s) / U[k, k]
        W[:, k:] -= err[:, None] * U[k, k:][None, :]
    return Q.to(torch.int8).numpy(), S.float().numpy()


@pytest.mark.parametrize("n_out, k, block", [(24, 96, 32), (7, 256, 64), (16, 160, 32)])
def test_gptq_equals_the_plain_algorithm(n_out, k, block):
    """Lazy batches (LAZY columns, then the rest of the matrix) change nothing but float rounding: the integers
    and scales equal the plain column-by-column algorithm's (K = 160: a last batch shorter than LAZY)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n_out, k, generator=g) * 0.05
    h = hessian(_correlated(4 * k, k))
    q, s = gptq(w, factor(h.clone()), block)
    q_ref, s_ref = _plain_gptq(w, h, block)
    assert (q == q_ref).mean() >= 0.995  # a rounding tie may fall the other way in float32
    np.testing.assert_allclose(s, s_ref, rtol=1e-3, atol=1e-7)
    assert q.min() >= -8 and q.max() <= 7


def test_gptq_without_a_hessian_is_round_to_nearest():
    """No calibration rows (h None): the integers and scales are rtn's exactly, packed the same."""
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
    q, s = gptq(w, None, 32)
    qweight, scales = rtn("x", w.numpy(), 32)
    np.testing.assert_array_equal(pack_nibbles(q), qweight)
    np.testing.assert_array_equal(int4_values(qweight), q)
    np.testing.assert_array_equal(s, scales)


def test_gptq_lowers_the_layer_output_error():
    """On correlated inputs, GPTQ's rounding moves the layer's outputs on those inputs far less than rounding to
    nearest, and on other inputs of the same kind too (it does not only fit the calibration rows)."""
    k, block = 128, 32
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(2)) * 0.05
    x, held_out = _correlated(1024, k, seed=3), _correlated(1024, k, seed=4)

    def error(q: np.ndarray, s: np.ndarray, x: torch.Tensor) -> float:
        wq = torch.from_numpy((q.reshape(*s.shape, block) * s[..., None]).reshape(q.shape).astype(np.float32))
        return float(((x @ w.T) - (x @ wq.T)).pow(2).mean())

    q_rtn, s_rtn = gptq(w, None, block)
    q_gptq, s_gptq = gptq(w, factor(hessian(x)), block)
    assert error(q_gptq, s_gptq, x) < 0.5 * error(q_rtn, s_rtn, x)  # 0.31 when written
    assert error(q_gptq, s_gptq, held_out) < 0.5 * error(q_rtn, s_rtn, held_out)


def test_gptq_keeps_channels_the_calibration_never_excites():
    """An input channel that is zero on every calibration row keeps its weights, rounded to nearest (the
    paper's code zeroes them; an expert few tokens reach would lose weights), and no NaN comes of the zero
    diagonal."""
    k, block = 64, 32
    w = torch.randn(8, k, generator=torch.Generator().manual_seed(5)) * 0.05
    x = _correlated(512, k)
    x[:, 10] = 0
    q, s = gptq(w, factor(hessian(x)), block)
    assert np.isfinite(s).all()
    wq = q[:, 10] * s[:, 0]
    assert np.abs(wq).max() > 0
    assert np.abs(wq - w[:, 10].numpy()).max() <= np.abs(s[:, 0]).max() * 0.5 + 1e-6


def test_gptq_refuses_inputs_that_are_not_finite():
    h = hessian(_correlated(64, 32))
    h[3, 3] = float("inf")
    with pytest.raises(ConfigError, match="layers.0.attention.wq are not finite"):
        factor(h, "layers.0.attention.wq")


@pytest.fixture(scope="module")
def gptq_models(tmp_path_factory):
    """name -> (checkpoint, fp32, rtn, gptq artifacts) of tiny checkpoints with initializer_range 0.05 (the
    shared ones' 0.5 makes every layer chaotic), calibrated on TEXT (few tokens: some experts get too few)."""
    root = tmp_path_factory.mktemp("gptq")
    text = root / "calibration.txt"
    text.write_text(TEXT)
    out = {}
    for name, family in (("mistral", "mistral"), ("mixtral", "mixtral")):
        ck = make_checkpoint(root / f"{name}-ck", family, sliding_window=8, max_position_embeddings=128,
                             initializer_range=0.05)
        out[name] = (ck, export_onnx(ck, root / f"{name}-fp32", progress=None),
                     export_onnx(ck, root / f"{name}-rtn", precision="int4", progress=None,
                                 int4=Int4Options(int8=())),
                     export_onnx(ck, root / f"{name}-gptq", precision="int4", progress=None,
                                 int4=Int4Options(method="gptq", int8=(), calibration=text)))
    return out, text


def _logits(art, ids):
    backend = OrtBackend.load(art, threads=1)
    return backend.step(backend.new_cache(1), np.asarray([ids], np.int64))[0]


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_gptq_artifact_is_closer_to_fp32_than_rtn(gptq_models, name):
    """Whole model, every linear and the lm_head in INT4: the gptq artifact's logits on the calibration text are
    closer to the fp32 artifact's than rtn's (by far: GPTQ fits its calibration text), and on another text too
    (by less: a calibration text of ~100 tokens here)."""
    from mixtrt.runtime.generation import Generator

    models, _ = gptq_models
    _, fp32, rtn_art, gptq_art = models[name]
    tok = Generator.load(fp32).tokenizer
    # on the calibration text 0.46 / 0.53 of rtn's squared error when written, on the other 0.88 / 0.76
    for text, bound in ((TEXT[:400], 0.7), ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and "
                                          "happy disposition, seemed to unite some of the best blessings of "
                                          "existence.", 1.0)):
        ids = tok.encode(text)[:100]
        ref = _logits(fp32, ids)
        err_rtn = float(((_logits(rtn_art, ids) - ref) ** 2).mean())
        err_gptq = float(((_logits(gptq_art, ids) - ref) ** 2).mean())
        assert err_gptq < bound * err_rtn, (text[:20], err_gptq, err_rtn)


def test_gptq_manifest_record_and_inspect(gptq_models, capsys):
    """The record says gptq, the calibration text and its tokens, and which experts were rounded to nearest for
    want of calibration tokens; inspect shows them; no file of the pass is left in the artifact."""
    from mixtrt.cli import main
    from mixtrt.runtime.generation import Generator

    models, text = gptq_models
    art = models["mixtral"][3]
    q = json.loads((art / "manifest.json").read_text())["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["source"] == str(text)
    total = len(Generator.load(models["mixtral"][1]).tokenizer.encode(TEXT))  # read to its end (in 128-position pieces)
    assert 128 < total and total - 2 < q["calibration"]["tokens"] <= total
    nearest = q["calibration"].get("nearest", [])
    assert all(".feed_forward.fc" in n for n in nearest)
    assert Manifest.load(art).quantization.calibration == q["calibration"]
    assert sorted(p.name for p in art.iterdir()) == sorted(
        p.name for p in models["mixtral"][2].iterdir())  # as an rtn artifact: no .gptq folder
    assert main(["inspect", str(art)]) == 0
    shown = capsys.readouterr().out
    assert "int4 gptq" in shown and str(text) in shown
    if nearest:
        assert "rounded to nearest (too few calibration tokens reached them)" in shown


def test_gptq_record_fields_are_checked():
    d = Quantization(method="gptq", block_size=32, calibration={"source": "x.txt", "tokens": 64,
                                                                 "nearest": ["layers.0.feed_forward.fc1.3"]}).to_dict()
    assert Quantization.from_dict(d).calibration["nearest"] == ["layers.0.feed_forward.fc1.3"]
    for bad in ({"source": "x.txt", "tokens": 64, "nearest": "fc1"}, {"source": "x.txt", "tokens": 64, "other": 1}):
        with pytest.raises(ArtifactError, match="quantization.calibration"):
            Quantization.from_dict({**d, "calibration": bad})


def test_gptq_refuses_a_weight_changed_after_calibration(gptq_models, tmp_path):
    """A transform hook that changes one element of a weight the pass calibrated: one error naming the tensor,
    nothing left."""
    models, text = gptq_models
    ck = models["mistral"][0]

    def double_wq(name, array):
        if "layers.1.attention.wq" in name:
            array = array.copy()
            array[3, 5] *= 2
        return [(name, array)]

    out = tmp_path / "art"
    with pytest.raises(ConfigError, match="layers.1.attention.wq: the weight written is not the one calibrated"):
        export_onnx(ck, out, precision="int4", progress=None, transform=double_wq,
                    int4=Int4Options(method="gptq", calibration=text))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gptq_refuses_a_checkpoint_weight_that_is_not_finite(tmp_path):
    """A NaN in a weight is named (tensor and file) before the calibration works on it, as the writer names it."""
    from safetensors.torch import load_file, save_file

    from mixtrt.runtime.errors import CheckpointError

    ck = make_checkpoint(tmp_path / "ck", "mistral", max_position_embeddings=64)
    [shard] = ck.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_proj.weight"][2, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="q_proj.weight' of model.safetensors holds NaN"):
        export_onnx(ck, tmp_path / "art", precision="int4", progress=None, int4=Int4Options(method="gptq"))
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_gptq_tied_embeddings_round_the_lm_head(tmp_path):
    """A checkpoint with a tied table and the lm_head in INT4: the pass reads the table as the lm_head, and the
    artifact generates."""
    from mixtrt.runtime.generation import Generator

    ck = make_checkpoint(tmp_path / "ck", "mistral", tie_word_embeddings=True, initializer_range=0.05,
                         max_position_embeddings=64)
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    art = export_onnx(ck, tmp_path / "art", precision="int4", progress=None,
                      int4=Int4Options(method="gptq", int8=(), calibration=text))
    assert "lm_head" not in json.loads((art / "manifest.json").read_text())["quantization"]["float"]
    [out] = Generator.load(art).generate([[1, 5, 6, 7]], max_new_tokens=4, do_sample=False)
    assert len(out.token_ids) == 4


def test_cli_gptq_and_calibration_without_a_method(gptq_models, tmp_path, capsys):
    from mixtrt.cli import main

    models, text = gptq_models
    ck = models["mistral"][0]
    assert main(["export", str(ck), "--precision", "int4", "--method", "gptq", "--calibration", str(text),
                 "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["quantization"]["method"] == "gptq"
    assert main(["export", str(ck), "--precision", "int4", "--calibration", str(text),
                 "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "--calibration needs a calibrated --method (awq or gptq)" in capsys.readouterr().err


@pytest.mark.slow  # ~15 s: two gptq exports
def test_calibration_from_stdin_is_the_files_calibration(gptq_models, tmp_path, monkeypatch):
    """`--calibration -` reads the text from stdin (as `perplexity --text -`): the same weights as from its file,
    recorded as "stdin"."""
    import io

    from mixtrt.cli import main

    models, text = gptq_models
    ck = models["mistral"][0]
    common = ["export", str(ck), "--precision", "int4", "--method", "gptq", "--quiet"]
    assert main([*common, "--calibration", str(text), "--out", str(tmp_path / "file")]) == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(Path(text).read_bytes()), encoding="utf-8"))
    assert main([*common, "--calibration", "-", "--out", str(tmp_path / "stdin")]) == 0
    file, stdin = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("file", "stdin"))
    assert stdin["quantization"]["calibration"]["source"] == "stdin"
    assert stdin["quantization"]["calibration"]["tokens"] == file["quantization"]["calibration"]["tokens"]
    assert (tmp_path / "stdin" / "model.onnx.data").read_bytes() == (tmp_path / "file" / "model.onnx.data").read_bytes()
