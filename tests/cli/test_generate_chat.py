"""`mixtrt generate` and `mixtrt chat` run as subprocesses on a real exported artifact."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mixtrt.export import export_onnx
from mixtrt.runtime.generation import GenerationConfig, Generator
from tests.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    ck = make_checkpoint(root / "ck", "mistral", sliding_window=6, max_position_embeddings=128)
    return export_onnx(ck, root / "art", progress=None)


@pytest.fixture(scope="module")
def generator(artifact) -> Generator:
    return Generator.load(artifact, threads=1)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mixtrt", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def test_generate_json_equals_generator_greedy(artifact, generator):
    r = cli("generate", str(artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    [want] = generator.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=5, return_logprobs=True),
                                continuation=True)  # the CLI's text continues the prompt's
    assert out["token_ids"] == want.token_ids and len(out["token_ids"]) == 5  # generated ids only
    assert out["text"] == want.text
    assert out["finish_reason"] == "length" and out["finish_message"] == "max_new_tokens=5 reached"
    assert out["stats"]["prompt_tokens"] == 3 and out["stats"]["generated_tokens"] == 5
    assert out["stats"]["time_to_first_token_s"] > 0
    assert out["logprobs"] == pytest.approx(want.logprobs.tolist(), abs=1e-5)


def test_generate_json_interrupted_prints_what_was_generated(artifact, generator, monkeypatch, capsys):
    """Ctrl-C during `generate --json`: one JSON object with the tokens made so far and finish_reason "interrupted"
    (it printed nothing, losing them), then exit 130."""
    import mixtrt.cli.commands.generate as generate_command
    from mixtrt.cli import main

    stream = generator.stream

    def cut(*args, **kw):
        for i, event in enumerate(stream(*args, **kw)):
            if i == 3:
                raise KeyboardInterrupt
            yield event

    monkeypatch.setattr(generate_command, "load_generator", lambda ns: generator)
    monkeypatch.setattr(generator, "stream", cut)
    assert main(["generate", str(artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "50", "--json"]) == 130
    out = json.loads(capsys.readouterr().out)
    [want] = generator.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=3), continuation=True)
    assert out["token_ids"] == want.token_ids and out["text"] == want.text and out["finish_reason"] == "interrupted"
    assert out["stats"] is None and "after 3 tokens" in out["finish_message"]


def test_generate_prompt_streams_text(artifact, generator):
    prompt = "The capital of France is"
    r = cli("generate", str(artifact), "--prompt", prompt, "--max-new-tokens", "6", "--threads", "1")
    assert r.returncode == 0, r.stderr
    [want] = generator.generate(prompt, max_new_tokens=6)
    assert want.text
    # the screen shows prompt + continuation with the space that decode drops from a text's first word
    space = " " if generator.tokenizer.id_to_piece(want.token_ids[0]).startswith("\u2581") else ""
    assert r.stdout == prompt + space + want.text + "\n"
    assert "6 generated" in r.stderr and "finish: length" in r.stderr


def test_generate_prompt_file_and_stdin_equal_the_prompt(artifact, generator, tmp_path):
    """--prompt-file FILE / - reads the prompt (one final line end dropped, as llama.cpp's --file; a leading UTF-8
    byte-order mark too); a text with line breaks inside keeps them."""
    prompt = "The capital of France is"
    base = ("generate", str(artifact), "--max-new-tokens", "4", "--threads", "1", "--json")
    want = json.loads(cli(*base, "--prompt", prompt).stdout)["token_ids"]
    (tmp_path / "p.txt").write_bytes(("\ufeff" + prompt + "\r\n").encode())
    for r in (cli(*base, "--prompt-file", str(tmp_path / "p.txt")), cli(*base, "-f", "-", stdin=prompt + "\n")):
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["token_ids"] == want
    two = "Line one\nLine two"
    [lines] = generator.generate(two, max_new_tokens=4)
    r = cli(*base, "-f", "-", stdin=two + "\n")
    assert json.loads(r.stdout)["token_ids"] == lines.token_ids


def test_sampling_with_seed_is_reproducible(artifact):
    args = ("generate", str(artifact), "--prompt-ids", "1,415,5565", "--max-new-tokens", "8", "--json",
            "--threads", "1", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95")
    a, b = cli(*args, "--seed", "7"), cli(*args, "--seed", "7")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    ids_a, ids_b = json.loads(a.stdout)["token_ids"], json.loads(b.stdout)["token_ids"]
    assert ids_a == ids_b and len(ids_a) == 8
    other = json.loads(cli(*args, "--seed", "8").stdout)["token_ids"]
    assert other != ids_a  # the seed matters (8 draws at temperature 1.5 from 50 candidates)


@pytest.mark.parametrize("argv, want", [
    ([], {}),
    (["--temperature", "0.7"], {"temperature": 0.7, "do_sample": True}),
    (["--top-p", "0.9", "--seed", "3"], {"top_p": 0.9, "seed": 3, "do_sample": True}),
    (["--temperature", "0", "--top-k", "5"], {"top_k": 5, "do_sample": False}),  # --temperature 0: greedy
    (["--max-new-tokens", "9", "--stop", "\n", "--repetition-penalty", "1.1"],
     {"max_new_tokens": 9, "stop_strings": ("\n",), "repetition_penalty": 1.1}),
    (["--min-p", "0.05", "--min-new-tokens", "4"], {"min_p": 0.05, "min_new_tokens": 4, "do_sample": True}),
    (["--presence-penalty", "0.5", "--frequency-penalty", "-0.25"],
     {"presence_penalty": 0.5, "frequency_penalty": -0.25}),
    (["--logit-bias", "5=-100", "--logit-bias", "7=2.5"], {"logit_bias": ((5, -100.0), (7, 2.5))}),
])
def test_options_given_override_the_artifact_defaults(argv, want):
    """Only what is given on the command line overrides the artifact's defaults (generation_config.json)."""
    import argparse

    from mixtrt.cli.options import add_sampling, generation_overrides

    p = argparse.ArgumentParser()
    add_sampling(p)
    assert generation_overrides(p.parse_args(argv)) == want


@pytest.mark.parametrize("option, pattern", [
    (("--top-p", "1.5"), r"top[-_]p"),
    (("--temperature", "-1"), r"temperature"),
    (("--max-new-tokens", "0"), r"max[-_]new[-_]tokens"),
    (("--repetition-penalty", "0"), r"repetition[-_]penalty"),
    (("--min-p", "1.5"), r"--min-p must be in \[0, 1\]"),
    (("--min-new-tokens", "-1"), r"--min-new-tokens must be an integer >= 0"),
    (("--frequency-penalty", "3"), r"--frequency-penalty must be in \[-2, 2\]"),
    (("--logit-bias", "5=200"), r"--logit-bias 5 must be a number in \[-100, 100\]"),
    (("--logit-bias", "5"), r"--logit-bias '5' is not ID=BIAS"),
    (("--logit-bias", "99999=1"), r"--logit-bias token ids \[99999\] outside the vocabulary"),  # checked at load
])
def test_invalid_option_exits_2_with_one_line(artifact, option, pattern):
    r = cli("generate", str(artifact), "--prompt-ids", "1,2,3", *option)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("mixtrt generate: error:") and re.search(pattern, lines[0])


def test_bad_prompt_ids_exit_2(artifact):
    r = cli("generate", str(artifact), "--prompt-ids", "1,x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--prompt-ids" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_prompt_ids_parse():
    """Commas, spaces or both separate ids; an empty place ("1,,2", a trailing comma) is an id left out: refused."""
    from mixtrt.cli.commands.generate import parse_ids
    from mixtrt.runtime.errors import ConfigError

    assert parse_ids("1,2,3") == parse_ids("1, 2, 3") == parse_ids(" 1 2  3 ") == [1, 2, 3]
    for text, words in (("1,,2", "empty id"), ("1,2,", "empty id"), ("", "no token ids"), ("1;2", "integers")):
        with pytest.raises(ConfigError, match=words):
            parse_ids(text)


def test_non_artifact_dir_exits_2(tmp_path):
    r = cli("generate", str(tmp_path), "--prompt-ids", "1,2,3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert str(tmp_path) in line and "not an artifact directory" in line and "mixtrt export" in line


def test_chat_keeps_its_cache_and_refuses_a_message_too_long(artifact, generator):
    """Three turns from stdin, the second one far too long for the model (128 positions): refused in one
    line, the chat goes on, and the replies are what stateless chat gives on the history."""
    too_long = " ".join(["word"] * 200)
    r = cli("chat", str(artifact), "--max-new-tokens", "4", "--threads", "1", "--stats",
            stdin=f"hello\n{too_long}\nmore\r\n\r\n")  # the last lines with Windows' line ends: the same
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # three messages, then the empty line ends the session; fed by a pipe, each line is echoed after its prompt
    turns = r.stdout.split("you> ")
    assert len(turns) == 5 and turns[0] == "" and turns[2] == too_long + "\n" and turns[4] == "\n"
    assert turns[1].startswith("hello\nmodel> ") and turns[3].startswith("more\nmodel> ")
    answers = [t.split("\nmodel> ", 1)[1][:-1] for t in (turns[1], turns[3])]
    cfg = GenerationConfig(max_new_tokens=4)
    first = generator.chat([{"role": "user", "content": "hello"}], cfg)
    assert answers[0] == first.text
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "more"}]
    assert answers[1] == generator.chat(history, cfg).text
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("mixtrt chat: the message is too long: ")
    assert "prefilled" in lines[0] and "new context: new" in lines[0]
    n_first = len(generator.tokenizer.apply_chat_template(history[:1]))
    ids = generator.tokenizer.apply_chat_template(history)
    held = n_first + len(first.token_ids) - 1  # the last generated token is fed with the new ones
    assert lines[2].startswith(f"[conversation {len(ids)} tokens: {len(ids) - held} prefilled (")
    assert f"{held} from the cache, 4 generated" in lines[2]


def test_chat_command_keeps_the_session_through_restarts_and_ctrl_c(monkeypatch, capsys):
    """`mixtrt chat` in process on the toy model (linear cache of 60): a restart is one line, Ctrl-C during a
    reply drops that turn only, an empty line ends with 0."""
    import mixtrt.cli.commands.chat as chat_command
    from mixtrt.cli import main
    from tests.runtime.test_chat_session import QUESTIONS, ByteChat, Speaker

    gen = Generator(Speaker(windowed=False, capacity=60), ByteChat())
    monkeypatch.setattr(chat_command, "load_generator", lambda ns: gen)
    lines, said = iter([*QUESTIONS[:4], "stop me", "ok", ""]), []
    monkeypatch.setattr("builtins.input", lambda prompt: said.append(next(lines)) or said[-1])
    real = chat_command.print_stream

    def print_stream(events, **kw):
        if said[-1] == "stop me":
            next(events)
            raise KeyboardInterrupt
        return real(events, **kw)

    sessions = []
    make_session = gen.chat_session
    monkeypatch.setattr(gen, "chat_session", lambda **kw: sessions.append(make_session(**kw)) or sessions[-1])
    monkeypatch.setattr(chat_command, "print_stream", print_stream)
    assert main(["chat", "unused", "--max-new-tokens", "5", "--system", "sys"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("a new context with the system prompt" in line for line in err)
    assert "mixtrt chat: reply interrupted; the turn is dropped" in err
    session = sessions[0]
    assert [m["content"] for m in session.messages if m["role"] == "user"][-1] == "ok"
    assert "stop me" not in [m["content"] for m in session.messages]


def test_generate_continuation_text(generator):
    """continuation=True: the text continues the prompt's (prompt + text == decode(prompt + generated ids), a
    first word's space kept), the same ids as without it, whose text is the decode of the generated ids alone."""
    tok = generator.tokenizer
    spaced = 0
    for prompt in ("The capital of France is", "Once upon a"):
        [plain] = generator.generate([prompt], max_new_tokens=6, do_sample=False)
        [cont] = generator.generate([prompt], max_new_tokens=6, do_sample=False, continuation=True)
        assert cont.token_ids == plain.token_ids and plain.text == tok.decode(plain.token_ids)
        spaced += cont.text == " " + plain.text
        assert prompt + cont.text == tok.decode(tok.encode(prompt) + cont.token_ids)
        events = generator.stream(prompt, max_new_tokens=6, do_sample=False, continuation=True)
        assert "".join(e.text for e in events) == cont.text
    assert spaced, "no prompt's first generated piece started a word: the test shows nothing"


def test_stop_strings_match_the_text_continuing_the_prompt_in_both_modes(generator):
    """A stop string is matched on the text that continues the prompt (as transformers' stop criteria and vLLM
    see it): " word" stops a first piece "▁word" whether or not the row's text continues the prompt, and the ids
    are the same in both modes; a new message's text still drops that first space; a streamed text equals it."""
    tok = generator.tokenizer
    for prompt in ("The capital of France is", "Once upon a", "Hello"):
        [cont] = generator.generate([prompt], max_new_tokens=6, do_sample=False, continuation=True)
        if cont.text.startswith(" ") and len(cont.text.strip()) >= 2:
            break
    else:
        pytest.fail("no prompt's first generated piece started a word: the test shows nothing")
    first = tok.decode(tok.encode(prompt) + cont.token_ids[:1])[len(prompt):]  # " word"
    stop = first[:2]  # a space and the word's first character
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=(), stop_strings=(stop,))
    [a] = generator.generate([prompt], cfg, continuation=True)
    [b] = generator.generate([prompt], cfg)
    events = list(generator.stream(prompt, cfg))
    assert a.finish_reason == b.finish_reason == "stop" and a.token_ids == b.token_ids == cont.token_ids[:1]
    assert a.text == b.text == "" and "".join(e.text for e in events) == "" and events[-1].output.token_ids == [
        cont.token_ids[0]]
    # a stop string later in the text: a new message's text is the continuation's less its first space
    later = cont.text[2:5]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=(), stop_strings=(later,))
    [a] = generator.generate([prompt], cfg, continuation=True)
    [b] = generator.generate([prompt], cfg)
    assert a.token_ids == b.token_ids and a.text == " " + b.text == cont.text[:cont.text.index(later)]
    assert "".join(e.text for e in generator.stream(prompt, cfg)) == b.text


def test_an_interrupted_stream_ends_its_line(monkeypatch, capsys):
    """Ctrl-C while text streams: the line on stdout is ended before the interrupt goes on (a file or a pipe gets
    whole lines), and nothing is added where nothing was written."""
    from mixtrt.cli.options import print_stream

    def events(texts):
        for text in texts:
            yield types.SimpleNamespace(text=text, output=None)
        raise KeyboardInterrupt

    for texts, before, started, want in ((["t0", "t1"], "It", False, "Itt0t1\n"), ([], "It", False, ""),
                                         ([], "", True, "\n"), ([""], "", False, ""), ([""], "It", False, "It\n")):
        with pytest.raises(KeyboardInterrupt):
            print_stream(events(texts), before=before, started=started)
        assert capsys.readouterr().out == want


def test_ctrl_c_at_the_chat_prompt_ends_its_line(monkeypatch, capsys):
    """Ctrl-C while `mixtrt chat` waits for a message: the prompt's line is ended, so "interrupted" (stderr) is not
    written after "you> " on a terminal; exit 130."""
    import mixtrt.cli.commands.chat as chat_command
    from mixtrt.cli import main
    from tests.runtime.test_chat_session import ByteChat, Speaker

    monkeypatch.setattr(chat_command, "load_generator", lambda ns: Generator(Speaker(windowed=False), ByteChat()))

    def interrupted(prompt):
        print(prompt, end="")
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert main(["chat", "unused"]) == 130
    captured = capsys.readouterr()
    assert captured.out.endswith("you> \n") and captured.err.strip().splitlines()[-1] == "interrupted"


def test_chat_command_takes_llama_clis_commands(monkeypatch, capsys, tmp_path):
    """/regen answers the last message again (the conversation keeps one exchange of it), /read FILE puts the file's
    text in front of the next message, /clear forgets the conversation, /help lists them, /exit ends the chat; a
    command that cannot be done is one line on stderr and the chat goes on."""
    import mixtrt.cli.commands.chat as chat_command
    from mixtrt.cli import main
    from tests.runtime.test_chat_session import ByteChat, Speaker

    gen = Generator(Speaker(windowed=False, capacity=400), ByteChat())
    monkeypatch.setattr(chat_command, "load_generator", lambda ns: gen)
    sessions = []
    make_session = gen.chat_session
    monkeypatch.setattr(gen, "chat_session", lambda **kw: sessions.append(make_session(**kw)) or sessions[-1])
    (tmp_path / "note.txt").write_text("five daughters\n")
    feed = iter(["/regen", "first", "/regen", f"/read {tmp_path / 'note.txt'}", "/read", "/read /no/such/file",
                 "second", "/help", "/exit", "never sent"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(feed))
    assert main(["chat", "unused", "--max-new-tokens", "3", "--seed", "1", "--temperature", "1"]) == 0
    [session] = sessions
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["first", "five daughters\n\nsecond"]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert len(session.turns) == 3 and session.turns[1].kind != "new"  # the regen kept the cache before it
    out, err = capsys.readouterr()
    assert out.count("model> ") == 3 and "never sent" not in out + err
    assert "/regen: no exchange to undo" in err and "/read: give a file" in err
    assert "/read /no/such/file: no such" in err
    assert all(name.split()[0] in err for name in chat_command.COMMANDS)  # /help
    feed = iter(["hello", "/clear", "again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(feed))
    assert main(["chat", "unused", "--max-new-tokens", "3"]) == 0
    assert [m["content"] for m in sessions[-1].messages if m["role"] == "user"] == ["again"]
    assert "the conversation is cleared" in capsys.readouterr().err
    # a command is a whole line (only /read takes an argument): anything else is a message
    assert chat_command._command_of("  /read  a b.txt ") == ("/read", "a b.txt")
    assert chat_command._command_of("/regen") == ("/regen", "") and chat_command._command_of("/exit ") == ("/exit", "")
    for message in ("/help me with this", "/regen please", "/clearly", "hello /clear", "/"):
        assert chat_command._command_of(message) == ("", ""), message


def test_a_regen_whose_reply_is_interrupted_keeps_the_exchange(monkeypatch, capsys):
    """/regen undoes the last exchange and answers its message again; when Ctrl-C cuts that reply, the undone
    exchange comes back (it was lost: the turn ended with the conversation as after the undo)."""
    import mixtrt.cli.commands.chat as chat_command
    from mixtrt.cli import main
    from tests.runtime.test_chat_session import ByteChat, Speaker

    gen = Generator(Speaker(windowed=False, capacity=400), ByteChat())
    monkeypatch.setattr(chat_command, "load_generator", lambda ns: gen)
    sessions = []
    make_session = gen.chat_session
    monkeypatch.setattr(gen, "chat_session", lambda **kw: sessions.append(make_session(**kw)) or sessions[-1])
    shown = chat_command.print_stream
    calls = []

    def cut_second(events, **kw):
        calls.append(1)
        if len(calls) == 2:
            next(iter(events))
            raise KeyboardInterrupt
        return shown(events, **kw)

    monkeypatch.setattr(chat_command, "print_stream", cut_second)
    feed = iter(["first", "/regen", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(feed))
    assert main(["chat", "unused", "--max-new-tokens", "3"]) == 0
    [session] = sessions
    assert [m["role"] for m in session.messages] == ["user", "assistant"] and session.messages[0]["content"] == "first"
    assert "reply interrupted" in capsys.readouterr().err


def test_chat_command_takes_a_multi_line_message(monkeypatch, capsys):
    """A line ending with a backslash continues the message on the next line (llama-cli's multi-line input): one
    message with its line breaks, one reply; input ending inside such a message drops it."""
    import mixtrt.cli.commands.chat as chat_command
    from mixtrt.cli import main
    from tests.runtime.test_chat_session import ByteChat, Speaker

    gen = Generator(Speaker(windowed=False, capacity=200), ByteChat())
    monkeypatch.setattr(chat_command, "load_generator", lambda ns: gen)
    sessions = []
    make_session = gen.chat_session
    monkeypatch.setattr(gen, "chat_session", lambda **kw: sessions.append(make_session(**kw)) or sessions[-1])
    for lines, want in ((["first \\", "second\\", "\\", "end", "third", ""], ["first \nsecond\n\nend", "third"]),
                        (["hi", "cut \\"], ["hi"])):
        feed = iter(lines)

        def read(prompt, feed=feed):
            try:
                return next(feed)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", read)
        assert main(["chat", "unused", "--max-new-tokens", "3"]) == 0
        assert [m["content"] for m in sessions[-1].messages if m["role"] == "user"] == want
        assert capsys.readouterr().out.count("model> ") == len(want)


def test_a_default_no_flag_set_is_named_as_the_artifacts():
    """Sampling asked for by --top-k where the artifact's generation defaults have temperature 0: the error names
    the defaults and the flag that sets it (it blamed --temperature, which was never given)."""
    import argparse

    from mixtrt.cli.options import add_sampling, generation_config, generation_overrides
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.generation import GenerationConfig

    class Defaults:  # what Generator.config does: the artifact's defaults, then the overrides
        def config(self, **overrides):
            return GenerationConfig(**{"temperature": 0.0, "do_sample": False, **overrides})

    p = argparse.ArgumentParser()
    add_sampling(p)
    with pytest.raises(ConfigError, match=r"^the artifact's generation defaults \(generation_config\.json\): "
                                          r"temperature .*; pass --temperature to set it$"):
        generation_config(Defaults(), generation_overrides(p.parse_args(["--top-k", "5"])))
    with pytest.raises(ConfigError, match=r"^--temperature must be > 0"):  # given: named by its flag, as before
        generation_config(Defaults(), {"temperature": -1.0, "do_sample": True})
    assert generation_config(Defaults(), generation_overrides(p.parse_args(["--top-k", "5", "--temperature", "0.7"])))


def test_chat_command_read_regen_and_the_end_of_the_context(monkeypatch, capsys, tmp_path):
    """/read of a text too long for the context goes with the refused message (every later message was refused
    with it, only /clear got out); /read of an empty file puts nothing in front; a seeded session's /regen draws a
    new reply each time (the same seed gave the same one); a reply the context ends is said (only --stats did)."""
    import mixtrt.cli.commands.chat as chat_command
    from mixtrt.cli import main
    from tests.runtime.test_chat_session import ByteChat, Speaker

    gen = Generator(Speaker(windowed=False, capacity=120), ByteChat())
    monkeypatch.setattr(chat_command, "load_generator", lambda ns: gen)
    sessions = []
    make_session = gen.chat_session
    monkeypatch.setattr(gen, "chat_session", lambda **kw: sessions.append(make_session(**kw)) or sessions[-1])
    (tmp_path / "big.txt").write_text("a" * 500)
    (tmp_path / "empty.txt").write_text("\n")
    feed = iter([f"/read {tmp_path / 'big.txt'}", "hi", "hi", f"/read {tmp_path / 'empty.txt'}", "ho", "/regen",
                 "/regen", "/regen", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(feed))
    outputs = []
    real = chat_command.print_stream

    def kept(events, **kw):
        outputs.append(real(events, **kw))
        return outputs[-1]

    monkeypatch.setattr(chat_command, "print_stream", kept)
    assert main(["chat", "unused", "--max-new-tokens", "8", "--seed", "5", "--temperature", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("too long") == 1 and "the /read text (500 characters) goes with it" in err, err
    assert "holds no text: nothing goes in front" in err
    [session] = sessions
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hi", "ho"]
    draws = [o.token_ids for o in outputs[1:]]  # "ho" and its three /regen draws
    assert len(draws) == 4 and len({tuple(d) for d in draws}) == 4, draws
    # a reply the context ended (finish "length" short of --max-new-tokens) is one line on stderr
    cut = types.SimpleNamespace(text="ab", token_ids=[5, 6], finish_reason="length",
                                finish_message="max positions: the model supports 120 positions",
                                constraint_complete=None)
    monkeypatch.setattr(chat_command, "print_stream", lambda events, **kw: events.close() or cut)
    feed = iter(["x", ""])
    assert main(["chat", "unused", "--max-new-tokens", "50"]) == 0
    assert "mixtrt chat: the reply was cut: max positions: the model supports 120 positions" in \
        capsys.readouterr().err
