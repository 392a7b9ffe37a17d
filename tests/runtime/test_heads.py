"""The base model and classifier heads, exported and run through mixtrt.runtime.heads, against their
transformers classes: a batch of ragged texts (the longest past the window) in passes smaller than the
batch; both families (tests.checkpoints.HEAD_CASES; the other family of each head runs under -m slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixtrt.runtime.errors import ArtifactError, ConfigError
from mixtrt.runtime.generation import Generator
from mixtrt.runtime.heads import Encoder, QuestionAnswerer, SequenceClassifier, TokenClassifier
from mixtrt.runtime.manifest import Manifest
from tests.checkpoints import EXPORT_W, LABELS, TAGS, close_logits

TEXTS = [
    "Anna lives in Paris, near the old stone bridge over the river.",
    "Hi",
    "Élise wrote three long letters to her sister in Lyon last spring.",
    "The weather was fine.",
    "Hi there",
]
QUESTION = "Where does Anna live?"


def _cases(head: str) -> list:
    return [head, pytest.param(f"{head}-slow", marks=pytest.mark.slow)]


def _hf(checkpoint, head: str):
    import transformers

    auto = {"base": transformers.AutoModel, "sequence_classification": transformers.AutoModelForSequenceClassification,
            "token_classification": transformers.AutoModelForTokenClassification,
            "question_answering": transformers.AutoModelForQuestionAnswering}[head]
    model = auto.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()

    def run(ids: list[int]):
        with torch.no_grad():
            return model(torch.tensor([ids]))

    return run


def test_texts_are_ragged_and_longer_than_the_window(head_artifacts):
    _, art = head_artifacts("base")
    lengths = [len(Encoder.load(art).tokenizer.encode(t)) for t in TEXTS]
    assert max(lengths) > 2 * EXPORT_W and len(set(lengths)) >= 4


@pytest.mark.parametrize("name", _cases("base"))
def test_encoder_equals_transformers_model(head_artifacts, name):
    ck, art = head_artifacts(name)
    enc = Encoder.load(art, threads=2, batch_size=2)
    hf = _hf(ck, "base")
    for text, hidden in zip(TEXTS, enc.encode(TEXTS), strict=True):
        ids = enc.tokenizer.encode(text)
        want = hf(ids).last_hidden_state[0].numpy()
        assert hidden.shape == want.shape == (len(ids), enc.args.hidden_size)
        close_logits(hidden, want)


@pytest.mark.parametrize("name", _cases("seqcls"))
def test_sequence_classifier_equals_transformers(head_artifacts, name):
    ck, art = head_artifacts(name)
    clf = SequenceClassifier.load(art, threads=2, batch_size=3)
    assert clf.args.id2label == tuple(LABELS.values())
    hf = _hf(ck, "sequence_classification")
    for text, c in zip(TEXTS, clf.classify(TEXTS), strict=True):
        want = hf(clf.tokenizer.encode(text)).logits[0].numpy()
        close_logits(c.logits, want)
        assert c.label == LABELS[str(int(want.argmax()))] and c.score == max(c.scores.values())
        assert sum(c.scores.values()) == pytest.approx(1.0) and list(c.scores) == list(LABELS.values())


def test_sequence_classifier_pools_the_last_non_pad_token_of_a_padded_batch(head_artifacts):
    """transformers on the same right-padded batch (pad id 0) gives the same logits as each row alone."""
    ck, art = head_artifacts("seqcls")
    clf = SequenceClassifier.load(art, threads=2)
    rows = [clf.tokenizer.encode(t) for t in TEXTS]
    batch = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.int64)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r)
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(ck, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(batch).logits.numpy()
    close_logits(np.stack([c.logits for c in clf.classify(TEXTS)]), want)


@pytest.mark.parametrize("name", _cases("tokcls"))
def test_token_classifier_equals_transformers(head_artifacts, name):
    ck, art = head_artifacts(name)
    tc = TokenClassifier.load(art, threads=2, batch_size=2)
    hf = _hf(ck, "token_classification")
    rows = [tc.tokenizer.encode(t) for t in TEXTS]
    for text, ids, raw, labels in zip(TEXTS, rows, tc.run(rows), tc.classify(TEXTS), strict=True):
        want = hf(ids).logits[0].numpy()  # [T, labels]
        close_logits(raw["logits"], want)
        assert [t.label for t in labels] == [TAGS[str(i)] for i in want.argmax(-1)[1:]]  # BOS not reported
        assert "".join(t.text for t in labels) == text  # the tokens' spans cover the text
        assert [t.position for t in labels] == list(range(1, len(ids)))


@pytest.mark.parametrize("name", _cases("qa"))
def test_question_answerer_picks_the_span_transformers_picks(head_artifacts, name):
    """Logits vs transformers' *ForQuestionAnswering on `<s> question <s> context`, and the span vs transformers'
    extractive-QA selection (select_starts_ends: what its question-answering pipeline ran)."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    ck, art = head_artifacts(name)
    qa = QuestionAnswerer.load(art, threads=2, batch_size=2)
    hf = _hf(ck, "question_answering")
    answers = qa.answer(QUESTION, TEXTS)
    q_ids = qa.tokenizer.encode(QUESTION)
    for context, a in zip(TEXTS, answers, strict=True):
        c_ids, spans = qa.tokenizer.encode_with_offsets(context)
        ids = q_ids + c_ids
        out = hf(ids)
        start, end = out.start_logits.numpy(), out.end_logits.numpy()  # [1, T]
        [raw] = qa.run([ids])
        close_logits(raw["start_logits"], start[0])
        close_logits(raw["end_logits"], end[0])
        p_mask = np.array([[i < len(q_ids) + 1 for i in range(len(ids))]], np.int64)  # question, BOS x2 masked
        starts, ends, scores, _ = select_starts_ends(start, end, p_mask, np.ones_like(p_mask))
        assert (a.start_token, a.end_token) == (int(starts[0]), int(ends[0]))
        assert a.score == pytest.approx(float(scores[0]), rel=1e-3)
        first = len(q_ids) + 1
        assert (a.start, a.end) == (spans[a.start_token - first + 1][0], spans[a.end_token - first + 1][1])
        assert a.text == context[a.start:a.end] and a.end_token - a.start_token < 15


@pytest.mark.parametrize("kind", ["multi_label_classification", "regression", "single_label_classification"])
def test_scores_follow_problem_type_as_transformers_pipeline(head_artifacts, kind):
    """A multi-label classifier scores each label by a sigmoid, a regression model gives its logits, a
    single-label one a softmax: what transformers' text-classification pipeline gives for that config."""
    import dataclasses

    import transformers

    ck, art = head_artifacts("seqcls")
    clf = SequenceClassifier.load(art, threads=2)
    clf.args = dataclasses.replace(clf.args, problem_type=kind)  # as an artifact exported from such a config
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(ck, attn_implementation="eager").eval()
    hf.config.problem_type = kind
    tok = transformers.AutoTokenizer.from_pretrained(ck, add_bos_token=True)  # mixtrt encodes texts with BOS
    pipe = transformers.pipeline("text-classification", model=hf, tokenizer=tok, device="cpu")
    for text, c in zip(TEXTS[:3], clf.classify(TEXTS[:3]), strict=True):
        assert tok(text)["input_ids"] == clf.tokenizer.encode(text)
        want = {d["label"]: d["score"] for d in pipe(text, top_k=None)}
        assert c.scores == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert c.label == max(want, key=want.get) and c.score == pytest.approx(max(want.values()), rel=1e-4)
    if kind != "single_label_classification":
        assert sum(c.scores.values()) != pytest.approx(1.0)  # not a softmax


def test_token_spans_of_byte_fallback_characters_are_transformers_offsets(head_artifacts):
    """A character sentencepiece writes as byte pieces: each of its pieces spans the whole character (as
    transformers' offsets), so a token's text or an answer never cuts a character; a lone dummy-prefix piece
    before such a character spans it too."""
    import transformers

    ck, art = head_artifacts("tokcls")
    tc = TokenClassifier.load(art, threads=2)
    tok = transformers.AutoTokenizer.from_pretrained(ck, add_bos_token=True)
    # and text that starts with a space (or "▁"): the lone dummy-prefix piece spans its first character only
    texts = ["Café 𝔸 ꙮ", "🇫🇷🇫🇷 flags", "aaa 🇫🇷 bbb", "ﬁ ligature Ⅳ", "Anna lives in Paris", " x", " hello",
             " é", "\u2581x", "  x", " 🇫🇷"]
    for text in texts:
        ids, spans = tc.tokenizer.encode_with_offsets(text)
        enc = tok(text, return_offsets_mapping=True)
        assert ids == enc["input_ids"] and spans == [tuple(o) for o in enc["offset_mapping"]], text
    [labels] = tc.classify(["aaa 🇫🇷 bbb"])
    assert [t.text for t in labels if t.text.strip() in ("🇫", "🇷")] == ["🇫"] * 4 + ["🇷"] * 4


def test_an_empty_context_and_a_long_pair_are_named_before_any_work(head_artifacts, monkeypatch):
    _, art = head_artifacts("qa")
    qa = QuestionAnswerer.load(art)
    monkeypatch.setattr(qa.backend, "forward", lambda ids: pytest.fail("ran before checking"))
    with pytest.raises(ConfigError, match=r"^context 1 has no tokens$"):
        qa.answer("Where?", ["Paris.", ""])
    with pytest.raises(ConfigError, match=r"^question \+ context 0 has \d+ tokens, more than the 128 positions"):
        qa.answer("Where? " * 100, ["Paris."])


def test_a_pad_id_outside_the_vocabulary_pads_no_head_but_the_pooling_one(head_artifacts, monkeypatch):
    """A token classifier whose config's pad id is outside the vocabulary (transformers cannot build it; the export
    checks the pad id only for the head that pools on it): a batch of ragged texts is padded with an id the
    embedding holds (it failed in onnxruntime's Gather), and the logits are the texts' run alone."""
    import dataclasses

    _, art = head_artifacts("tokcls")
    tc = TokenClassifier.load(art, batch_size=4)
    alone = [tc.run([tc.tokenizer.encode(t)])[0]["logits"] for t in TEXTS[:2]]
    monkeypatch.setattr(tc, "args", dataclasses.replace(tc.args, pad_token_id=tc.args.vocab_size))
    together = tc.run([tc.tokenizer.encode(t) for t in TEXTS[:2]])
    for one, both in zip(alone, together, strict=True):
        close_logits(both["logits"], one)


def test_texts_of_the_wrong_type_are_one_line_errors(head_artifacts):
    _, art = head_artifacts("seqcls")
    clf = SequenceClassifier.load(art)
    for bad, got in ((None, ", got NoneType"), (b"x", ", got bytes"), (5, ", got int"), ([], ""), ([b"x"], "")):
        with pytest.raises(ConfigError, match=f"^texts: give a str or a non-empty list of str{got}$"):
            clf.classify(bad)  # type: ignore[arg-type]
    assert len(clf.classify(("a", "b"))) == 2


def test_each_api_refuses_another_heads_artifact(head_artifacts, exported):
    _, qa_art = head_artifacts("qa")
    with pytest.raises(ConfigError, match=r"QuestionAnswering \(question_answering head\), not a "
                                          r"sequence_classification model: use `mixtrt run` "
                                          r"\(mixtrt.runtime.heads.QuestionAnswerer\)"):
        SequenceClassifier.load(qa_art)
    with pytest.raises(ConfigError, match=r"not a causal_lm model: use `mixtrt run`"):
        Generator.load(qa_art)
    _, lm_art = exported["mistral-window"]
    with pytest.raises(ConfigError, match=r"MistralForCausalLM \(causal_lm head\), not a base model: use "
                                          r"`mixtrt generate` or `mixtrt chat`"):
        Encoder.load(lm_art)


def test_texts_past_the_max_context_are_refused_before_any_work(head_artifacts):
    _, art = head_artifacts("base")
    enc = Encoder.load(art)
    with pytest.raises(ConfigError, match=r"text 1 has 2\d\d tokens, more than the 128 positions"):
        enc.encode(["fine", "word " * 200])


def test_manifest_lists_the_heads_feature(tmp_path, head_artifacts, monkeypatch):
    """A head artifact needs the "heads" feature: an older mixtrt (without it) refuses it; a manifest that
    drops it was edited. Its graph IO is the head's (Manifest.graph_io)."""
    import shutil

    import mixtrt.runtime.manifest as manifest_module

    _, art = head_artifacts("tokcls")
    m = Manifest.load(art)
    assert m.features == ("heads", "weight-index") and m.args.head == "token_classification"
    assert [t.name for t in m.inputs] == ["input_ids"] and [t.name for t in m.outputs] == ["logits"]
    assert m.outputs[0].shape == ("batch", "sequence", len(TAGS))
    monkeypatch.setattr(manifest_module, "FEATURES", frozenset({"weight-index"}))
    with pytest.raises(ArtifactError, match=r"needs features \['heads'\] that this mixtrt does not know; upgrade"):
        Manifest.load(art)
    monkeypatch.undo()
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    d = json.loads((copy / "manifest.json").read_text())
    d["features"] = ["weight-index"]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="needs the feature 'heads'; the manifest was edited"):
        Manifest.load(copy)
