"""Chat sessions keep their cache: replies equal stateless chat on the full history, each turn prefills only
the new tokens, and the limits keep the session (the toy backend and a byte-level toy chat format)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from mixtrt.runtime.chat_session import ChatSession
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.generation import GenerationConfig, Generator
from tests.runtime.fakes import PIECES, ToyBackend, ToyTokenizer


class ByteChat(ToyTokenizer):
    """One piece per byte (so a reply's text re-encodes to the ids the model generated) and a format that
    only appends: "sys ...\\n", "user ...\\n", the reply after "bot " closed by EOS."""

    single = {PIECES[i]: i for i in range(3, 37)}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [1] * bos + [self.single[bytes([b])] for b in text.encode()] + [2] * eos

    def apply_chat_template(self, messages, add_generation_prompt=True):
        ids = [1]
        for m in messages:
            if m["role"] == "assistant":
                ids += self.encode("bot " + m["content"], bos=False) + [2]
            else:
                ids += self.encode(f"{'sys' if m['role'] == 'system' else 'user'} {m['content']}\n", bos=False)
        return ids + (self.encode("bot ", bos=False) if add_generation_prompt else [])


class Speaker(ToyBackend):
    """The toy LM saying only what its text gives back: ASCII single-byte pieces and EOS (no <unk>, <s>,
    lone UTF-8 bytes or multi-byte pieces)."""

    def step(self, cache, input_ids, start_row=0, last_only=False):
        logits = super().step(cache, input_ids, start_row, last_only)
        logits[..., [0, 1, *range(32, len(PIECES))]] = -1e9
        return logits


QUESTIONS = ["hello", "how are you", "tell me more", "why", "and then", "go on", "the end"]


def make(**kw) -> tuple[Generator, Speaker]:
    backend = Speaker(**kw)
    return Generator(backend, ByteChat()), backend


@pytest.mark.parametrize("windowed", [True, False])
def test_session_equals_stateless_chat_and_prefills_only_new_tokens(windowed):
    """Greedy replies equal `chat` on the whole history (the history runs far past the window: capacity 6),
    and each turn feeds the model only the tokens its cache does not hold."""
    gen, backend = make(windowed=windowed, capacity=6 if windowed else 512)
    session = gen.chat_session(system="be brief", config=GenerationConfig(max_new_tokens=6))
    for n, question in enumerate(QUESTIONS):
        before, held = backend.tokens_run, session.cached_tokens
        out = session.send(question)
        fed = backend.tokens_run - before
        turn = session.turns[-1]
        ids = ByteChat().apply_chat_template(session.messages[:-1])
        assert turn.prompt_tokens == len(ids) and turn.cached_tokens == held
        assert turn.kind == ("new" if n == 0 else "cached") and turn.prefilled_tokens == len(ids) - held
        assert fed == turn.prefilled_tokens + len(out.token_ids) - 1  # the prefill, then one token per decode step
        want = gen.chat(session.messages[:-1], max_new_tokens=6)  # stateless, on everything before the reply
        assert out.token_ids == want.token_ids and out.text == want.text
    assert sum(t.prompt_tokens for t in session.turns) > 3 * sum(t.prefilled_tokens for t in session.turns)


def test_undo_drops_the_last_exchange_and_the_next_turn_rewinds_to_it():
    """undo() returns the last user message and drops it with its reply; sent again greedily it gives the same reply,
    from the cache's common prefix (kind "rewound": only what follows the kept prefix is prefilled). Nothing to undo,
    or a reply streaming: a ConfigError, the conversation unchanged."""
    gen, _ = make(windowed=False, capacity=512)
    session = gen.chat_session(system="be brief", config=GenerationConfig(max_new_tokens=6))
    with pytest.raises(ConfigError, match="no exchange to undo"):
        session.undo()
    first = session.send(QUESTIONS[0])
    second = session.send(QUESTIONS[1])
    conversation = list(session.messages)
    message = session.undo()
    assert message == {"role": "user", "content": QUESTIONS[1]} and session.messages == conversation[:-2]
    again = session.send(message)
    assert again.token_ids == second.token_ids and session.messages == conversation
    assert session.turns[-1].kind in ("cached", "rewound") and session.turns[-1].cached_tokens > len(first.token_ids)
    events = session.stream(QUESTIONS[2])
    next(events)
    with pytest.raises(ConfigError, match="still streaming"):
        session.undo()
    events.close()
    assert session.messages == conversation


def test_replies_ended_by_length_eos_and_stop():
    """max_new_tokens: the format's EOS opens the next turn's new ids (cache kept); a stop string leaves
    tokens the conversation does not hold (a new context, counted); results stay exact."""
    gen, _ = make()
    session = gen.chat_session()
    [probe] = [gen.chat([{"role": "user", "content": "hello"}], max_new_tokens=8)]
    stop = ByteChat().decode(probe.token_ids[2:4])
    session.send("hello", max_new_tokens=3)
    assert session.send("go on", max_new_tokens=8).token_ids == \
        gen.chat(session.messages[:-1], max_new_tokens=8).token_ids
    assert session.turns[-1].kind == "cached"
    session.reset()
    out = session.send("hello", max_new_tokens=8, stop_strings=(stop,))
    assert out.finish_reason == "stop" and session.messages[-1]["content"] == out.text
    again = session.send("go on", max_new_tokens=8)
    assert session.turns[-1].kind == "mismatch" and "leave the cached ones at token" in session.turns[-1].note
    assert again.token_ids == gen.chat(session.messages[:-1], max_new_tokens=8).token_ids
    assert session.send("more", max_new_tokens=8).token_ids and session.turns[-1].kind == "cached"


@pytest.mark.parametrize("capacity, windowed, kind", [(512, False, "rewound"), (100, True, "rewound"),
                                                      (6, True, "mismatch")])
def test_a_reply_the_conversation_parts_from_keeps_the_common_prefix(capacity, windowed, kind):
    """A reply cut at a stop string holds ids the rendered conversation does not: the cache keeps the common
    prefix and prefills only the rest where it still holds that prefix as it was (a linear cache; a windowed one
    whose window has dropped nothing), else a new context; the replies equal stateless chat either way."""
    gen, backend = make(windowed=windowed, capacity=capacity)
    session = gen.chat_session(system="be brief")
    probe = gen.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
                     max_new_tokens=8)
    stop = ByteChat().decode(probe.token_ids[3:5])
    session.send("hello", max_new_tokens=8, stop_strings=(stop,))
    held = len(session._row.sequence)
    before = backend.tokens_run
    out = session.send("go on", max_new_tokens=8)
    fed = backend.tokens_run - before
    turn = session.turns[-1]
    assert turn.kind == kind and "leave the cached ones at token" in turn.note
    assert out.token_ids == gen.chat(session.messages[:-1], max_new_tokens=8).token_ids
    if kind == "rewound":
        assert 0 < turn.cached_tokens < held and turn.prefilled_tokens == turn.prompt_tokens - turn.cached_tokens
        assert fed == turn.prefilled_tokens + len(out.token_ids) - 1  # the prefill after the kept prefix
    else:
        assert turn.cached_tokens == 0 and "sliding window has dropped the oldest tokens" in turn.note
    assert session.send("more", max_new_tokens=8).token_ids == \
        gen.chat(session.messages[:-1], max_new_tokens=8).token_ids


def test_an_empty_reply_drops_its_turn_and_says_so():
    """A reply with no text (a stop string at its start) cannot go into the conversation (the formats refuse an
    empty assistant message, and two user turns in a row): the message goes too, and the turn's note says so."""
    gen, _ = make()
    session = gen.chat_session(system="be brief")
    first = gen.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
                     max_new_tokens=4)
    out = session.send("hello", max_new_tokens=4, stop_strings=(first.text[0],))
    assert out.text == "" and out.finish_reason == "stop"
    assert session.messages == [{"role": "system", "content": "be brief"}]
    assert "the reply was empty" in session.turns[-1].note
    assert session.send("go on", max_new_tokens=4).text  # the session goes on
    assert session.messages[-2:][0] == {"role": "user", "content": "go on"}


def test_eos_reply_keeps_the_cache():
    """A reply that ends with the format's EOS is exactly the rendered assistant turn."""
    gen, _ = make(chain={ByteChat.single[b"e"]: 2})  # the toy LM says EOS after "e"
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=12))
    outs = [session.send(question) for question in QUESTIONS]
    assert sum(o.finish_reason == "eos" and bool(o.text) for o in outs) >= 3
    assert all(t.kind == "cached" for t in session.turns[1:])
    assert outs[-1].token_ids == gen.chat(session.messages[:-1], max_new_tokens=12).token_ids


def test_linear_cache_full_starts_a_new_context_and_keeps_the_session():
    gen, _ = make(windowed=False, capacity=60)
    session = gen.chat_session(system="sys", config=GenerationConfig(max_new_tokens=5))
    kinds = []
    for question in QUESTIONS * 2:
        out = session.send(question)
        kinds.append(session.turns[-1].kind)
        assert out.token_ids == gen.chat(session.messages[:-1], max_new_tokens=5).token_ids
    assert "restart" in kinds and set(kinds) <= {"new", "cached", "restart"}
    restart = next(t for t in session.turns if t.kind == "restart")
    assert "more than the model holds (cache full" in restart.note and "a new context with the system prompt" \
        in restart.note
    assert session.messages[0] == {"role": "system", "content": "sys"}
    before = (list(session.messages), session.cached_tokens, len(session.turns))
    with pytest.raises(ConfigError, match="the message is too long: .* the conversation is unchanged"):
        session.send("x" * 80)
    assert (session.messages, session.cached_tokens, len(session.turns)) == before
    out = session.send("ok")
    assert session.turns[-1].kind in ("cached", "restart")
    assert out.token_ids == gen.chat(session.messages[:-1], max_new_tokens=5).token_ids


def test_a_bad_system_prompt_is_refused_at_the_start():
    """Not with every message: invalid text, or a system prompt leaving no room for a message and a reply."""
    gen, _ = make(windowed=False, capacity=60)
    with pytest.raises(ConfigError, match="the system prompt is not valid text"):
        gen.chat_session(system="x\udcff")
    with pytest.raises(ConfigError, match="the system prompt is too long: .* no room for a reply"):
        gen.chat_session(system="x" * 80)
    assert gen.chat_session(system="x" * 20).send("hi").token_ids
    # reset(system=...) checks it the same way, and a refused one leaves the session as it was
    session = gen.chat_session(system="x" * 20)
    session.send("hi")
    before = (list(session.messages), session.cached_tokens, session.system)
    for bad, match in (("x\udcff", "not valid text"), ("x" * 80, "too long")):
        with pytest.raises(ConfigError, match=f"the system prompt is {match}"):
            session.reset(system=bad)
        assert (session.messages, session.cached_tokens, session.system) == before
    session.reset(system="y" * 20)
    assert session.messages == [{"role": "system", "content": "y" * 20}] and session.send("hi").token_ids


def test_closed_stream_cancels_the_turn_and_errors_leave_the_session():
    gen, backend = make()
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=6))
    session.send("hello")
    kept = list(session.messages)
    events = session.stream("more")
    with pytest.raises(ConfigError, match="still streaming"):
        session.send("again")
    next(events)
    events.close()  # the reader stops after one token
    assert session.messages == kept and session.cached_tokens == 0
    with pytest.raises(ConfigError, match="temperature"):
        session.send("x", do_sample=True, temperature=0)
    out = session.send("more")
    assert session.turns[-1].kind == "new" and out.token_ids == gen.chat(session.messages[:-1],
                                                                          max_new_tokens=6).token_ids
    assert isinstance(session, ChatSession) and "4 messages" in repr(session)


def test_a_turn_cut_inside_a_step_starts_the_next_on_a_new_engine():
    """Ctrl-C after the backend's pass and before the row took its token: the session's engine cannot go on
    (its cache is a position ahead of the row), so the next turn starts a new context on a new engine and
    equals stateless chat."""
    gen, backend = make()
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=6))
    session.send("hello")
    kept, step, calls = list(session.messages), backend.step, [0]

    def cut(*a, **kw):
        out = step(*a, **kw)
        calls[0] += 1
        if calls[0] == 3:  # the turn's prefill, then its decode steps
            raise KeyboardInterrupt
        return out

    backend.step, broken = cut, session.engine
    with pytest.raises(KeyboardInterrupt):
        session.send("more")
    backend.step = step
    assert broken.broken is not None and session.engine is not broken and session.messages == kept
    out = session.send("more")
    assert session.turns[-1].kind == "new"
    assert out.token_ids == gen.chat(session.messages[:-1], max_new_tokens=6).token_ids


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_stream_ended_before_its_first_event_cancels_the_turn(how):
    """A generator that never started runs no `finally`: the turn's end must not depend on it."""
    gen, _ = make()
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=6))
    session.send("hello")
    kept = list(session.messages)
    events = session.stream("more")
    if how == "close":
        events.close()
    del events
    gc.collect()
    assert session.messages == kept and session.cached_tokens == 0
    out = session.send("more")  # not "still streaming"
    assert session.turns[-1].kind == "new" and out.token_ids == gen.chat(session.messages[:-1],
                                                                          max_new_tokens=6).token_ids
    session.reset()
    assert session.messages == []


def test_wrong_types_are_one_line_errors_and_leave_the_session():
    gen, _ = make()
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=4))
    session.send("hello")
    kept = (list(session.messages), session.cached_tokens)
    for bad in (None, 5, b"hi", ["hi"]):
        with pytest.raises(ConfigError, match=f"the message must be its text .* got {type(bad).__name__}"):
            session.send(bad)  # type: ignore[arg-type]
        assert (session.messages, session.cached_tokens) == kept
    for bad in ("hello", {"role": "user", "content": "hi"}, 5):  # a str was read as one message per character
        with pytest.raises(ConfigError, match=f"messages must be a list .* got {type(bad).__name__}"):
            gen.chat(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="system must be a str .* got int"):
        gen.chat_session(system=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="system must be a str .* got int"):
        session.reset(system=5)  # type: ignore[arg-type]
    assert session.send("more").token_ids and session.turns[-1].kind == "cached"


def test_two_threads_starting_turns_at_once_one_is_refused():
    """The busy check and its setting are one step: of two turns started at once (both past the check before either
    set it, forced here by holding both in the chat format), one streams, the other is one ConfigError; the
    conversation then holds the one turn, and the next turn equals stateless chat."""
    import threading

    gen, _ = make()
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=6))
    session.send("hello")
    both = threading.Barrier(2, timeout=2)
    render = gen.tokenizer.apply_chat_template

    def held(messages, add_generation_prompt=True):
        try:
            both.wait()  # the second caller is refused before it renders: the wait times out for the first
        except threading.BrokenBarrierError:
            pass
        return render(messages, add_generation_prompt)

    gen.tokenizer.apply_chat_template = held
    results: list = []

    def turn(text: str) -> None:
        try:
            results.append(session.send(text))
        except ConfigError as e:
            results.append(e)

    threads = [threading.Thread(target=turn, args=(t,)) for t in ("why", "how")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    gen.tokenizer.apply_chat_template = render
    refused = [r for r in results if isinstance(r, ConfigError)]
    replies = [r for r in results if not isinstance(r, ConfigError)]
    assert len(refused) == 1 and "still streaming" in str(refused[0]) and len(replies) == 1, results
    assert len(session.messages) == 4 and replies[0].text == session.messages[-1]["content"]
    out = session.send("more")
    assert out.token_ids == gen.chat(session.messages[:-1], max_new_tokens=6).token_ids


def test_close_during_a_turn_cancels_it_in_the_thread_that_runs_it():
    """close() while a turn streams (another thread's stop button, or between events) ends the turn before its next
    token: the stream ends without an output, send() raises one ConfigError, the conversation is as it was, and
    the next turn is exact."""
    import threading

    gen, _ = make()
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=20, eos_token_id=()))
    session.send("hello")
    kept = list(session.messages)
    events = session.stream("more")
    first = next(events)
    session.close()
    rest = list(events)
    assert first.output is None and all(e.output is None for e in rest) and len(rest) <= 1
    assert session.messages == kept and session.cached_tokens == 0
    # from another thread, while send() runs
    started, closed = threading.Event(), threading.Event()
    speak = gen.backend.step

    def slow_step(*a, **k):  # the turn's first step waits for the close
        started.set()
        closed.wait(5)
        return speak(*a, **k)

    gen.backend.step = slow_step
    closer = threading.Thread(target=lambda: (started.wait(5), session.close(), closed.set()))
    closer.start()
    with pytest.raises(ConfigError, match=r"^chat session: the reply was cancelled \(the session was closed while it "
                       r"streamed\); the conversation is as it was$"):
        session.send("again")
    closer.join(5)
    gen.backend.step = speak
    assert session.messages == kept and session.cached_tokens == 0
    out = session.send("more")
    assert session.turns[-1].kind == "new" and out.token_ids == gen.chat(kept + [{"role": "user", "content": "more"}],
                                                                          max_new_tokens=20,
                                                                          eos_token_id=()).token_ids


def test_a_config_that_is_not_a_generation_config_is_one_line():
    gen, _ = make()
    for call in (lambda: gen.generate("hi", {"max_new_tokens": 3}), lambda: gen.chat_session(config="greedy"),
                 lambda: gen.chat_session().send("hi", config={"max_new_tokens": 3})):
        with pytest.raises(ConfigError, match=r"config must be a GenerationConfig or None, got (dict|str)"):
            call()


def test_sampled_session_equals_seeded_stateless_chat():
    gen, _ = make()
    session = gen.chat_session(config=GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, seed=4))
    for question in QUESTIONS[:4]:
        out = session.send(question)
        want = gen.chat(session.messages[:-1], GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5,
                                                                seed=4))
        assert out.token_ids == want.token_ids
    assert np.mean([t.kind == "cached" for t in session.turns[1:]]) == 1.0


@pytest.mark.parametrize("name", ["mixtral-window", "mistral-nowindow"])
def test_session_on_an_exported_model_equals_stateless_chat(exported, name):
    """The onnxruntime cache (compacted window of 5, or linear) kept across turns gives what a fresh prefill
    of the whole history gives, with the real v1 format and tokenizer."""
    _, art = exported[name]
    gen = Generator.load(art, threads=2)
    session = gen.chat_session(system="Answer briefly.", config=GenerationConfig(max_new_tokens=5))
    for question in QUESTIONS[:5]:
        out = session.send(question)
        assert out.token_ids == gen.chat(session.messages[:-1], max_new_tokens=5).token_ids
    assert session.turns[-1].prompt_tokens > 8 * 5  # far past the window
    kinds = [t.kind for t in session.turns]
    assert kinds.count("cached") >= 1  # random weights: some replies re-tokenize
    if name == "mistral-nowindow":  # the cache holds every position: a reply that re-tokenizes keeps the prefix
        assert "mismatch" not in kinds


@pytest.mark.parametrize("file, keeps_with_system", [
    ("tokenizer.model.v1", True), ("mistral_instruct_tokenizer_240323.model.v3", False),
    ("mistral_instruct_tokenizer_241114.model.v7", True), ("tekken_240718.json", False),
])
def test_which_mistral_formats_keep_the_cache(file, keeps_with_system):
    """What README and DESIGN say: a reply closed by EOS is a prefix of the next turn's ids in v1 and v7;
    v3 and tekken v3 move the system prompt to the last user message, so with one every turn starts anew."""
    from pathlib import Path

    mistral_common = pytest.importorskip("mistral_common")
    from mixtrt.runtime.chat_format import ChatFormat, load_chat_tokenizer

    path = Path(mistral_common.__file__).parent / "data" / file
    kind = "v1" if file.endswith(".v1") else "mistral-common"
    tok = load_chat_tokenizer(path.parent, ChatFormat(kind, path.name, {}))
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
        keeps = []
        for n in range(3):
            held = tok.apply_chat_template(messages) + tok.encode("Sure, here it is.", bos=False) + [tok.eos_id]
            messages += [{"role": "assistant", "content": "Sure, here it is."}, {"role": "user", "content": f"{n}?"}]
            keeps.append(tok.apply_chat_template(messages)[:len(held)] == held)
        assert keeps == [keeps_with_system or system is None] * 3, system
