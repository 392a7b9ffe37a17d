"""The `mixtrt` command line: a thin layer over the package's functions.

Heavy modules are imported inside each subcommand, so `mixtrt --help` needs neither torch nor onnx.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mixtrt.runtime import MixtrtError, __version__

# name -> (help, add_arguments(parser), run(args) -> exit code)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register a subcommand: decorate its run function; its `add_arguments` is attached as `.args`."""

    def deco(run: Callable[[argparse.Namespace], int]):
        def attach(add: Callable[[argparse.ArgumentParser], None]):
            _COMMANDS[name] = (help, add, run)
            return add

        run.args = attach  # type: ignore[attr-defined]
        return run

    return deco


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtrt",
        description="Export Mistral / Mixtral checkpoints to ONNX and TensorRT and generate text from them.",
    )
    parser.add_argument("--version", action="version", version=f"mixtrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mixtrt.export import commands  # noqa: F401  (registers the subcommands)

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _, _, run = _COMMANDS[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MixtrtError as e:
        print(f"mixtrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"mixtrt {args.command}: error: {e.name or e} is not installed; `mixtrt {args.command}` needs the "
              "exporter extras (pip install 'mixtrt[export]')", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"mixtrt {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # `python -m mixtrt.export.cli`: run the registry of the imported module
    from mixtrt.export.cli import main as _main

    sys.exit(_main())
