"""Base model and classifier heads (export/model.py) against their transformers classes."""

from __future__ import annotations

import pytest
import torch

from mixtrt.export.checkpoint import load_model
from mixtrt.export.model import QuestionAnswering, SequenceClassifier, TokenClassifier, Transformer
from tests.checkpoints import make_hf_model

VOCAB = 256
SMALL = dict(vocab_size=VOCAB, sliding_window=5)


def pair(tmp_path, family, head, **kw):
    hf = make_hf_model(family, head=head, **{**SMALL, **kw})
    hf.save_pretrained(tmp_path)
    return hf, load_model(tmp_path)


def ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["mistral", "mixtral", "ministral"])
def test_base_model(tmp_path, family):
    hf, ours = pair(tmp_path, family, "base")
    assert isinstance(ours, Transformer)
    x = ids(2, 12)
    with torch.no_grad():
        want = hf(x).last_hidden_state
        got, _ = ours.run(x)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["mistral", "mixtral", "ministral"])
def test_sequence_classification_pools_last_non_pad_token(tmp_path, family):
    hf, ours = pair(tmp_path, family, "sequence_classification", pad_token_id=0, num_labels=3)
    assert isinstance(ours, SequenceClassifier) and ours.score.bias is None
    x = ids(3, 10)
    x[0, 7:] = 0  # right padding
    x[1, :4] = 0  # left padding: the rightmost non-pad token is still the last one
    x[2, 5] = 0  # a pad id in the middle
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert got.shape == (3, 3)
    assert (got - want).abs().max().item() <= 1e-4


def test_sequence_classification_all_pad_row_takes_position_0(tmp_path):
    hf, ours = pair(tmp_path, "mistral", "sequence_classification", pad_token_id=0)
    x = ids(2, 6)
    x[1] = 0
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_sequence_classification_without_pad_token(tmp_path):
    hf, ours = pair(tmp_path, "mistral", "sequence_classification", pad_token_id=None)
    with torch.no_grad():
        x = ids(1, 9)
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
        with pytest.raises(ValueError, match="batch sizes > 1 if no padding token"):
            hf(ids(2, 9))
        with pytest.raises(ValueError, match="batch sizes > 1 if no padding token"):
            ours(ids(2, 9))


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_token_classification(tmp_path, family):
    hf, ours = pair(tmp_path, family, "token_classification", num_labels=5)
    assert isinstance(ours, TokenClassifier) and ours.score.bias is not None
    x = ids(2, 11)
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert got.shape == (2, 11, 5)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["mistral", "mixtral", "ministral"])  # Ministral's under "transformer."
def test_question_answering(tmp_path, family):
    hf, ours = pair(tmp_path, family, "question_answering")
    assert isinstance(ours, QuestionAnswering)
    x = ids(2, 11)
    with torch.no_grad():
        want = hf(x)
        start, end = ours(x)
    assert start.shape == end.shape == (2, 11)
    assert (start - want.start_logits).abs().max().item() <= 1e-4
    assert (end - want.end_logits).abs().max().item() <= 1e-4
