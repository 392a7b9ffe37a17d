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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtrt.runtime.errors import ConfigError

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
}
MODEL_TYPES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int  # E
    num_experts_per_tok: int  # A (top-k)

    def __post_init__(self) -> None:
        if not (1 <= self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )


@dataclass(frozen=True)
class ModelArgs:
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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be null or >= 1, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
                )
            bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            if bad:
                raise ConfigError(f"unknown layer_types {bad}: expected sliding_attention/full_attention")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; supported: {sorted(ARCHITECTURES)}")
        if self.is_mixtral != (self.moe is not None):
            raise ConfigError(f"{self.architecture} needs moe args iff it is a Mixtral architecture")

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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Inverse of to_dict (the form stored in manifest.json)."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown ModelArgs fields {unknown}")
        moe = d.pop("moe", None)
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", (2,)))
        return cls(**d, moe=MoeArgs(**moe) if moe else None)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, source: str = "config.json") -> ModelArgs:
        """From a transformers MistralConfig / MixtralConfig dict (4.x or 5.x field names)."""

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return cfg[key]

        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else MODEL_TYPES.get(cfg.get("model_type", ""))
        if arch is None:
            raise ConfigError(
                f"{source}: cannot tell the architecture (no 'architectures', model_type={cfg.get('model_type')!r}); "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        if arch not in ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (Mistral/Mixtral use 'silu')")

        # transformers 5.x moved rope_theta into rope_parameters; only the default (unscaled) rope is supported.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only unscaled RoPE)")
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = cfg.get("head_dim") or hidden // heads
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        moe = None
        if arch.startswith("Mixtral"):
            moe = MoeArgs(int(need("num_local_experts")), int(need("num_experts_per_tok")))
        layer_types = cfg.get("layer_types")
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            sliding_window=cfg.get("sliding_window"),
            layer_types=tuple(layer_types) if layer_types else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            num_labels=int(cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)),
            moe=moe,
        )

    @classmethod
    def from_params_json(cls, p: dict[str, Any], *, source: str = "params.json") -> ModelArgs:
        """From a raw Mistral ``params.json`` (dim, n_layers, n_heads, ..., optional moe)."""

        def need(key: str) -> Any:
            if key not in p:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return p[key]

        moe_p = p.get("moe")
        moe = MoeArgs(int(moe_p["num_experts"]), int(moe_p["num_experts_per_tok"])) if moe_p else None
        dim, heads = int(need("dim")), int(need("n_heads"))
        return cls(
            architecture="MixtralForCausalLM" if moe else "MistralForCausalLM",
            vocab_size=int(need("vocab_size")),
            hidden_size=dim,
            intermediate_size=int(need("hidden_dim")),
            num_hidden_layers=int(need("n_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(p.get("n_kv_heads") or heads),
            head_dim=int(p.get("head_dim") or dim // heads),
            rms_norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 1e6 if moe else 10000.0)),
            sliding_window=p.get("sliding_window"),
            max_position_embeddings=int(p.get("max_seq_len", p.get("max_position_embeddings", 32768))),
            tie_word_embeddings=False,
            moe=moe,
        )

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> ModelArgs:
        """config.json if present, else params.json; a clear error if neither is there."""
        path = Path(path)
        for name, build in (("config.json", cls.from_hf_config), ("params.json", cls.from_params_json)):
            f = path / name
            if f.is_file():
                try:
                    data = json.loads(f.read_text())
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{f}: not valid JSON ({e})") from None
                return build(data, source=str(f))
        raise ConfigError(f"{path}: not a checkpoint directory (no config.json or params.json)")
