"""Hostile GenerationConfig values through the Python API: every bad one is one ConfigError naming the field,
raised before any model work, whether given as a GenerationConfig or as keyword overrides."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import Engine, GenerationConfig, Generator
from tests.hostile import one_line
from tests.runtime.fakes import ToyBackend, ToyTokenizer, V

# (field, bad value); each is refused with the field named
BAD = [
    ("max_new_tokens", "5"), ("max_new_tokens", 5.0), ("max_new_tokens", True), ("max_new_tokens", 0),
    ("max_new_tokens", -1), ("max_new_tokens", None), ("max_new_tokens", np.float32(3)),
    ("do_sample", "yes"), ("do_sample", 1), ("do_sample", None),
    ("temperature", "0.5"), ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1.0),
    ("temperature", None), ("temperature", True), ("temperature", [1.0]),
    ("top_k", 1.5), ("top_k", -1), ("top_k", "3"), ("top_k", None),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("top_p", "0.9"), ("top_p", -math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", math.inf), ("repetition_penalty", "1"),
    ("repetition_penalty", -1.2),
    ("seed", -2**63 - 1), ("seed", "0"), ("seed", 1.5), ("seed", True),
    ("eos_token_id", "2"), ("eos_token_id", [2, "a"]), ("eos_token_id", -1), ("eos_token_id", 1.5),
    ("eos_token_id", True), ("eos_token_id", {2}), ("eos_token_id", [[2]]),
    ("stop_strings", [1]), ("stop_strings", [""]), ("stop_strings", ""), ("stop_strings", 5),
    ("stop_strings", None), ("stop_strings", ("ok", "bad\udcff")), ("stop_strings", [b"\n"]),
    ("return_logprobs", "no"), ("return_logprobs", None),
    ("prefill_chunk", 0), ("prefill_chunk", "x"), ("prefill_chunk", 2.0),
    ("json_schema", 5), ("json_schema", "{"), ("json_schema", [1]), ("json_schema", {"x-guidance": {}}),
    ("json_schema", {"type": "integer", "minimum": "x"}), ("json_schema", {"enum": [math.nan]}),
    ("grammar", ""), ("grammar", 5), ("grammar", "start: %%%"), ("grammar", "root ::= ("),
    ("regex", ""), ("regex", "("), ("regex", "a\\"), ("regex", 5),
    ("choice", []), ("choice", "yes"), ("choice", ["a", 1]), ("choice", ["", "b"]),
    ("suppress_tokens", "5"), ("suppress_tokens", [1, -1]), ("suppress_tokens", [1.5]), ("suppress_tokens", True),
    ("suppress_tokens", None),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_is_one_line_naming_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**{field: value})
    one_line(e.value, field)
    backend = ToyBackend()
    gen = Generator(backend, ToyTokenizer())
    with pytest.raises(ConfigError) as e:
        gen.generate([[1, 5, 9]], **{field: value})
    one_line(e.value, field)
    with pytest.raises(ConfigError):
        gen.stream([1, 5, 9], **{field: value})  # at the call, not at the first iteration
    assert backend.calls == []


# refused only once the model is known (Engine.add / Generator calls), still before any work
NEEDS_MODEL = [
    ({"eos_token_id": V}, "eos_token_id"),
    ({"eos_token_id": (2, V + 5)}, "eos_token_id"),
    ({"prefill_chunk": 7}, "prefill_chunk"),  # ToyBackend's cache holds 6
    ({"suppress_tokens": [3, V]}, "suppress_tokens"),
    ({"suppress_tokens": list(range(V))}, "suppress_tokens"),
    ({"colour": "red"}, "colour"),
]


@pytest.mark.parametrize("options, field", NEEDS_MODEL, ids=[f for _, f in NEEDS_MODEL])
def test_values_refused_against_the_model(options, field):
    backend = ToyBackend()
    gen = Generator(backend, ToyTokenizer())
    with pytest.raises(ConfigError) as e:
        gen.generate([[1, 5]], **options)
    one_line(e.value, field)
    assert backend.calls == []


def test_engine_and_scoring_arguments():
    backend = ToyBackend()
    for bad in (0, -1, 2.0, "8", None):
        with pytest.raises(ConfigError) as e:
            Engine(backend, ToyTokenizer(), max_batch=bad)  # type: ignore[arg-type]
        one_line(e.value, "max_batch")
    gen = Generator(backend, ToyTokenizer())
    with pytest.raises(ConfigError) as e:
        gen.perplexity([1, 5, 9], window=1)
    one_line(e.value, "window")
    with pytest.raises(ConfigError) as e:
        gen.teacher_forced_logprobs([1])
    one_line(e.value, "2 tokens")
    assert backend.calls == []


def test_accepted_values_are_normalised():
    cfg = GenerationConfig(max_new_tokens=np.int64(3), temperature=1, top_p=np.float32(0.5), do_sample=np.bool_(True),
                           eos_token_id=np.array([2, 3]), stop_strings="\n\n", seed=np.int32(4))
    assert (cfg.max_new_tokens, cfg.temperature, cfg.eos_token_id, cfg.stop_strings, cfg.seed) == \
        (3, 1.0, (2, 3), ("\n\n",), 4)
    assert type(cfg.max_new_tokens) is int and type(cfg.top_p) is float and cfg.do_sample is True
    assert dataclasses.replace(cfg, eos_token_id=()).eos_token_id == ()


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=4), st.lists(st.integers(-3, 100), max_size=3), st.binary(max_size=3))
FIELDS = [f.name for f in dataclasses.fields(GenerationConfig)]


@settings(max_examples=400, deadline=None)
@given(values=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4))
def test_any_values_give_a_sane_config_or_one_config_error(values):
    try:
        cfg = GenerationConfig(**values)
    except ConfigError as e:
        one_line(e)
        return
    assert type(cfg.max_new_tokens) is int and cfg.max_new_tokens >= 1
    assert all(math.isfinite(x) for x in (cfg.temperature, cfg.top_p, cfg.repetition_penalty))
    assert isinstance(cfg.stop_strings, tuple) and all(isinstance(s, str) and s for s in cfg.stop_strings)
    assert cfg.eos_token_id is None or isinstance(cfg.eos_token_id, (int, tuple))
    try:  # against a model: eos ids past its vocabulary and chunks past its cache are refused there
        [out] = Generator(ToyBackend(), ToyTokenizer()).generate([[1, 5]], dataclasses.replace(cfg, max_new_tokens=2))
    except ConfigError as e:
        # against a model: eos and suppressed ids, chunks, and a schema or grammar on a tokenizer structured output
        # cannot read
        culprit = next((f for f in ("json_schema", "grammar", "regex", "choice", "suppress_tokens")
                        if str(e).startswith(f)), None)
        one_line(e, culprit or ("eos_token_id" if "eos" in str(e) else "prefill_chunk"))
        return
    assert 1 <= out.stats.generated_tokens <= 2


def test_top_logprobs_past_the_vocabulary_gives_all_of_it():
    """top_logprobs larger than the vocabulary (46 toy pieces) lists every token, for the prompt's positions too
    (the prompt's buffer was sized by the request and did not fit what the vocabulary gives: a ValueError)."""
    from tests.runtime.fakes import V

    cfg = GenerationConfig(max_new_tokens=2, return_logprobs=True, top_logprobs=V + 1)
    [out] = Generator(ToyBackend(), ToyTokenizer()).generate([[1, 5, 9]], cfg)
    assert out.prompt_top_logprobs[0].shape == (2, V) and out.top_logprobs[0].shape == (2, V)


def test_absurd_batch_is_refused_before_allocating():
    """A cache larger than the machine's memory is one ConfigError, not a MemoryError or the OOM killer."""
    from mixtrt.runtime.cache import HostKVCache

    with pytest.raises(ConfigError) as e:
        HostKVCache(32, 10**6, 8, 4096, 128, np.float16)
    one_line(e.value, "KV cache of 1000000 row(s)", "GiB")
    with pytest.raises(ConfigError) as e:
        HostKVCache(2**20, 2**20, 1024, 2**20, 1024)  # no overflow in the arithmetic either
    one_line(e.value, "KV cache")
