"""`mixtrt chat`: an interactive multi-turn chat on stdin/stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixtrt.cli.options import add_sampling, generation_overrides, load_generator, print_stream, stats_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--system", default=None, help="system prompt, prepended to the first user message")
    p.add_argument("--stats", action="store_true", help="print speed after each answer")
    add_sampling(p)


def run(ns: argparse.Namespace) -> int:
    overrides = generation_overrides(ns)
    gen = load_generator(ns)
    cfg = gen.config(**overrides)
    messages: list[dict[str, str]] = [{"role": "system", "content": ns.system}] if ns.system else []
    while True:
        try:
            user = input("you> ")
        except EOFError:
            print()
            return 0
        if not user.strip():
            return 0
        messages.append({"role": "user", "content": user})
        sys.stdout.write("model> ")
        out = print_stream(gen.stream_chat(messages, cfg))
        if ns.stats:
            print(stats_line(out), file=sys.stderr)
        messages.append({"role": "assistant", "content": out.text.strip() or "..."})
