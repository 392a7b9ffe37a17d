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
