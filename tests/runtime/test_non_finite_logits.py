"""A model that produces NaN / inf logits (broken weights, fp16 overflow): the runtime never chooses a token from
them. The call stops with NonFiniteLogitsError naming the row and the step; in an Engine only that row stops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixtrt.runtime.errors import BackendError, NonFiniteLogitsError
from mixtrt.runtime.generation import Engine, GenerationConfig, Generator
from tests.hostile import cli, one_line, refused
from tests.runtime.fakes import ToyBackend, ToyTokenizer


class PoisonedBackend(ToyBackend):
    """ToyBackend whose logits turn NaN (or inf) for the token fed at `position`, in rows whose first token
    is `marker` (or in every row when marker is None)."""

    def __init__(self, position: int, marker: int | None = None, value: float = np.nan, **kw) -> None:
        super().__init__(**kw)
        self.position, self.marker, self.value = position, marker, value

    def step(self, cache, input_ids, start_row=0, last_only=False):
        first = cache.lengths[start_row:start_row + len(input_ids)].copy()
        firsts = [int(cache.keys[0][start_row + r, 0, self.slot(0), 0]) if first[r] else int(input_ids[r, 0])
                  for r in range(len(input_ids))]
        out = super().step(cache, input_ids, start_row, last_only)
        s = input_ids.shape[1]
        for r in range(len(input_ids)):
            if self.marker is not None and firsts[r] != self.marker:
                continue
            cols = range(s - out.shape[1], s)
            for j, col in enumerate(cols):
                if first[r] + col == self.position:
                    out[r, j, 3] = self.value
        return out


def test_nan_during_decode_names_the_row_and_step():
    gen = Generator(PoisonedBackend(position=6), ToyTokenizer())
    with pytest.raises(NonFiniteLogitsError) as e:
        gen.generate([[1, 5, 9, 12]], max_new_tokens=10)
    # positions 0-3 are the prompt; tokens 1, 2, 3 come from positions 3, 4, 5: token 4 would come from 6
    one_line(e.value, "prompt 0", "generated token 4", "position 6", "NaN or infinite logits")
    assert isinstance(e.value, BackendError)


def test_nan_during_prefill_names_the_positions():
    gen = Generator(PoisonedBackend(position=2, value=np.inf), ToyTokenizer())
    with pytest.raises(NonFiniteLogitsError) as e:
        gen.generate([[1, 5, 9, 12]], max_new_tokens=3, return_logprobs=True)
    one_line(e.value, "prompt 0", "prefill of positions 0-3")
    with pytest.raises(NonFiniteLogitsError) as e:
        gen.teacher_forced_logprobs([1, 5, 9, 12])
    one_line(e.value, "the sequence", "prefill")
    # a prefill that only needs the last position's logits cannot see position 2: it is fine
    assert Generator(PoisonedBackend(position=2), ToyTokenizer()).generate([[1, 5, 9, 12]], max_new_tokens=1)


def test_stream_stops_with_the_error_after_the_good_tokens():
    gen = Generator(PoisonedBackend(position=7), ToyTokenizer())
    events = []
    with pytest.raises(NonFiniteLogitsError, match="generated token 5"):
        for event in gen.stream([1, 5, 9, 12], max_new_tokens=10):
            events.append(event)
    assert len(events) == 4 and all(e.output is None for e in events)  # four good tokens, never a NaN one


def test_in_an_engine_only_the_poisoned_row_stops():
    backend = PoisonedBackend(position=5, marker=7)
    engine = Engine(backend, ToyTokenizer(), max_batch=3)
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=())
    engine.add([1, 5, 9], cfg, name="good")
    bad = engine.add([7, 5, 9], cfg, name="bad")
    done, errors = {}, []
    while engine.busy:
        try:
            events = engine.step()
        except NonFiniteLogitsError as e:
            errors.append(str(e))
            events = e.events
        for ev in events:
            assert ev.row is not bad or ev.output is None
            if ev.output is not None:
                done[ev.row.name] = ev.output
    assert len(errors) == 1 and errors[0].startswith("bad (generated token 4, position 5)")
    assert bad.reason == "length" and bad.message == "cancelled" and bad.released
    [alone] = Generator(ToyBackend(), ToyTokenizer()).generate([[1, 5, 9]], cfg)
    assert done["good"].token_ids == alone.token_ids  # the good row is unaffected


@pytest.mark.parametrize("where", ["chunk", "decode"])
def test_in_a_mixed_step_only_the_poisoned_row_stops(where):
    """A step that runs a prompt chunk with the decoding rows (step_mixed): NaN in the chunk cancels the row being
    prefilled, NaN in a decoding row cancels that row; the error names it, the other rows' tokens of that step
    are in its events, and every other row ends with the tokens of its run alone."""
    marker = 7
    backend = PoisonedBackend(position=2 if where == "chunk" else 6, marker=marker, mixed=True)
    engine = Engine(backend, ToyTokenizer(), max_batch=3)
    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=(), return_logprobs=True)
    runner = engine.add([1, 5, 9], cfg, name="runner")
    engine.step()
    bad = engine.add([marker, 5, 9, 11, 12], cfg, name="bad")
    engine.add([1, 6, 9, 13], cfg, name="late")
    done, errors, with_error = {}, [], []
    while engine.busy:
        try:
            events = engine.step(prefill_budget=2)
        except NonFiniteLogitsError as e:
            errors.append(str(e))
            events = e.events
            with_error += [ev.row.name for ev in events]
        for ev in events:
            assert ev.row is not bad or ev.output is None
            if ev.output is not None:
                done[ev.row.name] = ev.output
    assert backend.mixed_calls
    one_line(errors[0], "bad")
    assert len(errors) == 1 and ("prefill of positions 2-3" in errors[0] if where == "chunk"
                                 else errors[0].startswith("bad (generated token"))
    assert "runner" in with_error  # the decoding rows' tokens of the failed step were handed out
    assert bad.reason == "length" and bad.message == "cancelled" and bad.released and runner.reason is not None
    gen = Generator(ToyBackend(), ToyTokenizer())
    assert done["runner"].token_ids == gen.generate([[1, 5, 9]], cfg)[0].token_ids
    assert done["late"].token_ids == gen.generate([[1, 6, 9, 13]], cfg)[0].token_ids


def _serve(monkeypatch, backend) -> None:
    """`mixtrt generate` in this process, on `backend` and the toy tokenizer instead of an artifact."""
    from mixtrt.cli.commands import generate

    monkeypatch.setattr(generate, "load_generator", lambda ns: Generator(backend, ToyTokenizer()))


def test_cli_json_never_prints_nan(monkeypatch):
    """`generate --json` on a model gone NaN: exit 2, one line, nothing on stdout (never bare NaN)."""
    _serve(monkeypatch, PoisonedBackend(position=4))
    r = cli("generate", "unused", "--prompt-ids", "1,5,9", "--json", "--max-new-tokens", "5")
    refused(r, "generate", "prompt 0", "NaN or infinite logits")
    _serve(monkeypatch, ToyBackend())
    r = cli("generate", "unused", "--prompt-ids", "1,5,9", "--json", "--max-new-tokens", "2")
    assert r.code == 0 and json.loads(r.stdout)["finish_reason"] == "length"


def test_cli_stream_stops_with_one_line_after_the_good_text(monkeypatch):
    _serve(monkeypatch, PoisonedBackend(position=4))
    r = cli("generate", "unused", "--prompt", "ab", "--max-new-tokens", "5")
    assert r.code == 2 and r.stdout.startswith("ab") and "nan" not in r.stdout.lower()
    one_line(r.stderr, "mixtrt generate: error: prompt 0 (generated token 4, position 4)")


def test_a_failed_prefill_never_echoes_the_prompt(monkeypatch):
    _serve(monkeypatch, PoisonedBackend(position=4))  # "the stop" is 5 tokens: the prefill's last position
    r = cli("generate", "unused", "--prompt", "the stop", "--max-new-tokens", "5")
    refused(r, "generate", "prefill of positions 0-4")  # stdout empty: the prompt was not echoed


def test_perplexity_names_the_artifact_whose_logits_are_not_finite():
    """With a reference, the line says which of the two artifacts is broken."""
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.perplexity import evaluate

    ids = [1, 5, 9, 12, 7, 3, 8]
    good, bad = ToyBackend(), PoisonedBackend(position=1)
    assert evaluate(good, ids, 4, reference=ToyBackend())["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="^my-ref produced non-finite logits"):
        evaluate(good, ids, 4, reference=bad, names=("my-int4", "my-ref"))
    with pytest.raises(ConfigError, match="^my-int4 produced non-finite logits"):
        evaluate(bad, ids, 4, reference=good, names=("my-int4", "my-ref"))


class SteepBackend(ToyBackend):
    """Finite logits so steep that the text's mean NLL is past exp's float range (a broken but finite model)."""

    def step(self, cache, input_ids, start_row=0, last_only=False):
        return super().step(cache, input_ids, start_row, last_only) * 1e4


def test_perplexity_past_float_range_is_inf_and_json_null(monkeypatch, tmp_path):
    """The perplexity of such a model is inf (no overflow warning), and `perplexity --json` stays strict JSON: null,
    with the finite mean NLL beside it."""
    import warnings

    from mixtrt.runtime.perplexity import evaluate

    ids = ToyTokenizer().encode("abcdefghij")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = evaluate(SteepBackend(), ids, 6)
    assert out["perplexity"] == float("inf") and 709 < out["mean_nll"] < float("inf")
    monkeypatch.setattr(Generator, "load", classmethod(lambda cls, *a, **k: Generator(SteepBackend(), ToyTokenizer())))
    (tmp_path / "t.txt").write_text("abcdefghij")
    r = cli("perplexity", "unused", "--text", str(tmp_path / "t.txt"), "--chunk", "6", "--json")
    assert r.code == 0, r.stderr
    got = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert got["perplexity"] is None and got["mean_nll"] == pytest.approx(out["mean_nll"])
    r = cli("perplexity", "unused", "--text", str(tmp_path / "t.txt"), "--chunk", "6")
    assert r.code == 0 and r.stdout.startswith("perplexity inf over") and not r.stderr


def test_a_failed_guide_and_a_poisoned_prefill_in_one_mixed_step_both_fail(monkeypatch):
    """A mixed step whose decode half fails a row's structured output (GuideError) and whose prefill half has
    non-finite logits: both rows are cancelled and named in one error, each failed row's own message kept; the
    other decoding row goes on (the guided row never stays running, to end later on eos with a cut document)."""
    from mixtrt.runtime.errors import GuideError, RowError
    from tests.runtime.fakes import V

    class FailingGuide:
        def __init__(self, after: int) -> None:
            self.after, self.n = after, 0

        def allowed(self) -> np.ndarray:
            return np.ones(V, bool)

        def consume(self, token: int) -> None:
            if self.n == self.after:
                raise GuideError(f"cannot go on after {self.n} tokens")
            self.n += 1

    monkeypatch.setattr(Engine, "_guide", lambda self, cfg, new_message: FailingGuide(2) if cfg.seed == 7 else None)
    engine = Engine(PoisonedBackend(position=3, marker=7, capacity=64, windowed=False, mixed=True), ToyTokenizer(),
                    max_batch=3)
    guided = engine.add([1, 5, 9, 12], GenerationConfig(max_new_tokens=8, do_sample=True, seed=7, eos_token_id=()),
                        name="guided")
    plain = engine.add([1, 6, 9], GenerationConfig(max_new_tokens=8, eos_token_id=()), name="plain")
    engine.step(prefill_budget=4)
    engine.add([7, 5, 9, 12], GenerationConfig(max_new_tokens=8, eos_token_id=()), name="poisoned")
    with pytest.raises(RowError) as e:
        engine.step(prefill_budget=4)
    assert "poisoned (prefill" in str(e.value) and "guided: cannot go on after 2 tokens" in str(e.value)
    assert e.value.rows == {guided.id: "guided: cannot go on after 2 tokens"}
    assert [ev.row.name for ev in e.value.events] == ["plain"]
    assert engine.running == [plain] and guided.reason is not None and guided.message == "cancelled"
