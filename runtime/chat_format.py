"""Which tokenizer and chat format a checkpoint uses (resolved at export, recorded in the manifest), and
loading that tokenizer back from an artifact.

    fmt = resolve_chat_format("Mistral-7B-Instruct-v0.3", vocab_size=32768)   # the exporter
    fmt.kind, fmt.tokenizer_file                  # ('mistral-common', 'tokenizer.model.v3')
    for name, source in fmt.files.items():
        shutil.copyfile(source, tmp / name)       # listed in the manifest's files; fmt.to_dict() is its `chat`
    tok = load_chat_tokenizer(artifact_dir, manifest.chat, model_vocab_size=32768)   # the runtime
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])                    # [1, 3, 16127, 4]

The first rule that applies wins (the order of the issue):

1. "mistral-common": the checkpoint ships a mistral-common tokenizer file beside (or instead of)
   tokenizer.model, as Mistral's own repositories do: `tokenizer.model.v3`, `*.model.v7`, `*.model.v7m1`,
   `tekken.json`, ... Chat is encoded exactly as mistral-common's `encode_chat_completion` (the `mistral`
   extra). A `.v1` file is mistral-common's v1, which is what the built-in v1 format encodes: rule 3 with
   that file, no extra needed. Two such files is an error naming them.
2. "jinja": the checkpoint has a Jinja chat template: `chat_template.jinja` (with
   `additional_chat_templates/*.jinja`) or else tokenizer_config.json's `chat_template` (a string, or a list
   of named templates), as transformers loads them. Rendered as transformers renders it, tokenized by
   tokenizer.model with the added tokens and prefix rule of tokenizer_config.json (see jinja_tokenizer.py;
   added tokens also from tokenizer.json, and from added_tokens.json / special_tokens_map.json where the config
   has no `added_tokens_decoder`, as transformers reads them).
3. "v1": tokenizer.model with the built-in Mistral v1 instruct format (`Tokenizer.apply_chat_template`).

Rules 2 and 3 need the checkpoint's own tokenizer.model. Without one, a model of exactly 32000 embeddings
gets the Mistral v1 tokenizer.model shipped in mistral-common, said loudly: `ChatFormat.note` records the
substitution (export raises a MixtrtWarning, `mixtrt inspect` shows it). Its size is the only evidence that can be
checked (Mistral-7B v0.1/v0.2 and Mixtral-8x7B v0.1 use it); any other vocabulary size is refused, and so is
a checkpoint shipping tokenizer.json instead (not supported yet). A tokenizer file that is there but not
readable (a dangling link, a directory) is always an error, never skipped for the next rule.

`prefer` (export's `--chat-format`) picks among the rules where a checkpoint qualifies for more than one, as vLLM's
`--tokenizer-mode` does: "auto" (the order above), "mistral-common" (rule 1, an error where there is no such file),
"jinja" (rule 2 over rule 1: the template transformers' apply_chat_template renders, as vLLM's `hf` mode reads a
Mistral repository; an error where there is no template).

generation_config.json's values are read as transformers reads them (`GenerationDefaults`): the ones it sets
become the artifact's defaults, which explicit options override; what it leaves unset keeps mixtrt's defaults, not
transformers' (no top_k=50 is added to a file that turns sampling on: README's Chat).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

from mixtrt.runtime.errors import ConfigError, MixtrtWarning, NewerRecordError

ChatKind = Literal["mistral-common", "jinja", "v1"]
KINDS = ("mistral-common", "jinja", "v1")
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# The special-token attributes transformers passes to a chat template (PreTrainedTokenizerBase).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# generation_config.json keys about transformers' outputs and caches, not which tokens are chosen: not listed
# as `ignored` (transformers 5 writes the first three into every file).
_NOT_SAMPLING = frozenset({"output_attentions", "output_hidden_states", "use_cache", "transformers_version",
                           "output_scores", "output_logits", "return_dict_in_generate", "cache_implementation"})
# LlamaTokenizer's own defaults when tokenizer_config.json does not name them.
_LLAMA_SPECIAL_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_SENTENCEPIECE_FILE = re.compile(r".+\.model\.(v\d+)(m\d+)?")
V1_VOCAB_SIZE = 32000  # pieces of the Mistral v1 tokenizer.model shipped in mistral-common
# transformers' Metaspace prepend_scheme, as LlamaTokenizer sets it (see jinja_tokenizer.py)
PrependScheme = Literal["first", "always", "never"]
PREPEND_SCHEMES = ("first", "always", "never")
PREFERENCES = ("auto", "mistral-common", "jinja")  # resolve_chat_format's `prefer`: export's --chat-format


@dataclass(frozen=True)
class AddedToken:
    """A tokenizer_config.json `added_tokens_decoder` entry (transformers' AddedToken fields)."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "content": self.content, "special": self.special, "lstrip": self.lstrip,
                "rstrip": self.rstrip, "single_word": self.single_word}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AddedToken:
        return cls(int(d["id"]), str(d["content"]), bool(d.get("special", True)), bool(d.get("lstrip", False)),
                   bool(d.get("rstrip", False)), bool(d.get("single_word", False)))


class ChatTokenizer(Protocol):
    """What the runtime needs of a tokenizer; `Tokenizer`, `JinjaChatTokenizer` and `MistralCommonTokenizer`
    all provide it."""

    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...
    def id_to_piece(self, i: int) -> str: ...
    def stream(self) -> Any: ...
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, *,
                            continue_final_message: bool = False) -> list[int]: ...
    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, *, continue_final_message: bool = False
                    ) -> str: ...


# ---------------------------------------------------------------------------------------- generation_config


@dataclass(frozen=True)
class GenerationDefaults:
    """The generation_config.json values our `GenerationConfig` knows, None where the file does not set them.

    transformers fills what the file leaves unset with its own defaults (greedy, top_k 50, max_length 20, the
    model config's eos ids); `config_kwargs()` gives only what the file sets. `ignored` names the keys the
    file sets that our generation has no counterpart for (max_length, num_beams, typical_p, ...).
    """

    eos_token_ids: tuple[int, ...] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    min_p: float | None = None
    min_new_tokens: int | None = None
    suppress_tokens: tuple[int, ...] | None = None
    ignored: tuple[str, ...] = ()

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `GenerationConfig` (transformers' names): the values the file sets."""
        names = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "min_p",
                 "min_new_tokens")
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.eos_token_ids is not None:
            out["eos_token_id"] = self.eos_token_ids
        if self.suppress_tokens:
            out["suppress_tokens"] = self.suppress_tokens
        return out

    def eos(self, model_eos: Sequence[int]) -> tuple[list[int], str]:
        """The eos ids generation stops on (this file's, else the model config's `model_eos`) and the file they
        come from."""
        if self.eos_token_ids is not None:
            return list(self.eos_token_ids), GENERATION_CONFIG
        return list(model_eos), "config.json"

    def describe(self, model_eos: Sequence[int]) -> str:
        """One line for `mixtrt inspect`: what generation does when no option is given.

        >>> GenerationDefaults(eos_token_ids=(2,), do_sample=True, top_p=0.9, ignored=("typical_p",)).describe([2])
        'eos [2] (generation_config.json); do_sample True, top_p 0.9 (generation_config.json); not used: typical_p'
        """
        eos, where = self.eos(model_eos)
        line = f"eos {eos} ({where}); " if eos else f"eos none: never stops on one ({where}); "
        set_ = {k: v for k, v in self.config_kwargs().items() if k != "eos_token_id"}
        if not set_:
            line += "greedy, max_new_tokens 128 (mixtrt's defaults)"
        else:
            line += "greedy; " * (not self.do_sample) + ", ".join(f"{k} {_shown(v)}" for k, v in set_.items())
            line += f" ({GENERATION_CONFIG})"
        return line + (f"; not used: {', '.join(self.ignored)}" if self.ignored else "")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v is not None and k != "ignored"}
        if self.eos_token_ids is not None:
            d["eos_token_ids"] = list(self.eos_token_ids)
        if self.suppress_tokens is not None:
            d["suppress_tokens"] = list(self.suppress_tokens)
        if self.ignored:
            d["ignored"] = list(self.ignored)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationDefaults:
        """The manifest's record, checked as generation_config.json is when it is read (an edit gets the same
        one-line errors, naming chat.generation)."""
        where = "manifest chat.generation"
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:  # a generation setting a newer mixtrt records
            raise NewerRecordError(f"{where}: unknown fields {unknown} (written by a newer mixtrt, or edited)")
        if d.get("eos_token_ids") is not None:
            if not isinstance(d["eos_token_ids"], list) or not d["eos_token_ids"]:
                raise ConfigError(f"{where}: eos_token_ids must be a non-empty list, got {d['eos_token_ids']!r}")
            d["eos_token_ids"] = tuple(_check(where, "eos_token_ids", i, int, 0) for i in d["eos_token_ids"])
        if d.get("suppress_tokens") is not None:
            d["suppress_tokens"] = _ids(where, "suppress_tokens", d["suppress_tokens"]) or None
        for name, kind, low in _FIELDS:
            if d.get(name) is not None:
                d[name] = _check(where, name, d[name], kind, low)
        ignored = d.get("ignored", ())
        if not isinstance(ignored, list | tuple) or not all(isinstance(k, str) for k in ignored):
            raise ConfigError(f"{where}: ignored must be a list of names, got {ignored!r}")
        d["ignored"] = tuple(ignored)
        now_used = [k for k in d["ignored"] if k in known]
        if now_used:  # recorded as not used by the mixtrt that exported it: its value is not in the record
            warnings.warn(f"{where}: the checkpoint's {GENERATION_CONFIG} sets {', '.join(now_used)}, which the "
                          "mixtrt that exported this artifact did not use and this one would: export the checkpoint "
                          "again to use it", MixtrtWarning, stacklevel=2)
        return cls(**d).checked(where)

    def checked(self, where: str) -> GenerationDefaults:
        """self, once the values together make a valid GenerationConfig (top_p in (0, 1], a positive temperature
        when sampling, ...), else the one-line error naming `where`: a bad file fails at export, not at every
        generate after it."""
        from mixtrt.runtime.generation import GenerationConfig

        try:
            GenerationConfig(**self.config_kwargs())
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return self


_FIELDS = [("bos_token_id", int, 0), ("pad_token_id", int, 0), ("do_sample", bool, None), ("temperature", float, 0),
           ("top_k", int, 0), ("top_p", float, 0), ("repetition_penalty", float, 0), ("max_new_tokens", int, 1),
           ("min_p", float, 0), ("min_new_tokens", int, 0)]


# generation_config.json keys with no counterpart in mixtrt that change which tokens transformers' generate chooses
# (or how many), each with the value at which it changes nothing
_CHOICE_KEYS: dict[str, Any] = {
    "max_length": None, "min_length": 0, "max_time": None, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "stop_strings": None,
    "exponential_decay_length_penalty": None, "guidance_scale": 1.0, "constraints": None}


def unused_choices(checkpoint_dir: str | Path) -> list[str]:
    """The keys of the checkpoint's generation_config.json that would change transformers' tokens and that mixtrt
    does not use (an export warns about them; `inspect` lists every unused key): `key=value` strings."""
    path = Path(checkpoint_dir) / GENERATION_CONFIG
    cfg = _read_json(path) if path.is_file() else {}
    return [f"{k}={json.dumps(v)}" for k, v in sorted(cfg.items())
            if k in _CHOICE_KEYS and v not in (None, [], {}) and v != _CHOICE_KEYS[k]]


def _shown(value: Any) -> str:
    """A value on inspect's line: a list of ids as its first 8 and a count of the rest."""
    if not isinstance(value, tuple):
        return str(value)
    more = f" and {len(value) - 8} more" if len(value) > 8 else ""
    return f"{list(value[:8])}{more}"


def _ids(where: str, name: str, value: Any) -> tuple[int, ...]:
    """A list of token ids (integers >= 0), else a one-line error naming `where` and `name`."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {name} must be a list of token ids, got {value!r}")
    return tuple(_check(where, name, i, int, 0) for i in value)


def _check(where: str, name: str, value: Any, kind: type, low: float | None = None) -> Any:
    """value as `kind` (bool, int or float: JSON numbers, never booleans, never NaN or inf), else a one-line
    error."""
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        number = (int, float) if kind is float else int
        ok = isinstance(value, number) and not isinstance(value, bool) and (isinstance(value, int)
                                                                            or math.isfinite(value))
        ok = ok and (low is None or value >= low)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{where}: {name} must be {expected}{f' >= {low}' if low is not None else ''}, got {value!r}")
    return float(value) if kind is float else value


def read_generation_defaults(checkpoint_dir: str | Path) -> GenerationDefaults:
    """generation_config.json of the checkpoint (all None when it has none)."""
    path = Path(checkpoint_dir) / GENERATION_CONFIG
    if not path.is_file():
        return GenerationDefaults()
    cfg = _read_json(path)
    where = str(path)
    values: dict[str, Any] = {}
    eos = cfg.get("eos_token_id")
    if eos is not None:
        eos_list = eos if isinstance(eos, list) else [eos]
        values["eos_token_ids"] = tuple(_check(where, "eos_token_id", i, int, 0) for i in eos_list)
        if not eos_list:
            raise ConfigError(f"{where}: eos_token_id is an empty list")
    for name, kind, low in _FIELDS:
        if cfg.get(name) is not None:
            values[name] = _check(where, name, cfg[name], kind, low)
    if cfg.get("suppress_tokens") is not None:  # transformers' SuppressTokensLogitsProcessor: never chosen
        values["suppress_tokens"] = _ids(where, "suppress_tokens", cfg["suppress_tokens"]) or None  # []: unset
    known = {"eos_token_id", *values, *_NOT_SAMPLING}
    ignored = tuple(sorted(k for k, v in cfg.items() if k not in known and not k.startswith("_") and v is not None))
    if values.get("do_sample") and values.get("temperature") == 0:  # transformers loads it, then refuses to generate
        warnings.warn(f"{where}: do_sample true with temperature 0 is read as greedy (vLLM's reading of temperature "
                      "0; transformers' generate refuses it)", MixtrtWarning, stacklevel=2)
        values["do_sample"] = False  # temperature 0 kept: the server's default temperature (0: greedy)
    return GenerationDefaults(**values, ignored=ignored).checked(where)


# ---------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class ChatFormat:
    """How an artifact tokenizes and formats chat. `files`: artifact file name -> the file to copy there."""

    kind: ChatKind
    tokenizer_file: str  # the tokenizer's file name in the artifact
    files: Mapping[str, str]
    tokenizer_version: str | None = None  # mistral-common: "v3", "v7", ...
    templates: Mapping[str, str] = field(default_factory=dict)  # jinja: name -> template ("default", "tool_use")
    template_origin: str | None = None  # jinja: "chat_template.jinja" or "tokenizer_config.json"
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # jinja: template variables (bos_token, ...)
    added_tokens: tuple[AddedToken, ...] = ()  # jinja: tokenizer_config.json added_tokens_decoder
    prepend_scheme: PrependScheme = "first"  # jinja: transformers' Metaspace prepend_scheme
    # v1: "first" where tokenizer_config.json says `legacy: false` (plain text that starts with a space gets no second
    # "▁", as transformers' tokenizer(text)); None: sentencepiece's own dummy prefix on all of it (legacy, the default)
    text_prefix: PrependScheme | None = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    note: str | None = None  # what was substituted for a file the checkpoint lacks, and why (said loudly)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"chat format kind must be one of {KINDS}, got {self.kind!r}")
        if self.prepend_scheme not in PREPEND_SCHEMES:
            raise ConfigError(f"prepend_scheme must be one of {PREPEND_SCHEMES}, got {self.prepend_scheme!r}")
        if self.text_prefix not in (None, "first"):
            raise ConfigError(f"text_prefix must be 'first' or absent, got {self.text_prefix!r}")
        if self.kind == "jinja" and "default" not in self.templates:
            raise ConfigError(f"the checkpoint's chat templates {sorted(self.templates)} have none named 'default'")

    def describe(self) -> str:
        """One line for `mixtrt inspect` (with the substitution note, if any)."""
        if self.kind == "mistral-common":
            from mixtrt.runtime.extras import missing

            # the install hint only where mistral-common is missing (it showed beside an installed one)
            hint = "; pip install 'mixtrt[mistral]'" if missing("mistral") else ""
            line = f"mistral-common {self.tokenizer_version} ({self.tokenizer_file}{hint})"
        elif self.kind == "jinja":
            names = ", ".join(sorted(self.templates))
            line = (f"Jinja chat template from {self.template_origin} ({names}), {self.tokenizer_file}, "
                    f"{len(self.added_tokens)} added tokens, prefix {self.prepend_scheme}")
        else:
            line = f"built-in Mistral v1 instruct format, {self.tokenizer_file}"
            if self.text_prefix is not None:
                line += f", prefix {self.text_prefix} (tokenizer_config.json legacy: false)"
        return line + (f"; warning: {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "tokenizer_file": self.tokenizer_file, "files": dict(self.files),
            "tokenizer_version": self.tokenizer_version, "templates": dict(self.templates),
            "template_origin": self.template_origin, "special_tokens": dict(self.special_tokens),
            "added_tokens": [t.to_dict() for t in self.added_tokens], "prepend_scheme": self.prepend_scheme,
            "generation": self.generation.to_dict(), "note": self.note,
            # only where set: a record without it reads as before, also by a mixtrt that predates the field
            **({"text_prefix": self.text_prefix} if self.text_prefix is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatFormat:
        """The record as `to_dict` wrote it; unknown keys are refused (a newer mixtrt's, or an edit)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"manifest chat format must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise NewerRecordError(f"manifest chat format has unknown fields {unknown} (written by a newer mixtrt, "
                                   "or edited)")
        try:
            return cls(
                kind=d["kind"], tokenizer_file=d["tokenizer_file"], files=dict(d.get("files", {})),
                tokenizer_version=d.get("tokenizer_version"), templates=dict(d.get("templates", {})),
                template_origin=d.get("template_origin"), special_tokens=dict(d.get("special_tokens", {})),
                added_tokens=tuple(AddedToken.from_dict(t) for t in d.get("added_tokens", ())),
                prepend_scheme=d.get("prepend_scheme", "first"),
                generation=GenerationDefaults.from_dict(d.get("generation", {})), note=d.get("note"),
                text_prefix=d.get("text_prefix"),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, (ConfigError, NewerRecordError)):
                raise
            raise ConfigError(f"manifest chat format is malformed ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------- the resolver


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8, a 5000-digit number
        raise ConfigError(f"{path}: not readable JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _tokenizer_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's mistral-common tokenizer files; any tokenizer or chat file there that is not a
    readable file (a dangling link, a directory) is an error, never passed over for the next rule."""
    from mixtrt.runtime.mistral_tokenizer import is_tekken_file

    named = {TOKENIZER_MODEL, "tokenizer.json", TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE_FILE}
    found = []
    for p in sorted(checkpoint_dir.iterdir()):
        mistral_common = bool(_SENTENCEPIECE_FILE.fullmatch(p.name)) or is_tekken_file(p)
        if (mistral_common or p.name in named) and not p.is_file():
            what = "a link to a missing file" if p.is_symlink() and not p.exists() else "not a regular file"
            raise ConfigError(f"{p}: the checkpoint's {p.name} is {what}; fix or remove it (export never uses "
                              "another file in its place)")
        if mistral_common:
            found.append(p)
    return found


def _tekken_version(path: Path) -> str:
    version = _read_json(path).get("config", {}).get("version")
    if not isinstance(version, str):
        raise ConfigError(f"{path}: a tekken file without config.version")
    return version


def _sentencepiece_model(checkpoint_dir: Path, vocab_size: int | None) -> tuple[Path, str | None]:
    """tokenizer.model; without one, the shipped Mistral v1 one for a 32000-embedding model, with the note
    that says so (see the module docstring)."""
    from mixtrt.runtime.tokenizer import shipped_tokenizer_path

    own = checkpoint_dir / TOKENIZER_MODEL
    if own.is_file():
        return own, None
    if (checkpoint_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{checkpoint_dir} ships tokenizer.json without tokenizer.model or a mistral-common "
                          "tokenizer file (tokenizer.model.v3, tekken.json): tokenizer.json alone is not supported yet")
    if vocab_size != V1_VOCAB_SIZE:
        why = ("the model's vocabulary size was not given, so the Mistral v1 tokenizer cannot stand in"
               if vocab_size is None else f"the model's {vocab_size} embeddings are not the {V1_VOCAB_SIZE} pieces "
               "of the Mistral v1 tokenizer: it was trained with another one")
        raise ConfigError(f"{checkpoint_dir}: no {TOKENIZER_MODEL}, and {why}; put the model's own tokenizer file "
                          "(tokenizer.model, tokenizer.model.v3, tekken.json) in the checkpoint")
    note = (f"the checkpoint has no {TOKENIZER_MODEL}: using mistral-common's Mistral v1 tokenizer, whose "
            f"{V1_VOCAB_SIZE} pieces match the model's embeddings (right for Mistral-7B v0.1/v0.2 and "
            f"Mixtral-8x7B v0.1; wrong ids for a model trained with another {V1_VOCAB_SIZE}-piece tokenizer)")
    return shipped_tokenizer_path(), note


def _token_text(where: str, name: str, value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a string or {{'content': ...}}, got {value!r}")
    return value


def _jinja_templates(checkpoint_dir: Path, config: Mapping[str, Any]) -> tuple[dict[str, str], str] | None:
    """The checkpoint's chat templates and where they came from, as transformers loads them."""
    file = checkpoint_dir / CHAT_TEMPLATE_FILE
    extra_dir = checkpoint_dir / CHAT_TEMPLATE_DIR
    templates: dict[str, str] = {}
    if file.is_file():
        templates["default"] = file.read_text(encoding="utf-8")
    if extra_dir.is_dir():
        templates.update({p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))})
    if templates:
        return templates, CHAT_TEMPLATE_FILE if file.is_file() else CHAT_TEMPLATE_DIR
    value = config.get("chat_template")
    where = str(checkpoint_dir / TOKENIZER_CONFIG)
    if value is None:
        return None
    if isinstance(value, str):
        return {"default": value}, TOKENIZER_CONFIG
    if isinstance(value, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}, TOKENIZER_CONFIG
    raise ConfigError(f"{where}: chat_template must be a string or a list of {{'name', 'template'}}, got {value!r}")


def _added_tokens(where: str, config: Mapping[str, Any]) -> tuple[AddedToken, ...]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise ConfigError(f"{where}: added_tokens_decoder must be an object of id -> token")
    tokens = []
    for key, entry in decoder.items():
        try:
            tokens.append(AddedToken.from_dict({**entry, "id": int(key)}))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: added_tokens_decoder[{key!r}] is not an added token: {entry!r}") from None
    return tuple(sorted(tokens, key=lambda t: t.id))


def _special_tokens(where: str, config: Mapping[str, Any]) -> dict[str, str]:
    tokens = dict(_LLAMA_SPECIAL_DEFAULTS)
    for name in SPECIAL_TOKEN_NAMES:
        if name in config:
            value = _token_text(where, name, config[name])
            if value is None:
                tokens.pop(name, None)
            else:
                tokens[name] = value
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):  # named extra tokens become attributes (and template variables) in transformers
        for name, value in extra.items():
            text = _token_text(where, f"extra_special_tokens.{name}", value)
            if text is not None:
                tokens[str(name)] = text
    return tokens


def _prepend_scheme(config: Mapping[str, Any]) -> PrependScheme:
    """As transformers 5 builds a checkpoint's tokenizer from its tokenizer.model (a Mistral / Mixtral config.json
    beside it): `legacy` (default true) prefixes "▁" to every stretch of text between added tokens, even one that
    starts with a space (" [INST]" -> ▁ ▁[INST], as the legacy tokenizer.json of Mistral-7B-Instruct-v0.1/v0.2 and
    Mixtral-8x7B-Instruct does); `legacy: false` only to the text at the very start, unless it starts with a space.
    `add_prefix_space` is not read there (the sentencepiece model's own dummy-prefix setting is, jinja_tokenizer.py)."""
    return "first" if config.get("legacy") is False else "always"


def _refuse_v1_for_instruct_tokens(model: Path) -> None:
    """A sentencepiece file whose [INST] and [/INST] are control tokens is a Mistral v2 / v3 tokenizer: the built-in
    v1 format writes them as text ("[", "INST", "]"), so a checkpoint giving no other format for it is refused,
    naming what would (it exported and encoded every chat turn wrongly, unsaid)."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model))
    except Exception:  # unreadable: the tokenizer's own load says so, naming the file
        return
    ids = [sp.piece_to_id(piece) for piece in ("[INST]", "[/INST]")]
    if all(i != sp.unk_id() and sp.is_control(i) for i in ids):
        raise ConfigError(f"{model} holds [INST] and [/INST] as control tokens (a Mistral v2 / v3 tokenizer), but the "
                          "checkpoint has no chat template (tokenizer_config.json) nor a mistral-common file: the "
                          "built-in v1 format would write them as text. Add the checkpoint's tokenizer_config.json, "
                          f"or name the file {TOKENIZER_MODEL}.v3 (mistral-common's v3 format)")


def resolve_chat_format(checkpoint_dir: str | Path, vocab_size: int | None = None, prefer: str = "auto"
                        ) -> ChatFormat:
    """The checkpoint's tokenizer and chat format, by the rules of the module docstring (no side effects).
    vocab_size: the model's embeddings, for the one substitution allowed (None: none allowed). prefer: one of
    PREFERENCES (the module docstring)."""
    if prefer not in PREFERENCES:
        raise ConfigError(f"--chat-format must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ConfigError(f"{checkpoint_dir}: no such checkpoint directory")
    candidates = _tokenizer_files(checkpoint_dir)
    generation = read_generation_defaults(checkpoint_dir)
    if prefer == "mistral-common" and not candidates:
        raise ConfigError(f"--chat-format mistral-common: {checkpoint_dir} ships no mistral-common tokenizer file "
                          "(tokenizer.model.v3, tokenizer.model.v7, tekken.json, ...)")
    if prefer == "jinja":
        config_path = checkpoint_dir / TOKENIZER_CONFIG
        if _jinja_templates(checkpoint_dir, _read_json(config_path) if config_path.is_file() else {}) is None:
            raise ConfigError(f"--chat-format jinja: {checkpoint_dir} has no chat template ({CHAT_TEMPLATE_FILE}, "
                              f"or {TOKENIZER_CONFIG}'s chat_template)")
        candidates = []  # the template over the mistral-common file
    if len(candidates) > 1:
        raise ConfigError(f"{checkpoint_dir} ships several mistral-common tokenizer files "
                          f"({', '.join(p.name for p in candidates)}): keep the one the model was trained with")
    if candidates:
        [file] = candidates
        if file.name.endswith(".v1"):  # mistral-common's v1 encoding is the built-in v1 format
            return ChatFormat("v1", TOKENIZER_MODEL, {TOKENIZER_MODEL: str(file)}, generation=generation)
        match = _SENTENCEPIECE_FILE.fullmatch(file.name)
        version = match.group(1) + (match.group(2) or "") if match else _tekken_version(file)
        return ChatFormat("mistral-common", file.name, {file.name: str(file)}, tokenizer_version=version,
                          generation=generation)
    config_path = checkpoint_dir / TOKENIZER_CONFIG
    config = _read_json(config_path) if config_path.is_file() else {}
    found = _jinja_templates(checkpoint_dir, config)
    model, note = _sentencepiece_model(checkpoint_dir, vocab_size)
    files = {TOKENIZER_MODEL: str(model)}
    if found is None:  # transformers' tokenizer(text) still follows tokenizer_config.json's `legacy`
        _refuse_v1_for_instruct_tokens(model)
        text_prefix: PrependScheme | None = "first" if _prepend_scheme(config) == "first" else None
        return ChatFormat("v1", TOKENIZER_MODEL, files, generation=generation, note=note, text_prefix=text_prefix)
    templates, origin = found
    where = str(config_path)
    # tokenizer.json's added tokens count too (transformers builds the tokenizer from that file where it is there)
    in_json = {t.id: t for t in _tokenizer_json_tokens(checkpoint_dir)}
    if "added_tokens_decoder" in config:
        added = tuple({**in_json, **{t.id: t for t in _added_tokens(where, config)}}.values())
    else:  # a tokenizer saved before transformers 4.34: its special and added tokens in the files it read then
        config, legacy = _legacy_tokens(checkpoint_dir, config)
        added = tuple({**{t.id: t for t in legacy}, **in_json}.values())
    added = tuple(sorted(added, key=lambda t: t.id))
    return ChatFormat("jinja", TOKENIZER_MODEL, files, templates=templates, template_origin=origin,
                      special_tokens=_special_tokens(where, config), added_tokens=added,
                      prepend_scheme=_prepend_scheme(config), generation=generation, note=note)


def _legacy_tokens(checkpoint_dir: Path, config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[AddedToken, ...]]:
    """What transformers reads where tokenizer_config.json has no `added_tokens_decoder` (the layout of
    tokenizers saved before transformers 4.34): special_tokens_map.json's tokens over the config's, and
    added_tokens.json (`{content: id}`; special where the content is one of the special tokens; tokenizer.json's
    added tokens win over them by id). (config with the special tokens merged, added tokens by id.)"""
    merged = dict(config)
    path = checkpoint_dir / "special_tokens_map.json"
    if path.is_file():
        merged.update(_read_json(path))
    where = str(path)
    special = {_token_text(where, name, merged[name]) for name in SPECIAL_TOKEN_NAMES if merged.get(name)}
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, list):
        special |= {_token_text(where, "extra_special_tokens", t) for t in extra}
    added: dict[int, AddedToken] = {}
    path = checkpoint_dir / "added_tokens.json"
    if path.is_file():
        encoder = _read_json(path)
        for content, index in encoder.items():
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ConfigError(f"{path}: the id of {content!r} must be an integer >= 0, got {index!r}")
            added[index] = AddedToken(index, content, special=content in special)
    return merged, tuple(sorted(added.values(), key=lambda t: t.id))


def _tokenizer_json_tokens(checkpoint_dir: Path) -> tuple[AddedToken, ...]:
    """tokenizer.json's `added_tokens` (every field), if the checkpoint ships that file."""
    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        return ()
    entries = _read_json(path).get("added_tokens") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: added_tokens must be a list of tokens")
    tokens = []
    for entry in entries:
        try:
            tokens.append(AddedToken.from_dict(entry))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"{path}: added_tokens has an entry that is not an added token: {entry!r}") from None
    return tuple(tokens)


# ---------------------------------------------------------------------------------------- the loader


def load_chat_tokenizer(artifact_dir: str | Path | None, fmt: ChatFormat, model_vocab_size: int | None = None
                        ) -> ChatTokenizer:
    """The artifact's tokenizer for `fmt` (artifact_dir None: from the checkpoint files `fmt.files` names, as
    export checks them before copying); with model_vocab_size, checks that every id it makes, and every eos
    id of the generation defaults, is an embedding row of the model."""
    from mixtrt.runtime.tokenizer import Tokenizer

    if artifact_dir is None:
        path = Path(fmt.files.get(fmt.tokenizer_file, fmt.tokenizer_file))
    else:
        path = Path(artifact_dir) / fmt.tokenizer_file
    if not path.is_file():
        raise ConfigError(f"{path}: the artifact's tokenizer file is missing")
    tokenizer: ChatTokenizer
    if fmt.kind == "mistral-common":
        from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer

        tokenizer = MistralCommonTokenizer(path)
    elif fmt.kind == "jinja":
        from mixtrt.runtime.chat_template import ChatTemplate
        from mixtrt.runtime.jinja_tokenizer import JinjaChatTokenizer

        origin = fmt.template_origin or "chat_template"
        templates = {name: ChatTemplate(source, fmt.special_tokens, origin=f"{origin} {name}")
                     for name, source in fmt.templates.items()}
        tokenizer = JinjaChatTokenizer(Tokenizer.load(path), templates, fmt.added_tokens, fmt.prepend_scheme)
    else:
        tokenizer = Tokenizer.load(path, prefix_first=fmt.text_prefix == "first")
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(f"{path}: {tokenizer.vocab_size} token ids but the model has only {model_vocab_size} "
                          "embeddings")
    where = GENERATION_CONFIG if artifact_dir is None else f"{artifact_dir}/manifest.json chat.generation"
    for name, ids in (("eos_token_id", fmt.generation.eos_token_ids), ("suppress_tokens",
                                                                      fmt.generation.suppress_tokens)):
        bad = [i for i in ids or () if model_vocab_size is not None and i >= model_vocab_size]
        if bad:  # every generate would refuse it: said where it is read, not at each request
            raise ConfigError(f"{where}: {name} {bad[:8]}{' ...' if len(bad) > 8 else ''} outside the model's "
                              f"{model_vocab_size} embeddings")
    return tokenizer
