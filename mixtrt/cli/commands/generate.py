"""`mixtrt generate`: one prompt, streamed to the terminal, or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixtrt.cli.options import (
    add_sampling,
    ascii_int,
    generation_config,
    generation_overrides,
    load_generator,
    path,
    print_stream,
    stats_line,
)


class _Once(argparse.Action):
    """A value given once: a second --prompt is an error, not a silent replacement of the first."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "given more than once: `mixtrt generate` runs one prompt (a batch: "
                                               "Generator.generate in Python)")
        setattr(namespace, self.dest, values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory (written by `mixtrt export`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action=_Once, help="prompt text (BOS is added)")
    src.add_argument("--prompt-ids", action=_Once,
                     help="prompt token ids, separated by commas or spaces (used as given)")
    src.add_argument("--prompt-file", "-f", action=_Once, metavar="FILE",
                     help="prompt text from a UTF-8 file, '-' for stdin (one final line end dropped, as llama.cpp's "
                          "--file does; BOS is added)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: token_ids (generated only), text, finish_reason, finish_message, "
                        "stats, logprobs (on Ctrl-C: what was generated, finish_reason \"interrupted\")")
    add_sampling(p)


def parse_ids(text: str) -> list[int]:
    import re

    from mixtrt.runtime.errors import ConfigError

    parts = re.split(r"\s*,\s*|\s+", text.strip())
    if len(parts) > 1 and "" in parts:  # "1,,2" or "1,2,": an id left out, not a separator to skip
        raise ConfigError(f"--prompt-ids {text!r}: an empty id between separators (expected integers like 1,2,3)")
    try:
        ids = [ascii_int(t) for t in parts if t]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: expected integers separated by commas or spaces, "
                          "like 1,2,3") from None
    if not ids:
        raise ConfigError(f"--prompt-ids {text!r}: no token ids (expected integers like 1,2,3)")
    return ids


def _read_prompt(name: str) -> str:
    """The prompt text of --prompt-file: a UTF-8 file, or stdin for '-'; one final line end (LF or CRLF) dropped."""
    from mixtrt.runtime.prompts import read_text_file, read_text_stream

    if name == "-":
        text = read_text_stream(sys.stdin.buffer, "--prompt-file - (stdin)")
    else:
        text = read_text_file(Path(name), "--prompt-file")
    return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text


def run(ns: argparse.Namespace) -> int:
    import dataclasses

    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.prompts import check_text

    overrides = generation_overrides(ns, return_logprobs=ns.json)  # checked before the model loads
    prompt: str | list[int]
    if ns.prompt_ids is not None:
        prompt = parse_ids(ns.prompt_ids)
    elif ns.prompt_file is not None:
        prompt = _read_prompt(ns.prompt_file)
        if prompt == "":
            raise ConfigError(f"--prompt-file {ns.prompt_file}: no text (an empty file, or one line end)")
    else:
        prompt = check_text(ns.prompt, "--prompt")
    if prompt == "":
        raise ConfigError("--prompt is empty: give some text (BOS is added) or --prompt-ids")
    gen = load_generator(ns)
    cfg = generation_config(gen, overrides)
    if ns.json:
        ids: list[int] = []
        pieces: list[str] = []
        out = None
        try:
            for event in gen.stream(prompt, cfg, continuation=True):  # "text" continues the prompt's text
                ids += [] if event.token_id is None else [event.token_id]
                pieces.append(event.text)
                out = event.output or out
        except KeyboardInterrupt:  # what was generated is printed, as the plain stream has it on the terminal
            print(json.dumps({"token_ids": ids, "text": "".join(pieces), "finish_reason": "interrupted",
                              "finish_message": f"interrupted (Ctrl-C) after {len(ids)} tokens", "stats": None,
                              "logprobs": None}), flush=True)
            raise
        assert out is not None  # a stream ends with its output
        print(json.dumps({
            "token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
            "finish_message": out.finish_message, "stats": dataclasses.asdict(out.stats),
            "logprobs": None if out.logprobs is None else [float(x) for x in out.logprobs],
        }, allow_nan=False))  # the runtime never lets a NaN through; if one did, this fails instead of bad JSON
        return 0
    # everything checked here; the prompt is echoed with the first token, and the text continues it
    events = gen.stream(prompt, cfg, continuation=True)
    out = print_stream(events, before=prompt if isinstance(prompt, str) else "")
    print(stats_line(out), file=sys.stderr)
    return 0
