"""ModelArgs: the one typed, frozen description of a Mistral / Mixtral model.

It is built from a Hugging Face ``config.json`` (transformers 4.x or 5.x field sets) or from a raw
Mistral ``params.json``, flows unchanged from the loader to the exporter, into ``manifest.json`` and
into the runtime. Torch-free.

    >>> args = ModelArgs.from_hf_config({"architectures": ["MistralForCausalLM"], "vocab_size": 32000,
    ...     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    ...     "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096})
    >>> args.head_dim, args.window(0), args.moe
    (128, 4096, None)
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtrt.runtime.errors import ConfigError, MixtrtWarning

# Architectures (the `architectures[0]` of config.json) we load, and the head each one carries.
ARCHITECTURES = {
    "MistralForCausalLM": "causal_lm",
    "MixtralForCausalLM": "causal_lm",
    "MistralModel": "base",
    "MixtralModel": "base",
    "MistralForSequenceClassification": "sequence_classification",
    "MixtralForSequenceClassification": "sequence_classification",
    "MistralForTokenClassification": "token_classification",
    "MixtralForTokenClassification": "token_classification",
    "MistralForQuestionAnswering": "question_answering",
    "MixtralForQuestionAnswering": "question_answering",
    # transformers' Ministral is Mistral with layer_types (which mixtrt reads for Mistral too): the same model under
    # its own class names, as transformers saves a Mistral config with layer_types once it has loaded it
    "MinistralForCausalLM": "causal_lm",
    "MinistralModel": "base",
    "MinistralForSequenceClassification": "sequence_classification",
    "MinistralForTokenClassification": "token_classification",
    "MinistralForQuestionAnswering": "question_answering",
}
MODEL_TYPES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM", "ministral": "MinistralForCausalLM"}
LABELLED_HEADS = ("sequence_classification", "token_classification")  # the heads whose outputs are labels
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


# Sizes past these are refused when a config is read, before anything is allocated: each is far beyond
# any Mistral / Mixtral model (the largest have vocab 131072, hidden 12288, 88 layers, 96 heads, 8 experts)
# and small enough that nothing built from the config alone (rope tables, name maps, KV caches of a few
# rows) can exhaust memory. max_position_embeddings stops at int32 because positions are int32 in the graph.
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 20,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "max_position_embeddings": (1 << 31) - 1,
    "num_experts": 1024,
    "num_labels": 1 << 16,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(name: str, value: Any, limit: str | None = None) -> int:
    """A positive integer no larger than LIMITS[limit or name] (JSON integers only: 64.0 and "64" are refused)."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    high = LIMITS.get(limit or name)
    if high is not None and value > high:
        raise ConfigError(f"{name}={value} is larger than any model this mixtrt runs (at most {high})")
    return value


FLOAT32_MAX = 3.4028234663852886e38


def _real(name: str, value: Any, low: float, high: float = math.inf) -> float:
    """A finite number in (low, high) (JSON numbers only)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not low < value < high:
        raise ConfigError(f"{name} must be in ({low:g}, {high:g}), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int  # E
    num_experts_per_tok: int  # A (top-k)

    def __post_init__(self) -> None:
        _size("num_experts", self.num_experts)
        if not _is_int(self.num_experts_per_tok) or not (1 <= self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok!r} must be an integer in [1, num_experts="
                f"{self.num_experts}]"
            )


@dataclass(frozen=True)
class ModelArgs:
    """Checked by meaning on construction (every loader and the manifest go through it): sizes are positive
    integers within LIMITS, rms_norm_eps and rope_theta are positive (both finite: 0, a negative value or NaN
    there makes every logit NaN; any positive value is what transformers computes with), the window is an integer
    >= 1 or None, the token ids are inside the vocabulary."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    num_labels: int = 2
    moe: MoeArgs | None = None
    id2label: tuple[str, ...] | None = None  # label names by id (the labelled heads only), from config.json
    # how a sequence classifier's logits become scores (config.json's problem_type, transformers' names): None
    # (softmax, or a sigmoid for one label), "single_label_classification" (softmax), "multi_label_classification"
    # (a sigmoid per label), "regression" (the logits as they are)
    problem_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; supported: {sorted(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "num_labels"):
            _size(name, getattr(self, name))
        if self.max_position_embeddings < 2:  # as --max-context: a token and the next one at least
            raise ConfigError(f"max_position_embeddings={self.max_position_embeddings}: a model needs at least 2 "
                              "positions (a prompt token and a new one)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        object.__setattr__(self, "rms_norm_eps", _real("rms_norm_eps", self.rms_norm_eps, 0.0))
        object.__setattr__(self, "rope_theta", _real("rope_theta", self.rope_theta, 0.0))
        # the largest rotary angle, position x theta^(-(d-2)/d), must be a finite float32 (a theta near 0 made
        # every table entry inf or NaN): checked in logs, where no power overflows
        worst = (math.log(self.max_position_embeddings)
                 - (self.head_dim - 2) / self.head_dim * math.log(self.rope_theta))
        if worst >= math.log(FLOAT32_MAX):
            raise ConfigError(f"rope_theta={self.rope_theta!r} makes the rotary angles of "
                              f"{self.max_position_embeddings} positions overflow float32 (the tables would be "
                              "inf / NaN)")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be null or an integer >= 1, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or not all(isinstance(t, str) for t in self.layer_types):
                raise ConfigError(f"layer_types must be a list of strings, got {self.layer_types!r}")
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
                )
            bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            if bad:
                raise ConfigError(f"unknown layer_types {bad}: expected sliding_attention/full_attention")
            sliding = [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]
            if sliding and self.sliding_window is None:  # transformers fails on it; full attention would be a guess
                raise ConfigError(f"layer_types makes layer(s) {sliding} sliding_attention but sliding_window is null: "
                                  "no window to apply")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ConfigError(f"eos_token_id must be an integer, a list of integers or null, got "
                              f"{self.eos_token_ids!r}")
        for name, ids in (("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,)),
                          ("eos_token_id", self.eos_token_ids),
                          # the pad id only matters to the head that pools on it
                          ("pad_token_id", () if self.pad_token_id is None or self.head != "sequence_classification"
                           else (self.pad_token_id,))):
            for i in ids:
                if not _is_int(i) or not 0 <= i < self.vocab_size:
                    raise ConfigError(f"{name} {i!r} is not a token id inside the vocabulary [0, {self.vocab_size})")
        if self.pad_token_id is not None and not _is_int(self.pad_token_id):
            raise ConfigError(f"pad_token_id must be an integer or null, got {self.pad_token_id!r}")
        if self.moe is not None and not isinstance(self.moe, MoeArgs):
            raise ConfigError(f"moe must be MoeArgs or None, got {self.moe!r}")
        if self.is_mixtral != (self.moe is not None):
            raise ConfigError(f"{self.architecture} needs moe args iff it is a Mixtral architecture")
        if self.id2label is not None and (not isinstance(self.id2label, tuple) or len(self.id2label) != self.num_labels
                                          or not all(isinstance(n, str) for n in self.id2label)):
            raise ConfigError(f"id2label must name each of the {self.num_labels} labels once, got {self.id2label!r}")
        if self.id2label is not None:
            _distinct_labels(self.id2label)
        if self.problem_type is not None and (self.head != "sequence_classification"
                                              or self.problem_type not in PROBLEM_TYPES):
            raise ConfigError(f"problem_type must be null or (a sequence classifier's) one of "
                              f"{', '.join(PROBLEM_TYPES)}, got {self.problem_type!r} for a {self.head} model")
        if self.problem_type == "single_label_classification" and self.num_labels < 2:  # a softmax over one is 1
            raise ConfigError("problem_type single_label_classification needs num_labels >= 2, got 1 (transformers "
                              "refuses it too): num_labels 2 for a binary classifier, or regression for one output")

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def is_mixtral(self) -> bool:
        return self.architecture.startswith("Mixtral")

    @property
    def head(self) -> str:
        """Which head the architecture carries: causal_lm, base, sequence_classification, ..."""
        return ARCHITECTURES[self.architecture]

    @property
    def kv_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer: int) -> int | None:
        """Keys a query at position i sees: i - W < j <= i (W keys, itself included); None = full causal."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest's "model" object. id2label and problem_type appear only when set (the labelled heads),
        so a causal LM's dict is what mixtrt versions before them read."""
        d = dataclasses.asdict(self)
        for optional in ("id2label", "problem_type"):
            if d[optional] is None:
                del d[optional]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Inverse of to_dict (the form stored in manifest.json)."""
        if not isinstance(d, dict):
            raise ConfigError(f"model must be an object, got {type(d).__name__}")
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown ModelArgs fields {unknown}")
        moe = d.pop("moe", None)
        if moe is not None:
            if not isinstance(moe, dict) or set(moe) != {"num_experts", "num_experts_per_tok"}:
                raise ConfigError(f"moe must be null or {{num_experts, num_experts_per_tok}}, got {moe!r}")
            moe = MoeArgs(**moe)
        if isinstance(d.get("layer_types"), list):
            d["layer_types"] = tuple(d["layer_types"])
        if isinstance(d.get("eos_token_ids", ()), list):
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        if isinstance(d.get("id2label"), list):
            d["id2label"] = tuple(d["id2label"])
        try:
            return cls(**d, moe=moe)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"model: {e}") from None

    @classmethod
    def from_hf_config(cls, cfg: Any, *, source: str = "config.json") -> ModelArgs:
        """From a transformers MistralConfig / MixtralConfig dict (4.x or 5.x field names). Every error names
        `source` and the field."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        try:
            args = cls._from_hf(_Fields(cfg))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if args.is_mixtral and cfg.get("layer_types") is not None:  # not read (_from_hf): say so
            warnings.warn(f"{source}: layer_types is ignored, as transformers' Mixtral ignores it: every layer "
                          f"attends with sliding_window ({args.sliding_window})", MixtrtWarning, stacklevel=2)
        return args

    @classmethod
    def _from_hf(cls, cfg: _Fields) -> ModelArgs:
        archs = cfg.get("architectures", None, list)
        if archs and not isinstance(archs[0], str):
            raise ConfigError(f"architectures must be a list of strings, got {archs!r}")
        model_type = cfg.get("model_type", "", str)
        arch = archs[0] if archs else MODEL_TYPES.get(model_type)
        if arch is None:
            raise ConfigError(f"cannot tell the architecture (no 'architectures', model_type={model_type!r}); "
                              f"supported: {sorted(ARCHITECTURES)}")
        if arch not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu", str)
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (Mistral/Mixtral use 'silu')")

        # a field config.json leaves out takes transformers' default for the family (MistralConfig / MixtralConfig),
        # so a config exports as transformers loads it
        family = _HF_DEFAULTS["mixtral" if arch.startswith("Mixtral") else "mistral"]

        def absent(key: str) -> bool:
            return key not in cfg.d

        # transformers 5.x moved rope_theta into rope_parameters; only the default (unscaled) rope is supported.
        # Both keys are read: transformers reads a legacy rope_scaling beside rope_parameters (its scaling wins).
        ropes = {key: cfg.get(key, None, dict) or {} for key in ("rope_parameters", "rope_scaling")}
        for key, d in ropes.items():
            fields = _Fields(d, key + ".")
            kind = fields.get("rope_type", fields.get("type", "default", str), str)
            # linear scaling by 1 divides the frequencies by 1: transformers' unscaled RoPE exactly
            if kind == "linear" and fields.get("factor", None, (int, float)) == 1:
                continue
            if kind != "default":
                raise ConfigError(f"{key}: rope type {kind!r} is not supported (only unscaled RoPE)")
        rope_key = "rope_parameters" if ropes["rope_parameters"] else "rope_scaling"
        rope = _Fields(ropes[rope_key], rope_key + ".")
        rope_theta = rope.get("rope_theta", None, (int, float))
        if rope_theta is None:
            rope_theta = cfg.get("rope_theta", family["rope_theta"], (int, float))

        hidden, heads = cfg.size("hidden_size"), cfg.size("num_attention_heads")
        head_dim = cfg.get("head_dim", None, int)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"no head_dim, and hidden_size={hidden} is not a multiple of "
                                  f"num_attention_heads={heads}")
            head_dim = hidden // heads
        # absent: Mistral's 2 (transformers' default); null: no EOS token, generation never stops on one
        eos = cfg.get("eos_token_id", 2, (int, list))
        if "eos_token_id" in cfg.d and cfg.d["eos_token_id"] is None:
            eos = None
        moe = None
        if arch.startswith("Mixtral"):
            moe = MoeArgs(cfg.size("num_local_experts", "num_experts"), cfg.size("num_experts_per_tok"))
        layer_types = cfg.get("layer_types", None, list)
        if arch.startswith("Mixtral"):
            # transformers' Mixtral reads no layer_types (its AutoConfig turns only a Mistral config with them into
            # Ministral, which does): every layer keeps sliding_window, as the checkpoint runs there
            layer_types = None
        num_labels, id2label = _labels(cfg)
        return cls(
            architecture=arch,
            vocab_size=cfg.size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=cfg.size("intermediate_size"),
            num_hidden_layers=cfg.size("num_hidden_layers"),
            num_attention_heads=heads,
            # absent: the family's 8; null: one per attention head (transformers' rule for older configs)
            num_key_value_heads=(family["num_key_value_heads"] if absent("num_key_value_heads")
                                 else cfg.get("num_key_value_heads", heads, int)),
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", family["rms_norm_eps"], (int, float)),
            rope_theta=rope_theta,
            # absent: the family's (Mistral 4096, Mixtral none); null: no window
            sliding_window=(family["sliding_window"] if absent("sliding_window")
                            else cfg.get("sliding_window", None, int)),
            layer_types=tuple(layer_types) if layer_types else None,
            max_position_embeddings=cfg.get("max_position_embeddings", family["max_position_embeddings"], int),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False, bool),
            bos_token_id=cfg.get("bos_token_id", 1, int),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            # a negative pad id (-1 in some older configs) matches no token: transformers then pools each row's last
            # token, which is what no pad id does here
            pad_token_id=_no_negative(cfg.get("pad_token_id", None, int)),
            num_labels=num_labels,
            moe=moe,
            id2label=id2label if ARCHITECTURES[arch] in LABELLED_HEADS else None,
            # transformers' pipelines read it for sequence classification only; other heads ignore it as they do
            problem_type=(cfg.get("problem_type", None, str) if ARCHITECTURES[arch] == "sequence_classification"
                          else None),
        )

    @classmethod
    def from_params_json(cls, p: Any, *, source: str = "params.json") -> ModelArgs:
        """From a raw Mistral ``params.json`` (dim, n_layers, n_heads, ..., optional moe)."""
        if not isinstance(p, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(p).__name__}")
        try:
            return cls._from_params(_Fields(p))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _from_params(cls, p: _Fields) -> ModelArgs:
        _known_params(p.d, _PARAMS, "")
        if p.get("model_type", "transformer", str) != "transformer":
            raise ConfigError(f"model_type {p.d['model_type']!r} is not supported (only \"transformer\": Mistral's "
                              "dense and MoE decoders)")
        moe_p = p.get("moe", None, dict)
        moe = None
        if moe_p:
            _known_params(moe_p, _MOE_PARAMS, "moe.")
            m = _Fields(moe_p, "moe.")
            moe = MoeArgs(m.size("num_experts"), m.size("num_experts_per_tok"))
        dim, heads = p.size("dim", "hidden_size"), p.size("n_heads", "num_attention_heads")
        head_dim = p.get("head_dim", None, int)
        if head_dim is None:
            if dim % heads:
                raise ConfigError(f"no head_dim, and dim={dim} is not a multiple of n_heads={heads}")
            head_dim = dim // heads
        return cls(
            architecture="MixtralForCausalLM" if moe else "MistralForCausalLM",
            vocab_size=p.size("vocab_size"),
            hidden_size=dim,
            intermediate_size=p.size("hidden_dim", "intermediate_size"),
            num_hidden_layers=p.size("n_layers", "num_hidden_layers"),
            num_attention_heads=heads,
            # required, as mistral-inference requires them (a missing n_kv_heads read as n_heads failed later, on a
            # tensor's shape; a missing norm_eps took 1e-5 unsaid)
            num_key_value_heads=p.size("n_kv_heads", "num_key_value_heads"),
            head_dim=head_dim,
            rms_norm_eps=p.required("norm_eps", (int, float)),
            rope_theta=p.get("rope_theta", 1e6 if moe else 10000.0, (int, float)),
            sliding_window=_raw_window(p),
            max_position_embeddings=p.get("max_seq_len", p.get("max_position_embeddings", 32768, int), int),
            tie_word_embeddings=p.get("tied_embeddings", False, bool),  # output = tok_embeddings
            moe=moe,
        )

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> ModelArgs:
        """config.json if present (unless it has no weights beside it and a raw checkpoint is there: described_by),
        else params.json; a clear error if neither is there."""
        path = Path(path)
        for name, build in (("config.json", cls.from_hf_config), ("params.json", cls.from_params_json)):
            if name == "config.json" and described_by(path) == "params.json":
                continue
            f = path / name
            if f.is_symlink() and not f.exists():
                raise ConfigError(f"{f}: a symbolic link to a file that does not exist")
            if f.is_file():
                return build(read_json(f, ConfigError), source=str(f))
        if not path.is_dir():
            raise ConfigError(f"{path}: not a checkpoint directory ("
                              f"{'a file' if path.exists() else 'no such directory'})")
        raise ConfigError(f"{path}: not a checkpoint directory (no config.json or params.json)")


RAW_WEIGHTS = ("consolidated.safetensors", "consolidated*.pth")


def described_by(path: str | Path) -> str:
    """Which file describes the checkpoint in `path`: "config.json" where there is one, as transformers reads it,
    except where none of the Hugging Face weights mixtrt loads is beside it and params.json with its raw weights is
    (a download of a mistralai repository's `*.json` and `consolidated.safetensors`, which takes the shards' index
    without its shards): "params.json". A link that points nowhere counts as there (its own error names it)."""
    path = Path(path)

    def there(p: Path) -> bool:  # a file, or a link that may point nowhere
        return p.is_file() or p.is_symlink()

    config = path / "config.json"
    if not there(config):
        return "params.json"
    if not config.exists() or not (path / "params.json").is_file() \
            or not any(p.is_file() for pattern in RAW_WEIGHTS for p in path.glob(pattern)):
        return "config.json"
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if there(single):
        return "config.json"
    if there(index):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "config.json"  # the index is read as the weights: its own error says what is wrong with it
        if any(isinstance(s, str) and there(path / s) for s in shards):
            return "config.json"
    return "params.json"  # pickled weights (pytorch_model*.bin) are never loaded: the raw checkpoint is


# JSON files mixtrt reads are small; anything larger is not one of them (and is not read into memory).
MAX_JSON_BYTES = 64 << 20


def read_json(path: Path, error: type[Exception]) -> Any:
    """The parsed JSON of a small file, or `error` naming the file (too large, unreadable, not UTF-8 JSON).
    NaN and Infinity literals are refused (they are not JSON)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes is too large for a JSON file mixtrt reads (at most {MAX_JSON_BYTES})")
        return json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except _NotJSON as e:
        raise error(f"{path}: not valid JSON ({e} is not a JSON number)") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # Python's limit on integer digits (4300); our own errors pass through
        if isinstance(e, error):
            raise
        raise error(f"{path}: a number with more digits than any field takes") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None


class _NotJSON(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJSON(name)


# the fields of Mistral's params.json this reader takes (mistral-inference's TransformerArgs and MoeArgs, the
# transformers-style aliases, tied_embeddings); any other field is refused by name (a params.json field changes the
# model: a reader that skipped Mistral's `yarn` RoPE scaling ran the model with the wrong positions, silently)
_PARAMS = {"dim", "hidden_size", "n_layers", "num_hidden_layers", "head_dim", "hidden_dim", "intermediate_size",
           "n_heads", "num_attention_heads", "n_kv_heads", "norm_eps", "vocab_size", "rope_theta", "max_seq_len",
           "max_position_embeddings", "sliding_window", "_sliding_window", "moe", "tied_embeddings", "model_type",
           "max_batch_size"}
_MOE_PARAMS = {"num_experts", "num_experts_per_tok"}
_WHY = {"yarn": "YaRN RoPE scaling is not supported (only unscaled RoPE)",
        "llama_4_scaling": "Llama-4-style attention scaling is not supported (only unscaled RoPE)",
        "rope_scaling": "RoPE scaling is not supported (only unscaled RoPE)",
        "quantization": "a quantized checkpoint is not supported: export from its unquantized (bf16 / fp16 / fp32) "
                        "weights",
        "vision_encoder": "a vision-language checkpoint is not supported (text-only Mistral and Mixtral decoders)",
        "audio_encoder": "an audio-language checkpoint is not supported (text-only Mistral and Mixtral decoders)",
        "lora": "a LoRA adapter is not supported: export the merged weights"}


def _known_params(d: dict[str, Any], known: set[str], prefix: str) -> None:
    """A ConfigError naming the first field of a params.json object (or its moe object) outside `known` that is
    set (null is left out, as everywhere)."""
    for key, value in d.items():
        off = key == "lora" and isinstance(value, dict) and value.get("enable") is False  # mistral-inference's
        if key not in known and value is not None and value != {} and not off:
            why = _WHY.get(key, "a field mixtrt does not read, which may change the model: not supported")
            shown = key if isinstance(key, str) and key.isidentifier() else repr(key)  # a key of any text, one line
            raise ConfigError(f"{prefix}{shown}: {why}")


def _raw_window(p: _Fields) -> int | None:
    """params.json's window: `sliding_window`, or `_sliding_window` as mistral-inference also writes and reads it."""
    plain, underscored = p.get("sliding_window", None, int), p.get("_sliding_window", None, int)
    if plain is not None and underscored is not None and plain != underscored:
        raise ConfigError(f"sliding_window={plain} and _sliding_window={underscored} disagree")
    return plain if plain is not None else underscored


# transformers' defaults (MistralConfig / MixtralConfig) for the fields a config.json may leave out
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"rope_theta": 10000.0, "sliding_window": 4096, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
                "num_key_value_heads": 8},
    "mixtral": {"rope_theta": 1e6, "sliding_window": None, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                "num_key_value_heads": 8},
}


class _Fields:
    """Typed access to a config dict: each value is checked before it is used, and an error names the field.

    >>> _Fields({"hidden_size": "abc"}).size("hidden_size")
    Traceback (most recent call last):
    ...
    mixtrt.runtime.errors.ConfigError: hidden_size must be a positive integer, got 'abc'
    """

    def __init__(self, d: dict[str, Any], prefix: str = "") -> None:
        self.d, self.prefix = d, prefix

    def get(self, key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
        """d[key] if present and not null, else default; refused unless of `kind` (bool is never an int)."""
        value = self.d.get(key)
        if value is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                                 list: "a list", dict: "an object"}[k] for k in kinds)
            raise ConfigError(f"{self.prefix}{key} must be {names}, got {value!r}")
        return value

    def _present(self, key: str) -> Any:
        """d[key] of a required field; absent or null is named as missing."""
        if self.d.get(key) is None:
            raise ConfigError(f"missing required field {self.prefix + key!r}")
        return self.d[key]

    def required(self, key: str, types: type | tuple[type, ...]) -> Any:
        """A required field of `types`."""
        self._present(key)
        return self.get(key, None, types)

    def size(self, key: str, limit: str | None = None) -> int:
        """A required positive integer, at most LIMITS[limit or key] when there is one."""
        return _size(self.prefix + key, self._present(key), limit or key)


def _labels(cfg: _Fields) -> tuple[int, tuple[str, ...]]:
    """num_labels and the label names of a transformers config: `id2label` ({"0": "NEG", "1": "POS"}, keys
    exactly 0 .. num_labels-1), else `num_labels` (default 2) with transformers' names LABEL_0, LABEL_1, ..."""
    raw = cfg.get("id2label", None, dict)
    if not raw:
        n = _size("num_labels", cfg.get("num_labels", 2, int))
        return n, tuple(f"LABEL_{i}" for i in range(n))
    try:
        names = {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        names = {}
    if sorted(names) != list(range(len(raw))) or not all(isinstance(v, str) for v in names.values()):
        raise ConfigError(f"id2label keys must be the label ids 0..{len(raw) - 1} and its values names, got {raw!r}")
    n = _size("num_labels", len(names))
    if cfg.get("num_labels", n, int) != n:
        raise ConfigError(f"num_labels={cfg.get('num_labels', n, int)} but id2label names {n} labels")
    return n, _distinct_labels(tuple(names[i] for i in range(n)))


def _no_negative(token_id: int | None) -> int | None:
    return None if token_id is not None and token_id < 0 else token_id


def _distinct_labels(names: tuple[str, ...]) -> tuple[str, ...]:
    """Label names must differ: results and scores are keyed by name, so two labels of one name would merge.

    >>> _distinct_labels(("NEG", "POS", "NEG"))
    Traceback (most recent call last):
    ...
    mixtrt.runtime.errors.ConfigError: id2label names labels 0 and 2 both 'NEG': each label needs its own name
    """
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise ConfigError(f"id2label names labels {first[name]} and {i} both {name!r}: each label needs its own "
                              "name")
        first[name] = i
    return names
