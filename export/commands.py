"""Subcommands of the `mixtrt` CLI. Each imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mixtrt.export.cli import command


# ---- export ------------------------------------------------------------------------------------
@command("export", "Export a Hugging Face or raw Mistral checkpoint to an ONNX artifact directory.")
def run_export(ns: argparse.Namespace) -> int:
    from mixtrt.export.onnx_export import export_onnx

    export_onnx(ns.checkpoint, ns.out, precision=ns.precision, max_context=ns.max_context, overwrite=ns.force,
                progress=None if ns.quiet else print)
    return 0


@run_export.args
def _(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json + *.safetensors, or params.json)")
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default: engines/<name>-<precision>)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--max-context", type=int, default=None,
                   help="positions the artifact serves; the KV cache length of models without a sliding window "
                        "(default: max_position_embeddings with a window, else min(it, 4096))")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")


# ---- inspect -----------------------------------------------------------------------------------
@command("inspect", "Summarise an artifact directory: manifest, op counts, parameter and cache memory.")
def run_inspect(ns: argparse.Namespace) -> int:
    info = inspect_artifact(ns.artifact, verify=ns.verify)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    a = info["model"]
    print(f"artifact      {ns.artifact}")
    print(f"model         {a['architecture']}: {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
          f"heads {a['num_attention_heads']}/{a['num_key_value_heads']} (head_dim {a['head_dim']}), "
          f"vocab {a['vocab_size']}" + (f", experts {a['moe']['num_experts']} top-{a['moe']['num_experts_per_tok']}"
                                        if a["moe"] else ""))
    print(f"precision     {info['precision']}   max context {info['max_context']}")
    c = info["cache"]
    print(f"kv cache      {c['layout']} layout, capacity {c['capacity']} rows/layer"
          + (f" (window {c['window']})" if c["window"] else "")
          + f", {c['bytes_per_row'] / 2**20:.2f} MiB per batch row")
    print(f"parameters    {info['parameters'] / 1e6:.2f} M ({info['parameter_bytes'] / 2**20:.1f} MiB)")
    print("ops           " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    print("files         " + ", ".join(f"{k} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in info["files"].items()))
    print("versions      " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    return 0


@run_inspect.args
def _(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")


def inspect_artifact(directory: Path, verify: bool = False) -> dict:
    import numpy as np
    import onnx

    from mixtrt.runtime.manifest import Manifest

    m = Manifest.load(directory, verify=verify)
    graph = onnx.load(str(Path(directory) / "model.onnx"), load_external_data=False).graph
    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in graph.node)
    params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    param_bytes = sum(int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                      for t in graph.initializer)
    a = m.args
    itemsize = np.dtype(m.cache.dtype).itemsize
    cache_row = 2 * a.num_hidden_layers * a.num_key_value_heads * m.cache.capacity * a.head_dim * itemsize
    d = m.to_dict()
    return {
        "model": d["model"], "precision": m.precision, "max_context": m.max_context,
        "cache": {**d["cache"], "bytes_per_row": cache_row},
        "parameters": params, "parameter_bytes": param_bytes,
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "files": m.files, "versions": m.versions,
    }


# ---- generate / chat / demo --------------------------------------------------------------------
def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (greedy unless a sampling option is given)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    g.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files at load (sizes are still checked)")


def _config(ns: argparse.Namespace, **extra):
    from mixtrt.runtime.generation import GenerationConfig

    # any sampling option turns sampling on; --temperature 0 means greedy (as llama.cpp)
    sampling = ns.temperature != 0 and any(v is not None for v in (ns.temperature, ns.top_k, ns.top_p))
    return GenerationConfig(
        max_new_tokens=ns.max_new_tokens, do_sample=sampling,
        temperature=1.0 if not ns.temperature else ns.temperature,
        top_k=ns.top_k or 0, top_p=1.0 if ns.top_p is None else ns.top_p, seed=ns.seed,
        repetition_penalty=ns.repetition_penalty, stop_strings=tuple(ns.stop), **extra,
    )


def _stats_line(out) -> str:
    s = out.stats
    rate = f"{s.decode_tokens_per_s:.1f} tok/s decode" if s.decode_tokens_per_s else "n/a decode"
    prefill = f", prefill {s.prefill_tokens_per_s:.0f} tok/s" if s.prefill_tokens_per_s else ""
    return (f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated, first token "
            f"{s.time_to_first_token_s * 1e3:.0f} ms{prefill}, {rate}; "
            f"finish: {out.finish_reason} ({out.finish_message})]")


def _print_stream(events, tokenizer=None) -> object:
    """Write each event's text to stdout as it arrives; return the final GenerationOutput.

    With `tokenizer`, the text continues a prompt already on screen: a first piece that starts a new
    word ("▁Paris") gets its space back (decode drops the leading space of a text's first piece).
    """
    import sys

    out, first = None, True
    for event in events:
        if first and tokenizer is not None and event.token_id is not None:
            first = False
            if tokenizer.id_to_piece(event.token_id).startswith("\u2581") and not event.text.startswith(" "):
                sys.stdout.write(" ")
        sys.stdout.write(event.text)
        sys.stdout.flush()
        out = event.output or out
    sys.stdout.write("\n")
    return out


def _parse_ids(text: str) -> list[int]:
    import re

    from mixtrt.runtime.errors import ConfigError

    try:
        return [int(t) for t in re.split(r"[,\s]+", text.strip()) if t]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: expected integers separated by commas or spaces, "
                          "like 1,2,3") from None


@command("generate", "Generate text from an artifact directory, streaming it to the terminal.")
def run_generate(ns: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from mixtrt.runtime.generation import Generator

    cfg = _config(ns, return_logprobs=ns.json)  # validated before the model loads
    gen = Generator.load(ns.artifact, threads=ns.threads, verify=not ns.no_verify)
    prompt = _parse_ids(ns.prompt_ids) if ns.prompt_ids is not None else ns.prompt
    if ns.json:
        [out] = gen.generate([prompt] if isinstance(prompt, str) else [prompt], cfg)
        print(json.dumps({
            "token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
            "finish_message": out.finish_message, "stats": dataclasses.asdict(out.stats),
            "logprobs": None if out.logprobs is None else [float(x) for x in out.logprobs],
        }))
        return 0
    if isinstance(prompt, str):
        sys.stdout.write(prompt)
    out = _print_stream(gen.stream(prompt, cfg), gen.tokenizer if isinstance(prompt, str) else None)
    print(_stats_line(out), file=sys.stderr)
    return 0


@run_generate.args
def _(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory (written by `mixtrt export`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (BOS is added)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma-separated (used as given)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: token_ids (generated only), text, finish_reason, stats, logprobs")
    _add_sampling(p)


@command("chat", "Interactive multi-turn chat with the model's chat template (an empty line or Ctrl-D ends).")
def run_chat(ns: argparse.Namespace) -> int:
    import sys

    from mixtrt.runtime.generation import Generator

    cfg = _config(ns)
    gen = Generator.load(ns.artifact, threads=ns.threads, verify=not ns.no_verify)
    messages: list[dict[str, str]] = [{"role": "system", "content": ns.system}] if ns.system else []
    while True:
        try:
            user = input("you> ")
        except EOFError:
            print()
            return 0
        if not user.strip():
            return 0
        messages.append({"role": "user", "content": user})
        sys.stdout.write("model> ")
        out = _print_stream(gen.stream_chat(messages, cfg))
        if ns.stats:
            print(_stats_line(out), file=sys.stderr)
        messages.append({"role": "assistant", "content": out.text.strip() or "..."})


@run_chat.args
def _(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--system", default=None, help="system prompt, prepended to the first user message")
    p.add_argument("--stats", action="store_true", help="print speed after each answer")
    _add_sampling(p)


# ---- demo --------------------------------------------------------------------------------------
DEMO_PROMPTS = ("It is a truth universally acknowledged", "Mrs. Bennet was", "The weather was so fine that")


def builtin_checkpoint() -> Path:
    """The small trained Mixtral shipped in the source tree (models/tiny-mixtral)."""
    return Path(__file__).resolve().parent.parent / "models" / "tiny-mixtral"


@command("demo", "Export the built-in tiny Mixtral (once) and generate from it on the CPU, with speed "
                 "(sampling with temperature 0.8, top-p 0.95, seed 0 unless told otherwise).")
def run_demo(ns: argparse.Namespace) -> int:
    import sys

    from mixtrt.export.onnx_export import export_onnx, is_current
    from mixtrt.runtime.errors import ConfigError
    from mixtrt.runtime.generation import Generator

    ckpt = ns.checkpoint or builtin_checkpoint()
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"{ckpt}: no checkpoint there; pass --checkpoint DIR (the built-in one lives in the "
                          "source tree's models/ folder)")
    art = ns.out or Path("engines") / f"{ckpt.name}-fp32"
    if not is_current(art, ckpt) or ns.reexport:
        export_onnx(ckpt, art, overwrite=True)
    else:
        print(f"using the artifact in {art} (pass --reexport to rebuild it)")
    cfg = _config(ns)
    gen = Generator.load(art, threads=ns.threads, verify=not ns.no_verify)
    for prompt in ns.prompt or DEMO_PROMPTS:
        print()
        sys.stdout.write(prompt)
        print(_stats_line(_print_stream(gen.stream(prompt, cfg), gen.tokenizer)))
    return 0


@run_demo.args
def _(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to use instead of the built-in one")
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default: engines/<name>-fp32)")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: three stories)")
    p.add_argument("--reexport", action="store_true", help="export again even if the artifact is up to date")
    _add_sampling(p)
    # a model this small loops under greedy decoding; the demo samples, seeded, so it prints the same text
    # every run (--temperature 0 for greedy)
    p.set_defaults(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0)
