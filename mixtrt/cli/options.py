"""Options and output shared by the generation commands (generate, chat, demo)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def threads(text: str) -> int:
    """--threads N: 1 .. the cores this process may use (more only slows onnxruntime down)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    cores = available_cores()
    if not 1 <= n <= cores:
        raise argparse.ArgumentTypeError(f"{n} is not in [1, {cores}] (the cores this machine gives the process)")
    return n


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (greedy unless a sampling option is given)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    g.add_argument("--threads", type=threads, default=None,
                   help="onnxruntime intra-op threads, 1 .. the available cores (default: all of them)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files at load (sizes are still checked)")


def generation_config(ns: argparse.Namespace, **extra: Any) -> Any:
    from mixtrt.runtime.generation import GenerationConfig

    # any sampling option turns sampling on; --temperature 0 means greedy (as llama.cpp)
    sampling = ns.temperature != 0 and any(v is not None for v in (ns.temperature, ns.top_k, ns.top_p))
    return GenerationConfig(
        max_new_tokens=ns.max_new_tokens, do_sample=sampling,
        temperature=1.0 if not ns.temperature else ns.temperature,
        top_k=ns.top_k or 0, top_p=1.0 if ns.top_p is None else ns.top_p, seed=ns.seed,
        repetition_penalty=ns.repetition_penalty, stop_strings=tuple(ns.stop), **extra,
    )


def load_generator(ns: argparse.Namespace) -> Any:
    from mixtrt.runtime.generation import Generator

    return Generator.load(ns.artifact, threads=ns.threads, verify=not ns.no_verify)


def stats_line(out: Any) -> str:
    s = out.stats
    rate = f"{s.decode_tokens_per_s:.1f} tok/s decode" if s.decode_tokens_per_s else "n/a decode"
    prefill = f", prefill {s.prefill_tokens_per_s:.0f} tok/s" if s.prefill_tokens_per_s else ""
    return (f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated, first token "
            f"{s.time_to_first_token_s * 1e3:.0f} ms{prefill}, {rate}; "
            f"finish: {out.finish_reason} ({out.finish_message})]")


def print_stream(events: Any, tokenizer: Any = None) -> Any:
    """Write each event's text to stdout as it arrives; return the final GenerationOutput.

    With `tokenizer`, the text continues a prompt already on screen: a first piece that starts a new
    word ("▁Paris") gets its space back (decode drops the leading space of a text's first piece).
    """
    out, first = None, True
    for event in events:
        if first and tokenizer is not None and event.token_id is not None:
            first = False
            if tokenizer.id_to_piece(event.token_id).startswith("\u2581") and not event.text.startswith(" "):
                sys.stdout.write(" ")
        sys.stdout.write(event.text)
        sys.stdout.flush()
        out = event.output or out
    sys.stdout.write("\n")
    return out
