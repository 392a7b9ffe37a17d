"""`mixtrt run`: the base model or a classifier head over texts; labels are the config's id2label names."""

from __future__ import annotations

import argparse
import json

from mixtrt.cli.options import path, threads, visible


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory of a *Model, *ForSequenceClassification, "
                   "*ForTokenClassification or *ForQuestionAnswering checkpoint (written by `mixtrt export`)")
    p.add_argument("--text", action="append", required=True, metavar="TEXT",
                   help="a text (repeatable; run as one batch); for question answering, a context")
    p.add_argument("--question", help="question-answering artifacts: the question, asked of every --text")
    p.add_argument("--json", action="store_true", help="print one JSON object: the head and one result per text")
    p.add_argument("--batch-size", type=int, default=8, help="texts per pass of the graph (default 8)")
    p.add_argument("--threads", type=threads, default=None,
                   help="onnxruntime intra-op threads, 1 .. the available cores (default: all of them)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files at load (sizes are still checked)")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.heads import HEAD_CLASSES, wrong_head
    from mixtrt.runtime.manifest import Manifest
    from mixtrt.runtime.prompts import check_text

    for i, text in enumerate(ns.text):  # named as the user gave them, before anything loads
        check_text(text, "--text" if len(ns.text) == 1 else f"--text {i + 1}")
    if ns.question is not None:
        check_text(ns.question, "--question")
    args = Manifest.read(ns.artifact).args
    if args.head == "causal_lm":
        raise ConfigError(f"{ns.artifact}: {wrong_head(args, 'base or classifier')}")
    if (ns.question is not None) != (args.head == "question_answering"):
        raise ConfigError("--question is for question-answering artifacts only" if ns.question is not None
                          else f"{ns.artifact} answers questions: give --question (each --text is a context)")
    model = HEAD_CLASSES[args.head].load(ns.artifact, threads=ns.threads, verify=not ns.no_verify,
                                         batch_size=ns.batch_size)
    results = _results(model, args.head, ns)
    if ns.json:
        print(json.dumps({"head": args.head, "results": results}))
        return 0
    for r in results:
        print(_line(args.head, r))
    return 0


def _results(model, head: str, ns: argparse.Namespace) -> list[dict]:
    if head == "base":
        return [{"text": t, "tokens": len(h), "last_hidden_state": h.tolist()}
                for t, h in zip(ns.text, model.encode(ns.text), strict=True)]
    if head == "sequence_classification":
        return [{"text": t, "label": c.label, "score": c.score, "scores": c.scores}
                for t, c in zip(ns.text, model.classify(ns.text), strict=True)]
    if head == "token_classification":
        return [{"text": t, "tokens": [{"text": x.text, "start": x.start, "end": x.end, "label": x.label,
                                        "score": x.score} for x in labels]}
                for t, labels in zip(ns.text, model.classify(ns.text), strict=True)]
    return [{"text": t, "question": ns.question, "answer": a.text, "score": a.score, "start": a.start, "end": a.end}
            for t, a in zip(ns.text, model.answer(ns.question, ns.text), strict=True)]


def _line(head: str, r: dict) -> str:
    """One line per text: `LABEL  0.9731  text`, `token/LABEL ...`, `answer  0.4210  context`, or the hidden size."""
    if head == "base":
        h = r["last_hidden_state"]
        head4 = ", ".join(f"{v:.4f}" for v in h[-1][:4])
        return f"{r['tokens']} tokens x {len(h[0])} hidden, last token [{head4}, ...]\t{r['text']}"
    # labels come from the artifact: shown printable (a control character in one would reach the terminal, a tab or
    # newline would break the line's fields); an answer that is only spaces is shown as its repr, as a token's text
    if head == "sequence_classification":
        return f"{visible(r['label'])}\t{r['score']:.4f}\t{r['text']}"
    if head == "token_classification":
        return " ".join(f"{x['text'].strip() or repr(x['text'])}/{visible(x['label'])}" for x in r["tokens"])
    return f"{r['answer'].strip() or repr(r['answer'])}\t{r['score']:.4f}\t{r['text']}"
