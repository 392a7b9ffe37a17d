"""Tiny random Hugging Face checkpoints written by transformers, for tests.

    >>> path = make_checkpoint(tmp_path / "m", "mixtral", sliding_window=8)
    >>> sorted(p.name for p in path.iterdir())
    ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.model']

initializer_range defaults to 0.5 so greedy token ids are stable under rounding (DESIGN.md "Tests").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# Small but real: GQA, a window shorter than the prompts the tests use, the real 32000-piece vocab.
BASE = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    initializer_range=0.5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def mistral_tokenizer_path() -> Path:
    """The real Mistral v1 sentencepiece model shipped in mistral-common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def hf_config(family: str, **overrides: Any):
    """A transformers MistralConfig / MixtralConfig / MinistralConfig from BASE + overrides."""
    from transformers import MinistralConfig, MistralConfig, MixtralConfig

    kw = {**BASE, **overrides}
    if family == "mixtral":
        kw.setdefault("num_local_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
        kw.setdefault("router_jitter_noise", 0.0)
        return MixtralConfig(**kw)
    if family == "mistral":
        return MistralConfig(**kw)
    if family == "ministral":  # transformers builds no Ministral of head_dim null
        return MinistralConfig(**{"head_dim": kw["hidden_size"] // kw["num_attention_heads"], **kw})
    raise ValueError(family)


def make_hf_model(family: str, seed: int = 0, head: str = "causal_lm", **overrides: Any):
    """A random transformers model of the given family and head, eval mode, fp32."""
    import torch
    import transformers

    cfg = hf_config(family, **overrides)
    prefix = {"mixtral": "Mixtral", "ministral": "Ministral"}.get(family, "Mistral")
    cls_name = {
        "causal_lm": "ForCausalLM",
        "base": "Model",
        "sequence_classification": "ForSequenceClassification",
        "token_classification": "ForTokenClassification",
        "question_answering": "ForQuestionAnswering",
    }[head]
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + cls_name)(cfg)
    return model.eval()


def make_checkpoint(
    path: Path,
    family: str = "mistral",
    seed: int = 0,
    head: str = "causal_lm",
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write a tiny random checkpoint (config.json + safetensors [+ tokenizer.model]) to `path`."""
    model = make_hf_model(family, seed=seed, head=head, **overrides)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if tokenizer:
        shutil.copy(mistral_tokenizer_path(), path / "tokenizer.model")
    return path


def export_cases(root: Path, cases: dict[str, dict[str, Any]], **defaults: Any) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint dir, artifact dir) for each case {"family": ..., **config overrides}."""
    from mixtrt.export import export_onnx

    out = {}
    for name, kw in cases.items():
        kw = {**defaults, **kw}
        ck = make_checkpoint(root / f"{name}-ck", kw.pop("family"), **kw)
        out[name] = (ck, export_onnx(ck, root / f"{name}-art", progress=None))
    return out


def bos_prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    """Random prompts of the given lengths for the 32000-token test vocabulary, each starting with BOS (1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, 32000, n - 1).tolist()] for n in lengths]


def backend_pairs(exported: dict[str, tuple[Path, Path]], threads: int = 1) -> Any:
    """get(name) -> (onnxruntime backend, triton backend) on the session's artifact `name`, each pair loaded once."""
    from mixtrt.runtime.backends import load_backend

    cache: dict[str, tuple[Any, Any]] = {}

    def get(name: str) -> tuple[Any, Any]:
        if name not in cache:
            art = exported[name][1]
            cache[name] = (load_backend("onnxruntime", art, threads=threads), load_backend("triton", art))
        return cache[name]

    return get


# The artifacts most export/backend/manifest tests share (tests/conftest.py `exported`, once per session).
EXPORT_W = 5  # window shorter than every prompt those tests use
EXPORT_CASES: dict[str, dict[str, Any]] = {
    "mistral-window": dict(family="mistral", sliding_window=EXPORT_W),
    "mixtral-window": dict(family="mixtral", sliding_window=EXPORT_W),
    "mistral-nowindow": dict(family="mistral", sliding_window=None),
    "mixtral-nowindow": dict(family="mixtral", sliding_window=None, num_key_value_heads=1),
}


# The heads other than causal_lm (tests/conftest.py `head_artifacts`, each exported once per session on first
# use): both families, a window shorter than the test texts, the attention bodies the head dims pick (16: gqa,
# 24: gqa_rope, 12: standard), named labels. The "-slow" cases are the other family of each head.
LABELS = {"0": "NEGATIVE", "1": "NEUTRAL", "2": "POSITIVE"}
TAGS = {"0": "O", "1": "B-PER", "2": "I-PER", "3": "B-LOC", "4": "I-LOC"}
HEAD_CASES: dict[str, dict[str, Any]] = {
    "base": dict(family="mixtral", head="base", head_dim=12),
    "seqcls": dict(family="mistral", head="sequence_classification", pad_token_id=0, id2label=LABELS),
    "tokcls": dict(family="mixtral", head="token_classification", id2label=TAGS, head_dim=24),
    "qa": dict(family="mistral", head="question_answering"),
    "base-slow": dict(family="mistral", head="base"),
    "seqcls-slow": dict(family="mixtral", head="sequence_classification", pad_token_id=None, id2label=LABELS,
                        head_dim=24),
    "tokcls-slow": dict(family="mistral", head="token_classification", id2label=TAGS, head_dim=12),
    "qa-slow": dict(family="mixtral", head="question_answering", sliding_window=None, head_dim=12),
}
HEAD_DEFAULTS = dict(sliding_window=EXPORT_W, max_position_embeddings=128)


def hf_greedy(checkpoint: Path, prompt: list[int], new: int, **config: Any) -> list[int]:
    """transformers' greedy generate (eager attention, fp32, no eos stopping) from a causal-LM checkpoint;
    the generated ids only. `config` overrides config fields (sliding_window=None: the model without its window)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32,
                                                 **config)
    model.eval()
    # no eos at all: min_new_tokens would keep the eos id from being chosen (it is masked, not ignored), and an
    # eos_token_id of None in the call alone still stops at the model's own
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    gc = HFGenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0, bos_token_id=1)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    assert out.shape == (1, len(prompt) + new)
    return out[0, len(prompt):].tolist()


def close_logits(got: Any, want: Any) -> None:
    """fp32 rounding bound for logits of magnitude ~20 (initializer_range 0.5): 5e-5 of the largest logit.

    transformers' own cached decode differs from its full pass by 3e-4 on the tiny Mixtral; a wrong row,
    position or window is off by O(1).
    """
    import numpy as np

    tol = max(1e-4, 5e-5 * float(np.abs(want).max()))
    assert np.abs(got - want).max() <= tol
