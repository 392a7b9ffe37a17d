"""Encoders and classifiers: the base model and the classifier heads over batches of whole texts (torch-free).

    enc = Encoder.load("engines/mistral-base")
    [h] = enc.encode(["Hello world"])                    # [T, hidden] float32, BOS included
    clf = SequenceClassifier.load("engines/sentiment")
    clf.classify(["A fine film.", "Dull."])               # [Classification(label='POSITIVE', score=0.97, ...), ...]
    ner = TokenClassifier.load("engines/ner")
    ner.classify(["Anna lives in Paris"])[0][0]          # TokenLabel(text='Anna', label='PER', score=0.99, ...)
    qa = QuestionAnswerer.load("engines/qa")
    qa.answer("Where does Anna live?", ["Anna lives in Paris."])[0].text   # ' Paris'

Each text is encoded with BOS by the artifact's tokenizer, as the generator does (a question and its context
as transformers' tokenizer encodes a pair: `<s> question <s> context`). Rows run through the artifact's
cache-less graph in batches of up to `batch_size`, sorted by length and right-padded: attention is causal, so
a token never sees the padding after it and a text's outputs do not depend on its batch. A sequence
classifier without a pad id pools each row's last token, so it batches only texts of equal length
(transformers refuses batches there). Token spans (token classification, question answering) come from
sentencepiece; a tekken tokenizer has none and is refused there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from mixtrt.runtime.cache import check_batch_size
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.manifest import Manifest
from mixtrt.runtime.prompts import outside_vocab

H = TypeVar("H", bound="_Head")
QA_MAX_ANSWER_TOKENS = 15  # transformers' question-answering pipeline's max_answer_len default


@dataclass(frozen=True)
class Classification:
    """A text's label: the best label's name and probability, every label's probability, the raw logits."""

    label: str
    score: float
    scores: dict[str, float]
    logits: np.ndarray  # [labels] float32


@dataclass(frozen=True)
class TokenLabel:
    """One token's label. text = the token's characters in the input (with the space its piece starts with),
    text[start:end] of the input; position = its index in the model's input (BOS is 0)."""

    position: int
    token_id: int
    text: str
    start: int
    end: int
    label: str
    score: float


@dataclass(frozen=True)
class Answer:
    """The best span of a context: its text (context[start:end]), score = p(start) * p(end), and its first and
    last token positions in the model's input."""

    text: str
    score: float
    start: int
    end: int
    start_token: int
    end_token: int


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _texts(texts: str | Sequence[str], what: str = "texts") -> list[str]:
    if not isinstance(texts, (str, list, tuple)):  # None, bytes, a number: not texts
        raise ConfigError(f"{what}: give a str or a non-empty list of str, got {type(texts).__name__}")
    rows = [texts] if isinstance(texts, str) else list(texts)
    if not rows or not all(isinstance(t, str) for t in rows):
        raise ConfigError(f"{what}: give a str or a non-empty list of str")
    return rows


class _Head:
    """A backend running an artifact of head `head` (its graph has no cache), with the artifact's tokenizer."""

    head: ClassVar[str]

    def __init__(self, backend: Any, tokenizer: Any, batch_size: int = 8) -> None:
        if backend.args.head != self.head:
            raise ConfigError(wrong_head(backend.args, self.head))
        check_batch_size(batch_size)
        self.backend, self.tokenizer, self.batch_size = backend, tokenizer, batch_size
        self.args = backend.args
        _, outputs = Manifest.graph_io(self.args, 1, "fp32")
        self._per_token = {t.name for t in outputs if "sequence" in t.shape}  # outputs along the sequence

    @classmethod
    def load(cls: type[H], artifact_dir: str | Path, *, threads: int | None = None, verify: bool = True,
             batch_size: int = 8, backend: str = "onnxruntime") -> H:
        """The artifact's backend and tokenizer (the one its manifest's `chat` record names); an artifact of
        another head is refused, naming what fits it. verify: check the files' sha256 against the manifest."""
        from mixtrt.runtime.backends import load_backend
        from mixtrt.runtime.chat_format import load_chat_tokenizer

        engine: Any = load_backend(backend, artifact_dir, threads=threads, verify=verify, head=cls.head)
        chat = Manifest.read(artifact_dir).chat  # the files were checked by load_backend
        tokenizer = load_chat_tokenizer(artifact_dir, chat, engine.args.vocab_size)
        return cls(engine, tokenizer, batch_size=batch_size)

    def run(self, rows: Sequence[Sequence[int]], what: str = "text") -> list[dict[str, np.ndarray]]:
        """The graph's outputs (Manifest.graph_io) for each row of token ids, without the padding: outputs
        along the sequence are cut to the row's length. Everything is checked before any work; errors name row
        i as f"{what} {i}"."""
        rows = [list(r) for r in rows]
        limit = self.backend.max_positions
        for i, r in enumerate(rows):
            if not r:
                raise ConfigError(f"{what} {i} has no tokens")
            if len(r) > limit:
                raise ConfigError(f"{what} {i} has {len(r)} tokens, more than the {limit} positions this artifact "
                                  "serves (max context chosen at export)")
            message = outside_vocab(r, self.args.vocab_size, f"{what} {i}: token ids", shown=5)
            if message:
                raise ConfigError(message)
        pad = self.args.pad_token_id
        # without a pad id a sequence classifier pools the last token, so only rows of one length batch together
        equal_only = self.head == "sequence_classification" and pad is None
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: list[dict[str, np.ndarray]] = [{} for _ in rows]
        start = 0
        while start < len(order):
            stop = start + 1
            while (stop < len(order) and stop - start < self.batch_size
                   and (not equal_only or len(rows[order[stop]]) == len(rows[order[start]]))):
                stop += 1
            batch = order[start:stop]
            width = max(len(rows[i]) for i in batch)
            # right padding: a causal model's tokens never see it, so its value matters only where a sequence
            # classifier pools at the last non-pad token (the config's pad id, checked inside the vocabulary then)
            ids = np.full((len(batch), width), pad if pad is not None and self.head == "sequence_classification"
                          else 0, np.int64)
            for j, i in enumerate(batch):
                ids[j, :len(rows[i])] = rows[i]
            result = self.backend.forward(ids)
            for j, i in enumerate(batch):
                out[i] = {name: a[j, :len(rows[i])] if name in self._per_token else a[j] for name, a in result.items()}
            start = stop
        return out


class Encoder(_Head):
    """The base model (`*Model`): each text's last hidden states."""

    head = "base"

    def encode(self, texts: str | Sequence[str]) -> list[np.ndarray]:
        """[T_i, hidden] float32 per text (T_i tokens, BOS included), as transformers' last_hidden_state."""
        rows = [self.tokenizer.encode(t) for t in _texts(texts)]
        return [o["last_hidden_state"] for o in self.run(rows)]


class SequenceClassifier(_Head):
    """`*ForSequenceClassification`: one label per text, pooled at its last non-pad token (as transformers)."""

    head = "sequence_classification"

    def classify(self, texts: str | Sequence[str]) -> list[Classification]:
        """Per text: the label named by the config's id2label with the highest score. Scores as transformers'
        text-classification pipeline makes them from the config's problem_type: a softmax over the labels
        (single_label_classification; the default with several labels), a sigmoid per label
        (multi_label_classification; the default with one label), the logits themselves (regression)."""
        names = self.args.id2label or tuple(f"LABEL_{i}" for i in range(self.args.num_labels))
        kind = self.args.problem_type
        results = []
        for o in self.run([self.tokenizer.encode(t) for t in _texts(texts)]):
            logits = o["logits"]
            if kind == "regression":
                probs = logits.astype(np.float64)
            elif kind == "multi_label_classification" or (kind is None and len(logits) == 1):
                probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
            else:
                probs = softmax(logits)
            best = int(np.argmax(probs))
            results.append(Classification(names[best], float(probs[best]),
                                          {n: float(p) for n, p in zip(names, probs, strict=True)}, logits))
        return results


class TokenClassifier(_Head):
    """`*ForTokenClassification`: a label for every token of every text (BOS not reported)."""

    head = "token_classification"

    def classify(self, texts: str | Sequence[str]) -> list[list[TokenLabel]]:
        """Per text, per token after BOS: the best label (softmax over the labels), no aggregation (transformers'
        token-classification pipeline with aggregation_strategy="none" and nothing ignored)."""
        names = self.args.id2label or tuple(f"LABEL_{i}" for i in range(self.args.num_labels))
        texts = _texts(texts)
        encoded = [self.tokenizer.encode_with_offsets(t) for t in texts]
        results = []
        for text, (ids, spans), o in zip(texts, encoded, self.run([ids for ids, _ in encoded]), strict=True):
            probs = softmax(o["logits"])  # [T, labels]
            best = probs.argmax(-1)
            results.append([TokenLabel(p, ids[p], text[spans[p][0]:spans[p][1]], spans[p][0], spans[p][1],
                                       names[best[p]], float(probs[p, best[p]])) for p in range(1, len(ids))])
        return results


class QuestionAnswerer(_Head):
    """`*ForQuestionAnswering`: the best answer span of each context."""

    head = "question_answering"

    def answer(self, question: str | Sequence[str], contexts: str | Sequence[str],
               max_answer_tokens: int = QA_MAX_ANSWER_TOKENS) -> list[Answer]:
        """The best span of each context for `question` (one question for every context, or one per context).

        Rule (transformers' extractive question answering, `select_starts_ends` with top_k=1, no impossible
        answer): the input is `<s> question <s> context` (transformers' tokenizer pair); start and end logits
        become probabilities by a softmax over the context's tokens only; the span (i, j) with
        i <= j < i + max_answer_tokens maximising p_start[i] * p_end[j] wins (the first on ties); its text is
        context[start:end] from token i's first character to token j's last, the space token i's piece starts
        with included, as transformers' offsets have it (" Paris"). The whole input must fit the artifact's
        max context (no striding over long contexts).
        """
        contexts = _texts(contexts, "contexts")
        questions = [question] * len(contexts) if isinstance(question, str) else _texts(question, "question")
        if len(questions) != len(contexts):
            raise ConfigError(f"{len(questions)} questions for {len(contexts)} contexts: give one question, or one "
                              "per context")
        if not isinstance(max_answer_tokens, int) or max_answer_tokens < 1:
            raise ConfigError(f"max_answer_tokens must be an integer >= 1, got {max_answer_tokens!r}")
        rows, offsets = [], []
        for i, (q, c) in enumerate(zip(questions, contexts, strict=True)):
            q_ids = self.tokenizer.encode(q)
            c_ids, spans = self.tokenizer.encode_with_offsets(c)
            if len(c_ids) < 2:
                raise ConfigError(f"context {i} has no tokens")
            rows.append(q_ids + c_ids)
            offsets.append((len(q_ids) + 1, spans[1:]))  # the context's first token, its tokens' spans
        answers = []
        for c, (first, spans), o in zip(contexts, offsets, self.run(rows, "question + context"), strict=True):
            p_start = softmax(o["start_logits"][first:])  # [n] over the context's tokens only
            p_end = softmax(o["end_logits"][first:])
            n = len(spans)
            pair = np.triu(np.tril(p_start[:, None] * p_end[None, :], max_answer_tokens - 1))  # j in [i, i + max)
            i, j = divmod(int(np.argmax(pair)), n)
            start, end = spans[i][0], spans[j][1]
            answers.append(Answer(c[start:end], float(pair[i, j]), start, end, first + i, first + j))
        return answers


HEAD_CLASSES: dict[str, type[_Head]] = {
    cls.head: cls for cls in (Encoder, SequenceClassifier, TokenClassifier, QuestionAnswerer)
}


def wrong_head(args: Any, wanted: str) -> str:
    """The one line for an artifact used with the API or command of another head, naming the one that fits.

    >>> from mixtrt.runtime.args import ModelArgs
    >>> wrong_head(ModelArgs("MistralForTokenClassification", 32000, 64, 96, 2, 4, 2, 16), "causal_lm")
    'this artifact holds a MistralForTokenClassification (token_classification head), not a causal_lm model: \
use `mixtrt run` (mixtrt.runtime.heads.TokenClassifier)'
    """
    fits = ("`mixtrt generate` or `mixtrt chat` (mixtrt.runtime.generation.Generator)" if args.head == "causal_lm"
            else f"`mixtrt run` (mixtrt.runtime.heads.{HEAD_CLASSES[args.head].__name__})")
    return f"this artifact holds a {args.architecture} ({args.head} head), not a {wanted} model: use {fits}"
