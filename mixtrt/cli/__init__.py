"""The `mixtrt` command line: a thin layer over the package's functions, one module per command.

    mixtrt --help                   mixtrt COMMAND --help           python -m mixtrt COMMAND ...

Errors a user can act on (mixtrt's own, OS errors, a missing extra, a bad argument) print one line and
exit 2; mixtrt's warnings (a substituted tokenizer) print one line and the command goes on; an interrupted
command exits 130, a terminated one (SIGTERM/SIGHUP while writing an artifact) 128 + the signal; a closed
stdout (`mixtrt generate ... | head`) ends quietly with 141, as other tools killed by SIGPIPE do. Anything
else is a bug and keeps its traceback. Text arguments and stdin are read with Python's surrogateescape, so
invalid UTF-8 reaches the checks that name it instead of failing here.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import io
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from mixtrt import __version__
from mixtrt.cli.registry import COMMANDS


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (the usage is one `--help` away), exit 2 as before."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mixtrt",
        description="Export Mistral / Mixtral checkpoints to ONNX and TensorRT and generate text from them.",
    )
    parser.add_argument("--version", action="version", version=f"mixtrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        # no abbreviations: `--temp 0` is not silently taken for --temperature (nor a typo for another flag)
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, allow_abbrev=False)
        importlib.import_module(cmd.module).add_arguments(p)
    parser.set_defaults(_subparsers=sub.choices)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, with an unknown option named by the command it was given to (`mixtrt perplexity: error:
    unrecognized arguments: --x`), as its other errors are."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    commands = parser.get_default("_subparsers") or {}
    target = commands.get(command)
    asks = {"-h", "--help", "--version"}.intersection(args[:args.index(command)] if command is not None else args)
    if command is not None and target is None and not asks:  # a misspelt command: named with the closest one
        close = difflib.get_close_matches(command, sorted(commands), n=1)
        parser.error(f"invalid command {command!r}" + (f" (did you mean {close[0]}?)" if close else
                                                       f" (choose from {', '.join(commands)})"))
    if command is not None and target is not None:  # an unknown option is named before argparse reports a
        # required one as missing
        known = target._option_string_actions
        rest = args[args.index(command) + 1:]
        for i, arg in enumerate(rest):
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if not name.startswith("-") or name == "-" or " " in name or name in known or _NUMBER.match(arg):
                continue  # a positional, stdin, a value (with a space), a known option, a negative number
            short = known.get(name[:2]) if not name.startswith("--") else None
            if short is not None and short.nargs != 0:
                continue  # a short option with its value attached (-fprompt.txt, -r3)
            before = known.get(rest[i - 1]) if i else None
            if before is not None and before.nargs != 0:  # the value of the option before it, refused by argparse
                target.error(f"{rest[i - 1]} expects a value; one that starts with '-' is written "
                             f"{rest[i - 1]}={arg}")
            habit = next((h for h in _HABITS.get(name, ()) if h in known or not h.startswith("-")), None)
            if habit is not None:  # an option this command has, or why there is none
                target.error(f"unrecognized arguments: {name}"
                             + (f" (did you mean {habit}?)" if habit.startswith("-") else f" ({habit})"))
            options = sorted(o for o in known if o.startswith("--"))
            close = ([k for k in options if k.startswith(name)][:3] or difflib.get_close_matches(name, options, n=1)
                     if name.startswith("--") else [])  # a one-letter option is too short to guess from
            target.error(f"unrecognized arguments: {name}"
                         + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    ns, rest = parser.parse_known_args(argv)
    if rest:
        command = getattr(ns, "command", None)
        target = ns._subparsers.get(command, parser) if command else parser
        target.error(f"unrecognized arguments: {' '.join(rest)}")
    return ns


# options that llama.cpp's and vLLM's users type by habit, and what mixtrt calls them (or why there is none)
_HABITS = {"-p": ("--prompt", "--prompt-tokens"), "-n": ("--max-new-tokens", "--new-tokens"),  # llama-bench's too
           "--n-predict": ("--max-new-tokens",), "--max-tokens": ("--max-new-tokens",), "-t": ("--threads",),
           "-s": ("--seed",), "--temp": ("--temperature",), "-r": ("--repetitions",),
           "-m": ("the artifact is the first argument, not an option",), "--model": ("the artifact is the first "
           "argument, not an option",), "-c": ("the context is chosen at export: mixtrt export --max-context",),
           "--ctx-size": ("the context is chosen at export: mixtrt export --max-context",)}
_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # what argparse takes for a negative number, not an option


def main(argv: Sequence[str] | None = None) -> int:
    """The `mixtrt` command: its exit code. Run as the program (argv None, the process's own arguments), a Ctrl-C
    after the command is done is ignored: the second or so the interpreter takes to exit (torch's teardown after
    an export) would turn a written artifact's 0 into 130 (a stall in that exit then takes SIGTERM or Ctrl-\\)."""
    code = _main(argv)
    if argv is None:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: no handler to change
            pass
    return code


def _main(argv: Sequence[str] | None) -> int:
    from mixtrt.runtime.errors import MixtrtError, Terminated
    from mixtrt.runtime.extras import require

    # started with stdin or stderr closed (`<&-`, `2>&-`): Python leaves them None, and print(file=None) would put
    # diagnostics on stdout among the results; closed stdin reads as empty
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    parser = build_parser()
    ns = _parse(parser, argv)
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    if ns.command is None:
        parser.print_help()
        return 0
    cmd = next(c for c in COMMANDS if c.name == ns.command)
    if sys.stdout is None:  # started with stdout closed (`>&-`): every command prints something, a result or status
        _error(f"mixtrt {cmd.name}: error: stdout is closed, so the output would be lost; redirect it instead "
               "(> FILE, or > /dev/null to discard it)")
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(cmd.name, warnings.showwarning)
            require(cmd.extra, f"`mixtrt {cmd.name}`")
            return int(importlib.import_module(cmd.module).run(ns))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"mixtrt {cmd.name}: terminated by signal {e.signum}; nothing was left half-written", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except MixtrtError as e:
        _error(f"mixtrt {cmd.name}: error: {e}")
        return 2
    except OSError as e:
        if e.filename:
            where = f"{e.filename}: "
        elif isinstance(e, (ConnectionError, TimeoutError)):  # a network peer's (a cluster's), not the output's
            where = ""
        else:  # a write that names no file: the output (stdout on a full disk, /dev/full, ...)
            where = "writing the output (stdout): "
            _quiet_stdout()  # the interpreter's last flush would fail on it again
        _error(f"mixtrt {cmd.name}: error: {where}{e.strerror or e}")
        return 2


def _error(line: str) -> None:
    """The one error line on stderr; stderr itself unwritable (a full disk) leaves only the exit code to say it."""
    try:
        print(line, file=sys.stderr)
    except OSError:
        pass


def _one_line_warnings(command: str, show: Any) -> Any:
    """warnings.showwarning that prints mixtrt's own warnings as `mixtrt COMMAND: warning: ...`."""
    from mixtrt.runtime.errors import MixtrtWarning

    def showwarning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, MixtrtWarning):
            print(f"mixtrt {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
