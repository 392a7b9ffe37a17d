"""Time to first token per chat turn: a session that keeps its KV cache vs stateless re-prefill.

A scripted conversation (a system prompt, then 20 user messages of about 40 tokens, each answered with
16 greedy tokens, EOS ignored) on a benchmark-shaped model (random weights, the Mistral v1 tokenizer and
chat format). Random weights speak random pieces, and many of those do not come back when the reply's
text is tokenized again (a piece without its leading "▁" first, "▁Bud" "apest" for "▁Budapest"), so
every turn would start a new context; a trained chat model does this rarely. The benchmark model
therefore gets an lm_head whose rows are zero except for whole-word pieces ("▁the", "▁carriage", ...),
which re-tokenize to themselves: its replies keep the cache as a trained model's do, at the same cost per
token (`--any-piece` keeps the plain random model and shows the fallback).

For the session, the TTFT of turns 1, 5 and 20 as `send` reports it (from the turn's start to its first
token: only the new tokens are prefilled); for re-prefill, stateless `Generator.chat` on the same history
(the whole conversation prefilled every turn). Repeated --repeat times; the median is printed, with the
machine's load average.

    .venv/bin/python benchmarks/bench_chat.py [--model mistral] [--turns 1 5 20] [--repeat 3] [--threads 2]
        [--any-piece]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHAPES, exit_on_sigterm, make_benchmark_checkpoint, positive  # noqa: E402

SYSTEM = "You are a patient reading companion. Answer in plain sentences and keep every answer short."
TOPICS = ["the weather in the village", "a letter from London", "the ball at Netherfield", "a walk to Meryton",
          "the new curate", "a dinner at Rosings", "the carriage accident", "an evening of cards",
          "the officers in town", "a visit to Pemberley"]


def whole_word_checkpoint(ckpt: Path, out: Path) -> Path:
    """A copy of `ckpt` whose lm_head rows are zero except for pieces "▁word" that tokenize to themselves."""
    import re
    import shutil

    import numpy as np
    import sentencepiece as spm
    from safetensors.numpy import load_file, save_file

    if (out / "config.json").is_file():
        return out
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    words = [i for i in range(sp.get_piece_size()) if re.fullmatch("\u2581[a-z]{3,}", sp.id_to_piece(i))
             and sp.encode(sp.id_to_piece(i)[1:]) == [i]]  # the dummy prefix gives the "▁" back
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    weights = load_file(str(ckpt / "model.safetensors"))
    head = np.zeros_like(weights["lm_head.weight"])
    head[words] = weights["lm_head.weight"][words]
    weights["lm_head.weight"] = head
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    return out


def user_message(turn: int) -> str:
    """About 40 tokens, different every turn."""
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Turn {turn}: tell me what happened with {topic}, who was there, what they said to each other, "
            f"and whether anyone was surprised by it. Please also say how the day ended for everyone.")


def run_once(gen, turns: list[int], reply_tokens: int) -> tuple[dict[int, float], dict[int, float], list]:
    """TTFT per measured turn for the session and for stateless chat on the same history; the session's
    ChatTurn records."""
    from mixtrt.runtime.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=reply_tokens, eos_token_id=())
    session = gen.chat_session(system=SYSTEM, config=cfg)
    session_ttft, stateless_ttft = {}, {}
    for turn in range(1, max(turns) + 1):
        out = session.send(user_message(turn))
        if turn in turns:
            session_ttft[turn] = out.stats.time_to_first_token_s
            history = session.messages[:-1]  # what this turn's reply was generated from
            stateless_ttft[turn] = gen.chat(history, cfg, max_new_tokens=1).stats.time_to_first_token_s
    return session_ttft, stateless_ttft, session.turns


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mistral", choices=sorted(SHAPES))
    ap.add_argument("--turns", nargs="+", type=positive, default=[1, 5, 20])
    ap.add_argument("--reply-tokens", type=positive, default=16)
    ap.add_argument("--repeat", type=positive, default=3)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ap.add_argument("--any-piece", action="store_true", help="the plain random model (replies re-tokenize)")
    ns = ap.parse_args()

    from mixtrt.export.onnx_export import export_onnx, is_current
    from mixtrt.runtime.generation import Generator

    ckpt = make_benchmark_checkpoint(ns.model, ns.work)
    name = ns.model if ns.any_piece else f"{ns.model}-words"
    if not ns.any_piece:
        ckpt = whole_word_checkpoint(ckpt, ns.work / name)
    art = ns.work / f"{name}-fp32"
    if not is_current(art, ckpt):
        export_onnx(ckpt, art, overwrite=True, progress=None)
    gen = Generator.load(art, threads=ns.threads)
    gen.chat([{"role": "user", "content": "warm up"}], max_new_tokens=2)
    load_before = os.getloadavg()[0]
    runs = [run_once(gen, ns.turns, ns.reply_tokens) for _ in range(ns.repeat)]
    load_after = os.getloadavg()[0]

    head = "random pieces" if ns.any_piece else "whole-word lm_head"
    print(f"{ns.model}-shaped model ({head}), fp32, {ns.threads} threads, {ns.reply_tokens}-token replies, median "
          f"of {ns.repeat}; load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores")
    records = runs[0][2]
    kinds = [r.kind for r in records]
    print(f"session turns: {kinds.count('cached')} kept the cache, {kinds.count('mismatch')} re-tokenized "
          f"(new context), {kinds.count('restart')} restarted")
    print(f"{'turn':>5} {'history':>8} {'prefilled':>10} {'session TTFT':>13} {'re-prefill TTFT':>16} {'speed-up':>9}")
    med = {}
    for t in ns.turns:
        s = statistics.median(r[0][t] for r in runs)
        p = statistics.median(r[1][t] for r in runs)
        med[t] = (s, p)
        turn = records[t - 1]
        print(f"{t:>5} {turn.prompt_tokens:>8} {turn.prefilled_tokens:>10} {s * 1e3:>10.0f} ms {p * 1e3:>13.0f} ms "
              f"{p / s:>8.1f}x")
    first, last = min(ns.turns), max(ns.turns)
    print(f"turn {last} / turn {first} TTFT: session {med[last][0] / med[first][0]:.2f}x, "
          f"re-prefill {med[last][1] / med[first][1]:.2f}x (target for the session: <= 1.5x)")


if __name__ == "__main__":
    main()
