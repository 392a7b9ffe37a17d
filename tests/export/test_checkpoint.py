"""Checkpoint formats (export/checkpoint.py) load to transformers' logits; every error path says what is wrong."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtrt.export import export_onnx
from mixtrt.export.checkpoint import load_checkpoint, load_model
from mixtrt.runtime.errors import CheckpointError, ConfigError, MixtrtWarning
from mixtrt.runtime.manifest import Manifest
from tests.checkpoints import make_checkpoint, make_hf_model

VOCAB = 512


def hf_model(family: str, **kw):
    return make_hf_model(family, vocab_size=VOCAB, sliding_window=5, **kw)


def ids(batch: int = 2, length: int = 14) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def assert_same_logits(hf, path: Path) -> None:
    ours = load_model(path)
    x = ids()
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


# ---- formats ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_sharded_safetensors(tmp_path, family):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(hf, tmp_path)


def test_single_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path):
    """model.safetensors and model.safetensors.index.json (+ shards) of other weights side by side: transformers
    loads the single file; so do we, with a warning that the shards are unread (the shards were read, silently)."""
    hf = hf_model("mistral")
    other = hf_model("mistral")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other.save_pretrained(tmp_path, max_shard_size="100KB")
    hf.save_pretrained(tmp_path / "single")
    shutil.move(tmp_path / "single" / "model.safetensors", tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with pytest.warns(MixtrtWarning, match="reading model.safetensors, as transformers does"):
        assert_same_logits(loaded, tmp_path)
    x = ids()
    with torch.no_grad():
        assert (loaded(x).logits - hf(x).logits).abs().max().item() == 0  # the single file is what transformers read


def test_transformers_5_fused_expert_names(tmp_path):
    hf = hf_model("mixtral")
    hf.save_pretrained(tmp_path)  # writes 4.x names; replace them by the in-memory 5.x fused names
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 96, 64)  # [E, 2I, H] = [gate; up]
    assert sd["model.layers.0.mlp.experts.down_proj"].shape == (4, 64, 96)
    save_file(sd, tmp_path / "model.safetensors")
    assert_same_logits(hf, tmp_path)
    _, weights = load_checkpoint(tmp_path)
    gate_up, down = sd["model.layers.0.mlp.experts.gate_up_proj"], sd["model.layers.0.mlp.experts.down_proj"]
    for e in range(4):  # one tensor per expert, [gate; up] rows as in the fused tensor
        assert torch.equal(weights[f"model.layers.0.feed_forward.fc1.{e}"], gate_up[e])
        assert torch.equal(weights[f"model.layers.0.feed_forward.fc2.{e}"], down[e])
    assert "model.layers.0.feed_forward.fc1" not in weights


def test_transformers_4_names_one_tensor_per_expert(tmp_path):
    hf = hf_model("mixtral")
    hf.save_pretrained(tmp_path)
    _, weights = load_checkpoint(tmp_path)
    file = load_file(tmp_path / "model.safetensors")
    fc1 = weights["model.layers.1.feed_forward.fc1.2"]  # [2I, H] = [w1; w3]
    assert torch.equal(fc1[:96], file["model.layers.1.block_sparse_moe.experts.2.w1.weight"])
    assert torch.equal(fc1[96:], file["model.layers.1.block_sparse_moe.experts.2.w3.weight"])
    assert torch.equal(weights["model.layers.1.feed_forward.fc2.3"],
                       file["model.layers.1.block_sparse_moe.experts.3.w2.weight"])


def interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate_half rows -> raw Mistral interleaved rows (inverse of convert_mistral_weights_to_hf's permute)."""
    rows, H = w.shape
    return w.view(heads, 2, rows // heads // 2, H).transpose(1, 2).reshape(rows, H)  # [n*D,H]->[n,2,D/2,H]->[n,D/2,2,H]


def write_raw(hf, path: Path, fmt: str) -> None:
    """A raw Mistral checkpoint (params.json + consolidated.*) with the weights of a transformers model."""
    cfg, sd = hf.config, hf.state_dict()
    N, K = cfg.num_attention_heads, cfg.num_key_value_heads
    raw = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, r = f"model.layers.{i}.", f"layers.{i}."
        raw[r + "attention.wq.weight"] = interleave_rope_rows(sd[p + "self_attn.q_proj.weight"], N)
        raw[r + "attention.wk.weight"] = interleave_rope_rows(sd[p + "self_attn.k_proj.weight"], K)
        raw[r + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        raw[r + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        raw[r + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        raw[r + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if cfg.model_type == "mistral":
            raw[r + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
            raw[r + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
            raw[r + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
            continue
        raw[r + "feed_forward.gate.weight"] = sd[p + "mlp.gate.weight"]
        gate, up = sd[p + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
        for e in range(cfg.num_local_experts):
            raw[r + f"feed_forward.experts.{e}.w1.weight"] = gate[e]
            raw[r + f"feed_forward.experts.{e}.w3.weight"] = up[e]
            raw[r + f"feed_forward.experts.{e}.w2.weight"] = sd[p + "mlp.experts.down_proj"][e]
    raw = {k: v.contiguous().clone() for k, v in raw.items()}
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
              "hidden_dim": cfg.intermediate_size, "n_heads": N, "n_kv_heads": K, "norm_eps": cfg.rms_norm_eps,
              "vocab_size": cfg.vocab_size, "rope_theta": 10000.0, "sliding_window": cfg.sliding_window,
              "max_seq_len": 512}
    if cfg.model_type == "mixtral":
        params["moe"] = {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok}
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    if fmt == "pth":
        torch.save(raw, path / "consolidated.00.pth")
    else:
        save_file(raw, path / "consolidated.safetensors")


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_raw_mistral_checkpoint(tmp_path, family, fmt):
    hf = hf_model(family, rope_theta=10000.0)
    write_raw(hf, tmp_path, fmt)
    assert_same_logits(hf, tmp_path)


def test_tied_checkpoint_gives_lm_head_as_the_embedding(tmp_path):
    hf = hf_model("mistral", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    _, weights = load_checkpoint(tmp_path)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.rope_cos.device.type == "cpu" and model.model.rope_cos.shape == (512, 8)


def _tied_files(tmp_path: Path, edit) -> tuple[Path, dict]:
    """A tied checkpoint whose safetensors file `edit` changes ({name: tensor} in place), and its config."""
    hf_model("mistral", tie_word_embeddings=True).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path, json.loads((tmp_path / "config.json").read_text())


def test_tied_config_with_another_lm_head_keeps_it_as_transformers_does(tmp_path):
    import transformers

    def add_head(w):
        w["lm_head.weight"] = torch.randn_like(w["model.embed_tokens.weight"]) * 0.3

    path, _ = _tied_files(tmp_path, add_head)
    hf = transformers.MistralForCausalLM.from_pretrained(path).eval()  # warns, and does not tie them
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    args, weights = load_checkpoint(path)
    assert not args.tie_word_embeddings
    assert torch.equal(weights["lm_head.weight"], load_file(path / "model.safetensors")["lm_head.weight"])
    assert_same_logits(hf, path)
    # the exporter says so and records it untied (a checkpoint with its tokenizer: the default vocabulary)
    ck = make_checkpoint(tmp_path / "ck", "mistral", tie_word_embeddings=True)
    weights = load_file(ck / "model.safetensors")
    add_head(weights)
    save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(MixtrtWarning, match="lm_head.weight with other values: both are kept, untied"):
        export_onnx(ck, tmp_path / "art", progress=None)
    assert not Manifest.read(tmp_path / "art").args.tie_word_embeddings


def test_tied_config_with_an_equal_lm_head_or_only_the_lm_head_ties(tmp_path):
    import transformers

    def copy_head(w):
        w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()

    path, _ = _tied_files(tmp_path / "equal", copy_head)
    args, weights = load_checkpoint(path)
    assert args.tie_word_embeddings and weights["lm_head.weight"] is weights["model.embed_tokens.weight"]

    def only_head(w):
        w["lm_head.weight"] = w.pop("model.embed_tokens.weight")

    path, _ = _tied_files(tmp_path / "only", only_head)
    hf = transformers.MistralForCausalLM.from_pretrained(path).eval()  # ties the embedding to the lm_head
    args, weights = load_checkpoint(path)
    assert args.tie_word_embeddings and weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    assert_same_logits(hf, path)


def test_dtype(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path)
    _, weights = load_checkpoint(tmp_path, dtype=torch.float16)
    assert {w.dtype for w in weights.values()} == {torch.float16}


# ---- errors ----------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    hf_model("mistral").save_pretrained(path)
    return path


def edit_weights(path: Path, edit) -> None:
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"not a checkpoint directory \(no config.json or params.json\)"):
        load_checkpoint(tmp_path)


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json: unsupported architecture 'LlamaForCausalLM'"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    edit_weights(ckpt, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"ckpt: missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_checkpoint(ckpt)


def test_unexpected_tensor(ckpt):
    edit_weights(ckpt, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.0.extra.weight'"):
        load_checkpoint(ckpt)


def test_rotary_buffers_saved_by_older_transformers_are_ignored(ckpt):
    """`rotary_emb.inv_freq` (a buffer older transformers wrote into checkpoints) is not a weight: transformers
    ignores it on load, and so does the export, which computes the tables from rope_theta."""
    _, want = load_checkpoint(ckpt)
    edit_weights(ckpt, lambda sd: sd.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4)
                                            for i in range(2)}))
    _, got = load_checkpoint(ckpt)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _quantization_config(path: Path, record) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = record
    (path / "config.json").write_text(json.dumps(cfg))


def test_quantized_checkpoints_are_refused_naming_the_method(ckpt):
    """A GPTQ / AWQ layout (qweight, scales, qzeros in place of weight) or integer weights under a
    quantization_config: one error naming the method and what to export instead, not a missing-tensor puzzle."""
    _quantization_config(ckpt, {"quant_method": "gptq", "bits": 4, "group_size": 32})
    with pytest.warns(MixtrtWarning, match="is ignored"):  # float weights: read (the next test)
        _, want = load_checkpoint(ckpt, dtype=torch.float32)

    def gptq(sd):
        sd.pop("model.layers.0.self_attn.q_proj.weight")
        sd["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(8, 64, dtype=torch.int32)
        sd["model.layers.0.self_attn.q_proj.scales"] = torch.zeros(2, 64, dtype=torch.float16)

    original = (ckpt / "model.safetensors").read_bytes()
    edit_weights(ckpt, gptq)
    with pytest.raises(CheckpointError, match=r"ckpt: a quantized checkpoint \(config.json's quantization_config: "
                       r"gptq; no tensor 'model.layers.0.self_attn.q_proj.weight' .*export the unquantized "
                       r"checkpoint, with --precision int4 for INT4"):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(original)
    edit_weights(ckpt, lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.uint8)}))
    _quantization_config(ckpt, {"load_in_4bit": True})
    with pytest.raises(CheckpointError, match=r"a quantized checkpoint \(config.json's quantization_config: no "
                       r"quant_method; tensor 'model.norm.weight' stored as U8 "):
        load_checkpoint(ckpt)


def test_quantization_config_over_float_weights_warns_and_exports_them(ckpt):
    _, want = load_checkpoint(ckpt)
    _quantization_config(ckpt, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.warns(MixtrtWarning, match=r"config.json's quantization_config \(bitsandbytes\) is ignored: the "
                      r"weights are float"):
        _, got = load_checkpoint(ckpt)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_misshaped_tensor(ckpt):
    edit_weights(ckpt, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(CheckpointError,
                       match=r"model.safetensors: tensor 'model.norm.weight' has shape \[63\], expected \[64\]"):
        load_checkpoint(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file") as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file") as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def test_unreadable_safetensors_says_why(ckpt, monkeypatch):
    """The OS's reason (safetensors itself reports an unreadable file as missing)."""
    import builtins

    from mixtrt.export import checkpoint

    def refused(path, *a, **kw):
        if str(path).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *a, **kw)

    monkeypatch.setattr(checkpoint, "open", refused, raising=False)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read it \(Permission denied\)$"):
        load_checkpoint(ckpt)


def test_no_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_checkpoint(ckpt)


def test_missing_shard(tmp_path):
    hf_model("mistral").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: shard {shard.name} is missing"):
        load_checkpoint(tmp_path)


class NotATensor:
    """Unpickling this needs code outside torch's weights_only allow-list."""


def test_pth_needing_pickle(tmp_path):
    write_raw(hf_model("mistral"), tmp_path, "safetensors")
    (tmp_path / "consolidated.safetensors").unlink()
    torch.save({"tok_embeddings.weight": torch.zeros(2), "extra": NotATensor()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: needs pickle code .* weights_only=True") as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


def test_pth_in_the_legacy_format_is_one_clear_line(tmp_path):
    """torch's pre-1.6 (non-zip) format cannot be memory-mapped: one line saying what it is and what to do, not
    torch's own wording about mmap and _use_new_zipfile_serialization; nothing of it is unpickled."""
    write_raw(hf_model("mistral"), tmp_path, "safetensors")
    (tmp_path / "consolidated.safetensors").unlink()
    torch.save({"tok_embeddings.weight": torch.zeros(2)}, tmp_path / "consolidated.00.pth",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: not a readable .pth file \(not a zip archive, "
                       r"as torch writes them since 1.6: an older torch's format, or not a torch file\)") as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value) and "mmap" not in str(e.value)


def test_raw_without_weights(tmp_path):
    write_raw(hf_model("mistral"), tmp_path, "safetensors")
    (tmp_path / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="params.json but no consolidated.safetensors or consolidated"):
        load_checkpoint(tmp_path)


def test_raw_missing_tensor_names_raw_name(tmp_path):
    write_raw(hf_model("mixtral"), tmp_path, "pth")
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del sd["layers.1.feed_forward.experts.3.w2.weight"]
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers.1.feed_forward.experts.3.w2.weight'"):
        load_checkpoint(tmp_path)


def test_raw_rope_permutation_matches_mistral_inference_complex_rope():
    """Raw rows rotate as complex pairs (2j, 2j+1) (mistral-inference); after loading they rotate (j, j + D/2)."""
    from mixtrt.export.checkpoint import _rope_to_halves
    from mixtrt.plugins.swa.torch_op import apply_rope, rope_tables

    N, D, H, p = 2, 8, 16, 5
    g = torch.Generator().manual_seed(0)
    w_raw, x = torch.randn(N * D, H, generator=g), torch.randn(H, generator=g)
    cos, sin = rope_tables(D, 10000.0, 8)
    pairs = torch.view_as_complex((w_raw @ x).view(N, D // 2, 2).contiguous())  # [N, D/2]
    raw_rotated = torch.view_as_real(pairs * torch.complex(cos[p], sin[p])).flatten(1)  # [N, D] interleaved
    hf_rotated = apply_rope((_rope_to_halves(N)([w_raw]) @ x).view(N, 1, D), cos[p:p + 1], sin[p:p + 1])
    as_pairs = hf_rotated.view(N, 2, D // 2).transpose(1, 2).reshape(N, D)  # halves -> interleaved
    torch.testing.assert_close(as_pairs, raw_rotated)


def test_raw_underscored_sliding_window_is_the_window(tmp_path):
    """mistral-inference writes and reads `_sliding_window` as well as `sliding_window`: either is the model's
    window (it was ignored: no window, and logits wrong past it); two that disagree are refused."""
    from mixtrt.runtime.args import ModelArgs

    hf = hf_model("mistral", rope_theta=10000.0)  # window 5
    write_raw(hf, tmp_path, "safetensors")
    params = json.loads((tmp_path / "params.json").read_text())
    params["_sliding_window"] = params.pop("sliding_window")
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert ModelArgs.from_checkpoint_dir(tmp_path).sliding_window == 5
    assert_same_logits(hf, tmp_path)  # 14 positions: past the window
    (tmp_path / "params.json").write_text(json.dumps({**params, "sliding_window": 8}))
    with pytest.raises(ConfigError, match="sliding_window=8 and _sliding_window=5 disagree"):
        ModelArgs.from_checkpoint_dir(tmp_path)


def test_raw_tied_embeddings_and_fields_that_change_the_model(tmp_path):
    """params.json's `tied_embeddings: true` (no output.weight: the output is tok_embeddings) gives transformers'
    tied model's logits (it was a missing output.weight); a field that changes the model and is not read (Mistral's
    `yarn` RoPE scaling, which was skipped silently: wrong logits, a quantization, a moe field, an unknown field) is
    refused by name."""
    from mixtrt.runtime.args import ModelArgs

    hf = hf_model("mistral", rope_theta=10000.0, tie_word_embeddings=True)
    write_raw(hf, tmp_path, "safetensors")
    weights = load_file(tmp_path / "consolidated.safetensors")
    del weights["output.weight"]
    save_file(weights, tmp_path / "consolidated.safetensors")
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "tied_embeddings": True}))
    assert_same_logits(hf, tmp_path)
    for extra, said in (({"yarn": {"factor": 16.0, "original_max_position_embeddings": 4096}}, "yarn: YaRN RoPE"),
                        ({"llama_4_scaling": {"beta": 0.1}}, "llama_4_scaling: "),
                        ({"quantization": {"qformat_weight": "fp8_e4m3"}}, "quantization: a quantized checkpoint"),
                        ({"moe": {"num_experts": 2, "num_experts_per_tok": 1, "num_shared_experts": 1}},
                         "moe.num_shared_experts: a field mixtrt does not read"),
                        ({"model_type": "mamba"}, "model_type 'mamba' is not supported"),
                        ({"qk_norm": True}, "qk_norm: a field mixtrt does not read"),
                        ({"x\ny": 1}, "'x\\ny': a field mixtrt does not read"),  # any key text, one line
                        ({"lora": {"enable": True, "rank": 16}}, "lora: a LoRA adapter is not supported")):
        (tmp_path / "params.json").write_text(json.dumps({**params, **extra}))
        with pytest.raises(ConfigError, match=f"params.json: {re.escape(said)}"):
            ModelArgs.from_checkpoint_dir(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**params, "yarn": None, "lora": {}, "max_batch_size": 1}))
    assert ModelArgs.from_checkpoint_dir(tmp_path).rope_theta == 10000.0  # null and {} are left out
    (tmp_path / "params.json").write_text(json.dumps({**params, "lora": {"enable": False, "rank": 16}}))
    assert ModelArgs.from_checkpoint_dir(tmp_path).rope_theta == 10000.0  # mistral-inference's LoRA switched off


def test_raw_with_both_weight_formats_is_refused(tmp_path):
    write_raw(hf_model("mistral"), tmp_path, "safetensors")
    write_raw(hf_model("mistral"), tmp_path, "pth")
    with pytest.raises(CheckpointError, match=r"both consolidated.safetensors and consolidated.00.pth: keep one"):
        load_checkpoint(tmp_path)


def test_another_layout_names_what_is_missing_and_what_is_there(tmp_path):
    """Mixtral's first release fused its experts (`block_sparse_moe.w1` [E*I, H]): the error names a missing tensor,
    the file, and the tensors we did not expect, which say which layout it is."""
    write_raw(hf_model("mixtral"), tmp_path, "safetensors")
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "consolidated.safetensors")
    for k in [k for k in sd if ".feed_forward.experts." in k]:
        sd[k.replace(".feed_forward.experts.", ".block_sparse_moe.experts.")] = sd.pop(k)
    save_file(sd, tmp_path / "consolidated.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers.0.feed_forward.experts.0.w1.weight' \(and "
                                              r"\d+ more\) for MixtralForCausalLM in consolidated.safetensors; the "
                                              r"files hold 'layers.0.block_sparse_moe.experts.0.w1.weight'"):
        load_checkpoint(tmp_path)


def test_config_json_without_weights_beside_a_raw_checkpoint_exports_the_raw_one(tmp_path):
    """A mistralai repository downloaded as its *.json and consolidated.safetensors: config.json has no weights
    beside it, params.json has its own: the raw checkpoint is read (with a warning at export); with the Hugging Face
    weights there too, config.json wins as transformers reads it; with neither, the error names what is missing."""
    from mixtrt.runtime.args import described_by

    hf = hf_model("mistral", rope_theta=10000.0)
    write_raw(hf, tmp_path, "safetensors")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    assert described_by(tmp_path) == "params.json"
    assert_same_logits(hf, tmp_path)
    make_checkpoint(tmp_path / "ck", "mistral", max_position_embeddings=64)
    raw = make_hf_model("mistral", vocab_size=32000, sliding_window=5, rope_theta=10000.0)  # the tokenizer's
    write_raw(raw, tmp_path / "ck", "safetensors")  # params.json + consolidated.safetensors beside the HF files
    assert described_by(tmp_path / "ck") == "config.json"  # its model.safetensors is there
    (tmp_path / "ck" / "model.safetensors").unlink()
    ck = tmp_path / "ck"
    # the shards' index without its shards (what `*.json` takes), pickled weights (never loaded): still the raw one
    index = {"weight_map": {"lm_head.weight": "model-1.safetensors"}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    (ck / "pytorch_model.bin").write_bytes(b"never unpickled")
    assert described_by(ck) == "params.json"
    (ck / "model-1.safetensors").symlink_to(ck / "gone")  # a shard there, if only as a link to nothing: the HF one,
    assert described_by(ck) == "config.json"  # whose loader names what is wrong
    (ck / "model-1.safetensors").unlink()
    (ck / "model.safetensors").symlink_to(ck / "gone")
    assert described_by(ck) == "config.json"
    (ck / "model.safetensors").unlink()
    config = (ck / "config.json").read_bytes()
    (ck / "config.json").unlink()
    (ck / "config.json").symlink_to(ck / "gone")  # a config.json link to nothing is not skipped over
    assert described_by(ck) == "config.json"
    with pytest.raises(ConfigError, match="config.json: a symbolic link to a file that does not exist"):
        load_checkpoint(ck)
    (ck / "config.json").unlink()
    (ck / "config.json").write_bytes(config)
    with pytest.warns(MixtrtWarning, match="config.json has no safetensors weights beside it"):
        art = export_onnx(tmp_path / "ck", tmp_path / "art", progress=None)
    assert Manifest.read(art).args.max_position_embeddings == 512  # params.json's max_seq_len, not config.json's 64
    (ck / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-1.safetensors is missing"):  # the HF one, not raw
        load_checkpoint(ck)
