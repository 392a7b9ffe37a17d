"""The steppable Engine on the toy backend: rows admitted between steps, kept rows extended, cancellation."""

import numpy as np
import pytest

from mixtrt.runtime.errors import BackendError, ConfigError
from mixtrt.runtime.generation import Engine, GenerationConfig, Generator
from tests.runtime.fakes import ToyBackend, ToyTokenizer

PROMPTS = [[1, 5, 9, 12], [1, 20, 7, 7, 30, 11, 8, 4, 17, 40, 3, 19, 22], [1, 37], [1, 8, 8, 3, 9]]
GREEDY = GenerationConfig(max_new_tokens=9, eos_token_id=())


def alone(prompt: list[int], config: GenerationConfig = GREEDY, **kw) -> list[int]:
    return Generator(ToyBackend(**kw), ToyTokenizer()).generate(prompt, config)[0].token_ids


def drain(engine: Engine, steps: int | None = None) -> dict[int, list[int]]:
    """Step until idle (or `steps` times); row id -> tokens of the rows that finished."""
    done: dict[int, list[int]] = {}
    n = 0
    while engine.busy and (steps is None or n < steps):
        for event in engine.step():
            if event.output is not None:
                done[event.row.id] = event.output.token_ids
        n += 1
    return done


@pytest.mark.parametrize("windowed", [True, False])
def test_rows_admitted_between_steps_equal_their_runs_alone(windowed):
    backend = ToyBackend(windowed=windowed, capacity=6 if windowed else 64)
    engine = Engine(backend, ToyTokenizer(), max_batch=3)
    configs = [GenerationConfig(max_new_tokens=n, eos_token_id=()) for n in (9, 4, 12, 7)]
    rows = [engine.add(PROMPTS[0], configs[0]), engine.add(PROMPTS[1], configs[1])]
    done = drain(engine, steps=2)
    rows.append(engine.add(PROMPTS[2], configs[2]))  # joins the running batch
    done |= drain(engine, steps=3)
    rows.append(engine.add(PROMPTS[3], configs[3]))  # waits for a free row, then joins
    assert len(engine.waiting) == 1 or engine.running
    done |= drain(engine)
    for row, prompt, config in zip(rows, PROMPTS, configs, strict=True):
        assert done[row.id] == alone(prompt, config, windowed=windowed, capacity=backend.capacity)
    assert max(b for b, _, _ in backend.calls) == 3  # never more rows than max_batch


def test_waiting_rows_wait_for_a_free_cache_row():
    backend = ToyBackend()
    engine = Engine(backend, ToyTokenizer(), max_batch=1)
    a, b = engine.add(PROMPTS[0], GREEDY), engine.add(PROMPTS[2], GREEDY)
    engine.step()
    assert engine.running == [a] and list(engine.waiting) == [b]
    done = drain(engine)
    assert done == {a.id: alone(PROMPTS[0]), b.id: alone(PROMPTS[2])}


def test_kept_row_extends_with_its_cache_and_equals_one_long_prompt():
    """A kept row's next turn prefills only the new tokens (and its last generated token) and continues
    exactly as one prompt holding the whole conversation would."""
    backend = ToyBackend(capacity=6)
    engine = Engine(backend, ToyTokenizer(), max_batch=2)
    row = engine.add(PROMPTS[0], GREEDY, keep=True)
    other = engine.add(PROMPTS[1], GREEDY)
    first = drain(engine)[row.id]
    assert engine.parked == [row] and not engine.running
    backend.calls.clear()
    turn2 = [29, 37, 3]
    engine.extend(row, turn2, GREEDY)
    second = drain(engine)[row.id]
    prefill = [s for b, s, _ in backend.calls if s > 1]
    assert prefill == [1 + len(turn2)]  # the last generated token + the new ones, nothing re-prefilled
    assert second == alone(PROMPTS[0] + first + turn2)
    assert other.reason == "length"
    engine.release(row)
    assert engine.parked == [] and not engine.busy


@pytest.mark.parametrize("windowed", [True, False])
def test_a_kept_row_rewinds_to_a_prefix_while_its_cache_dropped_nothing(windowed):
    """extend(keep=k) continues after the row's first k tokens, as one prompt of those and the new ones would;
    refused (the row unchanged) for k past what the cache holds or once a window has dropped a token."""
    backend = ToyBackend(capacity=64 if windowed else 512, windowed=windowed)
    engine = Engine(backend, ToyTokenizer(), max_batch=2)
    row = engine.add(PROMPTS[1], GREEDY, keep=True)
    first = drain(engine)[row.id]
    sequence = PROMPTS[1] + first
    for bad in (0, row.cached + 1, "3", 2.0, True):
        assert not engine.can_rewind(row, bad)
        with pytest.raises(ConfigError, match=f"keep={bad!r} is not a prefix"):
            engine.extend(row, [5], GREEDY, keep=bad)
    assert engine.parked == [row] and row.sequence == sequence  # unchanged
    backend.calls.clear()
    engine.extend(row, [29, 37, 3], GREEDY, keep=9)
    second = drain(engine)[row.id]
    assert [s for b, s, _ in backend.calls if s > 1] == [3]  # only the new tokens after the kept 9
    assert second == alone(sequence[:9] + [29, 37, 3])
    small = ToyBackend(capacity=6)  # a window of 4 in 6 rows: the first turn already dropped tokens
    engine = Engine(small, ToyTokenizer(), max_batch=1)
    row = engine.add(PROMPTS[1], GREEDY, keep=True)
    drain(engine)
    assert not engine.can_rewind(row, 3)


def test_parked_row_survives_other_rows_coming_and_going():
    backend = ToyBackend(capacity=6)
    engine = Engine(backend, ToyTokenizer(), max_batch=2)
    kept = engine.add(PROMPTS[0], GREEDY, keep=True)
    first = drain(engine)[kept.id]
    for prompt in PROMPTS[1:]:  # each takes the other cache row and leaves
        row = engine.add(prompt, GREEDY)
        assert drain(engine)[row.id] == alone(prompt)
    engine.extend(kept, [3, 4], GREEDY)
    assert drain(engine)[kept.id] == alone(PROMPTS[0] + first + [3, 4])


def test_cancel_frees_the_row_and_the_others_continue():
    backend = ToyBackend()
    engine = Engine(backend, ToyTokenizer(), max_batch=2)
    a, b = engine.add(PROMPTS[0], GREEDY), engine.add(PROMPTS[1], GREEDY)
    drain(engine, steps=2)
    engine.cancel(a)
    assert engine.running == [b]
    done = drain(engine)
    assert done == {b.id: alone(PROMPTS[1])} and a.id not in done
    waiting = engine.add(PROMPTS[2], GREEDY)
    engine.cancel(waiting)  # never admitted
    assert not engine.busy


def test_another_engines_row_is_refused_and_left_as_it_was():
    backend = ToyBackend()
    mine, other = Engine(backend, ToyTokenizer(), max_batch=2), Engine(backend, ToyTokenizer(), max_batch=2)
    theirs = other.add(PROMPTS[0], GREEDY)
    kept = other.add(PROMPTS[2], GenerationConfig(max_new_tokens=2, eos_token_id=()), keep=True)
    drain(other, steps=1)
    for call in (mine.cancel, mine.release):
        with pytest.raises(ConfigError, match="row 0 was added to another Engine"):
            call(theirs)
    with pytest.raises(ConfigError, match="added to another Engine"):
        mine.extend(kept, [3], GREEDY)
    with pytest.raises(ConfigError, match="cancel takes a Row"):
        mine.cancel(theirs.id)
    with pytest.raises(ConfigError, match="fork_of: row 0 was added to another Engine"):
        mine.add(PROMPTS[0], GREEDY, fork_of=theirs)
    assert theirs.reason is None and not theirs.released and theirs in other.running
    assert drain(other)[theirs.id] == alone(PROMPTS[0])  # the other engine's row went on untouched

class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("when", [1, 4])  # the prefill's backend call, a decode step's
def test_a_step_cut_short_after_the_backend_pass_stops_the_engine(when):
    """Ctrl-C after the backend advanced the cache and before the rows took their tokens: going on would feed
    a token again one position on, for every row, silently. The engine refuses to go on instead; a new one is
    exact, and a chat session starts its next turn on a new engine."""
    backend = ToyBackend()
    calls, step = [0], backend.step

    def cut(*a, **kw):
        out = step(*a, **kw)
        calls[0] += 1
        if calls[0] == when:
            raise Interrupt
        return out

    backend.step = cut
    engine = Engine(backend, ToyTokenizer(), max_batch=2)
    rows = [engine.add(PROMPTS[0], GREEDY), engine.add(PROMPTS[3], GREEDY)]
    with pytest.raises(Interrupt):
        drain(engine)
    for call in (engine.step, lambda: engine.add(PROMPTS[1], GREEDY), lambda: list(engine.parts()), engine.decode,
                 engine.admit, lambda: engine.mixed_step(4)):
        with pytest.raises(BackendError, match="cannot go on: a step was cut short by Interrupt"):
            call()
    engine.cancel(rows[0])  # clean-up still works
    fresh = Engine(backend, ToyTokenizer(), max_batch=2)
    again = [fresh.add(PROMPTS[0], GREEDY), fresh.add(PROMPTS[3], GREEDY)]
    done = drain(fresh)
    assert [done[r.id] for r in again] == [alone(PROMPTS[0]), alone(PROMPTS[3])]


def test_row_failures_leave_the_engine_usable_and_misuse_is_named():
    backend, sizes = ToyBackend(), []
    new_cache = backend.new_cache
    backend.new_cache = lambda n: sizes.append(n) or new_cache(n)  # onnxruntime's takes a plain int only
    engine = Engine(backend, ToyTokenizer(), max_batch=np.int64(2))
    assert engine.max_batch == 2 and type(engine.max_batch) is int and sizes == [2] and type(sizes[0]) is int
    bad = [((PROMPTS[0], None), {}, "add takes a GenerationConfig, got NoneType"),
           ((PROMPTS[0], {"max_new_tokens": 3}), {}, "add takes a GenerationConfig, got dict"),
           ((PROMPTS[0], GREEDY), {"sample_index": -1}, "sample_index must be an integer >= 0, got -1"),
           ((PROMPTS[0], GREEDY), {"sample_index": 1.5}, "sample_index must be an integer >= 0, got 1.5"),
           ((PROMPTS[0], GREEDY), {"keep": "yes"}, "keep must be True or False, got 'yes'"),
           ((PROMPTS[0], GREEDY), {"continuation": 1}, "continuation must be True or False, got 1"),
           ((PROMPTS[0], GREEDY), {"fork_of": 5}, "add's fork_of takes a Row"),
           ]
    for args, kw, message in bad:
        with pytest.raises(ConfigError, match=message):
            engine.add(*args, **kw)
    assert not engine.busy
    first, second = engine.add(PROMPTS[0], GREEDY, sample_index=np.int64(0)), engine.add(PROMPTS[2], GREEDY)
    with pytest.raises(ConfigError, match="release: row 1 has not finished"):
        engine.release(second)
    assert drain(engine) == {first.id: alone(PROMPTS[0]), second.id: alone(PROMPTS[2])}


def test_sample_index_not_the_cache_row_seeds_sampling():
    config = GenerationConfig(max_new_tokens=8, do_sample=True, seed=5, eos_token_id=())
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=2)
    filler = engine.add(PROMPTS[1], GREEDY)
    drain(engine, steps=1)
    late = engine.add(PROMPTS[0], config, sample_index=7)  # lands in cache row 1
    done = drain(engine)
    solo = Engine(ToyBackend(), ToyTokenizer(), max_batch=1)
    again = solo.add(PROMPTS[0], config, sample_index=7)  # cache row 0
    assert drain(solo)[again.id] == done[late.id] and filler.id in done


def test_add_and_extend_check_everything_before_work():
    backend = ToyBackend(windowed=False, capacity=10)
    engine = Engine(backend, ToyTokenizer(), max_batch=1)
    with pytest.raises(ConfigError, match="row 0 has 13 tokens"):
        engine.add(PROMPTS[1], GREEDY)
    row = engine.add(PROMPTS[0], GenerationConfig(max_new_tokens=2, eos_token_id=()), keep=True)
    drain(engine)
    with pytest.raises(ConfigError, match="the conversation has 10 tokens.*cache full"):
        engine.extend(row, [3, 4, 5, 6], GREEDY)
    with pytest.raises(ConfigError, match="at least one new token"):
        engine.extend(row, [], GREEDY)
    other = engine.add(PROMPTS[2], GREEDY)
    with pytest.raises(ConfigError, match="keep=True"):
        engine.extend(other, [3], GREEDY)
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(backend, ToyTokenizer(), max_batch=0)
    assert [c for c in backend.calls if c[1] > 0][:1] == [(1, 4, 0)]  # only the one valid prompt ran
    # the one cache row holds the kept row, and `other` waits for it: a step says so (it looped on no work)
    with pytest.raises(ConfigError, match="all 1 cache rows hold kept rows"):
        engine.step()
    engine.cancel(other)
    # ids are checked as the Generator checks them (one out of the vocabulary failed every row's later steps)
    vocab = backend.args.vocab_size
    for bad, match in (([1, vocab], rf"token ids \[{vocab}\] outside the vocabulary"), ([-1], r"\[-1\] outside"),
                       ("hello", "must be token ids .* encode text"), ([1, 2.0], "must be integer token ids"),
                       ([True], "must be integer token ids"), (np.array([[1, 2]]), "must be token ids"),
                       (np.array(3), "must be token ids")):
        with pytest.raises(ConfigError, match=match):
            engine.add(bad, GREEDY)
        with pytest.raises(ConfigError, match=match):
            engine.extend(row, bad, GREEDY)
    assert engine.add(np.array([1, 5, 9]), GREEDY).prompt == [1, 5, 9]  # a numpy row of ids is ids
    engine.cancel(engine.waiting[-1])
    # a row extended twice before a step would be queued twice (two outputs, its cache row twice)
    engine.extend(row, [3], GenerationConfig(max_new_tokens=1, eos_token_id=()))
    with pytest.raises(ConfigError, match="already waiting"):
        engine.extend(row, [4], GREEDY)
    assert len([e for e in engine.step() if e.output is not None]) == 1 and engine.parked == [row]


def test_finished_rows_stay_until_their_row_is_needed():
    """When every row finished on one step nothing is copied; a new row empties its slot first."""
    backend = ToyBackend()
    engine = Engine(backend, ToyTokenizer(), max_batch=2)
    a, b = engine.add(PROMPTS[0], GREEDY), engine.add(PROMPTS[2], GREEDY)
    drain(engine)
    assert engine.cache.lengths.tolist() == [len(PROMPTS[0]) + 8, len(PROMPTS[2]) + 8]
    c = engine.add(PROMPTS[3], GREEDY)
    assert drain(engine)[c.id] == alone(PROMPTS[3])
    assert a.reason == b.reason == "length"
    np.testing.assert_array_equal(engine.cache.lengths, [len(PROMPTS[3]) + 8, 0])


def test_admit_then_decode_is_a_step_in_two_halves():
    """admit(max_rows) prefills waiting rows one at a time (each gets its first token), decode() steps the
    running rows: the same tokens as step(), which a server uses to hand first tokens out early."""
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=3)
    rows = [engine.add(p, GREEDY) for p in PROMPTS[:3]]
    first = engine.admit(max_rows=1)
    assert [(e.row.id, len(e.row.tokens)) for e in first] == [(rows[0].id, 1)] and len(engine.waiting) == 2
    assert [e.row.id for e in engine.admit()] == [rows[1].id, rows[2].id]
    assert [e.row.id for e in engine.decode()] == [r.id for r in rows]
    done = drain(engine)
    assert [done[r.id] for r in rows] == [alone(p) for p in PROMPTS[:3]]


def drain_budget(engine: Engine, budget: int) -> dict[int, list[int]]:
    done: dict[int, list[int]] = {}
    while engine.busy:
        for event in engine.step(prefill_budget=budget):
            if event.output is not None:
                done[event.row.id] = event.output.token_ids
    return done


@pytest.mark.parametrize("budget", [1, 3, 100])
@pytest.mark.parametrize("windowed", [True, False])
def test_prefill_budget_splits_prompts_across_steps_and_keeps_the_tokens(budget, windowed):
    """While rows decode, a step prefills at most `budget` prompt tokens (a longer prompt goes on at the next
    steps, its row not decoding yet); every row's tokens equal its run alone. Prompts of 13 tokens cross the
    toy ring (capacity 6) in chunks of 1 and 3 (crossing its wrap mid-chunk) or go in whole (100)."""
    backend = ToyBackend(windowed=windowed, capacity=6 if windowed else 64)
    engine = Engine(backend, ToyTokenizer(), max_batch=3)
    long = GenerationConfig(max_new_tokens=40, eos_token_id=())  # decodes while the others are prefilled
    rows = [engine.add(PROMPTS[0], long)]
    engine.step(prefill_budget=budget)  # nothing decodes yet: the whole prompt
    assert len(rows[0].tokens) == 2
    rows += [engine.add(PROMPTS[1], GREEDY), engine.add(PROMPTS[3], GREEDY)]
    calls = len(backend.calls)
    done = drain_budget(engine, budget)
    assert [done[r.id] for r in rows] == [alone(p, c, windowed=windowed, capacity=backend.capacity)
                                          for p, c in ((PROMPTS[0], long), (PROMPTS[1], GREEDY), (PROMPTS[3], GREEDY))]
    fed, prefills = 0, 0
    for b, s, start in backend.calls[calls:]:  # between two decode steps at most `budget` prefill tokens
        if start == 0:  # a decode step of the running rows (row 0 runs throughout)
            assert s == 1
            fed = 0
            continue
        fed, prefills = fed + s, prefills + 1
        assert b == 1 and fed <= budget, backend.calls[calls:]
    assert fed == 0 and prefills >= (len(PROMPTS[1]) + len(PROMPTS[3])) // budget  # the prompts went in pieces


def test_an_idle_engine_prefills_a_burst_of_prompts_whole_in_one_step():
    """The budget applies only while rows decode: prompts that arrive together at an idle engine all go in whole
    in the first step (each row's first token comes out of it), and the tokens equal each run alone."""
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=3)
    rows = [engine.add(p, GREEDY) for p in PROMPTS[:3]]
    first = engine.step(prefill_budget=2)
    assert engine.prefilling is None and not engine.waiting and all(r.tokens for r in rows)
    assert {e.row.id for e in first} == {r.id for r in rows}
    done = {e.row.id: e.output.token_ids for e in first if e.output is not None} | drain_budget(engine, 2)
    assert [done[r.id] for r in rows] == [alone(p) for p in PROMPTS[:3]]


@pytest.mark.parametrize("budget", [0, -1, True, 1.5, "8"])
def test_a_bad_prefill_budget_is_one_clear_error(budget):
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=2)
    engine.add(PROMPTS[0], GREEDY)
    with pytest.raises(ConfigError, match=r"prefill_budget must be None or an integer >= 1, got"):
        engine.step(prefill_budget=budget)
    assert engine.waiting and not engine.running  # nothing was started


def test_an_empty_prompt_is_refused_when_added():
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=2)
    with pytest.raises(ConfigError, match=r"row 0 is empty"):
        engine.add([], GREEDY)
    assert not engine.busy


def test_a_row_part_way_through_its_prefill_can_be_cancelled():
    backend = ToyBackend()
    engine = Engine(backend, ToyTokenizer(), max_batch=3)
    a = engine.add(PROMPTS[0], GREEDY)
    engine.step(prefill_budget=2)
    b, c = engine.add(PROMPTS[1], GREEDY), engine.add(PROMPTS[2], GREEDY)
    engine.step(prefill_budget=2)
    assert engine.prefilling is b and b.cached == 2 and engine.running == [a] and not b.tokens
    engine.cancel(b)
    assert engine.prefilling is None and engine.cache.lengths[1] == 0 and b.reason is not None
    done = drain_budget(engine, 2)
    assert done == {a.id: alone(PROMPTS[0]), c.id: alone(PROMPTS[2])}


def logprobs_across_steps(engine: Engine) -> None:
    """A row with prompt logprobs added after one step of `engine`'s rows, prefilled 5 tokens a step while they
    decode: its tokens, prompt logprobs and top logprobs equal one whole prefill's."""
    config = GenerationConfig(max_new_tokens=4, eos_token_id=(), return_logprobs=True, top_logprobs=2)
    whole = Generator(ToyBackend(), ToyTokenizer()).generate(PROMPTS[1], config)[0]
    engine.step()
    row = engine.add(PROMPTS[1], config)
    done = {}
    while row.reason is None:
        for event in engine.step(prefill_budget=5):
            if event.output is not None:
                done[event.row.id] = event.output
    out = done[row.id]
    assert out.token_ids == whole.token_ids
    np.testing.assert_allclose(out.prompt_logprobs, whole.prompt_logprobs, rtol=1e-6)
    np.testing.assert_array_equal(out.prompt_top_logprobs[0], whole.prompt_top_logprobs[0])


def test_prompt_logprobs_and_a_kept_row_across_prefill_steps():
    """Prompt logprobs gathered over several steps equal one whole prefill's; a kept row extended while
    another decodes is prefilled in pieces too and equals one long prompt."""
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=3)
    runner = engine.add(PROMPTS[0], GenerationConfig(max_new_tokens=60, eos_token_id=()))
    kept = engine.add(PROMPTS[2], GREEDY, keep=True)
    logprobs_across_steps(engine)
    while kept.reason is None:
        engine.step()
    first = list(kept.tokens)
    engine.extend(kept, PROMPTS[1], GREEDY)
    got = {}
    while kept.reason is None:
        for event in engine.step(prefill_budget=4):
            if event.output is not None:
                got[event.row.id] = event.output.token_ids
    assert got[kept.id] == alone(PROMPTS[2] + first + PROMPTS[1]) and runner.reason is None


# ---- mixed steps: the prompt chunk in the decode step's backend call (a server's Engine on onnxruntime) -------
@pytest.mark.parametrize("budget", [1, 3, 100])
@pytest.mark.parametrize("windowed", [True, False])
def test_mixed_steps_run_each_chunk_with_the_decode_rows_and_keep_the_tokens(budget, windowed):
    """With a backend that has step_mixed, a step while rows decode is one call: the running rows' tokens and at
    most `budget` prompt tokens of one row (never a pass of its own); rows arriving while others decode, with
    prompts crossing the toy ring in chunks, give the tokens of their runs alone."""
    backend = ToyBackend(windowed=windowed, capacity=6 if windowed else 64, mixed=True)
    engine = Engine(backend, ToyTokenizer(), max_batch=4)
    long = GenerationConfig(max_new_tokens=40, eos_token_id=())
    rows = [engine.add(PROMPTS[0], long)]
    engine.step(prefill_budget=budget)  # nothing decodes yet: a prefill of its own
    assert not backend.mixed_calls and len(rows[0].tokens) == 2
    rows += [engine.add(PROMPTS[1], GREEDY), engine.add(PROMPTS[3], GREEDY)]
    done = drain_budget(engine, budget)
    rows.append(engine.add(PROMPTS[2], GREEDY))  # after the others: alone again
    done |= drain_budget(engine, budget)
    want = [alone(p, c, windowed=windowed, capacity=backend.capacity)
            for p, c in ((PROMPTS[0], long), (PROMPTS[1], GREEDY), (PROMPTS[3], GREEDY), (PROMPTS[2], GREEDY))]
    assert [done[r.id] for r in rows] == want
    assert backend.mixed_calls and all(b >= 1 and 1 <= s <= budget for b, s in backend.mixed_calls)
    # every prompt token fed while row 0 decoded went through step_mixed
    chunks = sum(s for _, s in backend.mixed_calls)
    assert chunks == len(PROMPTS[1]) + len(PROMPTS[3]), backend.mixed_calls
    plain = [s for (_, s, _), mixed in zip(backend.calls, backend.in_mixed, strict=True) if s > 1 and not mixed]
    assert plain == [len(PROMPTS[0]), len(PROMPTS[2])]  # the prompts that came when nothing decoded


def test_mixed_steps_keep_prompt_logprobs_and_cancel_a_row_part_way():
    backend = ToyBackend(mixed=True)
    engine = Engine(backend, ToyTokenizer(), max_batch=3)
    runner = engine.add(PROMPTS[0], GenerationConfig(max_new_tokens=60, eos_token_id=()))
    logprobs_across_steps(engine)
    assert backend.mixed_calls and not any(backend.last_only[i] for i, m in enumerate(backend.in_mixed)
                                           if m and backend.calls[i][2] != 0)  # the chunks' logits: all positions
    b, c = engine.add(PROMPTS[1], GREEDY), engine.add(PROMPTS[2], GREEDY)
    engine.step(prefill_budget=2)
    assert engine.prefilling is b and b.cached == 2 and not b.tokens
    engine.cancel(b)
    assert engine.prefilling is None and engine.cache.lengths[1] == 0
    got = drain_budget(engine, 2)
    assert got[c.id] == alone(PROMPTS[2]) and runner.id in got


def test_a_finished_row_is_replaced_by_the_last_one_not_by_shifting_every_row():
    """Compaction moves the fewest cache rows (a row is MBs of keys and values): when a row in the middle
    finishes, the last running row fills its slot and the others stay; every row's tokens are unchanged."""
    backend = ToyBackend(capacity=64, windowed=False)
    moves: list[list[int]] = []
    move = backend.move_rows
    backend.move_rows = lambda cache, rows: (moves.append(list(rows)), move(cache, rows))[1]  # type: ignore
    engine = Engine(backend, ToyTokenizer(), max_batch=4)
    configs = [GenerationConfig(max_new_tokens=n, eos_token_id=()) for n in (20, 3, 20, 20)]
    rows = [engine.add(p, c) for p, c in zip(PROMPTS, configs, strict=True)]
    done = drain(engine)
    assert moves[0] == [0, 3, 2]  # row 1 finished: row 3 moved into its slot, rows 0 and 2 stayed
    assert [done[r.id] for r in rows] == [alone(p, c, capacity=64, windowed=False)
                                          for p, c in zip(PROMPTS, configs, strict=True)]


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("windowed", [True, False])
def test_forked_samples_start_from_one_prefill_and_equal_their_runs_alone(mixed, windowed):
    """A request's n samples (rows added with fork_of the first): the prompt is prefilled once, the others
    start from a copy of its cache row and its last logits, each sampling by its own sample index; their
    tokens and prompt logprobs equal each sample run alone, with other rows decoding beside them (mixed steps)
    and without; with too few free cache rows the rest are prefilled as any row."""
    backend = ToyBackend(windowed=windowed, capacity=6 if windowed else 64, mixed=mixed)
    engine = Engine(backend, ToyTokenizer(), max_batch=4)
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, seed=3, eos_token_id=(), return_logprobs=True,
                           top_logprobs=2)
    runner = engine.add(PROMPTS[0], GREEDY)
    engine.step(prefill_budget=3)
    first = engine.add(PROMPTS[1], cfg, sample_index=0)
    forks = [engine.add(PROMPTS[1], cfg, sample_index=i, fork_of=first) for i in (1, 2, 3)]
    rows = [first, *forks]
    done, outputs = {}, {}
    while engine.busy:
        for event in engine.step(prefill_budget=3):
            if event.output is not None:
                done[event.row.id], outputs[event.row.id] = event.output.token_ids, event.output
    assert engine.forked == 2 and [r.forked for r in rows] == [False, True, True, False]  # 4 rows: one waited
    # the prompt tokens fed: the runner's, the first sample's and the one that waited for a cache row
    assert engine.prefilled == len(PROMPTS[0]) + 2 * len(PROMPTS[1])
    assert bool(backend.mixed_calls) == mixed
    for i, row in enumerate(rows):
        solo = Engine(ToyBackend(windowed=windowed, capacity=backend.capacity), ToyTokenizer(), max_batch=1)
        again = solo.add(PROMPTS[1], cfg, sample_index=i)
        [out] = [e.output for e in drain_events(solo) if e.output is not None]
        assert done[row.id] == out.token_ids, i
        np.testing.assert_allclose(outputs[row.id].prompt_logprobs, out.prompt_logprobs, rtol=1e-6)
        assert np.array_equal(outputs[row.id].prompt_top_logprobs[0], out.prompt_top_logprobs[0])
        assert again.reason is not None
    assert done[runner.id] == alone(PROMPTS[0], GREEDY, windowed=windowed, capacity=backend.capacity)
    assert len({tuple(done[r.id]) for r in rows}) > 1  # the samples differ: each by its own index


def drain_events(engine: Engine) -> list:
    events = []
    while engine.busy:
        events += engine.step()
    return events


def test_fork_of_must_be_the_same_prompt_and_config():
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=2)
    first = engine.add(PROMPTS[0], GREEDY)
    with pytest.raises(ConfigError, match="fork_of must be a row of the same prompt and config"):
        engine.add(PROMPTS[1], GREEDY, fork_of=first)
    with pytest.raises(ConfigError, match="fork_of"):
        engine.add(PROMPTS[0], GenerationConfig(max_new_tokens=9, eos_token_id=()), fork_of=first)


def test_greedy_rows_chosen_in_one_argmax_equal_rows_chosen_by_their_samplers():
    """Plain greedy rows of a step get their tokens from one argmax over the batch; rows beside them with
    penalties, a logit bias, eos held back or sampling go through their samplers: each equals its run alone."""
    configs = [GenerationConfig(max_new_tokens=9, eos_token_id=()),
               GenerationConfig(max_new_tokens=9, eos_token_id=(), repetition_penalty=1.5),
               GenerationConfig(max_new_tokens=9, eos_token_id=(), logit_bias=((5, 3.0),)),
               GenerationConfig(max_new_tokens=9, do_sample=True, seed=7, eos_token_id=())]
    # greedy's second token (a decode step's choice), made the eos of a row that must not stop on it
    second = alone(PROMPTS[2])[1]
    configs.append(GenerationConfig(max_new_tokens=9, eos_token_id=second, min_new_tokens=3))
    prompts = [*PROMPTS, PROMPTS[2]]
    engine = Engine(ToyBackend(), ToyTokenizer(), max_batch=len(configs))
    rows = [engine.add(p, c) for p, c in zip(prompts, configs, strict=True)]
    done = drain(engine)
    for row, prompt, config in zip(rows, prompts, configs, strict=True):
        assert done[row.id] == alone(prompt, config)
    assert second not in done[rows[4].id][:3] and len(done[rows[4].id]) >= 3
