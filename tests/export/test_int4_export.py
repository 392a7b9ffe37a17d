"""--precision int4 end to end: tiny Mistral and Mixtral artifacts (window shorter than the prompt) against the
reference model on the dequantized weights and against the fp32 artifact; the manifest's record; the CLI."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from mixtrt.export import export_onnx, load_model
from mixtrt.export.checkpoint import load_checkpoint
from mixtrt.export.model import KVCache as TorchCache
from mixtrt.export.quantize import INT8_BLOCK, INT8_DEFAULT, INT8_DEFAULT_MOE, Int4Options, block_for, kept, rtn
from mixtrt.plugins.int4 import pack_int8, unpack_int4
from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.errors import ArtifactError, ConfigError, MixtrtWarning
from mixtrt.runtime.generation import GenerationConfig, Generator
from mixtrt.runtime.manifest import Manifest
from tests.checkpoints import EXPORT_W as W
from tests.checkpoints import make_checkpoint

FAMILIES = ["mistral-window", "mixtral-window"]
BLOCK = 64  # hidden 64 takes it; intermediate 96 does not: 32 for those tensors (recorded)
DEQ_RTOL = 1e-4  # accuracy level 0 vs the reference on the dequantized weights, relative to max|ref|


@pytest.fixture(scope="module")
def int4_artifacts(exported, tmp_path_factory):
    """name -> (checkpoint, int4 artifact at accuracy level 0, block 64) of the shared tiny checkpoints."""
    root = tmp_path_factory.mktemp("int4")
    return {name: (exported[name][0], export_onnx(exported[name][0], root / name, precision="int4", progress=None,
                                                  int4=Int4Options(block_size=BLOCK, accuracy_level=0)))
            for name in FAMILIES}


@pytest.fixture(scope="module")
def realistic_pairs(tmp_path_factory):
    """name -> (fp32 artifact, int4 artifact with the defaults) of tiny checkpoints with initializer_range 0.05:
    the 0.5 of the shared ones makes every layer chaotic, so any rounding changes the logits completely."""
    root = tmp_path_factory.mktemp("int4-vs-fp32")
    out = {}
    for name, family in (("mistral-window", "mistral"), ("mixtral-window", "mixtral")):
        ck = make_checkpoint(root / f"{name}-ck", family, sliding_window=W, max_position_embeddings=64,
                             initializer_range=0.05)
        out[name] = (export_onnx(ck, root / f"{name}-fp32", progress=None),
                     export_onnx(ck, root / f"{name}-int4", precision="int4", progress=None))
    return out


def _dequantized_reference(ck):
    """The reference model with every weight the exporter quantizes replaced by its int4 round trip."""
    model = load_model(ck)
    int8 = INT8_DEFAULT_MOE if model.args.moe is not None else INT8_DEFAULT  # the defaults per model kind
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.endswith("gate.weight"):
                b = block_for(p.shape[1], BLOCK)
                if kept(name.removesuffix(".weight").removeprefix("model."), int8):  # INT8: blocks of up to 256
                    b = block_for(p.shape[1], INT8_BLOCK)
                    q, s = pack_int8(p.numpy(), b)
                    p.copy_(torch.from_numpy((q.reshape(*s.shape, b) * s[..., None]).reshape(p.shape)))
                else:
                    p.copy_(torch.from_numpy(unpack_int4(*rtn(name, p.numpy(), b))))
    return model


def _logits(backend, ids, steps):
    cache, out, pos = backend.new_cache(1), [], 0
    for s in steps:
        out.append(backend.step(cache, ids[:, pos:pos + s]))
        pos += s
    return np.concatenate(out, axis=1)


STEPS = [12] + [1] * (3 * W) + [4]  # prefill past the window, 3W decodes, a multi-token step


@pytest.mark.parametrize("name", FAMILIES)
def test_int4_artifact_equals_reference_on_dequantized_weights(int4_artifacts, name):
    """Every quantized tensor (q/k/v/o, MLP or experts in INT4, embedding and lm_head in INT8) in the right layout:
    the graph at accuracy level 0 computes the reference model on the dequantized weights (traps: tests/plugins)."""
    ck, a0 = int4_artifacts[name]
    ids = torch.randint(3, 32000, (1, sum(STEPS)), generator=torch.Generator().manual_seed(1))
    got = _logits(OrtBackend.load(a0, threads=2), ids.numpy(), STEPS)
    model, cache, want, pos = _dequantized_reference(ck), None, [], 0
    cache = TorchCache(model.args, 1, capacity=OrtBackend.load(a0).capacity)
    with torch.no_grad():
        for s in STEPS:
            want.append(model(ids[:, pos:pos + s], cache=cache).numpy())
            pos += s
    ref = np.concatenate(want, axis=1)
    assert np.abs(got - ref).max() <= DEQ_RTOL * np.abs(ref).max()


# Measured (block 32, accuracy level 4, initializer_range 0.05, 31 positions x 32000 logits): max|int4 - fp32| /
# max|fp32| 0.27 (mistral), 0.28 (mixtral); rms 0.046 / 0.050 of max|fp32|: RTN int4 of random Gaussian weights,
# ~10% rms error per matrix. Bounds with headroom:
FP32_MAX_REL, FP32_RMS_REL = 0.45, 0.08


@pytest.mark.parametrize("name", FAMILIES)
def test_int4_logits_close_to_fp32_and_greedy_through_3w(realistic_pairs, name):
    fp32, int4 = realistic_pairs[name]
    ids = torch.randint(3, 32000, (1, sum(STEPS)), generator=torch.Generator().manual_seed(2)).numpy()
    got = _logits(OrtBackend.load(int4, threads=2), ids, STEPS)
    ref = _logits(OrtBackend.load(fp32, threads=2), ids, STEPS)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= FP32_MAX_REL * scale
    assert np.sqrt(((got - ref) ** 2).mean()) <= FP32_RMS_REL * scale
    gen = Generator.load(int4, threads=2)
    out = gen.generate([list(range(5, 17))], GenerationConfig(max_new_tokens=3 * W + 1, eos_token_id=[]))[0]
    assert len(out.token_ids) == 3 * W + 1 and all(0 <= t < 32000 for t in out.token_ids)


def test_int4_manifest_record(int4_artifacts, capsys):
    m = Manifest.load(int4_artifacts["mixtral-window"][1])
    q = m.quantization
    assert m.precision == "int4" and "int4" in m.features and m.cache.dtype == "float32"
    assert q is not None and (q.method, q.bits, q.block_size, q.accuracy_level, q.symmetric) == ("rtn", 4, 64, 0, True)
    assert q.blocks == {f"layers.{i}.feed_forward.fc2.{e}": 32 for i in range(2) for e in range(4)}
    assert q.kept_float == {f"layers.{i}.feed_forward.gate": "router: routing stays fp32" for i in range(2)}
    # a MoE model's default INT8 tensors: the vocabulary tables and the attention k/v projections (a dense one's:
    # the tables only)
    assert q.int8 == sorted(["embed_tokens", "lm_head"] + [f"layers.{i}.attention.{w}" for i in range(2)
                                                           for w in ("wk", "wv")])
    assert Manifest.load(int4_artifacts["mistral-window"][1]).quantization.int8 == ["embed_tokens", "lm_head"]
    assert Manifest.from_dict(m.to_dict()) == m
    assert 0 < m.summary["bytes_per_token"] < m.summary["parameter_bytes"]  # 2 of 4 experts, one embedding row
    # inspect: INT4 tensors at another block counted apart from the INT8 ones, which show their own block
    from mixtrt.cli import main

    assert main(["inspect", str(int4_artifacts["mixtral-window"][1])]) == 0
    shown = capsys.readouterr().out
    assert "int4 rtn, block 64 (other blocks: 8 int4 tensors at [32])," in shown, shown
    assert ("  int8        embed_tokens, layers.0.attention.wk, layers.0.attention.wv, layers.1.attention.wk and 2 "
            "more (8-bit, block 64)\n") in shown, shown


def test_accuracy_level_0_with_int8_linears_warns(exported, tmp_path):
    """onnxruntime runs an 8-bit MatMulNBits at accuracy level 0 by dequantizing its weights every step: the export
    says so where the plan has INT8 linears (the default lm_head, a MoE model's k/v), not where only the table is."""
    import warnings

    ck = exported["mixtral-window"][0]
    with pytest.warns(MixtrtWarning, match=r"--accuracy-level 0 with (layers\.\d\.attention\.w[kv], ){2}"
                                           r"layers\.\d\.attention\.w[kv] and \d+ more in INT8: .*--accuracy-level 4"):
        export_onnx(ck, tmp_path / "a", precision="int4", progress=None, int4=Int4Options(accuracy_level=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixtrtWarning)
        export_onnx(ck, tmp_path / "b", precision="int4", progress=None,
                    int4=Int4Options(accuracy_level=0, int8=("embed_tokens",)))
        export_onnx(ck, tmp_path / "c", precision="int4", progress=None, int4=Int4Options(accuracy_level=4))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["quantization"].update(version=2), "quantization version 2 is not the one this mixtrt reads "
                                                    r"\(1\); upgrade mixtrt"),
    (lambda d: d.update(features=[]), "precision int4 needs the feature 'int4'"),
    (lambda d: d.update(quantization=None), "quantization must be a record for precision int4"),
    (lambda d: d["quantization"].update(symmetric=False), "quantization.symmetric False is not valid"),
    # a value of the right kind that this mixtrt does not know: a newer one's (upgrade), not damage
    (lambda d: d["quantization"].update(block_size=48), "quantization.block_size 48 is not one this mixtrt knows.*"
                                                        r"written by a newer mixtrt, or edited; upgrade mixtrt"),
    (lambda d: d["quantization"].update(method="hqq"), "quantization.method 'hqq' is not one this mixtrt knows"),
    (lambda d: d["quantization"].update(method=5), "quantization.method 5 is not valid.*artifact is damaged"),
    (lambda d: d["quantization"].update(zero_points="int4"), r"unknown fields \['zero_points'\].*upgrade mixtrt"),
    # a float that equals an allowed integer (it loaded and then failed in onnxruntime's setting)
    (lambda d: d["quantization"].update(accuracy_level=4.0), "quantization.accuracy_level 4.0 is not valid"),
    (lambda d: d["quantization"].update(block_size=32.0), "quantization.block_size 32.0 is not valid"),
    (lambda d: d["quantization"].pop("float"), r"quantization: missing \['float'\]"),
])
def test_int4_manifest_edits_are_refused(int4_artifacts, tmp_path, edit, match):
    copy = tmp_path / "art"
    shutil.copytree(int4_artifacts["mistral-window"][1], copy)
    d = json.loads((copy / "manifest.json").read_text())
    edit(d)
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=match):
        OrtBackend.load(copy)


def test_int4_options_are_checked(exported, tmp_path):
    ck, _ = exported["mistral-window"]
    with pytest.raises(ConfigError, match="pass --precision int4"):
        export_onnx(ck, tmp_path / "a", int4=Int4Options(), progress=None)
    with pytest.raises(ConfigError, match="--block-size 48"):
        export_onnx(ck, tmp_path / "a", precision="int4", int4=Int4Options(block_size=48), progress=None)
    # a float equal to an allowed integer: refused (it crashed the packing, or wrote an artifact onnxruntime refuses)
    for options, match in (({"block_size": 32.0}, "--block-size 32.0"), ({"accuracy_level": 4.0}, "accuracy_level 4.0"),
                           ({"accuracy_level": True}, "accuracy_level True")):
        with pytest.raises(ConfigError, match=match):
            export_onnx(ck, tmp_path / "a", precision="int4", int4=options, progress=None)
    with pytest.raises(ConfigError, match="--calibration needs a calibrated --method"):
        export_onnx(ck, tmp_path / "a", precision="int4", int4=Int4Options(calibration=ck / "config.json"),
                    progress=None)
    assert not (tmp_path / "a").exists()


def test_a_calibration_text_past_the_token_limit_is_cut_and_counted(exported, tmp_path):
    """The first MAX_TOKENS are read; the whole text's count comes back, for the status line to say so."""
    from mixtrt.export.calibration import MAX_TOKENS, calibration_ids

    text = tmp_path / "long.txt"
    text.write_text("It was a truth universally acknowledged. " * 1500)
    _, _, tokens, total = calibration_ids(text, Generator.load(exported["mixtral-window"][1]).tokenizer, 64)
    assert total > MAX_TOKENS >= tokens > MAX_TOKENS - 64


@pytest.mark.parametrize("longest", [64, 10, 5])
def test_a_calibration_text_is_read_to_its_end(exported, tmp_path, longest):
    """The text is cut into sequences of one length, the longest the fewest sequences of at most the model's give,
    as many as the tokens allow: fewer tokens than one sequence are left over at its end (pieces of exactly the
    longest length dropped the last piece: 102 of 358 tokens; at most 10 positions, 123 sequences of 9 left 121 of
    1228 where 136 leave 4)."""
    from mixtrt.export.calibration import calibration_ids

    tokenizer = Generator.load(exported["mixtral-window"][1]).tokenizer
    for words in (9, 20, 31, 47):
        text = tmp_path / f"c{words}.txt"
        text.write_text(" ".join(["It was a truth universally acknowledged"] * words))
        seqs, _, tokens, total = calibration_ids(text, tokenizer, longest)
        length = total // -(-total // longest)
        assert {len(q) for q in seqs} == {length} and length <= longest and len(seqs) >= -(-total // longest)
        assert tokens == sum(map(len, seqs)) and total - length < tokens <= total, (words, total, tokens)
        assert seqs[0] == tokenizer.encode(text.read_text())[:len(seqs[0])]


def test_block_for_non_dividing_dimensions():
    assert [block_for(k, 128) for k in (192, 256, 96, 4096, 40)] == [64, 128, 32, 128, None]
    assert block_for(14336, 128) == 128 and block_for(48, 32) == 16


def test_a_reference_of_another_vocabulary_is_refused_without_a_warning_first(recwarn):
    """Another vocabulary is refused (evaluate's error), so no warning says the KL will compare two models first."""
    import types

    from mixtrt.cli.commands.perplexity import _warn_if_other_model

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, moe=None)
    _warn_if_other_model(types.SimpleNamespace(**shape), types.SimpleNamespace(**{**shape, "vocab_size": 32064}), "r")
    assert not recwarn.list
    _warn_if_other_model(types.SimpleNamespace(**shape), types.SimpleNamespace(**{**shape, "hidden_size": 96}), "r")
    assert "hidden_size 64 vs 96" in str(recwarn.pop().message)


def test_perplexity_in_pieces_equals_the_whole_table(realistic_pairs, monkeypatch):
    """evaluate holds a piece's logits and some rows' log-softmax at a time: with pieces and row blocks that do not
    divide the chunks (nor each other), perplexity, KL and top-1 equal one float64 table per chunk."""
    import mixtrt.runtime.perplexity as ppl

    fp32, int4 = (OrtBackend.load(a, threads=1) for a in realistic_pairs["mixtral-window"])
    ids = [1, *np.random.default_rng(3).integers(3, 32000, 70).tolist()]
    monkeypatch.setattr(ppl, "PIECE_TOKENS", 7)
    monkeypatch.setattr(ppl, "ROWS", 3)
    got = ppl.evaluate(int4, ids, 30, reference=fp32)
    nll = kl = 0.0
    count = agree = 0
    for c in ppl.chunks(ids, 30):
        tables = []
        for be in (int4, fp32):
            logits = be.step(be.new_cache(1), np.asarray([c[:-1]]))[0].astype(np.float64)
            tables.append(logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                          - logits.max(-1, keepdims=True))
        logp, ref = tables
        nll -= logp[np.arange(len(c) - 1), c[1:]].sum()
        kl += (np.exp(ref) * (ref - logp)).sum()
        agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        count += len(c) - 1
    assert got["scored_tokens"] == count == 68
    assert got["mean_nll"] == pytest.approx(nll / count, rel=1e-6)
    assert got["mean_kl"] == pytest.approx(kl / count, rel=1e-5) and got["top1_agreement"] == agree / count

    class SmallerCache:  # a reference whose cache holds fewer positions than the artifact's: its pieces are shorter
        def __init__(self, backend):
            self._backend, self.capacity = backend, 5

        def __getattr__(self, name):
            return getattr(self._backend, name)

    other = ppl.evaluate(int4, ids, 30, reference=SmallerCache(fp32))  # rows still line up
    assert other["mean_kl"] == pytest.approx(got["mean_kl"], rel=1e-5) and other["top1_agreement"] == agree / count


def test_perplexity_command_with_reference(realistic_pairs, tmp_path, capsys, monkeypatch):
    from mixtrt.cli import main
    from mixtrt.runtime.perplexity import chunks

    fp32, int4 = realistic_pairs["mixtral-window"]
    text = tmp_path / "t.txt"
    text.write_text("It was a truth universally acknowledged that a single man in possession of a good fortune. " * 3)
    assert main(["perplexity", str(int4), "--text", str(text), "--chunk", "16", "--reference", str(fp32),
                 "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "warning" not in captured.err  # the same model at another precision
    assert out["scored_tokens"] == sum(len(c) - 1 for c in chunks(list(range(out["tokens"])), 16))
    assert 0 < out["mean_kl"] < 1 and 0 < out["top1_agreement"] <= 1 and out["perplexity"] > 1
    assert main(["perplexity", str(fp32), "--text", str(text), "--chunk", "16", "--reference", str(fp32),
                 "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert abs(same["mean_kl"]) < 1e-9 and same["top1_agreement"] == 1.0
    # another model with the same tokenizer is compared, and said to be another model
    other = realistic_pairs["mistral-window"][0]
    assert main(["perplexity", str(int4), "--text", str(text), "--chunk", "16", "--reference", str(other)]) == 0
    err = capsys.readouterr().err
    assert f"warning: --reference {other} is not the same model (" in err and "MoE vs dense" in err, err
    # `--text -` reads stdin: the same text scores the same
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.read_bytes())))
    assert main(["perplexity", str(fp32), "--text", "-", "--chunk", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == same["perplexity"]
    assert main(["perplexity", str(fp32), "--text", str(text), "--chunk", "1"]) == 2
    assert "--chunk must be an integer >= 2" in capsys.readouterr().err
    assert main(["perplexity", str(fp32), "--text", str(text), "--reference", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err  # the reference's own error, said to be the reference's
    assert f"--reference {tmp_path / 'nope'}: no such artifact directory" in err and len(err.splitlines()) == 1
    # a chunk past the artifact's positions names the artifact and the largest --chunk that fits (64 positions)
    long = tmp_path / "long.txt"
    long.write_text("one two three four five six seven eight nine ten " * 20)
    assert main(["perplexity", str(fp32), "--text", str(long), "--chunk", "100"]) == 2
    assert f"--chunk 100 is past the 64 positions {fp32} serves: pass --chunk 64 or less" in capsys.readouterr().err
    # the --chunk given is named, also where the text is shorter than it (it was named as the text's length)
    assert main(["perplexity", str(fp32), "--text", str(text), "--chunk", "999999999"]) == 2
    assert "--chunk 999999999 is past the 64 positions" in capsys.readouterr().err
    # on a terminal, the chunks done and the perplexity so far (llama-perplexity's running value), then a newline
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main(["perplexity", str(fp32), "--text", str(long), "--chunk", "16", "--json"]) == 0
    captured = capsys.readouterr()
    n = len(chunks(list(range(json.loads(captured.out)["tokens"])), 16))
    shown = [part for part in captured.err.split("\r") if part]
    assert [p.split(":")[0] for p in shown] == [f"chunk {i}/{n}" for i in range(1, n + 1)] and captured.err[-1] == "\n"
    assert f"{json.loads(captured.out)['perplexity']:.4f}" in shown[-1]
    monkeypatch.undo()
    assert main(["perplexity", str(fp32), "--text", str(long), "--json"]) == 0  # the default fits itself: 64, not 256
    assert json.loads(capsys.readouterr().out)["chunk"] == 64
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["perplexity", str(fp32), "--text", str(empty)]) == 2
    assert "perplexity needs at least 2" in capsys.readouterr().err


@pytest.mark.parametrize("name", FAMILIES)
def test_int4_batch_invariance(realistic_pairs, name):
    """The server's batch-invariance contract (docs/DESIGN.md, Serving) on an int4 artifact with the default
    accuracy level: a row's decode logits in a batch of two ragged rows equal its logits alone within
    5e-5 of the largest logit, and its greedy tokens are the same."""
    _, art = realistic_pairs[name]
    backend = OrtBackend.load(art, threads=2)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 256, size=n).reshape(1, -1) for n in (9, 4)]
    alone = []
    for p in prompts:
        cache = backend.new_cache(1)
        rows, tok = [backend.step(cache, p)[:, -1]], None
        for _ in range(3 * W):
            tok = rows[-1].argmax(-1).reshape(1, 1)
            rows.append(backend.step(cache, tok)[:, -1])
        alone.append(np.concatenate(rows))
    both = backend.new_cache(2)
    last = [backend.step(both, p, start_row=r)[:, -1] for r, p in enumerate(prompts)]
    got = [[x] for x in last]
    for _ in range(3 * W):
        toks = np.stack([got[r][-1].argmax(-1) for r in range(2)]).reshape(2, 1)
        step = backend.step(both, toks)[:, -1]
        for r in range(2):
            got[r].append(step[r:r + 1])
    for r in range(2):
        batched = np.concatenate(got[r])
        scale = float(np.abs(alone[r]).max())
        assert float(np.abs(batched - alone[r]).max()) <= 5e-5 * scale, f"row {r}"
        assert (batched.argmax(-1) == alone[r].argmax(-1)).all()


def test_a_tied_tables_two_quantized_forms_are_read_by_form(tmp_path):
    """A tied embedding stored quantized twice (the lookup table and the lm_head): the index names both forms,
    reads each by `form`, and says how where a bare name is ambiguous or the lm_head is asked for by its name."""
    from mixtrt.runtime.weights import WeightIndex

    ck = make_checkpoint(tmp_path / "ck", "mistral", tie_word_embeddings=True, max_position_embeddings=64,
                         num_hidden_layers=1)
    art = export_onnx(ck, tmp_path / "art", precision="int4", progress=None)
    _, weights = load_checkpoint(ck)
    index = WeightIndex.read(art)
    table = "model.embed_tokens.weight"
    with pytest.raises(KeyError, match="stored quantized 2 times.*give form="):
        index.quantized(table)
    with pytest.raises(KeyError, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'.*dequantize_linear"):
        index.quantized("lm_head.weight")
    lookup, q_lookup, s_lookup = index.quantized(table, form="gather_block_quantized")
    head, q_head, s_head = index.quantized(table, form="dequantize_linear")
    assert lookup.name != head.name
    q8, s8 = pack_int8(weights[table].numpy(), lookup.quant["block_size"])  # the default: INT8 tables
    np.testing.assert_array_equal(q_lookup, q8.view(np.uint8) ^ 0x80)
    np.testing.assert_array_equal(q_head, q8.T)
    np.testing.assert_array_equal(s_lookup, s8)
    np.testing.assert_array_equal(s_head, s8.T)


def test_int4_weight_index_is_the_checkpoint_quantized(int4_artifacts):
    """weights.json of an int4 artifact (version 2): every quantized tensor byte for byte the packing of the
    checkpoint's weight (what the whole-graph int4 pass wrote before quantization moved into the streaming
    writer), its scales, the graph's initializers the same bytes, the experts' packed bytes and scales stacked,
    and no float copy of a quantized weight in the data file."""
    import onnx
    from onnx import numpy_helper

    from mixtrt.export.checkpoint import load_checkpoint
    from mixtrt.plugins.int4 import dequantize_linear_layout, matmulnbits_layout
    from mixtrt.runtime.weights import WeightIndex

    ck, art = int4_artifacts["mixtral-window"]
    _, weights = load_checkpoint(ck)
    index = WeightIndex.read(art)
    assert Manifest.load(art).weight_index == "weights.json"
    assert json.loads((art / "weights.json").read_text())["version"] == 2
    graph = {t.name: t for t in onnx.load(str(art / "model.onnx")).graph.initializer}
    quantized = [e for e in index.tensors.values() if e.quant is not None]
    assert {e.quant["format"] for e in quantized} == {"dequantize_linear", "matmulnbits", "gather_block_quantized"}
    for e in quantized:
        w = weights[e.of].numpy()
        b = e.quant["block_size"]
        assert b == block_for(w.shape[1], BLOCK)
        stored, scales = np.asarray(index.array(e.name)), np.asarray(index.array(e.quant["scales"]))
        if e.quant["format"] == "dequantize_linear" and e.dtype == "int4":  # attention [K, N]
            raw, dims, st = dequantize_linear_layout(*rtn(e.of, w, b))
            assert (tuple(e.shape), stored.tobytes(), scales.tobytes()) == (dims, raw, st.tobytes())
            assert graph[e.name].data_type == onnx.TensorProto.INT4 and graph[e.name].raw_data == raw
        elif e.quant["format"] == "matmulnbits":  # an expert [N, K/b, b/2]
            q, s = rtn(e.of, w, b)
            assert stored.tobytes() == matmulnbits_layout(q, b).tobytes() and np.array_equal(scales, s)
            np.testing.assert_array_equal(numpy_helper.to_array(graph[e.name]), stored)
        else:  # the INT8 vocabulary tables
            q8, s = pack_int8(w, b)
            want = q8.T if e.quant["format"] == "dequantize_linear" else q8.view(np.uint8) ^ 0x80
            np.testing.assert_array_equal(stored, want)
            np.testing.assert_array_equal(scales, s.T if e.quant["format"] == "dequantize_linear" else s)
    assert not [e.name for e in index.tensors.values() if e.quant is None and e.layout != "derived"
                and e.of is not None and e.of in {q.of for q in quantized}]
    with pytest.raises(KeyError, match="stored quantized"):
        index.weight("model.layers.0.attention.wq.weight")
    entry, packed, _ = index.quantized("model.layers.0.attention.wq.weight")
    assert entry.name == "layers.0.attention.wq.int4" and packed.nbytes == entry.nbytes
    np.testing.assert_array_equal(index.weight("model.layers.0.feed_forward.gate.weight"), weights[
        "model.layers.0.feed_forward.gate.weight"].numpy())  # the router stays float, read as before
    fc1 = index.stacks["model.layers.0.feed_forward.fc1"]
    assert fc1.quant is not None and fc1.quant["scales"] == "model.layers.0.feed_forward.fc1.scales"
    packed, scales = index.stack(fc1.name), index.stack(fc1.quant["scales"])
    assert packed.shape == (4, 192, 64 // BLOCK, BLOCK // 2) and scales.shape == (4, 192, 64 // BLOCK)
    np.testing.assert_array_equal(packed[3], index.array("layers.0.feed_forward.fc1.3.int4"))


def test_awq_scalings_are_exact_and_written(exported, tmp_path):
    """AWQ layer by layer: the scalings chosen from the checkpoint leave the float model's function unchanged
    (replayed on every parameter), and the awq artifact's int4 tensors are the scaled weights rounded."""
    from mixtrt.export.awq import awq_scalings
    from mixtrt.export.calibration import calibration_ids
    from mixtrt.export.quantize import rtn_max7
    from mixtrt.plugins.int4 import dequantize_linear_layout
    from mixtrt.runtime.weights import WeightIndex

    ck, fp32 = exported["mixtral-window"]
    text = tmp_path / "calibration.txt"
    text.write_text("It was a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. However little known the feelings or views of such a man may be.")
    options = Int4Options(method="awq", block_size=BLOCK, accuracy_level=0, calibration=text)
    seqs, _, tokens, _ = calibration_ids(text, Generator.load(fp32).tokenizer)
    assert 32 <= tokens < 128  # one sequence, within the checkpoint's positions
    scaling = awq_scalings(ck, None, seqs, options, lambda _m: None)
    assert {"model.layers.0.attention.wq.weight", "model.layers.1.feed_forward.fc1.2", "lm_head.weight"} \
        <= set(scaling.ops)
    model, scaled = load_model(ck), load_model(ck)
    with torch.no_grad():
        for name, p in scaled.named_parameters():
            scaling.replay(name, p)
        ids = torch.tensor([seqs[0][:W + 5]])
        ref, got = model(ids), scaled(ids)
    assert not torch.equal(model.model.norm.weight, scaled.model.norm.weight)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()

    art = export_onnx(ck, tmp_path / "awq", precision="int4", int4=options, progress=None)
    index = WeightIndex.read(art)
    e = index.tensors["layers.1.attention.wq.int4"]
    raw, _, _ = dequantize_linear_layout(*rtn_max7(e.of, scaled.get_parameter(e.of).detach().numpy(), BLOCK))
    assert np.asarray(index.array(e.name)).tobytes() == raw


def test_awq_search_counts_only_the_weights_the_export_rounds():
    """A weight that stays float computes exactly under any scale: it adds no error to the search, so a group with
    one float member chooses what the group without it chooses."""
    from mixtrt.export.awq import _search

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 8, 64)
    a, b = torch.randn(48, 64, generator=g), torch.randn(40, 64, generator=g) * 5
    assert torch.equal(_search(x, [a, b], [(32, 4), None]), _search(x, [a], [(32, 4)]))
    assert not torch.equal(_search(x, [a, b], [(32, 4), (32, 4)]), _search(x, [a, b], [(32, 4), None]))


def _awq(ck, tmp_path, tokenizer, **options):
    from mixtrt.export.awq import awq_scalings
    from mixtrt.export.calibration import calibration_ids

    text = tmp_path / "calibration.txt"
    text.write_text("It was a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. However little known the feelings or views of such a man may be.")
    opts = Int4Options(method="awq", block_size=BLOCK, accuracy_level=0, calibration=text, **options)
    seqs, _, _, _ = calibration_ids(text, tokenizer)
    return awq_scalings(ck, None, seqs, opts, lambda _m: None), opts


def test_awq_searches_each_group_with_the_plans_rounding(exported, tmp_path, monkeypatch):
    """The forms the scale search is given are the int4 plan's: --int8 w2 makes w2's search INT8, --keep-float w3
    takes w3 out of its group's error, and the experts' searches are INT4 at their blocks (hidden 64 takes block
    64, intermediate 96 block 32)."""
    import mixtrt.export.awq as awq

    seen: list[list] = []
    real = awq._search
    monkeypatch.setattr(awq, "_search", lambda x, weights, forms: seen.append(forms) or real(x, weights, forms))
    ck, fp32 = exported["mistral-window"]
    _awq(ck, tmp_path, Generator.load(fp32).tokenizer, int8=("w2", "lm_head"), keep_float=("w3",))
    plan = {"q/k/v": [(64, 4)] * 3, "w2": [(32, 8)], "w1/w3": [(64, 4), None], "lm_head": [(64, 8)]}
    assert seen == [*(plan["q/k/v"], plan["w2"], plan["w1/w3"]) * 2, plan["lm_head"]], seen
    seen.clear()
    ck, fp32 = exported["mixtral-window"]
    _awq(ck, tmp_path, Generator.load(fp32).tokenizer)
    # a MoE model's defaults keep wk and wv INT8 (INT8_DEFAULT_MOE)
    assert {tuple(f) for f in seen} == {((64, 4), (64, 8), (64, 8)), ((32, 4),), ((64, 4),) * 4, ((64, 8),)}, seen


def test_awq_leaves_groups_kept_float_unscaled(exported, tmp_path):
    """--keep-float on a whole group (w1 and w3 read the FFN norm's output; w2 reads their product): AWQ moves no
    scale there, since nothing of the group is rounded; the other groups are scaled as before."""
    ck, fp32 = exported["mistral-window"]
    tok = Generator.load(fp32).tokenizer
    scaling, _ = _awq(ck, tmp_path, tok, keep_float=("w1", "w3", "w2"))
    assert not {n for n in scaling.ops if "feed_forward" in n or "ffn_norm" in n}
    assert "model.layers.0.attention.wq.weight" in scaling.ops and "model.layers.1.attention_norm.weight" in scaling.ops
    scaling, _ = _awq(ck, tmp_path, tok, keep_float=("w2",))  # w1 / w3 still rounded: their group is scaled
    assert "model.layers.0.ffn_norm.weight" in scaling.ops
    assert "model.layers.0.feed_forward.w2.weight" not in scaling.ops


def test_awq_experts_few_tokens_reach_stay_unscaled_and_are_recorded(exported, tmp_path, monkeypatch, capsys):
    """An expert reached by fewer than MIN_ROWS calibration tokens (GPTQ's threshold) gets no searched scale (one
    fitted to a handful of tokens fits them, not the expert); the manifest's calibration lists them as gptq's."""
    import mixtrt.export.awq as awq

    ck, fp32 = exported["mixtral-window"]
    monkeypatch.setattr(awq, "MIN_ROWS", 10**9)
    scaling, options = _awq(ck, tmp_path, Generator.load(fp32).tokenizer)
    assert scaling.nearest == [f"layers.{i}.feed_forward.fc2.{e}" for i in range(2) for e in range(4)]
    assert not [n for n in scaling.ops if ".fc2." in n]
    assert "model.layers.0.feed_forward.fc1.0" in scaling.ops  # the shared FFN-norm scale still applies
    art = export_onnx(ck, tmp_path / "awq", precision="int4", int4=options, progress=None)
    assert json.loads((art / "manifest.json").read_text())["quantization"]["calibration"]["nearest"] == \
        scaling.nearest
    from mixtrt.cli import main

    capsys.readouterr()
    assert main(["inspect", str(art)]) == 0
    assert "fc2.0, layers.0.feed_forward.fc2.1, layers.0.feed_forward.fc2.2, layers.0.feed_forward.fc2.3 and 4 more: " \
        "no activation-aware scale of their own (too few" in capsys.readouterr().out


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(version=1), "an entry must have exactly the fields"),
    (lambda d: d["tensors"][-1]["quant"].update(scales="nowhere"), "names the scales 'nowhere'"),
    (lambda d: d["tensors"][-1]["quant"].update(format="gguf"), "has quant"),
    (lambda d: d["tensors"][-1].update(nbytes=d["tensors"][-1]["nbytes"] + 1), "has nbytes"),
    (lambda d: d["tensors"][-1]["quant"].update(block_size=48), r"has block_size 48 \(a power of two from 16 to 256\)"),
    (lambda d: d["tensors"][-1]["quant"].update(zero_point=3), "has dtype .* and zero_point 3"),
    # scales of another shape (a norm's weight) than one per block of this tensor
    (lambda d: d["tensors"][-1]["quant"].update(scales=next(t["name"] for t in d["tensors"] if "norm" in t["name"])),
     r"has scales '.*norm.*' float32 \[\d+\] \(one float32 per block"),
    (lambda d: next(t for t in d["tensors"] if t["dtype"] == "int4").pop("quant"), "is int4 but has no quant field"),
    (lambda d: d["tensors"][0].update(offset=d["tensors"][0]["offset"] + 1),
     r"starts at byte \d+, not a multiple of the index's alignment \(65536\)"),
])
def test_int4_weight_index_edits_are_refused(int4_artifacts, edit, match):
    from mixtrt.runtime.weights import WeightIndex

    art = int4_artifacts["mistral-window"][1]
    d = json.loads((art / "weights.json").read_text())
    d["tensors"] = [t for t in d["tensors"] if "quant" not in t] + [t for t in d["tensors"] if "quant" in t]
    edit(d)
    with pytest.raises(ArtifactError, match=match):
        WeightIndex.from_dict(d, art, "weights.json")


@pytest.mark.parametrize("name, max_context", [("mistral-window", None), ("mixtral-nowindow", 48)])
def test_awq_default_calibration_fits_a_short_model(exported, tmp_path, name, max_context):
    """The default calibration text (thousands of tokens, sequences of 256) on models of 128 positions, one with
    no window and a 48-row cache: the sequences are cut to what the model holds, and the artifact generates."""
    ck, _ = exported[name]
    kw = {} if max_context is None else {"max_context": max_context}
    art = export_onnx(ck, tmp_path / "awq", precision="int4", int4=Int4Options(method="awq", block_size=BLOCK),
                      progress=None, **kw)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantization"]["calibration"]["tokens"] >= 256
    [out] = Generator.load(art).generate([[1, 5, 6, 7]], max_new_tokens=4, do_sample=False)
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("option", [{"keep_float": ("nosuchtensor",)}, {"int8": ("bogus",)},
                                    {"keep_float": ("model.layers.0.attention.wq.weight",)},
                                    {"int8": ("fc1",)}])  # experts are INT4 or float, never INT8
def test_int4_patterns_that_match_nothing_are_refused(exported, tmp_path, option):
    """A --keep-float / --int8 pattern naming no tensor it applies to (a typo, the checkpoint's own name for a
    tensor) is a one-line error naming the flag and the pattern, before anything is written."""
    ck, _ = exported["mixtral-window"]
    with pytest.raises(ConfigError, match="matches no tensor") as e:
        export_onnx(ck, tmp_path / "art", precision="int4", int4=Int4Options(**option), progress=None)
    assert "\n" not in str(e.value) and repr(next(iter(option.values()))[0]) in str(e.value)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("option", [{"keep_float": ("wqq",)}, {"int8": ("fc2",)}])
def test_int4_pattern_typos_are_refused_before_calibrating_or_tracing(exported, tmp_path, monkeypatch, option):
    """The check runs on the model's module before a calibrated method's pass over the model and before the trace
    (minutes on a real checkpoint): neither is reached."""
    import mixtrt.export.awq as awq
    import mixtrt.export.onnx_export as onnx_export

    def reached(*a, **k):
        raise AssertionError("reached before the patterns were checked")

    monkeypatch.setattr(awq, "awq_scalings", reached)
    monkeypatch.setattr(onnx_export, "_trace", reached)
    ck, _ = exported["mixtral-window"]
    with pytest.raises(ConfigError, match="matches no tensor"):
        export_onnx(ck, tmp_path / "art", precision="int4", int4=Int4Options(method="awq", **option), progress=None)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("name", ["mixtral-window", "mistral-window"])
def test_int4_pattern_labels_before_tracing_are_the_plans(exported, tmp_path, monkeypatch, name):
    """The labels the early check reads off the module are the ones the plan gives the traced graph's tensors
    (a pattern the plan would take is never refused early)."""
    import mixtrt.export.quantize as quantize

    seen = []
    check = quantize._check_labels
    monkeypatch.setattr(quantize, "_check_labels",
                        lambda o, d, e: (seen.append((sorted(d), sorted(e))), check(o, d, e)))
    ck, _ = exported[name]
    export_onnx(ck, tmp_path / "art", precision="int4", int4=Int4Options(keep_float=("layers.0.*",)), progress=None)
    early, planned = seen
    assert early == planned and early[0], (early, planned)


def test_int4_options_from_python_as_the_cli_takes_them(exported, tmp_path):
    """A str is the CLI's comma list (not its characters), a list a tuple; int4 may be a dict of the fields; other
    types are one-line errors before anything is written."""
    assert Int4Options(keep_float="lm_head,embed_tokens").keep_float == ("lm_head", "embed_tokens")
    # spaces around a pattern are not part of it, as on the command line (--keep-float "wq, wk")
    assert Int4Options(keep_float="wq, wk ,").keep_float == ("wq", "wk") == Int4Options(int8=[" wq", "wk "]).int8
    assert Int4Options(int8=["wq"], keep_float=()).int8 == ("wq",) and Int4Options(int8=None).int8 is None
    with pytest.raises(ConfigError, match="keep_float must be tensor patterns"):
        Int4Options(keep_float=[3])
    ck, _ = exported["mistral-window"]
    with pytest.raises(ConfigError, match=r"int4: unknown options \['blocksize'\]"):
        export_onnx(ck, tmp_path / "a", precision="int4", int4={"blocksize": 64}, progress=None)
    with pytest.raises(ConfigError, match="--block-size 48"):
        export_onnx(ck, tmp_path / "a", precision="int4", int4={"block_size": 48}, progress=None)
    with pytest.raises(ConfigError, match="int4 must be an Int4Options .* got int"):
        export_onnx(ck, tmp_path / "a", precision="int4", int4=4, progress=None)
    assert not (tmp_path / "a").exists()


def test_int4_parameter_count_is_the_models(realistic_pairs):
    """The scales are bytes, not parameters: inspect counts the same parameters as the fp32 artifact's."""
    from mixtrt.runtime.inspect import inspect_artifact

    for fp32, int4 in realistic_pairs.values():
        a, b = inspect_artifact(fp32), inspect_artifact(int4)
        assert a["parameters"] == b["parameters"] and b["parameter_bytes"] < a["parameter_bytes"] / 3


def test_an_int4_export_that_quantizes_nothing_says_so(tmp_path):
    """hidden 40 and intermediate 72: no power-of-two block >= 16 divides them, so every linear stays float; the
    export works (as any non-dividing dimension does) and warns, whatever the progress setting."""
    from mixtrt.runtime.errors import MixtrtWarning

    ck = make_checkpoint(tmp_path / "ck", "mistral", hidden_size=40, intermediate_size=72, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=1, max_position_embeddings=32)
    with pytest.warns(MixtrtWarning, match=r"int4 stores no weight in INT4 here \(input dimension 40 has no "
                                           r"power-of-two block >= 16") as caught:
        art = export_onnx(ck, tmp_path / "art", precision="int4", progress=None)
    assert Manifest.load(art).quantization.kept_float
    assert "INT8 for" not in str(caught[0].message)  # no block fits the tables' 40 either
    # --int8 '*' took every linear a block fits (input 64) and w2 (input 72) has none: both reasons are given
    ck = make_checkpoint(tmp_path / "ck2", "mistral", hidden_size=64, intermediate_size=72, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=1, max_position_embeddings=32)
    with pytest.warns(MixtrtWarning, match=r"stores no weight in INT4 here \(input dimension 72 has no power-of-two "
                                           r"block >= 16 dividing it; INT8 for 8 by --int8 or its default\)"):
        export_onnx(ck, tmp_path / "art2", precision="int4", int4=Int4Options(int8="*"), progress=None)


def test_experts_without_a_block_stay_float_with_a_warning_naming_the_dimension(tmp_path):
    """Intermediate 100 (no power-of-two block >= 16 divides it): every expert stays float (all or none), the
    most of a MoE model's bytes, so the export warns, naming that dimension only (hidden 64 has blocks)."""
    from mixtrt.runtime.errors import MixtrtWarning

    ck = make_checkpoint(tmp_path / "ck", "mixtral", hidden_size=64, intermediate_size=100, num_hidden_layers=1,
                         max_position_embeddings=32)
    with pytest.warns(MixtrtWarning, match=r"keeps the experts in float: the experts' fc2 input "
                                           r"\(intermediate 100\) has no power-of-two block") as caught:
        art = export_onnx(ck, tmp_path / "art", precision="int4", progress=None)
    assert "--block-size" not in str(caught[0].message)  # every block size was tried: none would help
    kept_float = Manifest.load(art).quantization.kept_float
    assert kept_float["layers.0.feed_forward.fc2.0"].startswith("the experts' fc2 input (intermediate 100)")
    assert "fc1 input" not in kept_float["layers.0.feed_forward.fc1.0"]  # hidden 64 has a block: not named
    assert "attention.wq" not in " ".join(kept_float)  # the dense layers are INT4 as usual


def test_tensor_patterns_match_labels_and_experts_by_their_matrix():
    """A pattern is a label, its last parts or an fnmatch pattern; an expert's matrix is named without its index
    (`--keep-float fc1` keeps every layer's experts float, as the all-or-none rule has it)."""
    from mixtrt.export.quantize import kept

    expert, dense = "layers.0.feed_forward.fc1.3", "layers.0.attention.wq"
    assert all(kept(expert, [p]) for p in ("fc1", "feed_forward.fc1", "fc1.3", expert, "layers.0.*", "*fc1*"))
    assert not any(kept(expert, [p]) for p in ("fc2", "fc", "feed_forward", "layers.1.*", "fc1.2"))
    assert kept(dense, ["wq"]) and kept(dense, ["attention.wq"]) and not kept(dense, ["q"])
