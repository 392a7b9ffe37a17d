"""The PyTorch reference model for Mistral and Mixtral: the module the ONNX exporter traces.

# B batch, S new tokens, T total, W window, N heads, K kv heads, D head dim, E experts, A active experts,
# C cache capacity, H hidden, I intermediate, V vocab, L labels, P rope positions (max_position_embeddings)

Attention and MoE go through the custom ops torch.ops.mixtrt.sliding_window_attention and
torch.ops.mixtrt.moe (plugins/), so the traced graph has no data-dependent Python loops and no complex
RoPE. Parameter names are the contract with the checkpoint loader and the exporter:

    model.embed_tokens.weight [V, H]              model.norm.weight [H]         lm_head.weight [V, H]
    model.layers.{i}.attention_norm.weight [H]    model.layers.{i}.ffn_norm.weight [H]
    model.layers.{i}.attention.wq/wk/wv/wo.weight [N*D, H] / [K*D, H] / [K*D, H] / [H, N*D]
    dense: model.layers.{i}.feed_forward.w1/w2/w3.weight [I, H] / [H, I] / [I, H]
    moe:   model.layers.{i}.feed_forward.gate.weight [E, H], .fc1.{e} [2I, H] ([gate; up] rows), .fc2.{e} [H, I]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mixtrt.plugins.moe.torch_op  # noqa: F401  (registers torch.ops.mixtrt.moe)
import mixtrt.plugins.swa.torch_op  # noqa: F401  (registers torch.ops.mixtrt.sliding_window_attention)
from mixtrt.plugins.swa.torch_op import rope_tables
from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.backends import EXPORT_BACKENDS, window_slack
from mixtrt.runtime.cache import CachePlan

Past = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [B, K, C, D]


class KVCache:
    """Per layer k, v [B, K, C, D] + lengths [B] int32 (tokens seen per row); memory fixed at creation.

    The reference op keeps a ring: position p lives in slot p % C. Example, W=4, C=6, after 9 tokens:
    slots hold [p6, p7, p8, p3, p4, p5]; the next token (p9) reads p6..p8 (its window) and goes to slot 3.
    A cache without a window (linear layout) has C = max context and holds at most C tokens.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_context: int | None = None,
                 capacity: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        if capacity is None:
            if max_context is None:
                raise ValueError("KVCache needs max_context or capacity")
            plan = CachePlan.for_model(args, max_context, slack=window_slack(EXPORT_BACKENDS))
            capacity, self.windowed = plan.capacity, plan.windowed
        else:
            windows = [args.window(i) for i in range(args.num_hidden_layers)]
            self.windowed = all(w is not None and w <= capacity for w in windows)
        shape = (batch_size, args.num_key_value_heads, capacity, args.head_dim)  # [B, K, C, D]
        self.layers: Past = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                             for _ in range(args.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int32)
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As transformers: normalize in fp32, cast back, then scale."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """With a cache plan (export), the layer's window and cache mode are the plan's (a window that never
    bites within the max context is full causal); without one, the model's window."""

    def __init__(self, args: ModelArgs, layer: int, plan: CachePlan | None = None) -> None:
        super().__init__()
        N, K, D, H = args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.hidden_size
        self.num_heads, self.kv_heads = N, K
        self.window = (plan.windows[layer] if plan else args.window(layer)) or -1  # -1 = full causal attention
        self.windowed_cache = int(plan.windowed) if plan else -1  # -1: windowed iff the layer has a window
        self.wq = nn.Linear(H, N * D, bias=False)
        self.wk = nn.Linear(H, K * D, bias=False)
        self.wv = nn.Linear(H, K * D, bias=False)
        self.wo = nn.Linear(N * D, H, bias=False)

    def forward(self, x: torch.Tensor, total_lengths: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x [B, S, H] -> q [B, S, N*D], k/v [B, S, K*D]; RoPE and the cache update happen inside the op.
        out, k, v = torch.ops.mixtrt.sliding_window_attention(
            self.wq(x), self.wk(x), self.wv(x), past_k, past_v, total_lengths, cos, sin,
            self.num_heads, self.kv_heads, self.window, 0.0, self.windowed_cache,
        )
        return self.wo(out), k, v  # out [B, S, N*D] -> [B, S, H]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.w3 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), None


class MoeFeedForward(nn.Module):
    """Router matmul here; softmax, top-k, renormalisation and the experts inside torch.ops.mixtrt.moe."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.moe is not None
        E, H, I = args.moe.num_experts, args.hidden_size, args.intermediate_size  # noqa: E741
        self.top_k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(H, E, bias=False)
        # one parameter per expert matrix: one initializer each in the exported graph (see plugins/moe/SPEC.md)
        self.fc1 = nn.ParameterList(torch.empty(2 * I, H) for _ in range(E))  # rows [gate (w1); up (w3)]
        self.fc2 = nn.ParameterList(torch.empty(H, I) for _ in range(E))  # w2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])  # [B, S, H] -> [B*S, H]
        logits = self.gate(flat)  # [B*S, E]
        out = torch.ops.mixtrt.moe(flat, logits, list(self.fc1), list(self.fc2), self.top_k)  # [B*S, H]
        return out.view(x.shape), logits  # [B*S, H] -> [B, S, H]


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, plan: CachePlan | None = None) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args, layer, plan)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = MoeFeedForward(args) if args.moe else FeedForward(args)

    def forward(self, x: torch.Tensor, total_lengths: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor):
        a, k, v = self.attention(self.attention_norm(x), total_lengths, past_k, past_v, cos, sin)
        x = x + a
        f, router_logits = self.feed_forward(self.ffn_norm(x))
        return x + f, k, v, router_logits


class Transformer(nn.Module):
    """The base model (transformers' MistralModel / MixtralModel): token ids -> final hidden states."""

    def __init__(self, args: ModelArgs, plan: CachePlan | None = None) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i, plan) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # cos/sin [P, D/2], fp32, recomputed rather than loaded (call init_rope after a meta-device build).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self) -> None:
        cos, sin = rope_tables(self.args.head_dim, self.args.rope_theta, self.args.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos, sin

    def empty_past(self, batch_size: int, total: int) -> Past:
        """A fresh cache for one full pass over `total` tokens: capacity W for windowed layers (the op
        concatenates the new keys, so it never needs more), `total` for full-attention layers and for every
        layer of a model built with a linear plan (a graph without a cache: the op's linear mode wants C >= total)."""
        w = self.embed_tokens.weight
        past = []
        for i, block in enumerate(self.layers):
            assert isinstance(block, Block)
            window = self.args.window(i)
            linear = block.attention.windowed_cache == 0
            cap = min(window, total) if window is not None and not linear else total
            shape = (batch_size, self.args.num_key_value_heads, max(cap, 1), self.args.head_dim)  # [B, K, C, D]
            past.append((w.new_zeros(shape), w.new_zeros(shape)))
        return past

    def forward(self, input_ids: torch.Tensor, total_lengths: torch.Tensor, past: Past
                ) -> tuple[torch.Tensor, Past, list[torch.Tensor]]:
        """input_ids [B, S] int64, total_lengths [B] int32 (past + S per row), past per layer (k, v) [B, K, C, D]
        -> hidden [B, S, H], presents per layer, router logits [B*S, E] per MoE layer (empty when dense)."""
        x = self.embed_tokens(input_ids)  # [B, S, H]
        presents: Past = []
        router_logits: list[torch.Tensor] = []
        # the tables are kept in fp32; the attention op takes them in the activation dtype (as GQA does)
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)  # [P, D/2]
        for layer, (pk, pv) in zip(self.layers, past, strict=True):
            x, k, v, logits = layer(x, total_lengths, pk, pv, cos, sin)
            presents.append((k, v))
            if logits is not None:
                router_logits.append(logits)
        return self.norm(x), presents, router_logits

    def run(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One full pass without a cache: input_ids [B, T] -> hidden [B, T, H], router logits."""
        B, T = input_ids.shape
        lengths = torch.full((B,), T, dtype=torch.int32, device=input_ids.device)
        hidden, _, router_logits = self(input_ids, lengths, self.empty_past(B, T))
        return hidden, router_logits


class CausalLM(nn.Module):
    """Transformer + lm_head (tied to embed_tokens when args.tie_word_embeddings). `plan`: the artifact's
    cache plan when the model is built for export (see Attention)."""

    def __init__(self, args: ModelArgs, plan: CachePlan | None = None) -> None:
        super().__init__()
        self.args = args
        self.model = Transformer(args, plan)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def step(self, input_ids: torch.Tensor, total_lengths: torch.Tensor, logit_positions: torch.Tensor,
             *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The exported function: (input_ids [B, S], total_lengths [B] int32, logit_positions [B, P] int64,
        k0, v0, k1, v1, ...) -> (logits [B, P, V], present k0, v0, k1, v1, ...).

        logit_positions index the S new tokens: [[S-1]] gives the last position's logits only (a prefill
        that only samples the next token skips S-1 rows of the lm_head), arange(S) gives all of them.
        """
        past = list(zip(past_flat[0::2], past_flat[1::2], strict=True))
        hidden, presents, _ = self.model(input_ids, total_lengths, past)  # hidden [B, S, H], normed
        picked = hidden.gather(1, logit_positions[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, P, H]
        return (self.lm_head(picked), *(t for kv in presents for t in kv))

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, logits_to_keep: int = 0,
                output_router_logits: bool = False):
        """input_ids [B, T] -> logits [B, T, V] (only the last `logits_to_keep` positions when > 0).

        With `cache`, the T tokens follow the cache's contents and cache.lengths advances by T.
        With output_router_logits=True returns (logits, router_logits) where router_logits is a list of
        [B*T, E] per MoE layer (as transformers' outputs.router_logits), empty for Mistral.
        """
        B, T = input_ids.shape
        if cache is None:
            hidden, router_logits = self.model.run(input_ids)
        else:
            total = cache.lengths + T  # [B] int32
            if not cache.windowed and int(total.max()) > cache.capacity:
                raise ValueError(f"{int(total.max())} tokens do not fit a cache of capacity {cache.capacity}")
            hidden, presents, router_logits = self.model(input_ids, total, cache.layers)
            cache.layers, cache.lengths = presents, total
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]  # [B, T, H] -> [B, logits_to_keep, H]
        logits = self.lm_head(hidden)
        return (logits, router_logits) if output_router_logits else logits


class SequenceClassifier(nn.Module):
    """Score of the last non-pad token per row (transformers' *ForSequenceClassification): [B, T] -> [B, L].

    As transformers: the rightmost token != pad_token_id (position 0 if a row is all padding); with
    pad_token_id None the last token, and batches of more than one row are refused. `plan`: see Attention
    (the exporter builds every head with CachePlan.one_pass).
    """

    def __init__(self, args: ModelArgs, plan: CachePlan | None = None) -> None:
        super().__init__()
        self.args = args
        self.model = Transformer(args, plan)
        self.score = nn.Linear(args.hidden_size, args.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.args.pad_token_id is None and input_ids.shape[0] != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        return self.pooled(input_ids)

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The logits [B, L] at each row's last non-pad token (the last token without a pad id), any batch:
        what the exported graph computes."""
        B, T = input_ids.shape
        logits = self.score(self.model.run(input_ids)[0])  # [B, T, L]
        pad = self.args.pad_token_id
        if pad is None:
            return logits[:, -1]
        non_pad = (input_ids != pad).to(torch.int32)  # [B, T]
        last = (torch.arange(T, dtype=torch.int32, device=input_ids.device) * non_pad).argmax(-1)  # [B]
        return logits[torch.arange(B, device=input_ids.device), last]


class TokenClassifier(nn.Module):
    """Per-token labels (transformers' *ForTokenClassification, dropout is identity at inference): [B, T, L]."""

    def __init__(self, args: ModelArgs, plan: CachePlan | None = None) -> None:
        super().__init__()
        self.args = args
        self.model = Transformer(args, plan)
        self.score = nn.Linear(args.hidden_size, args.num_labels, bias=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.score(self.model.run(input_ids)[0])


class QuestionAnswering(nn.Module):
    """Span start/end logits (transformers' *ForQuestionAnswering): [B, T] -> (start [B, T], end [B, T])."""

    def __init__(self, args: ModelArgs, plan: CachePlan | None = None) -> None:
        super().__init__()
        self.args = args
        self.model = Transformer(args, plan)
        self.qa_outputs = nn.Linear(args.hidden_size, 2, bias=True)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.qa_outputs(self.model.run(input_ids)[0])  # [B, T, 2]
        start, end = logits.unbind(-1)  # [B, T] each
        return start.contiguous(), end.contiguous()


HEADS: dict[str, type[nn.Module]] = {
    "causal_lm": CausalLM,
    "base": Transformer,
    "sequence_classification": SequenceClassifier,
    "token_classification": TokenClassifier,
    "question_answering": QuestionAnswering,
}


def finish_loaded(model: nn.Module) -> nn.Module:
    """A head whose parameters are in place (loaded, or on the meta device): rope tables made, a causal LM's
    lm_head tied where the config says so, eval mode."""
    base = model if isinstance(model, Transformer) else model.model
    assert isinstance(base, Transformer)
    base.init_rope()
    if isinstance(model, CausalLM):
        model.tie_weights()
    return model.eval()
