"""Export records the checkpoint's tokenizer, chat format and generation defaults; the runtime loads them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mixtrt.export import export_onnx
from mixtrt.runtime.chat_format import ChatFormat, resolve_chat_format
from mixtrt.runtime.errors import ArtifactError, ConfigError, MixtrtWarning
from mixtrt.runtime.generation import GenerationConfig, Generator
from mixtrt.runtime.inspect import inspect_artifact
from mixtrt.runtime.manifest import MANIFEST, file_entries
from tests.checkpoints import make_checkpoint

mistral_common = pytest.importorskip("mistral_common")
DATA = Path(mistral_common.__file__).parent / "data"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
TINY = dict(sliding_window=8, max_position_embeddings=64, num_hidden_layers=1, hidden_size=32,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=48)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def v3_export(tmp_path_factory) -> tuple[Path, Path]:
    """Mistral-7B-Instruct-v0.3's tokenizer layout (tokenizer.model + tokenizer.model.v3 + a Jinja template)
    on a tiny 32768-embedding model whose generation_config.json samples."""
    root = tmp_path_factory.mktemp("chat-export")
    ck = make_checkpoint(root / "ck", "mistral", tokenizer=False, vocab_size=32768, **TINY)
    shutil.copy(V3, ck / "tokenizer.model")
    shutil.copy(V3, ck / "tokenizer.model.v3")
    (ck / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    (ck / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "max_length": 4096, "num_beams": 1}))
    # keys without a counterpart: warned about where they would change transformers' tokens (num_beams 1 would not)
    with pytest.warns(UserWarning, match=r"generation_config.json: max_length=4096 would change transformers' tokens "
                                         "and have no counterpart in mixtrt: not used$"):
        return ck, export_onnx(ck, root / "art", progress=None)


def test_mistral_common_file_is_recorded_and_used(v3_export):
    from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer

    _, art = v3_export
    info = inspect_artifact(art)
    # tokenizer.model is not used: not copied
    assert sorted(info["files"]) == ["model.onnx", "model.onnx.data", "tokenizer.model.v3", "weights.json"]
    assert info["chat_format"] == "mistral-common v3 (tokenizer.model.v3)"
    assert info["generation_defaults"] == ("eos [2] (generation_config.json); do_sample True, temperature 0.7, "
                                           "top_p 0.8 (generation_config.json); not used: max_length, num_beams")
    gen = Generator.load(art, threads=1)
    assert isinstance(gen.tokenizer, MistralCommonTokenizer)
    assert gen.tokenizer.apply_chat_template(MESSAGES) == MistralCommonTokenizer(V3).apply_chat_template(MESSAGES)
    out = gen.chat(MESSAGES, max_new_tokens=3, seed=0)
    assert out.stats.prompt_tokens == len(MistralCommonTokenizer(V3).apply_chat_template(MESSAGES))


def test_chat_format_jinja_exports_the_template_over_the_mistral_common_file(v3_export, tmp_path, capsys):
    """`mixtrt export --chat-format jinja`: the same layout renders its Jinja template, as transformers'
    apply_chat_template does (vLLM's --tokenizer-mode hf), tokenized by tokenizer.model."""
    from mixtrt.cli import main

    ck, _ = v3_export
    assert main(["export", str(ck), "--out", str(tmp_path / "art"), "--chat-format", "jinja", "--quiet"]) == 0
    info = inspect_artifact(tmp_path / "art")
    assert "tokenizer.model.v3" not in info["files"] and info["chat_format"].startswith("Jinja chat template")
    tok = Generator.load(tmp_path / "art", threads=1).tokenizer
    text = tok.decode(tok.apply_chat_template(MESSAGES), skip_special=False)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_generation_defaults_and_explicit_options(v3_export):
    """The checkpoint's values are the defaults; options override them; transformers' own fallbacks
    (top_k 50) are not copied; a config given whole is used as it is, with the artifact's eos ids."""
    _, art = v3_export
    gen = Generator.load(art, threads=1)
    cfg = gen.config()
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.eos_token_id) == (True, 0.7, 0.8, 0, (2,))
    assert cfg.max_new_tokens == GenerationConfig().max_new_tokens  # max_length is not max_new_tokens
    cfg = gen.config(temperature=0.5, do_sample=False)
    assert (cfg.do_sample, cfg.temperature, cfg.top_p) == (False, 0.5, 0.8)
    cfg = gen.config(GenerationConfig(max_new_tokens=4))
    assert (cfg.do_sample, cfg.top_p, cfg.eos_token_id) == (False, 1.0, (2,))
    a, b = (gen.chat(MESSAGES, max_new_tokens=4, seed=3) for _ in range(2))
    assert a.token_ids == b.token_ids  # sampled (the checkpoint's default), seeded


def _rerecord(art: Path, to: Path, chat: ChatFormat) -> Path:
    """A copy of `art` whose tokenizer files and manifest `chat` record are `chat`'s (as export writes them)."""
    shutil.copytree(art, to)
    manifest = json.loads((to / MANIFEST).read_text())
    old = ChatFormat.from_dict(manifest["chat"])
    for name in old.files:
        (to / name).unlink()
        del manifest["files"][name]
    for name, source in chat.files.items():
        shutil.copyfile(source, to / name)
    manifest["files"].update(file_entries(to, list(chat.files)))
    manifest["chat"] = chat.to_dict()
    (to / MANIFEST).write_text(json.dumps(manifest))
    return to


def test_jinja_template_with_added_tokens_and_eos_list(v3_export, tmp_path):
    """A ChatML checkpoint: <|im_start|> / <|im_end|> past the sentencepiece vocabulary, and the eos list of
    generation_config.json (<|im_end|> = 32000) is what generation stops on."""
    from mixtrt.runtime.jinja_tokenizer import JinjaChatTokenizer

    _, art = v3_export
    ck = tmp_path / "chatml"
    ck.mkdir()
    shutil.copy(DATA / "tokenizer.model.v1", ck / "tokenizer.model")
    (ck / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "legacy": False,  # legacy would prefix "▁" to each stretch
        "added_tokens_decoder": {"32000": {"content": "<|im_end|>"}, "32001": {"content": "<|im_start|>"}}}))
    (ck / "generation_config.json").write_text(json.dumps({"eos_token_id": 32000}))
    chatml = _rerecord(art, tmp_path / "art", resolve_chat_format(ck, vocab_size=32768))
    gen = Generator.load(chatml, threads=1)
    assert isinstance(gen.tokenizer, JinjaChatTokenizer)
    assert gen.config().eos_token_id == (32000,) and gen.tokenizer.eos_id == 32000
    ids = gen.tokenizer.apply_chat_template(MESSAGES)
    assert ids[0] == 32001 and ids.count(32000) == 4 and ids.count(32001) == 5  # 4 messages + the prompt
    assert gen.tokenizer.decode(ids) == gen.tokenizer.render_chat(MESSAGES).replace("<|im_start|>", "").replace(
        "<|im_end|>", "")  # control tokens never show as text
    assert "Jinja chat template from tokenizer_config.json (default)" in inspect_artifact(chatml)["chat_format"]


@pytest.mark.parametrize("generation_eos", [2, [2, 32000]])
def test_a_template_eos_that_generation_does_not_stop_on_is_said(exported, tmp_path, generation_eos):
    """A ChatML fine-tune whose generation_config.json still names </s>: its replies would run past <|im_end|>,
    so the export warns (and not once generation stops on it)."""
    import warnings

    ck = make_checkpoint(tmp_path / "ck", "mistral", vocab_size=32002, **TINY)
    (ck / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>",
        "added_tokens_decoder": {"32000": {"content": "<|im_end|>"}, "32001": {"content": "<|im_start|>"}}}))
    (ck / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    busy = tmp_path / "busy"  # a directory export refuses to replace: it stops right after the tokenizer checks
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    with warnings.catch_warnings(record=True) as said, pytest.raises(ArtifactError, match="not a mixtrt artifact"):
        warnings.simplefilter("always")
        export_onnx(ck, busy, progress=None)
    lines = [str(w.message) for w in said if issubclass(w.category, MixtrtWarning)]
    if generation_eos == 2:
        [line] = lines
        assert "the chat template's eos_token '<|im_end|>' (id 32000) is not among the eos ids generation stops " \
               "on, [2] (from generation_config.json)" in line
    else:
        assert lines == []


def test_manifest_chat_record_is_checked(v3_export, tmp_path):
    _, art = v3_export
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    for edit, match in [
        (lambda d: d.pop("chat"), "no chat record .* export the checkpoint again"),
        (lambda d: d["chat"].update(tokenizer_file="tekken.json"), "files does not list tekken.json"),
        (lambda d: d["chat"].update(kind="tiktoken"), "chat format kind must be one of"),
        (lambda d: d["chat"].update(added=[]), r"chat format has unknown fields \['added'\]"),
    ]:
        d = json.loads(json.dumps(manifest))
        edit(d)
        (copy / MANIFEST).write_text(json.dumps(d))
        with pytest.raises(ArtifactError, match=match):
            Generator.load(copy)


# ---------------------------------------------------------------- substitution is loud, or refused


def _checkpoint_without_tokenizer(exported, tmp_path: Path) -> Path:
    ck, _ = exported["mistral-window"]
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    (copy / "tokenizer.model").unlink()
    return copy


def test_missing_tokenizer_substitutes_v1_loudly_for_32000_embeddings(exported, tmp_path):
    ck = _checkpoint_without_tokenizer(exported, tmp_path)
    busy = tmp_path / "busy"  # a directory export refuses to replace: it stops right after the tokenizer check
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    with pytest.warns(MixtrtWarning, match="no tokenizer.model: using mistral-common's Mistral v1 tokenizer"), \
            pytest.raises(ArtifactError, match="not a mixtrt artifact"):
        export_onnx(ck, busy, progress=None)


def test_missing_or_dangling_tokenizer_is_refused_before_loading_weights(exported, tmp_path):
    ck = _checkpoint_without_tokenizer(exported, tmp_path)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "vocab_size": 32768}))
    with pytest.raises(ConfigError, match="the model's 32768 embeddings are not the 32000 pieces"):
        export_onnx(ck, tmp_path / "art", progress=None)
    (ck / "tokenizer.model").symlink_to(tmp_path / "moved-away.model")
    with pytest.raises(ConfigError, match="tokenizer.model is a link to a missing file"):
        export_onnx(ck, tmp_path / "art", progress=None)
    assert not (tmp_path / "art").exists()
