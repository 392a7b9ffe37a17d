"""Held-out perplexity of a checkpoint, with transformers in float32 (the reference number).

Protocol (simple on purpose, so that any runtime can reproduce it, e.g. the exported ONNX graph):

1. text = the bytes of ``<model>/heldout.txt`` decoded as UTF-8, used as is (no stripping).
2. ids  = [1] + sentencepiece(tokenizer.model).encode(text)   # BOS once, at the very start; no EOS
   (plain ``SentencePieceProcessor.encode(text)`` with the model's defaults: the Mistral v1 model
   adds the leading "▁" dummy prefix itself.)
3. Cut ids into consecutive, non-overlapping chunks of ``--chunk`` tokens (default 256):
   ids[0:256], ids[256:512], ...; the last chunk may be shorter (dropped only if it has < 2 tokens).
4. Run each chunk on its own from position 0 with an empty cache (positions 0..len-1, full
   causal attention with the model's sliding window, as in training), batch size 1.
5. Score every token of the chunk except its first: NLL of ids[k] given the chunk's tokens before it,
   log-softmax in float32 over all 32000 logits. The first token of each chunk is never scored.
6. perplexity = exp(sum of NLL / number of scored tokens).

Weights are loaded from the (float16) safetensors and cast to float32; attention "eager".

Usage:  python training/evaluate.py [models/tiny-mixtral] [--chunk 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def heldout_ids(model_dir: Path) -> list[int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    text = (model_dir / "heldout.txt").read_bytes().decode("utf-8")
    return [sp.bos_id()] + sp.encode(text)


def chunks(ids: list[int], chunk: int) -> list[list[int]]:
    out = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
    return [c for c in out if len(c) >= 2]


def perplexity(model_dir: Path, chunk: int = 256, threads: int = 2) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = heldout_ids(model_dir)
    nll, count = 0.0, 0
    t0 = time.time()
    with torch.no_grad():
        for c in chunks(ids, chunk):
            x = torch.tensor([c])
            logits = model(input_ids=x).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            tgt = x[0, 1:]
            nll -= float(logp.gather(1, tgt[:, None]).double().sum())
            count += len(c) - 1
    return {
        "model": str(model_dir),
        "heldout_tokens": len(ids),
        "chunk": chunk,
        "scored_tokens": count,
        "mean_nll": nll / count,
        "perplexity": math.exp(nll / count),
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Held-out perplexity (transformers, fp32).")
    ap.add_argument("model_dir", nargs="?", type=Path, default=REPO / "models" / "tiny-mixtral")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = perplexity(args.model_dir, args.chunk, args.threads)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']}: held-out perplexity {r['perplexity']:.4f} (mean NLL {r['mean_nll']:.5f} nats) "
              f"over {r['scored_tokens']} scored tokens of {r['heldout_tokens']} "
              f"(chunks of {r['chunk']}), {r['seconds']} s")


if __name__ == "__main__":
    np.random.seed(0)
    main()
