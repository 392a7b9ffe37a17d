"""`mixtrt perplexity`: held-out perplexity of an artifact on a text file; with --reference, the mean KL divergence
and top-1 agreement against another artifact (runtime/perplexity.py)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from mixtrt.cli.options import path, threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--text", type=path, required=True,
                   help="UTF-8 text file, used as is ([BOS] + its tokens; a leading byte-order mark is dropped); - "
                        "reads stdin")
    p.add_argument("--chunk", type=int, default=None,
                   help="tokens per chunk, each scored from an empty cache (default 256, training/evaluate.py's, or "
                        "the positions the artifact serves where fewer)")
    p.add_argument("--reference", type=path, default=None,
                   help="another artifact of the same model (e.g. the fp32 one): adds mean KL and top-1 agreement")
    p.add_argument("--threads", type=threads, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.runtime.errors import ArtifactError, ConfigError
    from mixtrt.runtime.generation import Generator
    from mixtrt.runtime.perplexity import chunks, evaluate
    from mixtrt.runtime.prompts import read_text_file, read_text_stream

    if str(ns.text) == "-":
        text = read_text_stream(sys.stdin.buffer, "--text - (stdin)")
    else:
        text = read_text_file(ns.text, "--text")
    if ns.chunk is not None:
        chunks([], ns.chunk)  # checks --chunk before loading anything
    gen = Generator.load(ns.artifact, threads=ns.threads)
    ref = None
    if ns.reference is not None:
        try:
            ref = Generator.load(ns.reference, threads=ns.threads)
        except (ArtifactError, ConfigError) as e:  # the same line the artifact would give: say which one it is
            raise type(e)(f"--reference {e}") from None
        _warn_if_other_model(gen.backend.args, ref.backend.args, ns.reference)
    most = min([gen.backend.max_positions] + ([ref.backend.max_positions] if ref is not None else []))
    if ns.chunk is None:  # an explicit --chunk past the positions is an error; the default fits itself
        ns.chunk = min(256, most)
    elif ns.chunk > most:
        raise ConfigError(f"--chunk {ns.chunk} is past the {most} positions "
                          f"{ns.artifact if most == gen.backend.max_positions else f'--reference {ns.reference}'} "
                          f"serves: pass --chunk {most} or less")
    ids = gen.tokenizer.encode(text)
    if ref is not None and ref.tokenizer.encode(text) != ids:
        raise ConfigError(f"--reference {ns.reference}: its tokenizer splits the text differently")
    # on a terminal, the chunks done and the perplexity so far on one line, as llama-perplexity prints them
    shown: list[int] = []

    def show(done: int, total: int, perplexity: float) -> None:
        # \x1b[K: the rest of the line cleared (a shorter line would leave the last one's end behind)
        print(f"\rchunk {done}/{total}: perplexity so far {perplexity:.4f}\x1b[K", end="", file=sys.stderr, flush=True)
        shown.append(done)

    try:
        out = evaluate(gen.backend, ids, ns.chunk, reference=ref.backend if ref is not None else None,
                       names=(str(ns.artifact), f"--reference {ns.reference}"),
                       progress=show if sys.stderr.isatty() else None)
    finally:
        if shown:  # the progress line ends before what follows on stderr
            print(file=sys.stderr)
    if ns.json:
        # strict JSON: a perplexity past float range is null (its mean_nll says how far)
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()},
                         indent=2, allow_nan=False))
        return 0
    line = (f"perplexity {out['perplexity']:.4f} over {out['scored_tokens']} scored tokens "
            f"({out['tokens']} tokens, chunks of {out['chunk']})")
    if ref is not None:
        line += f"; vs {ns.reference}: mean KL {out['mean_kl']:.5f} nats, top-1 agreement {out['top1_agreement']:.2%}"
    print(line)
    return 0


def _warn_if_other_model(args: Any, ref_args: Any, reference: Any) -> None:
    """--reference is meant to be the same model at another precision: where its shape differs, say so (the
    comparison still runs: KL against another model of the same tokenizer is a measurement too; one of another
    vocabulary is refused by evaluate, with no warning before the refusal)."""
    import warnings

    from mixtrt.runtime.errors import MixtrtWarning

    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size")
    differ = [f"{f} {getattr(args, f)} vs {getattr(ref_args, f)}" for f in fields
              if getattr(args, f) != getattr(ref_args, f)]
    if (args.moe is None) != (ref_args.moe is None):
        differ.append("MoE vs dense" if args.moe is not None else "dense vs MoE")
    if differ and args.vocab_size == ref_args.vocab_size:  # another vocabulary is refused (evaluate), not compared
        warnings.warn(f"--reference {reference} is not the same model ({', '.join(differ)}): the KL and agreement "
                      "compare two models, not two precisions of one", MixtrtWarning, stacklevel=2)
