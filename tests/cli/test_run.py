"""`mixtrt run` on head artifacts (in process): label names from the config's id2label, token labels, answer
spans, JSON; and the one line each of `run` and `generate` gives for an artifact of the other kind."""

from __future__ import annotations

import json

import pytest

from mixtrt.cli import main
from mixtrt.runtime.heads import QuestionAnswerer, SequenceClassifier, TokenClassifier
from tests.checkpoints import LABELS, TAGS

TEXTS = ["Anna lives in Paris, near the old stone bridge.", "Hi", "The weather was fine."]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_prints_label_names(capsys, head_artifacts):
    _, art = head_artifacts("seqcls")
    args = [a for t in TEXTS for a in ("--text", t)]
    code, out, err = run(capsys, "run", str(art), *args, "--threads", "1")
    assert code == 0, err
    want = SequenceClassifier.load(art).classify(TEXTS)
    lines = out.splitlines()
    assert [line.split("\t") for line in lines] == [[c.label, f"{c.score:.4f}", t] for c, t in zip(want, TEXTS,
                                                                                                    strict=True)]
    assert {c.label for c in want} <= set(LABELS.values())
    code, out, _ = run(capsys, "run", str(art), *args, "--json")
    d = json.loads(out)
    assert d["head"] == "sequence_classification" and [r["label"] for r in d["results"]] == [c.label for c in want]


def test_run_shows_label_names_printable(capsys, tmp_path):
    """A label name with control characters (an ESC sequence, a tab, a newline: export takes any id2label name)
    is printed as its escapes, never sent to the terminal nor breaking the line's tab-separated fields."""
    from tests.checkpoints import HEAD_CASES, HEAD_DEFAULTS, export_cases

    names = {0: "\x1b[31mRED\x1b[0m", 1: "a\tb", 2: "c\nd"}
    _, art = export_cases(tmp_path, {"odd": {**HEAD_CASES["seqcls"], "id2label": names}}, **HEAD_DEFAULTS)["odd"]
    code, out, err = run(capsys, "run", str(art), "--text", "Hi", "--text", "Bye", "--threads", "1")
    assert code == 0, err
    assert "\x1b" not in out and all(len(line.split("\t")) == 3 for line in out.splitlines()), out
    shown = {line.split("\t")[0] for line in out.splitlines()}
    assert shown <= {"\\x1b[31mRED\\x1b[0m", "a\\tb", "c\\nd"} and shown, shown


def test_run_token_labels_and_json(capsys, head_artifacts):
    _, art = head_artifacts("tokcls")
    code, out, err = run(capsys, "run", str(art), "--text", TEXTS[0])
    assert code == 0, err
    [labels] = TokenClassifier.load(art).classify(TEXTS[:1])
    assert out.strip() == " ".join(f"{t.text.strip()}/{t.label}" for t in labels)
    assert out.split()[0].startswith("Anna/") and {t.label for t in labels} <= set(TAGS.values())
    code, out, _ = run(capsys, "run", str(art), "--text", TEXTS[0], "--json")
    [r] = json.loads(out)["results"]
    assert [x["label"] for x in r["tokens"]] == [t.label for t in labels]


def test_run_answers_a_question(capsys, head_artifacts):
    _, art = head_artifacts("qa")
    code, out, err = run(capsys, "run", str(art), "--question", "Where does Anna live?", "--text", TEXTS[0],
                         "--text", TEXTS[2])
    assert code == 0, err
    want = QuestionAnswerer.load(art).answer("Where does Anna live?", [TEXTS[0], TEXTS[2]])
    assert [line.split("\t")[0] for line in out.splitlines()] == [a.text.strip() for a in want]
    code, _, err = run(capsys, "run", str(art), "--text", TEXTS[0])
    assert code == 2 and err.strip().endswith("answers questions: give --question (each --text is a context)")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_on_a_head_artifact_names_the_command_that_fits(capsys, head_artifacts, command):
    _, art = head_artifacts("tokcls")
    capsys.readouterr()  # what making the artifact printed (transformers' progress bars) is not the command's
    argv = [command, str(art)] + (["--prompt", "hi"] if command == "generate" else [])
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"mixtrt {command}: error: {art}: this artifact holds a MixtralForTokenClassification (token_classification "
        "head), not a causal_lm model: use `mixtrt run` (mixtrt.runtime.heads.TokenClassifier)"]


def test_run_on_a_language_model_names_the_command_that_fits(capsys, exported):
    _, art = exported["mistral-window"]
    code, out, err = run(capsys, "run", str(art), "--text", "hi")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"mixtrt run: error: {art}: this artifact holds a MistralForCausalLM (causal_lm head), not a base or "
        "classifier model: use `mixtrt generate` or `mixtrt chat` (mixtrt.runtime.generation.Generator)"]


def test_inspect_and_serve_on_a_head_artifact(capsys, head_artifacts, tmp_path):
    """inspect: a head scoring whole texts has no cache (--json's cache is null, the human line says none and the
    attention window the export planned); serve refuses it in one line before it binds a port or says it listens."""
    from mixtrt.export import export_onnx
    from tests.checkpoints import EXPORT_W

    ck, art = head_artifacts("seqcls")
    capsys.readouterr()
    code, out, err = run(capsys, "inspect", str(art), "--json")
    assert code == 0 and json.loads(out)["cache"] is None, err
    assert json.loads(out)["attention_windows"] == [EXPORT_W] * 2
    code, out, _ = run(capsys, "inspect", str(art))
    assert f"kv cache      none: the graph scores whole texts (window {EXPORT_W})" in out.splitlines()
    # a window at least max_context long was exported full causal: no window is shown
    short = export_onnx(ck, tmp_path / "short", max_context=EXPORT_W, progress=None)
    capsys.readouterr()
    code, out, _ = run(capsys, "inspect", str(short))
    assert "kv cache      none: the graph scores whole texts" in out.splitlines(), out
    code, out, err = run(capsys, "serve", str(art), "--port", "0")
    assert code == 2 and out == "" and "listening" not in err
    assert err.strip().splitlines() == [
        f"mixtrt serve: error: {art}: this artifact holds a MistralForSequenceClassification (sequence_classification "
        "head), not a causal_lm model: use `mixtrt run` (mixtrt.runtime.heads.SequenceClassifier)"], err
