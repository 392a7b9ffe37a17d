"""`mixtrt inspect`: what an artifact holds, from its manifest (needs no onnx or torch)."""

from __future__ import annotations

import argparse
import builtins
import json
from typing import Any

from mixtrt.cli.options import path, visible


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory (written by `mixtrt export`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true",
                   help="also check every file's sha256 against the manifest, and the manifest against its graph "
                        "(inputs, outputs, model, precision, cache), as loading does")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.runtime.inspect import inspect_artifact

    info = inspect_artifact(ns.artifact, verify=ns.verify)
    info["verified"] = ns.verify  # a failed check is an error before this: True says every check passed
    if ns.json:
        builtins.print(json.dumps(info, indent=2))  # escapes and non-ASCII characters escaped by json
        return 0
    a = info["model"]
    print(f"artifact      {ns.artifact}")
    print(f"model         {a['architecture']}: {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
          f"heads {a['num_attention_heads']}/{a['num_key_value_heads']} (head_dim {a['head_dim']}), "
          f"vocab {a['vocab_size']}" + (f", experts {a['moe']['num_experts']} top-{a['moe']['num_experts_per_tok']}"
                                        if a["moe"] else ""))
    print(f"precision     {info['precision']}   max context {info['max_context']}   "
          f"backends {', '.join(info['backends'])}")
    c = info["cache"]  # None for a head scoring whole texts
    if info["head"] != "causal_lm":
        labels = f", labels {', '.join(a['id2label'])}" if a.get("id2label") else ""
        labels += f" ({a['problem_type']})" if a.get("problem_type") else ""
        print(f"head          {info['head']}{labels} (`mixtrt run`)")
        windows = sorted({w for w in info["attention_windows"] if w})  # the JSON's cache is null: there is none
        print("kv cache      none: the graph scores whole texts"
              + (f" (window {', '.join(map(str, windows))})" if windows else ""))
    else:
        print(f"kv cache      {c['layout']} layout, capacity {c['capacity']} rows/layer"
              + (f" (window {c['window']})" if c["window"] else "")
              + f", {_size(c['bytes_per_row'], 2)} per batch row")
    size = _size(info['parameter_bytes'])
    if info["stored_parameters"] != info["parameters"]:
        size = (f"{info['stored_parameters'] / 1e6:.2f} M stored, {size}: the tied embedding table twice, as the "
                f"input table and, transposed, as lm_head")
    print(f"parameters    {info['parameters'] / 1e6:.2f} M ({size})")
    q = info["quantization"]
    if q is not None:
        int8 = set(q["int8"])
        other = {t: b for t, b in q["blocks"].items() if t not in int8}  # INT4 tensors at a block of their own
        blocks = sorted(set(other.values()))
        print(f"quantization  int{q['bits']} {q['method']}, block {q['block_size']}"
              + (f" (other blocks: {len(other)} int{q['bits']} tensor{'s' * (len(other) != 1)} at {blocks})"
                 if blocks else "")
              + f", symmetric, {q['scale_dtype']} scales, onnxruntime accuracy level {q['accuracy_level']}"
              + (f", calibrated on {q['calibration']['source']} ({q['calibration']['tokens']} tokens)"
                 if q["calibration"] else ""))
        if q["calibration"] and q["calibration"].get("nearest"):
            near = q["calibration"]["nearest"]
            what = "no activation-aware scale of their own" if q["method"] == "awq" else "rounded to nearest"
            print(f"  nearest     {', '.join(near[:4])}{f' and {len(near) - 4} more' if len(near) > 4 else ''}: "
                  f"{what} (too few calibration tokens reached them)")
        if q["int8"]:
            names = q["int8"]
            b8 = sorted({q["blocks"].get(t, q["block_size"]) for t in names})
            print(f"  int8        {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''} "
                  f"(8-bit, block{'s' * (len(b8) != 1)} {', '.join(map(str, b8))})")
        reasons: dict[str, list[str]] = {}
        for name, why in q["float"].items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            print(f"  kept float  {shown}: {why}")
    if info["bytes_per_token"]:
        print(f"decode reads  {_size(info['bytes_per_token'], 2)} of weights per token")
    print(f"chat          {info['chat_format']}")
    print(f"generation    {info['generation_defaults']}")
    print("ops           " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items())
          + (f" (attention body on onnxruntime: {info['attention_body']})" if info["attention_body"] else ""))
    print("files         " + ", ".join(f"{k} ({_size(v['bytes'])})" for k, v in info["files"].items()))
    print("versions      " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    if ns.verify:
        index = ", the weight index" if "weights.json" in info["files"] else ""
        print(f"verified      the sha256 of all {len(info['files'])} files, the graph against the manifest, "
              f"the tokenizer{index}")
    return 0


def print(*parts: Any) -> None:  # noqa: A001 - every text line of inspect goes through here
    """Print with what a checkpoint or an edited manifest may carry into names and notes (a generation_config.json
    key, a template's name) made visible: a character that is not printable (an escape sequence's ESC, a BEL)
    is shown as its Python escape, never sent to the terminal."""
    builtins.print(*(visible(p) for p in parts))


def _size(nbytes: int, digits: int = 1) -> str:
    """MiB to `digits` decimals; KiB where that would print 0 (a tiny model's sizes)."""
    if nbytes * 10**digits < 2**20 / 2:
        return f"{nbytes / 2**10:.{digits}f} KiB"
    return f"{nbytes / 2**20:.{digits}f} MiB"
