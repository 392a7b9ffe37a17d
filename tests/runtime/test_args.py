"""ModelArgs from transformers 4.x / 5.x configs and raw params.json; the checks made on them."""

import pytest

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.errors import ConfigError

MISTRAL = {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "sliding_window": 4096, "rope_theta": 10000.0}


def test_mistral_config():
    a = ModelArgs.from_hf_config(MISTRAL)
    assert (a.head_dim, a.kv_group, a.window(0), a.moe, a.head) == (128, 4, 4096, None, "causal_lm")
    assert ModelArgs.from_dict(a.to_dict()) == a


def test_mixtral_transformers_5_fields():
    cfg = {**MISTRAL, "architectures": ["MixtralForCausalLM"], "sliding_window": None, "num_local_experts": 8,
           "num_experts_per_tok": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
           "eos_token_id": [2, 31999], "head_dim": 64}
    a = ModelArgs.from_hf_config(cfg)
    assert a.moe is not None and (a.moe.num_experts, a.moe.num_experts_per_tok) == (8, 2)
    assert (a.rope_theta, a.eos_token_ids, a.head_dim, a.window(5)) == (1e6, (2, 31999), 64, None)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "MixtralForCausalLM"])
def test_fields_left_out_take_transformers_defaults_for_the_family(arch):
    """A config.json without rope_theta, sliding_window, rms_norm_eps, max_position_embeddings or
    num_key_value_heads exports as transformers loads it: MistralConfig's and MixtralConfig's defaults differ
    (rope_theta 1e4 / 1e6, window 4096 / none, eps 1e-6 / 1e-5)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle for config defaults")
    sizes = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
             "num_attention_heads": 8}
    moe = {"num_local_experts": 4, "num_experts_per_tok": 2} if arch.startswith("Mixtral") else {}
    a = ModelArgs.from_hf_config({"architectures": [arch], **sizes, **moe})
    hf = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**sizes, **moe)
    theta = hf.rope_parameters["rope_theta"] if getattr(hf, "rope_parameters", None) else hf.rope_theta
    assert (a.rope_theta, a.sliding_window, a.rms_norm_eps, a.max_position_embeddings, a.num_key_value_heads) == (
        theta, hf.sliding_window, hf.rms_norm_eps, hf.max_position_embeddings, hf.num_key_value_heads)
    # written out as null, the window is none for either family
    assert ModelArgs.from_hf_config({"architectures": [arch], **sizes, **moe, "sliding_window": None}
                                    ).sliding_window is None


def test_layer_types_choose_the_window_per_layer():
    a = ModelArgs.from_hf_config({**MISTRAL, "num_hidden_layers": 2,
                                  "layer_types": ["sliding_attention", "full_attention"]})
    assert [a.window(0), a.window(1)] == [4096, None]


def test_a_mixtral_configs_layer_types_are_not_read():
    """transformers' Mixtral reads no layer_types: every layer keeps sliding_window, also where it is none (a
    sliding_attention entry there is no window to miss), with a warning naming the file."""
    from tests.checkpoints import hf_config

    base = {**hf_config("mixtral").to_dict(), "architectures": ["MixtralForCausalLM"], "num_hidden_layers": 2}
    for window in (4, None):
        with pytest.warns(UserWarning, match=r"c/config.json: layer_types is ignored"):
            cfg = {**base, "sliding_window": window, "layer_types": ["sliding_attention", "full_attention"]}
            a = ModelArgs.from_hf_config(cfg, source="c/config.json")
        assert a.layer_types is None and [a.window(0), a.window(1)] == [window, window]


def test_raw_params_json():
    a = ModelArgs.from_params_json({"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336,
                                    "n_heads": 32, "n_kv_heads": 8, "norm_eps": 1e-5, "vocab_size": 32000,
                                    "moe": {"num_experts": 8, "num_experts_per_tok": 2}})
    assert a.architecture == "MixtralForCausalLM" and a.rope_theta == 1e6 and a.moe is not None


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "linear", "factor": 1.0, "rope_theta": 1e6}},
                                  {"rope_scaling": {"type": "linear", "factor": 1}, "rope_theta": 1e6}])
def test_linear_rope_scaling_by_1_is_unscaled_rope(rope):
    """transformers divides the frequencies by the factor: by 1 they are the unscaled ones, so such a config exports
    (it was refused as scaled RoPE); any other factor stays refused."""
    torch = pytest.importorskip("torch", reason="transformers is the oracle for RoPE's frequencies")
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle for RoPE's frequencies")
    a = ModelArgs.from_hf_config({**MISTRAL, **rope})
    assert a.rope_theta == 1e6 and a == ModelArgs.from_hf_config({**MISTRAL, "rope_theta": 1e6})
    sizes = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    freqs = [transformers.models.mistral.modeling_mistral.MistralRotaryEmbedding(
        transformers.MistralConfig(**sizes, **r)).inv_freq for r in (rope, {"rope_theta": 1e6})]
    torch.testing.assert_close(freqs[0], freqs[1], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="rope type 'linear' is not supported"):
        ModelArgs.from_hf_config({**MISTRAL, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})


@pytest.mark.parametrize("edit, match", [
    ({"architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"num_key_value_heads": 5}, "not a multiple"),
    ({"layer_types": ["sliding_attention"]}, "layer_types has 1 entries"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
])
def test_configs_we_cannot_run_are_refused(edit, match):
    with pytest.raises(ConfigError, match=match):
        ModelArgs.from_hf_config({**MISTRAL, **edit})


def test_missing_field_names_the_file_and_field():
    cfg = dict(MISTRAL)
    del cfg["vocab_size"]
    with pytest.raises(ConfigError, match="my/config.json: missing required field 'vocab_size'"):
        ModelArgs.from_hf_config(cfg, source="my/config.json")


def test_id2label_of_the_labelled_heads():
    cfg = {**MISTRAL, "architectures": ["MistralForTokenClassification"], "id2label": {"1": "B-PER", "0": "O"}}
    a = ModelArgs.from_hf_config(cfg)
    assert (a.head, a.num_labels, a.id2label) == ("token_classification", 2, ("O", "B-PER"))
    assert ModelArgs.from_dict(a.to_dict()) == a
    plain = ModelArgs.from_hf_config({**MISTRAL, "architectures": ["MistralForSequenceClassification"],
                                      "num_labels": 3})
    assert plain.id2label == ("LABEL_0", "LABEL_1", "LABEL_2")  # transformers' default names


def test_problem_type_of_a_sequence_classifier():
    """config.json's problem_type decides how scores are made (transformers' text-classification pipeline); the
    manifest keeps it; other heads ignore it as transformers' pipelines do; an unknown value is refused."""
    seq = {**MISTRAL, "architectures": ["MistralForSequenceClassification"]}
    for kind in ("regression", "multi_label_classification", "single_label_classification"):
        a = ModelArgs.from_hf_config({**seq, "problem_type": kind})
        assert a.problem_type == kind and ModelArgs.from_dict(a.to_dict()) == a
    assert "problem_type" not in ModelArgs.from_hf_config(seq).to_dict()  # what older mixtrt read
    tok = ModelArgs.from_hf_config({**seq, "architectures": ["MistralForTokenClassification"],
                                    "problem_type": "regression"})
    assert tok.problem_type is None
    with pytest.raises(ConfigError, match="problem_type must be null or .* got 'ranking'"):
        ModelArgs.from_hf_config({**seq, "problem_type": "ranking"})
    with pytest.raises(ConfigError, match="problem_type must be null or .* for a token_classification model"):
        ModelArgs.from_dict({**tok.to_dict(), "problem_type": "regression"})
    # one label under a softmax scores 1.0 whatever the text: refused, as transformers refuses it
    with pytest.raises(ConfigError, match="single_label_classification needs num_labels >= 2, got 1"):
        ModelArgs.from_hf_config({**seq, "problem_type": "single_label_classification", "num_labels": 1})
    assert ModelArgs.from_hf_config({**seq, "problem_type": "regression", "num_labels": 1}).num_labels == 1
    # pad_token_id -1 (older configs) matches no token: transformers pools each row's last token, as no pad id does
    assert ModelArgs.from_hf_config({**seq, "pad_token_id": -1}).pad_token_id is None
    assert ModelArgs.from_hf_config({**seq, "pad_token_id": 0}).pad_token_id == 0


def test_a_causal_lm_keeps_no_label_names():
    """transformers writes id2label into every config; a causal LM's manifest model stays what older mixtrt read."""
    a = ModelArgs.from_hf_config({**MISTRAL, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}})
    assert a.id2label is None and "id2label" not in a.to_dict()
    assert ModelArgs.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("labels, match", [
    ({"0": "O", "2": "B-PER"}, "keys must be the label ids 0..1"),
    ({"0": "O", "x": "B-PER"}, "keys must be the label ids"),
    ({"0": "O", "1": 5}, "values names"),
    (["O", "B-PER"], "id2label must be an object"),
    ({"0": "A", "1": "B", "2": "A"}, "id2label names labels 0 and 2 both 'A': each label needs its own name"),
])
def test_bad_id2label_is_refused(labels, match):
    cfg = {**MISTRAL, "architectures": ["MistralForSequenceClassification"], "id2label": labels}
    with pytest.raises(ConfigError, match=match):
        ModelArgs.from_hf_config(cfg)


def test_num_labels_must_agree_with_id2label():
    cfg = {**MISTRAL, "architectures": ["MistralForSequenceClassification"], "id2label": {"0": "A"},
           "num_labels": 2}
    with pytest.raises(ConfigError, match="num_labels=2 but id2label names 1 labels"):
        ModelArgs.from_hf_config(cfg)
    with pytest.raises(ConfigError, match="id2label must name each of the 2 labels"):
        ModelArgs.from_dict({**ModelArgs.from_hf_config({**cfg, "num_labels": 1}).to_dict(), "num_labels": 2})


def test_eos_token_id_null_means_no_eos_token():
    """transformers reads `"eos_token_id": null` as no EOS token (generate never stops on one); a missing field is
    Mistral's 2. The null used to fall back to 2, so a small vocabulary's ordinary token 2 ended generation."""
    assert ModelArgs.from_hf_config({**MISTRAL, "eos_token_id": None}).eos_token_ids == ()
    absent = {k: v for k, v in MISTRAL.items() if k != "eos_token_id"}
    assert ModelArgs.from_hf_config(absent).eos_token_ids == (2,)
    a = ModelArgs.from_hf_config({**MISTRAL, "eos_token_id": None})
    assert ModelArgs.from_dict(a.to_dict()).eos_token_ids == ()  # through the manifest


def test_eos_token_id_null_generates_past_token_2(tmp_path):
    """End to end: an artifact of such a checkpoint (8 pieces, so token 2 is an ordinary, frequent token) generates
    through token 2, as transformers' generate does."""
    import numpy as np
    import sentencepiece as spm

    from mixtrt.export import export_onnx
    from mixtrt.runtime.generation import Generator
    from tests.checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "mistral", tokenizer=False, vocab_size=8, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, eos_token_id=None)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join("abcde"[j % 5] * (1 + (i + j) % 3) for j in range(5)) for i in range(50)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(ck / "tokenizer"), vocab_size=8, model_type="char",
                                   character_coverage=1.0, hard_vocab_limit=False, add_dummy_prefix=False, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    gen = Generator.load(export_onnx(ck, tmp_path / "art", progress=None), threads=1)
    assert gen.backend.args.eos_token_ids == ()
    assert gen.defaults.describe(()).startswith("eos none: never stops on one (config.json)")
    rng = np.random.default_rng(0)
    for _ in range(20):  # some prompt whose greedy continuation passes through token 2
        [out] = gen.generate([rng.integers(3, 8, 4).tolist()], max_new_tokens=24, do_sample=False)
        if 2 in out.token_ids[:-1]:
            break
    else:
        raise AssertionError("no greedy continuation produced token 2: the test proves nothing")
    assert out.finish_reason == "length" and len(out.token_ids) == 24
