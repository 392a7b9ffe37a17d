"""Generation on real exported artifacts: parity with transformers' generate and the reference model,
fixed cache memory, finish reasons and streaming.

Tiny random Mistral and Mixtral (initializer_range 0.5, the real tokenizer) with a sliding window W
shorter than every prompt; each checkpoint is exported once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixtrt.export import export_onnx, load_model
from mixtrt.runtime.backends.onnxruntime import OrtBackend
from mixtrt.runtime.generation import GenerationConfig, Generator
from mixtrt.runtime.tokenizer import Tokenizer
from tests.checkpoints import export_cases, hf_greedy, make_checkpoint

W = 6  # window; every prompt below is 10-17 tokens
NEW = 3 * W  # generated tokens in the parity tests
LINEAR_CONTEXT = 24  # max context of the no-window artifact: its cache fills during generation
CASES = {
    "mistral": dict(family="mistral", sliding_window=W),
    "mixtral": dict(family="mixtral", sliding_window=W),
}
GREEDY = GenerationConfig(max_new_tokens=NEW, eos_token_id=())  # fixed length: never stop on eos


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 32000, n).tolist() for n in lengths]


PROMPT = _prompts(0, (12,))[0]
BATCH = _prompts(1, (10, 17, 13))  # different lengths, all longer than W


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (checkpoint dir, artifact dir); "mistral-nowindow" has a linear cache of LINEAR_CONTEXT."""
    root = tmp_path_factory.mktemp("gen")
    out = export_cases(root, CASES, max_position_embeddings=128)
    ck = make_checkpoint(root / "nowindow-ck", "mistral", seed=1, sliding_window=None, max_position_embeddings=128)
    out["mistral-nowindow"] = (ck, export_onnx(ck, root / "nowindow-art", max_context=LINEAR_CONTEXT, progress=None))
    return out


@pytest.fixture(scope="module")
def generators(exported):
    return {name: Generator.load(art, threads=2) for name, (_, art) in exported.items()}


def _reference_logprobs(ck, ids: list[int]) -> np.ndarray:
    """[T - 1]: log p(ids[t] | ids[:t]) from the reference model's full forward (no cache)."""
    model = load_model(ck)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()  # [T, V]
    lp = torch.log_softmax(logits, dim=-1)[:-1]
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


# ---- 1. greedy parity with transformers ----------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_greedy_batch1_equals_transformers_generate(exported, generators, name):
    ck, _ = exported[name]
    [out] = generators[name].generate([PROMPT], GREEDY)
    want = hf_greedy(ck, PROMPT, NEW)
    assert out.token_ids == want
    assert out.finish_reason == "length"
    # The comparison can fail: without its window the same model generates different ids.
    assert hf_greedy(ck, PROMPT, NEW, sliding_window=None) != want


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_batch3_equals_transformers_and_one_by_one(exported, generators, name):
    ck, _ = exported[name]
    gen = generators[name]
    batched = gen.generate(BATCH, GREEDY)
    for prompt, out in zip(BATCH, batched, strict=True):
        assert out.token_ids == hf_greedy(ck, prompt, NEW)
        [alone] = gen.generate([prompt], GREEDY)
        assert alone.token_ids == out.token_ids
        assert alone.text == out.text
    assert len({tuple(o.token_ids) for o in batched}) == 3


# ---- 2. teacher-forced logprobs vs the reference -------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_logprobs_equal_reference(exported, generators, name):
    ck, _ = exported[name]
    gen = generators[name]
    [out] = gen.generate([PROMPT], GREEDY, return_logprobs=True)
    seq = PROMPT + out.token_ids  # 30 tokens, 5x the window
    want = _reference_logprobs(ck, seq)

    diffs = {}
    for chunk in (None, 4):  # one prefill, and chunks shorter than the window
        got = gen.teacher_forced_logprobs(seq, prefill_chunk=chunk)
        assert got.shape == (len(seq) - 1,)
        diffs[f"teacher_forced chunk={chunk}"] = float(np.abs(got - want).max())
    assert out.logprobs.shape == (NEW,) and out.prompt_logprobs.shape == (len(PROMPT) - 1,)
    diffs["generate logprobs"] = float(np.abs(out.logprobs - want[len(PROMPT) - 1:]).max())
    diffs["prompt_logprobs"] = float(np.abs(out.prompt_logprobs - want[: len(PROMPT) - 1]).max())
    assert max(diffs.values()) <= 1e-4, diffs
    # Greedy picks the argmax, so its logprob is the largest of the row: never below log(1/V).
    assert (out.logprobs >= -np.log(32000)).all()


# ---- 3. memory -----------------------------------------------------------------------------------
class _Spy:
    """Delegates to a backend; records each cache it creates and the buffer addresses every step binds."""

    def __init__(self, backend: OrtBackend) -> None:
        self._backend = backend
        self.caches = []  # (cache, its buffer arrays at creation)
        self.addresses: set[tuple[int, ...]] = set()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def new_cache(self, batch_size):
        cache = self._backend.new_cache(batch_size)
        self.caches.append((cache, [*cache.keys, *cache.values]))
        return cache

    def step(self, cache, input_ids, start_row=0, last_only=False):
        self.addresses.add(tuple(a.ctypes.data for a in (*cache.keys, *cache.values)))
        return self._backend.step(cache, input_ids, start_row=start_row, last_only=last_only)


def _spied(art) -> tuple[Generator, _Spy]:
    spy = _Spy(OrtBackend.load(art, threads=2))
    return Generator(spy, Tokenizer.load(art)), spy


@pytest.mark.parametrize("batch", [[PROMPT], BATCH], ids=["batch1", "batch3"])
def test_generating_8x_window_uses_the_same_cache_as_1x(exported, batch):
    _, art = exported["mixtral"]
    gen, spy = _spied(art)
    short = gen.generate(batch, GREEDY, max_new_tokens=W)
    long = gen.generate(batch, GREEDY, max_new_tokens=8 * W)
    (c1, bufs1), (c8, bufs8) = spy.caches
    assert c1.nbytes == c8.nbytes > 0
    assert [a.shape for a in bufs1] == [a.shape for a in bufs8]
    assert c8.capacity == W + 16 < len(batch[0]) + 8 * W  # the run went far past the capacity
    # No reallocation: the cache ends with the very arrays it started with, and every step bound them.
    assert all(a is b for a, b in zip([*c8.keys, *c8.values], bufs8, strict=True))
    assert len(spy.addresses) == 2  # one address set per generate call
    for s, lg in zip(short, long, strict=True):
        assert len(lg.token_ids) == 8 * W and lg.finish_reason == "length"
        assert lg.token_ids[:W] == s.token_ids
    # every row fed all but its last token (all rows finished on the same step)
    assert c8.lengths.tolist() == [len(p) + 8 * W - 1 for p in batch]


def test_linear_cache_fills_and_ends_with_length(exported, generators):
    gen = generators["mistral-nowindow"]
    assert not gen.backend.windowed and gen.backend.capacity == LINEAR_CONTEXT
    prompts = _prompts(2, (10, 15))
    outs = gen.generate(prompts, GREEDY, max_new_tokens=100)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(prompt) + len(out.token_ids) == LINEAR_CONTEXT
        assert out.finish_reason == "length"
        assert "cache full" in out.finish_message and str(LINEAR_CONTEXT) in out.finish_message
    # A max_new_tokens that fits ends with the max_new_tokens message instead.
    [out] = gen.generate([prompts[0]], GREEDY, max_new_tokens=LINEAR_CONTEXT - 10 - 1)
    assert out.finish_reason == "length" and "max_new_tokens" in out.finish_message


# ---- 4. finish reasons on a real artifact ----------------------------------------------------------
def test_eos_from_a_greedy_run_ends_the_row(generators):
    gen = generators["mistral"]
    [full] = gen.generate([PROMPT], GREEDY)
    eos = full.token_ids[2]
    stop_at = full.token_ids.index(eos)
    [out] = gen.generate([PROMPT], GREEDY, eos_token_id=eos)
    assert out.finish_reason == "eos" and str(eos) in out.finish_message
    assert out.token_ids == full.token_ids[: stop_at + 1]  # the eos token is kept in the ids ...
    assert out.text == gen.tokenizer.decode(full.token_ids[:stop_at])  # ... not in the text

    # In a batch, only the row that produces it stops; the others run to max_new_tokens.
    outs = gen.generate([BATCH[0], PROMPT, BATCH[2]], GREEDY, eos_token_id=eos)
    assert outs[1].token_ids == out.token_ids and outs[1].finish_reason == "eos"
    for out in (outs[0], outs[2]):
        assert (out.finish_reason == "eos") == (eos in out.token_ids)
        if out.finish_reason == "length":
            assert len(out.token_ids) == NEW


def test_min_new_tokens_holds_eos_back_as_transformers(exported, generators):
    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig

    ck, _ = exported["mistral"]
    gen = generators["mistral"]
    [full] = gen.generate([PROMPT], GREEDY)
    eos = full.token_ids[0]  # greedy's first token: without min_new_tokens the row ends at once
    assert gen.generate([PROMPT], GREEDY, eos_token_id=eos)[0].token_ids == [eos]
    [out] = gen.generate([PROMPT], GREEDY, eos_token_id=eos, min_new_tokens=4)
    model = AutoModelForCausalLM.from_pretrained(ck, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    hf = HFGenerationConfig(do_sample=False, max_new_tokens=NEW, min_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=hf)[0, len(PROMPT):]
    assert out.token_ids == want.tolist()
    assert eos not in out.token_ids[:4] and len(out.token_ids) >= 4


def test_stop_string_from_a_greedy_run_ends_the_row(generators):
    gen = generators["mixtral"]
    [full] = gen.generate([PROMPT], GREEDY)
    pieces = [e.text for e in gen.stream(PROMPT, GREEDY) if e.output is None]
    k = next(i for i in range(3, len(pieces)) if pieces[i].strip())  # a visible piece, a few tokens in
    stop = pieces[k].strip()
    cut = full.text.find(stop)
    [out] = gen.generate([PROMPT], GREEDY, stop_strings=(stop,))
    assert out.finish_reason == "stop" and repr(stop) in out.finish_message
    assert out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) <= k + 1


def test_max_new_tokens_ends_the_row(generators):
    gen = generators["mistral"]
    for n in (1, 5):
        [out] = gen.generate([PROMPT], GREEDY, max_new_tokens=n)
        assert out.finish_reason == "length" and f"max_new_tokens={n}" in out.finish_message
        assert len(out.token_ids) == n == out.stats.generated_tokens


# ---- 5. streaming --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_stream_concatenates_to_the_final_text(generators, name):
    gen = generators[name]
    for prompt, cfg in (("The capital of France is", GREEDY),
                        (PROMPT, GenerationConfig(max_new_tokens=NEW, do_sample=True, seed=3, eos_token_id=()))):
        events = list(gen.stream(prompt, cfg))
        *tokens, last = events
        assert last.output is not None and all(e.output is None for e in tokens)
        assert "".join(e.text for e in tokens) == last.output.text != ""
        assert [e.token_id for e in tokens] == last.output.token_ids
        [again] = gen.generate([prompt], cfg)
        assert again.token_ids == last.output.token_ids and again.text == last.output.text
