"""resolve_chat_format: which tokenizer and chat format wins; the manifest record; generation_config.json."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mixtrt.runtime.chat_format import (
    ChatFormat,
    GenerationDefaults,
    load_chat_tokenizer,
    read_generation_defaults,
    resolve_chat_format,
    unused_choices,
)
from mixtrt.runtime.errors import ConfigError, MixtrtWarning, NewerRecordError
from mixtrt.runtime.generation import GenerationConfig
from mixtrt.runtime.jinja_tokenizer import JinjaChatTokenizer
from mixtrt.runtime.tokenizer import Tokenizer, shipped_tokenizer_path

mistral_common = pytest.importorskip("mistral_common")
DATA = Path(mistral_common.__file__).parent / "data"
TEMPLATE = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"


def _dir(tmp_path: Path, *files: str, config: dict | None = None, generation: dict | None = None) -> Path:
    """A checkpoint directory holding `files` (names from mistral-common's data folder, `name=source`
    to rename) and the given tokenizer_config.json / generation_config.json."""
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    for f in files:
        name, _, source = f.partition("=")
        shutil.copy(DATA / (source or name), d / name)
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


V3 = "tokenizer.model.v3=mistral_instruct_tokenizer_240323.model.v3"
V3_AS_MODEL = "tokenizer.model=mistral_instruct_tokenizer_240323.model.v3"


# ---------------------------------------------------------------- which one wins


def test_mistral_common_file_wins_over_template(tmp_path):
    """Mistral-7B-Instruct-v0.3's layout: tokenizer.model + tokenizer.model.v3 + a chat_template."""
    d = _dir(tmp_path, V3_AS_MODEL, V3, config={"chat_template": TEMPLATE})
    fmt = resolve_chat_format(d)
    assert (fmt.kind, fmt.tokenizer_file, fmt.tokenizer_version) == ("mistral-common", "tokenizer.model.v3", "v3")
    assert dict(fmt.files) == {"tokenizer.model.v3": str(d / "tokenizer.model.v3")}
    assert fmt.describe() == "mistral-common v3 (tokenizer.model.v3)"  # installed here: no install hint
    # --chat-format: the template as transformers renders it (vLLM's --tokenizer-mode hf), or mistral-common named
    jinja = resolve_chat_format(d, prefer="jinja")
    assert (jinja.kind, jinja.tokenizer_file, jinja.templates["default"]) == ("jinja", "tokenizer.model", TEMPLATE)
    assert dict(jinja.files) == {"tokenizer.model": str(d / "tokenizer.model")}
    assert resolve_chat_format(d, prefer="mistral-common") == fmt
    (d / "tokenizer.model.v3").unlink()
    with pytest.raises(ConfigError, match="--chat-format mistral-common: .* ships no mistral-common tokenizer file"):
        resolve_chat_format(d, prefer="mistral-common")
    (d / "tokenizer_config.json").unlink()
    shutil.copy(DATA / "mistral_instruct_tokenizer_240323.model.v3", d / "tokenizer.model.v3")
    with pytest.raises(ConfigError, match="--chat-format jinja: .* has no chat template"):
        resolve_chat_format(d, prefer="jinja")
    with pytest.raises(ConfigError, match="--chat-format must be one of auto, mistral-common, jinja, got 'hf'"):
        resolve_chat_format(d, prefer="hf")


def test_tekken_and_versions(tmp_path):
    d = _dir(tmp_path, "tekken.json=tekken_240718.json")
    fmt = resolve_chat_format(d)
    assert (fmt.kind, fmt.tokenizer_file, fmt.tokenizer_version) == ("mistral-common", "tekken.json", "v3")
    (d / "tekken.json").unlink()
    shutil.copy(DATA / "mistral_instruct_tokenizer_241114.model.v7m1", d / "tokenizer.model.v7m1")
    assert resolve_chat_format(d).tokenizer_version == "v7m1"
    shutil.copy(DATA / "tekken_240718.json", d / "tekken.json")
    with pytest.raises(ConfigError, match=r"several mistral-common tokenizer files \(tekken.json, tokenizer.model.v7"):
        resolve_chat_format(d)


def test_v1_file_is_the_builtin_format(tmp_path):
    d = _dir(tmp_path, "tokenizer.model.v1", config={"chat_template": TEMPLATE})
    fmt = resolve_chat_format(d)
    assert (fmt.kind, fmt.tokenizer_file, dict(fmt.files)) == ("v1", "tokenizer.model",
                                                                {"tokenizer.model": str(d / "tokenizer.model.v1")})


def test_template_sources_in_transformers_order(tmp_path):
    d = _dir(tmp_path, V3_AS_MODEL, config={"chat_template": TEMPLATE, "legacy": True})
    fmt = resolve_chat_format(d)
    assert (fmt.kind, fmt.template_origin, dict(fmt.templates)) == ("jinja", "tokenizer_config.json",
                                                                    {"default": TEMPLATE})
    assert fmt.prepend_scheme == "always"
    assert fmt.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (d / "chat_template.jinja").write_text("{{ 'file' }}")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'tools' }}")
    fmt = resolve_chat_format(d)
    assert fmt.template_origin == "chat_template.jinja"
    assert dict(fmt.templates) == {"default": "{{ 'file' }}", "tool_use": "{{ 'tools' }}"}
    tok = load_chat_tokenizer(d, fmt)
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "file"
    assert tok.render_chat([{"role": "user", "content": "x"}], tools=[{"type": "function"}]) == "tools"


def test_template_list_and_special_tokens(tmp_path):
    config = {
        "chat_template": [{"name": "default", "template": TEMPLATE}, {"name": "rag", "template": "x"}],
        "bos_token": {"content": "<s>", "lstrip": False, "__type": "AddedToken"}, "eos_token": "</s>",
        "pad_token": None, "unk_token": "<unk>", "extra_special_tokens": {"image_token": "[IMG]"},
        "add_prefix_space": False,
        "added_tokens_decoder": {"32000": {"content": "<pad>", "special": True}},
    }
    d = _dir(tmp_path, "tokenizer.model=tokenizer.model.v1", config=config)
    fmt = resolve_chat_format(d)
    # transformers builds a checkpoint's tokenizer from tokenizer.model's own settings: add_prefix_space is not read
    assert set(fmt.templates) == {"default", "rag"} and fmt.prepend_scheme == "always"
    assert fmt.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                  "image_token": "[IMG]"}
    assert [(t.id, t.content) for t in fmt.added_tokens] == [(32000, "<pad>")]
    assert "Jinja chat template from tokenizer_config.json (default, rag)" in fmt.describe()
    with pytest.raises(ConfigError, match="32001 token ids but the model has only 32000"):
        load_chat_tokenizer(d, fmt, model_vocab_size=32000)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TOKENS = [{"id": 32000, "content": "<|im_end|>", "special": True, "lstrip": False, "rstrip": False,
                  "single_word": False, "normalized": False},
                 {"id": 32001, "content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False,
                  "single_word": False, "normalized": False}]


@pytest.mark.parametrize("layout", ["added_tokens.json", "tokenizer.json", "tokenizer.json with a decoder"])
def test_added_tokens_outside_tokenizer_config_count_as_transformers_reads_them(tmp_path, layout):
    """A ChatML fine-tune saved before transformers 4.34 (added_tokens.json, special_tokens_map.json, no
    added_tokens_decoder), or whose added tokens are only in tokenizer.json: the same ids as transformers, the
    eos its special tokens name, not the tokens spelled out as text."""
    transformers = pytest.importorskip("transformers")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "unk_token": "<unk>", "chat_template": CHATML}
    d = _dir(tmp_path, "tokenizer.model=tokenizer.model.v1", config=config)
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 32002}))
    if layout == "added_tokens.json":
        (d / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32000, "<|im_start|>": 32001}))
        (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>",
                                                               "unk_token": "<unk>"}))
    else:
        base = transformers.AutoTokenizer.from_pretrained(d)  # its tokenizer.json, with the ChatML tokens added
        base.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|im_start|>"]})
        base.backend_tokenizer.save(str(d / "tokenizer.json"))
        if layout == "tokenizer.json with a decoder":  # the config lists only the sentencepiece specials
            config["added_tokens_decoder"] = {str(i): {"content": c, "special": True}
                                              for i, c in enumerate(["<unk>", "<s>", "</s>"])}
        (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    fmt = resolve_chat_format(d, vocab_size=32002)
    assert [(t.id, t.content) for t in fmt.added_tokens if t.id >= 32000] == [(32000, "<|im_end|>"),
                                                                                 (32001, "<|im_start|>")]
    ours = load_chat_tokenizer(None, fmt, 32002)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ours.apply_chat_template(messages) == list(want)
    assert ours.eos_id == hf.eos_token_id == 32000


def test_v1_without_template_and_shipped_tokenizer(tmp_path):
    """Without tokenizer.model only a 32000-embedding model gets the shipped v1 one, and the record says so."""
    d = _dir(tmp_path, config={"bos_token": "<s>"})
    fmt = resolve_chat_format(d, vocab_size=32000)
    assert (fmt.kind, dict(fmt.files)) == ("v1", {"tokenizer.model": str(shipped_tokenizer_path())})
    assert fmt.note is not None and "no tokenizer.model: using mistral-common's Mistral v1 tokenizer" in fmt.note
    assert fmt.describe() == f"built-in Mistral v1 instruct format, tokenizer.model; warning: {fmt.note}"
    assert ChatFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    for size, match in [(32768, "the model's 32768 embeddings are not the 32000 pieces of the Mistral v1 tokenizer"),
                        (None, "vocabulary size was not given")]:
        with pytest.raises(ConfigError, match=match):
            resolve_chat_format(d, vocab_size=size)
    art = tmp_path / "art"
    art.mkdir()
    shutil.copy(shipped_tokenizer_path(), art / "tokenizer.model")
    tok = load_chat_tokenizer(art, fmt, model_vocab_size=32000)
    assert isinstance(tok, Tokenizer) and tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        Tokenizer.load().apply_chat_template([{"role": "user", "content": "Hi"}])
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer.json alone is not supported"):
        resolve_chat_format(d, vocab_size=32000)


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.model.v3", "tekken.json", "tokenizer_config.json"])
def test_unreadable_tokenizer_file_is_refused(tmp_path, name):
    """A dangling link or a directory where a tokenizer file should be is an error, never skipped."""
    d = _dir(tmp_path, "tokenizer.model=tokenizer.model.v1")
    target = d / name
    if target.exists():
        target.unlink()
    target.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=f"{name} is a link to a missing file"):
        resolve_chat_format(d, vocab_size=32000)
    target.unlink()
    target.mkdir()
    with pytest.raises(ConfigError, match=f"{name} is not a regular file"):
        resolve_chat_format(d, vocab_size=32000)


def test_an_instruct_tokenizer_without_a_template_is_refused(tmp_path):
    """A v2 / v3 tokenizer.model ([INST] and [/INST] control tokens) with no chat template nor mistral-common file:
    the built-in v1 format wrote them as text ("[", "INST", "]") unsaid; refused, naming the two fixes, which work."""
    d = _dir(tmp_path, V3_AS_MODEL)
    with pytest.raises(ConfigError, match=r"tokenizer.model holds \[INST\] and \[/INST\] as control tokens .* "
                                          r"Add the checkpoint's tokenizer_config.json, or name the file "
                                          r"tokenizer.model.v3"):
        resolve_chat_format(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    assert resolve_chat_format(d).kind == "jinja"
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.model").rename(d / "tokenizer.model.v3")
    assert resolve_chat_format(d).kind == "mistral-common"
    (tmp_path / "v1").mkdir()
    v1 = _dir(tmp_path / "v1", "tokenizer.model=tokenizer.model.v1")  # the v1 file has no such tokens: v1
    assert resolve_chat_format(v1).kind == "v1"


def test_resolver_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        resolve_chat_format(tmp_path / "missing")
    d = _dir(tmp_path, V3_AS_MODEL)
    for config, match in [
        ({"chat_template": 3}, "chat_template must be a string or a list"),
        ({"chat_template": [{"name": "rag", "template": "x"}]}, "none named 'default'"),
        ({"chat_template": TEMPLATE, "eos_token": 2}, "eos_token must be a string"),
        ({"chat_template": TEMPLATE, "added_tokens_decoder": {"x": {"content": "a"}}}, r"added_tokens_decoder\['x'\]"),
    ]:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=match):
            resolve_chat_format(d)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json: not readable JSON"):
        resolve_chat_format(d)
    with pytest.raises(ConfigError, match="tokenizer file is missing"):
        load_chat_tokenizer(tmp_path, ChatFormat("v1", "tokenizer.model", {}))
    with pytest.raises(ConfigError, match="kind must be one of"):
        ChatFormat.from_dict({"kind": "tiktoken", "tokenizer_file": "x"})
    with pytest.raises(ConfigError, match="malformed"):
        ChatFormat.from_dict({"kind": "v1"})
    with pytest.raises(NewerRecordError, match=r"unknown fields \['stop_words'\] \(written by a newer mixtrt"):
        ChatFormat.from_dict({"kind": "v1", "tokenizer_file": "tokenizer.model", "stop_words": []})


def test_record_round_trips_through_json(tmp_path):
    config = {"chat_template": TEMPLATE, "eos_token": "</s>",
              "added_tokens_decoder": {"32000": {"content": "<|im_end|>", "special": True, "rstrip": True}}}
    d = _dir(tmp_path, "tokenizer.model=tokenizer.model.v1", config=config,
             generation={"eos_token_id": [2, 32000], "temperature": 0.7, "do_sample": True})
    fmt = resolve_chat_format(d)
    again = ChatFormat.from_dict(json.loads(json.dumps(fmt.to_dict())))
    assert again == fmt
    tok = load_chat_tokenizer(d, again, model_vocab_size=32001)
    assert isinstance(tok, JinjaChatTokenizer) and tok.vocab_size == 32001
    messages = [{"role": "user", "content": "Hi<|im_end|>  there"}]
    ids = tok.apply_chat_template(messages)
    assert ids == load_chat_tokenizer(d, fmt).apply_chat_template(messages)
    # rstrip takes the spaces after the token; the stretch left gets the legacy prefix (as transformers gives it)
    assert ids[0] == 1 and ids.count(32000) == 1 and tok.id_to_piece(ids[ids.index(32000) + 1]) == "▁there"


# ---------------------------------------------------------------- generation_config.json


def test_generation_defaults(tmp_path):
    d = _dir(tmp_path, generation={
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": [2, 32000], "pad_token_id": 11,
        "do_sample": True, "temperature": 0.15, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1,
        "max_new_tokens": 256, "min_p": 0.05, "max_length": 4096, "transformers_version": "4.46.0",
        "num_beams": None, "min_new_tokens": 3, "typical_p": 0.9,
    })
    g = read_generation_defaults(d)
    assert g == GenerationDefaults(eos_token_ids=(2, 32000), bos_token_id=1, pad_token_id=11, do_sample=True,
                                   temperature=0.15, top_k=40, top_p=0.9, repetition_penalty=1.1,
                                   max_new_tokens=256, min_p=0.05, min_new_tokens=3,
                                   ignored=("max_length", "typical_p"))
    kwargs = g.config_kwargs()
    assert kwargs == {"do_sample": True, "temperature": 0.15, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1,
                      "max_new_tokens": 256, "min_p": 0.05, "min_new_tokens": 3, "eos_token_id": (2, 32000)}
    cfg = GenerationConfig(**{**kwargs, "temperature": 0.5})  # explicit options override the checkpoint's
    assert (cfg.temperature, cfg.top_k, cfg.eos_token_id) == (0.5, 40, (2, 32000))
    assert GenerationDefaults.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_generation_config_suppress_tokens_are_honoured(tmp_path):
    """transformers' suppress_tokens (SuppressTokensLogitsProcessor): read as the artifact's default, kept in the
    record, never in the unused keys; a bad list is one error naming it."""
    d = _dir(tmp_path, generation={"eos_token_id": 2, "suppress_tokens": [7, 5], "begin_suppress_tokens": [9]})
    g = read_generation_defaults(d)
    assert g.config_kwargs() == {"eos_token_id": (2,), "suppress_tokens": (7, 5)} and g.ignored == (
        "begin_suppress_tokens",)
    assert GenerationConfig(**g.config_kwargs()).suppress_tokens == (5, 7)
    assert unused_choices(d) == ["begin_suppress_tokens=[9]"]
    assert GenerationDefaults.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert "suppress_tokens [7, 5] (generation_config.json)" in g.describe([2])
    (tmp_path / "v").mkdir()
    d = _dir(tmp_path / "v", "tokenizer.model=tokenizer.model.v1", generation={"suppress_tokens": [5, 40000]})
    with pytest.raises(ConfigError, match=r"generation_config.json: suppress_tokens \[40000\] outside the "
                                          r"model's 32000 embeddings"):  # at export, not at every request
        load_chat_tokenizer(None, resolve_chat_format(d, vocab_size=32000), model_vocab_size=32000)
    (tmp_path / "e").mkdir()
    d = _dir(tmp_path / "e", generation={"suppress_tokens": []})  # unset: not in the record (an older mixtrt reads it)
    assert read_generation_defaults(d).suppress_tokens is None and "suppress_tokens" not in \
        read_generation_defaults(d).to_dict()
    for bad, words in (("5", "suppress_tokens must be a list of token ids, got '5'"),
                       ([5, -1], "suppress_tokens must be an integer >= 0, got -1")):
        (tmp_path / str(len(words))).mkdir()
        d = _dir(tmp_path / str(len(words)), generation={"suppress_tokens": bad})
        with pytest.raises(ConfigError, match=re.escape(f"{d / 'generation_config.json'}: {words}")):
            read_generation_defaults(d)


def test_generation_defaults_single_eos_and_absent(tmp_path):
    assert read_generation_defaults(tmp_path) == GenerationDefaults()
    assert GenerationDefaults().config_kwargs() == {}
    d = _dir(tmp_path, generation={"bos_token_id": 1, "eos_token_id": 2})
    assert read_generation_defaults(d).config_kwargs() == {"eos_token_id": (2,)}
    assert resolve_chat_format(d, vocab_size=32000).generation.eos_token_ids == (2,)


@pytest.mark.parametrize("generation,match", [
    ({"eos_token_id": "2"}, "eos_token_id must be an integer >= 0, got '2'"),
    ({"eos_token_id": [2, -1]}, "eos_token_id must be an integer >= 0, got -1"),
    ({"eos_token_id": []}, "eos_token_id is an empty list"),
    ({"eos_token_id": True}, "eos_token_id must be an integer"),
    ({"temperature": "hot"}, "temperature must be a number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a number"),
    ({"do_sample": 1}, "do_sample must be true or false"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
])
def test_generation_config_errors(tmp_path, generation, match):
    d = _dir(tmp_path, generation=generation)
    with pytest.raises(ConfigError, match=match) as e:
        read_generation_defaults(d)
    assert "generation_config.json" in str(e.value)
    (d / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        read_generation_defaults(d)


@pytest.mark.parametrize("values, words", [
    ({"top_p": 5.0}, "top_p must be in (0, 1]"),
    ({"min_p": 3.0}, "min_p must be in [0, 1]"),
    ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0 when do_sample=True"),
])
def test_generation_defaults_that_no_generation_could_use_are_refused_when_read(tmp_path, values, words):
    """A value every generate would refuse is refused where it is read: generation_config.json at export, the
    manifest's record at load (naming which); in the file, sampling at temperature 0 is greedy (vLLM's reading)."""
    d = _dir(tmp_path, generation={"eos_token_id": 2, **values})
    if values.get("temperature") == 0:
        with pytest.warns(MixtrtWarning, match=re.escape(f"{d / 'generation_config.json'}: do_sample true with "
                                                         "temperature 0 is read as greedy")):
            read = read_generation_defaults(d)
        assert read.config_kwargs() == {"do_sample": False, "temperature": 0.0, "eos_token_id": (2,)}
        assert GenerationConfig(**read.config_kwargs()).do_sample is False  # a valid config: greedy
    else:
        with pytest.raises(ConfigError, match=re.escape(f"{d / 'generation_config.json'}: {words}")):
            read_generation_defaults(d)
    with pytest.raises(ConfigError, match=re.escape(f"manifest chat.generation: {words}")):
        GenerationDefaults.from_dict(values)


@pytest.mark.parametrize("files, config", [
    (("tokenizer.model=tokenizer.model.v1",), None),  # the built-in v1 format
    (("tokenizer.model=tokenizer.model.v1",), {"chat_template": TEMPLATE}),  # a Jinja template
    ((V3,), None),  # mistral-common
])
def test_tools_given_where_transformers_takes_them_are_refused_not_read_as_a_flag(tmp_path, files, config):
    """transformers' apply_chat_template(conversation, tools, ...) takes tools second, ours add_generation_prompt:
    a list there is a one-line error, not a true flag."""
    tok = load_chat_tokenizer(None, resolve_chat_format(_dir(tmp_path, *files, config=config)))
    messages = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for call in (tok.apply_chat_template, tok.render_chat):
        with pytest.raises(ConfigError, match=r"add_generation_prompt must be True or False, got list \(pass tools "
                                              r"by keyword"):
            call(messages, [tool])
    with pytest.raises(ConfigError, match="continue_final_message must be True or False, got str"):
        tok.apply_chat_template(messages, continue_final_message="yes")
    assert tok.apply_chat_template(messages, True) == tok.apply_chat_template(messages)
