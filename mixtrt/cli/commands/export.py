"""`mixtrt export`: a checkpoint -> an artifact directory (export_onnx)."""

from __future__ import annotations

import argparse

from mixtrt.cli.options import path
from mixtrt.runtime.chat_format import PREFERENCES
from mixtrt.runtime.precision import PRECISIONS
from mixtrt.runtime.quantization import BLOCK_SIZES, METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=path, help="checkpoint directory (config.json + *.safetensors, or params.json)")
    p.add_argument("--out", type=path, default=None, help="artifact directory (default: engines/<name>-<precision>)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="weight precision of the artifact (default fp32)")
    p.add_argument("--max-context", type=int, default=None,
                   help="positions the artifact serves; the KV cache length of models without a sliding window "
                        "(default: max_position_embeddings with a window, else min(it, 4096))")
    p.add_argument("--chat-format", choices=PREFERENCES, default="auto",
                   help="where the checkpoint ships both a mistral-common tokenizer file (tokenizer.model.v3, "
                        "tekken.json, ...) and a Jinja chat template: auto and mistral-common encode chat with "
                        "mistral-common (as mistral-inference, and vLLM's --tokenizer-mode mistral); jinja renders the "
                        "template as transformers' apply_chat_template does (vLLM's --tokenizer-mode hf)")
    q = p.add_argument_group("int4 (--precision int4: INT4 weights, fp32 activations; README \"INT4\")")
    q.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None,
                   help="weights per scale along the input dimension (default 32)")
    q.add_argument("--method", choices=METHODS, default=None,
                   help="rtn: round to nearest; awq: activation-aware scales; gptq: Hessian-weighted rounding "
                        "(awq and gptq calibrate on a text; default rtn)")
    q.add_argument("--calibration", type=path, default=None,
                   help="UTF-8 text for --method awq / gptq, - for stdin (default: the calibration text shipped "
                        "with mixtrt)")
    q.add_argument("--keep-float", default=None,
                   help="comma-separated tensors kept float, by name or pattern: lm_head,embed_tokens,layers.0.*")
    q.add_argument("--int8", default=None,
                   help="comma-separated tensors stored as INT8 instead (default lm_head,embed_tokens: the vocabulary "
                        "tables, and in a MoE model also wk,wv, as llama.cpp does); '' for none")
    q.add_argument("--accuracy-level", type=int, choices=(0, 4), default=None,
                   help="onnxruntime int4 matmuls: 4 quantizes activations to int8 (faster, default), 0 keeps fp32")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.cli.options import status
    from mixtrt.export.onnx_export import export_onnx
    from mixtrt.export.quantize import Int4Options
    from mixtrt.runtime.errors import ConfigError

    given = {k: v for k, v in (("block_size", ns.block_size), ("method", ns.method), ("calibration", ns.calibration),
                               ("keep_float", ns.keep_float), ("int8", ns.int8),
                               ("accuracy_level", ns.accuracy_level)) if v is not None}
    if given and ns.precision != "int4":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"{flags} {'applies' if len(given) == 1 else 'apply'} to --precision int4 only")
    int4 = Int4Options(**given) if ns.precision == "int4" else None
    export_onnx(ns.checkpoint, ns.out, precision=ns.precision, max_context=ns.max_context, overwrite=ns.force,
                progress=None if ns.quiet else status, int4=int4, chat_format=ns.chat_format)
    return 0
