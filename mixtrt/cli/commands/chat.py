"""`mixtrt chat`: an interactive multi-turn chat on stdin/stdout, in the checkpoint's chat format.

One chat session (runtime/chat_session.py): the KV cache is kept between turns, so a turn prefills only
its new tokens. A message the model cannot take is refused with one line and the chat goes on; a
conversation that outgrows the model starts a new context with the system prompt, said in one line;
Ctrl-C during a reply stops that reply (the turn is dropped) and the chat goes on. A line that is one of
llama-cli's commands (COMMANDS) is that command, not a message.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtrt.cli.options import (
    _FLAGS,
    add_sampling,
    generation_config,
    generation_overrides,
    load_generator,
    path,
    print_stream,
    stats_line,
)

if TYPE_CHECKING:
    from mixtrt.runtime.chat_session import ChatSession


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--system", default=None, help="system prompt (placed where the chat format puts it)")
    p.add_argument("--stats", action="store_true", help="print speed and the tokens prefilled after each answer")
    add_sampling(p)


# llama-cli's commands: a line that is one of them (/read with its argument) is the command, not a message
COMMANDS = {"/exit": "end the chat (as an empty line or Ctrl-D)",
            "/clear": "forget the conversation (the system prompt stays)",
            "/regen": "drop the last reply and answer its message again",
            "/read FILE": "put a UTF-8 text file's text in front of the next message",
            "/help": "list these commands"}


def run(ns: argparse.Namespace) -> int:
    from mixtrt.runtime.errors import ConfigError

    overrides = generation_overrides(ns)
    gen = load_generator(ns)
    session = gen.chat_session(system=ns.system, config=generation_config(gen, overrides))
    read: list[str] = []  # texts of /read, put in front of the next message
    regens = 0  # /regen of the last message so far: a seeded session's k-th draws with seed + k
    if sys.stdin.isatty():  # line editing and history at the prompt, as llama-cli has (arrow keys were raw escapes)
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() uses it once imported)
    while True:
        try:
            user = _message()
        except EOFError:
            print()
            return 0
        if not user.strip():
            return 0
        message: str | dict[str, Any] = "\n\n".join([*read, user])
        before = session.messages
        command, argument = _command_of(user)
        if command == "/exit":
            return 0
        if command:
            try:
                if command != "/regen":
                    _command(session, command, argument, read)
                    continue
                message = session.undo()
            except ConfigError as e:
                said = str(e)
                said = said if said.startswith(command) else f"{command}: {said.removeprefix('chat session: ')}"
                print(f"mixtrt chat: {said}", file=sys.stderr)
                continue
        regens = regens + 1 if command == "/regen" else 0
        seed = session.config.seed
        try:  # a /regen draws again: a seeded session's k-th one with seed + k (the same seed gave the same reply)
            events = session.stream(message, **({"seed": (seed + regens) % (1 << 64)} if regens and seed is not None
                                                 else {}))
        except ConfigError as e:  # the message is refused; the conversation is kept (an undone exchange too)
            session.messages = before
            dropped = ""
            if read and not command:  # what /read put in front of it was refused with it: the next starts without it
                dropped = f"; the /read text ({sum(map(len, read))} characters) goes with it"
                read.clear()
            print(f"mixtrt chat: {str(e).removeprefix('chat: ')}{dropped}", file=sys.stderr)
            continue
        if command != "/regen":
            read.clear()
        turn = session.turns[-1]
        if turn.kind == "restart":
            print(f"mixtrt chat: {turn.note}", file=sys.stderr)
        sys.stdout.write("model> ")
        try:
            out = print_stream(events, started=True)
        except KeyboardInterrupt:
            events.close()  # cancels the turn: the conversation stays as it was (print_stream ended its line)
            session.messages = before  # a /regen's undone exchange too: its new reply did not come
            print("mixtrt chat: reply interrupted; the turn is dropped", file=sys.stderr)
            continue
        # a length end short of --max-new-tokens: the context ended it (said; only --stats showed it)
        by_context = out.finish_reason == "length" and len(out.token_ids) < session.config.max_new_tokens
        if not out.text:
            session.messages = before  # as above (the session drops an empty reply with its message)
            print(f"mixtrt chat: {session.turns[-1].note}", file=sys.stderr)
        elif out.finish_reason != "eos" and (constraint := session.config.constraint()) is not None and (
                out.finish_reason != "length" or not out.constraint_complete):  # a text already whole was not cut
            cut = "the end of the context" if by_context else \
                "--max-new-tokens" if out.finish_reason == "length" else "a stop string"
            print(f"mixtrt chat: the reply was cut by {cut} before its text was complete ({_FLAGS[constraint[0]]})",
                  file=sys.stderr)
        elif by_context:
            print(f"mixtrt chat: the reply was cut: {out.finish_message}", file=sys.stderr)
        if ns.stats:
            if turn.kind in ("cached", "rewound"):
                cache = f"{turn.cached_tokens} from the cache"
                what = ("the new message, the template's tokens around it and the last reply's final token"
                        if turn.kind == "cached" else "from where the conversation leaves the cached reply")
            else:
                cache, what = f"new context: {turn.kind}", "the whole conversation"
            conversation = (f"conversation {turn.prompt_tokens} tokens: {turn.prefilled_tokens} prefilled ({what}), "
                            f"{cache}")
            print(stats_line(out, prompt=conversation), file=sys.stderr)


def _command_of(line: str) -> tuple[str, str]:
    """(command, argument) where the line is one of COMMANDS, else ("", "") (a message: "/help me with this" too;
    only /read takes an argument)."""
    command, _, argument = line.strip().partition(" ")
    if command not in {name.split()[0] for name in COMMANDS} or (argument and command != "/read"):
        return "", ""
    return command, argument.strip()


def _command(session: ChatSession, command: str, argument: str, read: list[str]) -> None:
    """/clear, /help or /read FILE (said on stderr; a bad argument is a ConfigError)."""
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.prompts import read_text_file

    if command == "/help":
        for name, what in COMMANDS.items():
            print(f"  {name:<11} {what}", file=sys.stderr)
    elif command == "/clear":
        session.reset()
        read.clear()
        print("mixtrt chat: the conversation is cleared", file=sys.stderr)
    else:
        if not argument:
            raise ConfigError("give a file: /read FILE")
        text = read_text_file(Path(argument).expanduser(), "/read").rstrip("\n")
        if not text.strip():  # nothing to put in front (it added blank lines to the message)
            print(f"mixtrt chat: {argument} holds no text: nothing goes in front of the next message", file=sys.stderr)
            return
        read.append(text)
        print(f"mixtrt chat: {argument} ({len(text)} characters) goes in front of the next message", file=sys.stderr)


def _message() -> str:
    """The next message: one line, or several where a line ends with a backslash (llama-cli's multi-line input:
    the backslash goes, the line break stays). A line ended by CRLF (a transcript saved on Windows) is the same as
    with LF. EOFError at the end of input (a message cut by it is dropped, as an unfinished line is)."""
    lines: list[str] = []
    prompt = "you> "
    while True:
        try:
            line = input(prompt).removesuffix("\r")
        except KeyboardInterrupt:  # Ctrl-C at the prompt: its line ends before "interrupted" (stderr) is said
            print()
            raise
        if not sys.stdin.isatty():  # a terminal echoes the line; fed by a pipe, the transcript shows it so
            print(_shown(line))
        if not line.endswith("\\"):
            return "\n".join([*lines, line])
        lines.append(line[:-1])
        prompt = "...> "


def _shown(line: str) -> str:
    """A line read from stdin as it can be written back: bytes that were not UTF-8 as U+FFFD."""
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return line.encode("utf-8", "replace").decode("utf-8")
