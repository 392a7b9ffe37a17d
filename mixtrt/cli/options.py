"""Options and output shared by the generation commands (generate, chat, demo)."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def threads(text: str) -> int:
    """--threads N: 1 .. the cores this process may use (more only slows onnxruntime down)."""
    from mixtrt.runtime.threads import available_cores

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    cores = available_cores()
    if not 1 <= n <= cores:
        raise argparse.ArgumentTypeError(f"{n} is not in [1, {cores}] (the cores this machine gives the process)")
    return n


def add_sampling(p: argparse.ArgumentParser, heading: str | None = None) -> None:
    g = p.add_argument_group(heading or "generation (the artifact's defaults from the checkpoint's "
                             "generation_config.json, else greedy and 128 new tokens; a sampling option turns "
                             "sampling on, --temperature 0 means greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens to generate (default: the artifact's, else 128)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 .. (0 = greedy; default: the artifact's, else greedy)")
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--top-p", type=float, default=None, help="1.0 = off")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than MIN_P x the most likely one (0 = off)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="no eos before this many new tokens")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling (an integer; a negative one as its 64-bit unsigned value; default: a "
                        "fresh one each run)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers': a seen token's logit is divided (positive) or multiplied by it (1.0 = off)")
    g.add_argument("--presence-penalty", type=float, default=None,
                   help="OpenAI's: each token already generated loses this much logit (-2..2; 0 = off)")
    g.add_argument("--frequency-penalty", type=float, default=None,
                   help="OpenAI's: each generated token loses this much logit per time it was generated (-2..2)")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit before each choice (repeatable; -100 bans it)")
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    g.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                   help="the reply is JSON this JSON schema accepts, enforced token by token (the schema's JSON text, "
                        "'{}' for any JSON; llama.cpp's -j), needs mixtrt[structured]")
    g.add_argument("--json-schema-file", type=path, default=None, metavar="FILE",
                   help="as --json-schema, the schema read from FILE (llama.cpp's -jf)")
    g.add_argument("--grammar", default=None, metavar="GRAMMAR",
                   help="the reply is text this grammar accepts: llama.cpp's GBNF (a root rule) or Lark in "
                        "llguidance's dialect (a start rule); needs mixtrt[structured]")
    g.add_argument("--grammar-file", type=path, default=None, metavar="FILE",
                   help="as --grammar, the grammar read from FILE (llama.cpp's --grammar-file)")
    g.add_argument("--regex", default=None, metavar="REGEX",
                   help="the reply is text this regular expression matches whole (Rust's regex syntax)")
    g.add_argument("--choice", action="append", default=[], metavar="TEXT",
                   help="the reply is exactly one of these texts (repeatable: --choice yes --choice no)")
    g.add_argument("--threads", type=threads, default=None,
                   help="onnxruntime intra-op threads, 1 .. the available cores (default: all of them)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files at load (sizes are still checked)")
    g.add_argument("--backend", default="onnxruntime", metavar="NAME",
                   help="onnxruntime (default: the CPU), triton (torch + the Triton kernels on CUDA, or on the CPU "
                        "under the Triton interpreter: slow; needs `pip install 'mixtrt[gpu]'`) or tensorrt (the "
                        "engine `mixtrt build` added; a GPU and `pip install 'mixtrt[tensorrt]'`)")


def path(text: str) -> Path:
    """A path argument; an empty one is refused (Path("") would silently be the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (use . for the current folder)")
    return Path(text)


def ascii_int(text: str) -> int:
    """int(text) for a decimal integer in ASCII digits (int() also reads 1_000 and other scripts' digits), else
    ValueError."""
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def status(line: str) -> None:
    """A progress or status line: on stderr, so stdout carries only a command's result (as pipes expect)."""
    print(line, file=sys.stderr, flush=True)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low, else argparse's one-line usage error naming the flag (the
    benchmark scripts use it too)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is less than {low}")
        return n
    return parse


def generation_overrides(ns: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The generation options given on the command line, as GenerationConfig keywords that override the
    artifact's defaults (`Generator.config(**overrides)`); checked now, before any model loads.

    Any of --temperature/--top-k/--top-p/--min-p turns sampling on; --temperature 0 means greedy (as llama.cpp).
    """
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.generation import GenerationConfig
    from mixtrt.runtime.prompts import check_text

    for stop in ns.stop:
        check_text(stop, f"--stop {stop!r}")
    if ns.temperature is not None and not ns.temperature >= 0:  # NaN too; llama.cpp reads a negative one as greedy
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {ns.temperature}")

    given = {"max_new_tokens": ns.max_new_tokens, "top_k": ns.top_k, "top_p": ns.top_p, "seed": ns.seed,
             "repetition_penalty": ns.repetition_penalty, "temperature": ns.temperature or None,
             "min_p": ns.min_p, "min_new_tokens": ns.min_new_tokens, "presence_penalty": ns.presence_penalty,
             "frequency_penalty": ns.frequency_penalty}
    out: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if ns.min_new_tokens is not None and ns.max_new_tokens is not None and ns.min_new_tokens > ns.max_new_tokens:
        raise ConfigError(f"--min-new-tokens {ns.min_new_tokens} is more than --max-new-tokens {ns.max_new_tokens}, "
                          "the most tokens generated (the server refuses min_tokens over max_tokens likewise)")
    if ns.temperature == 0:
        out["do_sample"] = False
    elif any(v is not None for v in (ns.temperature, ns.top_k, ns.top_p, ns.min_p)):
        out["do_sample"] = True
    if ns.stop:
        out["stop_strings"] = tuple(ns.stop)
    if ns.logit_bias:
        out["logit_bias"] = tuple(_bias_pair(text) for text in ns.logit_bias)
    out.update(_constraint(ns))
    out.update(extra)
    with _named_by_flag():
        GenerationConfig(**out)
    return out


def _constraint(ns: argparse.Namespace) -> dict[str, Any]:
    """The structured-output flag given, as GenerationConfig's field (at most one: each constrains the whole
    reply); a file's text read and checked here, so its errors name the file."""
    from mixtrt.runtime import structured
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.prompts import read_text_file

    given = [flag for flag, value in (("--json-schema", ns.json_schema), ("--json-schema-file", ns.json_schema_file),
                                      ("--grammar", ns.grammar), ("--grammar-file", ns.grammar_file),
                                      ("--regex", ns.regex), ("--choice", ns.choice or None)) if value is not None]
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]}: give one of them (each constrains the whole reply)")
    if ns.json_schema_file is not None:
        where = f"--json-schema-file {ns.json_schema_file}"
        return {"json_schema": structured.check_schema(read_text_file(ns.json_schema_file, "--json-schema-file"),
                                                       where)}
    if ns.grammar_file is not None:
        where = f"--grammar-file {ns.grammar_file}"
        return {"grammar": structured.check_grammar(read_text_file(ns.grammar_file, "--grammar-file"), where)}
    return {name: value for name, value in (("json_schema", ns.json_schema), ("grammar", ns.grammar),
                                            ("regex", ns.regex), ("choice", tuple(ns.choice) or None))
            if value is not None}


def generation_config(gen: Any, overrides: dict[str, Any]) -> Any:
    """gen.config(**overrides): the checks that need the model (token ids inside its vocabulary) named by flag; a
    value the artifact's generation defaults gave (no flag set it) is named as theirs."""
    with _named_by_flag(given=overrides):
        return gen.config(**overrides)


@contextlib.contextmanager
def _named_by_flag(given: dict[str, Any] | None = None) -> Iterator[None]:
    """A ConfigError about a GenerationConfig field named by its flag, not by the field the flag sets; with `given`
    (the overrides), a field no flag set came from the artifact's generation defaults and is named so (sampling
    asked for by --top-k where the defaults have temperature 0 was blamed on --temperature)."""
    from mixtrt.runtime.errors import ConfigError

    try:
        yield
    except ConfigError as e:
        field, _, rest = str(e).partition(" ")
        colon = ":" if field.endswith(":") else ""  # "json_schema: ..." -> "--json-schema: ..."
        name, bracket, index = field.rstrip(":").partition("[")  # logit_bias[5] -> --logit-bias 5
        if name in _FLAGS and given is not None and name not in given:
            raise ConfigError(f"the artifact's generation defaults (generation_config.json): {name}{colon} {rest}; "
                              f"pass {_FLAGS[name]} to set it") from None
        if name in _FLAGS:
            raise ConfigError(f"{_FLAGS[name]}{' ' + index.rstrip(']') if bracket else ''}{colon} {rest}") from None
        raise


def _bias_pair(text: str) -> tuple[int, float]:
    """--logit-bias ID=BIAS -> (ID, BIAS); the ranges are GenerationConfig's to check."""
    from mixtrt.runtime.errors import ConfigError

    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return ascii_int(token), float(bias)
    except ValueError:
        raise ConfigError(f"--logit-bias {text!r} is not ID=BIAS (e.g. 13=-100)") from None


_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
          "top_p": "--top-p", "seed": "--seed", "repetition_penalty": "--repetition-penalty", "stop_strings": "--stop",
          "min_p": "--min-p", "min_new_tokens": "--min-new-tokens", "presence_penalty": "--presence-penalty",
          "frequency_penalty": "--frequency-penalty", "logit_bias": "--logit-bias", "json_schema": "--json-schema",
          "grammar": "--grammar", "regex": "--regex", "choice": "--choice"}


def load_generator(ns: argparse.Namespace) -> Any:
    from mixtrt.runtime.generation import Generator

    return Generator.load(ns.artifact, backend=getattr(ns, "backend", "onnxruntime"), threads=ns.threads,
                          verify=not ns.no_verify)


def _rate(per_s: float) -> str:
    """A rate for the stats line: whole numbers from 100 up, else one decimal, and two significant digits below 1
    (the triton interpreter's 0.11 tok/s is not 0).

        >>> _rate(2241.4), _rate(35.27), _rate(0.113)
        ('2241', '35.3', '0.11')
    """
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2g}"


def stats_line(out: Any, prompt: str | None = None) -> str:
    """One line of a generation's numbers; `prompt` replaces the prompt's token count (chat: the conversation's)."""
    s = out.stats
    rate = f"{_rate(s.decode_tokens_per_s)} tok/s decode" if s.decode_tokens_per_s else "n/a decode"
    prefill = f", prefill {_rate(s.prefill_tokens_per_s)} tok/s" if s.prefill_tokens_per_s else ""
    return (f"[{prompt or f'{s.prompt_tokens} prompt tokens'}, {s.generated_tokens} generated, first token "
            f"{s.time_to_first_token_s * 1e3:.0f} ms{prefill}, {rate}; "
            f"finish: {out.finish_reason} ({out.finish_message})]")


def print_stream(events: Any, before: str = "", started: bool = False) -> Any:
    """Write each event's text to stdout as it arrives; return the final GenerationOutput.

    `before` (the prompt) is written once the first token is there, so a prompt whose prefill fails is never
    echoed; a stream made with continuation=True then reads as the prompt's text continued. Ctrl-C (raised on)
    ends the line first where anything is on it (`started`: the caller wrote its start).
    """
    out = None
    written = started
    try:
        for event in events:
            if before:
                sys.stdout.write(before)
                before, written = "", True
            sys.stdout.write(event.text)
            sys.stdout.flush()
            written = written or bool(event.text)
            out = event.output or out
    except KeyboardInterrupt:
        if written:  # the cut text's line ends (a file or a pipe reads one whole line), then the interrupt goes on
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    return out


def visible(text: Any) -> str:
    """`text` with every character that is not printable (an escape sequence's ESC, a BEL, a TAB or newline that
    would break a line's fields) shown as its Python escape: what an artifact carries into names (labels, keys)
    never reaches the terminal as control characters."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
