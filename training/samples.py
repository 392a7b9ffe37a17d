"""Print a few greedy and sampled generations from a checkpoint with transformers' generate (fp32).

Usage:  python training/samples.py [models/tiny-mixtral] [--max-new-tokens 60] [--markdown]

Prompts are encoded as [BOS] + sentencepiece pieces (no chat template: the model is a plain
language model). Greedy uses do_sample=False; sampling uses temperature 0.8, top_p 0.95 with
torch.manual_seed(seed) set right before each call, so the output is reproducible on one machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "It is a truth universally acknowledged",
    "Mrs. Bennet was",
    "The weather was so fine that",
    "\"My dear Catherine,\" said her mother,",
]


def main() -> None:
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?", type=Path, default=REPO / "models" / "tiny-mixtral")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sp = spm.SentencePieceProcessor(model_file=str(args.model_dir / "tokenizer.model"))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    for mode in ("greedy", "sampled"):
        for prompt in PROMPTS:
            ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
            kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_p=0.95)
            torch.manual_seed(args.seed)
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=2, pad_token_id=2,
                                 top_k=0 if mode == "sampled" else None, **kw)
            full = sp.decode(out[0, 1:].tolist())  # decode prompt + continuation together (keeps spacing)
            text = full[len(sp.decode(ids[0, 1:].tolist())):]
            if args.markdown:
                print(f"**{mode}** — prompt `{prompt}`\n\n```text\n{prompt}{text}\n```\n")
            else:
                print(f"[{mode}] {prompt}|{text}\n")

if __name__ == "__main__":
    main()
