"""The reference model (export/model.py) against transformers, and incremental decoding vs one full pass."""

from __future__ import annotations

import pytest
import torch

from mixtrt.export.checkpoint import load_model
from mixtrt.export.model import CausalLM, KVCache
from tests.checkpoints import make_hf_model

VOCAB = 512
# (family, overrides): window shorter than the prompt, no window, GQA ratios 1/2/4, head_dim != H/N, tied.
CONFIGS = {
    "mistral-w5-gqa2": ("mistral", dict(sliding_window=5)),
    "mistral-full-gqa1": ("mistral", dict(sliding_window=None, num_key_value_heads=4)),
    "mistral-w7-gqa4-hd24-tied": ("mistral", dict(sliding_window=7, num_key_value_heads=1, head_dim=24,
                                                  tie_word_embeddings=True)),
    "mixtral-w5-gqa2": ("mixtral", dict(sliding_window=5)),
    "mixtral-full-gqa4-hd8-top1": ("mixtral", dict(sliding_window=None, num_key_value_heads=1, head_dim=8,
                                                   num_experts_per_tok=1)),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (transformers model, our CausalLM loaded from its save_pretrained output)."""
    cache = {}

    def get(name):
        if name not in cache:
            family, kw = CONFIGS[name]
            hf = make_hf_model(family, vocab_size=VOCAB, **kw)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            cache[name] = hf, load_model(path)
        return cache[name]

    return get


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(pairs, name):
    hf, ours = pairs(name)
    x = ids(2, 20)
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert got.shape == (2, 20, VOCAB)
    assert (got - want).abs().max().item() <= 1e-4


def test_tied_embeddings_share_one_parameter(pairs):
    _, ours = pairs("mistral-w7-gqa4-hd24-tied")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    _, untied = pairs("mistral-w5-gqa2")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["mixtral-w5-gqa2", "mixtral-full-gqa4-hd8-top1"])
def test_router_logits_match_transformers(pairs, name):
    hf, ours = pairs(name)
    x = ids(2, 12)
    with torch.no_grad():
        want = hf(x, output_router_logits=True).router_logits
        logits, got = ours(x, output_router_logits=True)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g.shape == (2 * 12, 4)
        assert (g - w).abs().max().item() <= 1e-4


def test_dense_model_has_no_router_logits(pairs):
    _, ours = pairs("mistral-w5-gqa2")
    with torch.no_grad():
        _, router = ours(ids(1, 4), output_router_logits=True)
    assert router == []


def test_logits_to_keep(pairs):
    _, ours = pairs("mistral-w5-gqa2")
    x = ids(2, 9)
    with torch.no_grad():
        full, last = ours(x), ours(x, logits_to_keep=1)
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-5)


def decode_in_chunks(model: CausalLM, x: torch.Tensor, cache: KVCache, first_chunks: int = 4) -> torch.Tensor:
    """Chunks of 3 tokens for the first `first_chunks` steps, then one token at a time."""
    out, pos = [], 0
    sizes = [3] * first_chunks + [1] * (x.shape[1] - 3 * first_chunks)
    sizes_seen = set()
    for n in sizes:
        out.append(model(x[:, pos:pos + n], cache=cache))
        pos += n
        assert cache.lengths.tolist() == [pos] * x.shape[0]
        sizes_seen.add(cache.nbytes)
    assert len(sizes_seen) == 1, "cache memory must not depend on the number of tokens"
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name,capacity,max_context", [
    ("mistral-w5-gqa2", None, 64),  # windowed layout: C = W + slack = 21 < 40 tokens, the ring wraps
    ("mistral-w5-gqa2", 5, None),  # C = W exactly: every chunk wraps
    ("mixtral-w5-gqa2", None, 64),
    ("mistral-full-gqa1", None, 40),  # linear layout, C = max context
])
def test_incremental_decode_matches_full_pass(pairs, name, capacity, max_context):
    _, ours = pairs(name)
    x = ids(2, 40, seed=1)  # 4 chunks of 3 (prompt 12 > W), then 28 single tokens (> W)
    cache = KVCache(ours.args, batch_size=2, max_context=max_context, capacity=capacity)
    before = cache.nbytes
    with torch.no_grad():
        full = ours(x)
        stepped = decode_in_chunks(ours, x, cache)
    assert cache.nbytes == before
    # Same math, different matmul shapes: fp32 rounding, amplified by initializer_range 0.5 (logits reach ~18).
    # transformers' own cached decode differs from its full pass by up to 3.1e-4 on mixtral-w5-gqa2.
    assert (stepped - full).abs().max().item() <= 5e-5 * full.abs().max().item()


def test_cache_memory_independent_of_max_generated_length(pairs):
    _, ours = pairs("mistral-w5-gqa2")
    small = KVCache(ours.args, 1, max_context=100)
    large = KVCache(ours.args, 1, max_context=100_000)
    assert small.nbytes == large.nbytes == 2 * 2 * 2 * 21 * 16 * 4  # layers * (k, v) * K * (W+16) * D * fp32


def test_linear_cache_refuses_overflow(pairs):
    _, ours = pairs("mistral-full-gqa1")
    cache = KVCache(ours.args, 1, max_context=8)
    with torch.no_grad(), pytest.raises(ValueError, match="capacity 8"):
        ours(ids(1, 9), cache=cache)


def test_step_is_the_flat_exported_signature(pairs):
    _, ours = pairs("mixtral-w5-gqa2")
    x = ids(2, 6)
    cache = KVCache(ours.args, 2, capacity=8)
    past = [t for kv in cache.layers for t in kv]
    with torch.no_grad():
        every = torch.arange(6).repeat(2, 1)  # logits for all 6 positions of both rows
        logits, *present = ours.step(x, torch.tensor([6, 6], dtype=torch.int32), every, *past)
        want = ours(x)
        picked, *_ = ours.step(x, torch.tensor([6, 6], dtype=torch.int32), torch.tensor([[5], [2]]), *past)
    assert len(present) == 4 and all(p.shape == (2, 2, 8, 16) for p in present)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(picked[:, 0], want[[0, 1], [5, 2]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mistral-w5-gqa2", "mixtral-w5-gqa2"])
def test_fp16_smoke(pairs, name, tmp_path):
    hf, ours = pairs(name)
    hf.save_pretrained(tmp_path)
    half = load_model(tmp_path, dtype=torch.float16)
    assert half.model.embed_tokens.weight.dtype == torch.float16
    x = ids(1, 12)
    with torch.no_grad():
        want = ours(x)
        got = half(x)
        cache = KVCache(half.args, 1, capacity=5, dtype=torch.float16)
        stepped = torch.cat([half(x[:, :6], cache=cache), half(x[:, 6:], cache=cache)], dim=1)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= 2e-2 * scale
    assert (stepped.float() - want).abs().max().item() <= 2e-2 * scale


def test_step_traces_with_torch_export(pairs):
    """What the ONNX exporter (dynamo=True) sees: dynamic B, S and P, attention and MoE as the custom ops."""
    _, ours = pairs("mixtral-w5-gqa2")

    class Step(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, total_lengths, positions, *past):
            return self.lm.step(input_ids, total_lengths, positions, *past)

    past = tuple(t for kv in KVCache(ours.args, 2, capacity=8).layers for t in kv)
    B, S, P = torch.export.Dim("B", max=16), torch.export.Dim("S", max=64), torch.export.Dim("P", max=64)
    ep = torch.export.export(
        Step(ours), (ids(2, 3), torch.tensor([3, 3], dtype=torch.int32), torch.tensor([[0, 1, 2, 2]] * 2), *past),
        dynamic_shapes=({0: B, 1: S}, {0: B}, {0: B, 1: P}, tuple({0: B} for _ in past)),
    )
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("mixtrt.sliding_window_attention.default") == 2
    assert targets.count("mixtrt.moe.default") == 2
    x = ids(3, 5)
    with torch.no_grad():
        got = ep.module()(x, torch.tensor([5, 5, 5], dtype=torch.int32), torch.arange(5).repeat(3, 1),
                          *(t for kv in KVCache(ours.args, 3, capacity=8).layers for t in kv))[0]
        torch.testing.assert_close(got, ours(x), rtol=0, atol=1e-5)
