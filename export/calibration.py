"""What the calibrated int4 methods (`--method awq`, `--method gptq`) share: the calibration text as token
sequences, and the walk that carries its activations through the model layer by layer, one layer's float
weights in memory at a time (read from the checkpoint tensor by tensor).

Calibration text: UTF-8 (default: export/calibration.txt, the first 23.8 KB of *Persuasion*, which the built-in
model was trained on; never its held-out *Northanger Abbey*), [BOS] + tokens, its first `MAX_TOKENS` tokens cut
into the fewest sequences of equal length up to 256 tokens (fewer for a model of fewer positions or a shorter
cache): fewer than one token per sequence is left over at the end (pieces of exactly 256 dropped the text's last
piece, up to 255 tokens, unsaid).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from mixtrt.runtime.errors import CheckpointError, ConfigError
from mixtrt.runtime.prompts import read_text_file, read_text_stream

if TYPE_CHECKING:
    from mixtrt.export.model import Block, RMSNorm

M = TypeVar("M", bound=torch.nn.Module)

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.txt"
MAX_TOKENS = 4096
SEQUENCE = 256


def calibration_ids(path: Path | None, tokenizer: Any, longest: int = SEQUENCE
                    ) -> tuple[list[list[int]], str, int, int]:
    """Sequences of token ids from the calibration text's first MAX_TOKENS, all of one length: the longest that the
    fewest sequences of up to min(SEQUENCE, longest) tokens give (longest: the positions the model and its cache
    plan hold), cut as many times as the tokens allow (fewer than one sequence's tokens left over); its source (as
    recorded), the sequences' token count and the whole text's."""
    sequence = max(1, min(SEQUENCE, longest))
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    if str(path) == "-":  # stdin, as `mixtrt perplexity --text -` reads it
        text = read_text_stream(sys.stdin.buffer, "--calibration - (stdin)")
    else:
        text = read_text_file(path, "--calibration")
    ids = tokenizer.encode(text)
    total = len(ids)
    ids = ids[:MAX_TOKENS]
    if len(ids) < 2 * 16:
        what = "is empty" if not text.strip() else f"has {len(ids)} tokens (BOS included)"
        raise ConfigError(f"--calibration {path} {what}: at least 32 tokens are needed")
    count = -(-len(ids) // sequence)  # the fewest sequences of at most `sequence` tokens that hold them all
    length = len(ids) // count  # one length for all (the walk's [B, T])
    count = len(ids) // length  # as many of that length as there are tokens: fewer than `length` left over (short
    # sequences: 1228 tokens in at most 10 are 123 of 9 with 121 left over, or 136 of 9 with 4)
    seqs = [ids[i * length:(i + 1) * length] for i in range(count)]
    source = ("mixtrt/export/calibration.txt" if path == DEFAULT_CALIBRATION else "stdin" if str(path) == "-"
              else str(path))
    return seqs, source, sum(len(s) for s in seqs), total


def load_module(module: M, prefix: str, read: Callable[[str], torch.Tensor]) -> M:
    """`module` (built on the meta device) with its parameters read from the checkpoint as `prefix` + name."""
    module.load_state_dict({n: read(prefix + n) for n in module.state_dict()}, strict=True, assign=True)
    return module


class LayerWalk:
    """The calibration sequences' hidden states carried through the model, layer by layer. The caller takes
    `layer(i)` (its float weights read from the open checkpoint `ck`), works on `x` (the layer's input [B, T, H]),
    and sets `x` to what the next layer reads (the layer's output: `run`, from whatever weights it now holds);
    after the last layer the lm_head reads `final_norm()` of `x`. Each layer attends over a full pass of the
    sequences from an empty cache, as the exported graph does (Transformer.empty_past)."""

    def __init__(self, ck: Any, plan: Any, seqs: list[list[int]],
                 table: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """table: applied to the embedding table before the sequences are looked up (gptq: its round trip, as
        the artifact stores it)."""
        from mixtrt.plugins.swa.torch_op import rope_tables

        self.ck, self.args, self.plan = ck, ck.args, plan
        ids = torch.tensor(seqs)  # [B, T]
        self.B, self.T = ids.shape
        self.lengths = torch.full((self.B,), self.T, dtype=torch.int32)
        with torch.no_grad():
            embedding = self.read("model.embed_tokens.weight")
            self.x = torch.nn.functional.embedding(ids, table(embedding) if table is not None else embedding)
            del embedding
        a = self.args
        # the positions the sequences reach (a table of max_position_embeddings rows was ~500 MiB for a
        # 1024000-position config at head dim 128)
        self.cos, self.sin = (t.to(self.x.dtype) for t in rope_tables(a.head_dim, a.rope_theta, self.T))

    def layers(self) -> Iterator[tuple[int, Block]]:
        """(i, layer i) in order, each read when the previous one's turn is over."""
        for i in range(self.args.num_hidden_layers):
            yield i, self.layer(i)

    def read(self, name: str) -> torch.Tensor:
        t = self.ck.tensor(name, torch.float32)
        if not bool(torch.isfinite(t).all()):  # the writer's check, before the calibration works on it
            raise CheckpointError(f"{self.ck.sources(name)} holds NaN or infinite values; refusing to export it")
        return t

    def layer(self, i: int) -> Block:
        from mixtrt.export.model import Block

        with torch.device("meta"):
            layer = Block(self.args, i, self.plan)
        self._past = self._empty_past(layer, i)
        return load_module(layer, f"model.layers.{i}.", self.read)

    def _empty_past(self, layer: Block, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.args.window(i)  # the past of one full pass (Transformer.empty_past)
        at = layer.attention
        cap = min(window, self.T) if window is not None and at.windowed_cache != 0 else self.T
        shape = (self.B, self.args.num_key_value_heads, max(cap, 1), self.args.head_dim)
        return self.x.new_zeros(shape), self.x.new_zeros(shape)

    def attention(self, layer: Block, a_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's output [B, T, H] on its normed input a_in, and the input its wo reads [B*T, N*D]."""
        seen: list[torch.Tensor] = []
        hook = layer.attention.wo.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            out = layer.attention(a_in, self.lengths, *self._past, self.cos, self.sin)[0]
        finally:
            hook.remove()
        return out, seen[0].reshape(-1, seen[0].shape[-1])

    def run(self, layer: Block) -> torch.Tensor:
        """The layer's output on `x`, from the weights it holds now."""
        return layer(self.x, self.lengths, *self._past, self.cos, self.sin)[0]

    def final_norm(self) -> RMSNorm:
        """The model's final RMSNorm, its weight read from the checkpoint."""
        from mixtrt.export.model import RMSNorm

        with torch.device("meta"):
            norm = RMSNorm(self.args.hidden_size, self.args.rms_norm_eps)
        return load_module(norm, "model.norm.", self.read)
