"""What an artifact directory holds, as one dict (`mixtrt inspect`): read from the manifest alone.

    info = inspect_artifact("engines/tiny-mixtral-fp32")
    info["cache"]["bytes_per_row"], info["ops"]["mixtrt::MoE"]                  # (163840, 4)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime.errors import ArtifactError, first_line
from mixtrt.runtime.manifest import MODEL_FILE, Manifest, graph_specs


def inspect_artifact(directory: str | Path, verify: bool = False) -> dict[str, Any]:
    """The manifest's model, precision, cache (with its bytes per batch row), backends, graph summary
    (op counts, parameters), chat format (the record, and one line each for it and the generation
    defaults), files and versions; the graph IO it lists must be what its model, cache and precision give (as
    loading refuses an edited one); verify: check the files' sha256 too (sizes always), and that the manifest
    agrees with its graph (IO and the graph's own record of model, precision and cache), as loading checks, and the
    weight index (weights.json) with the data file, as its readers check it."""
    m = Manifest.load(directory, verify=verify)
    m.check_graph_io(directory)  # the manifest's own fields against each other (no file read): as loading refuses it
    if verify:
        import onnx

        path = Path(directory) / MODEL_FILE
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # onnx raises its own (protobuf) exception types
            raise ArtifactError(f"{path}: not a readable ONNX graph ({first_line(e)})") from None
        m.check_graph(path, *graph_specs(model))
        from mixtrt.runtime.chat_format import load_chat_tokenizer

        load_chat_tokenizer(directory, m.chat, m.args.vocab_size)  # the tokenizer and chat record, as loading does
        if m.weight_index is not None:  # the index against the data file, as a reader of it checks it
            from mixtrt.runtime.weights import WeightIndex

            WeightIndex.read(directory)
    a = m.args
    itemsize = np.dtype(m.cache.dtype).itemsize
    cache_row = 2 * a.num_hidden_layers * a.num_key_value_heads * m.cache.capacity * a.head_dim * itemsize
    if a.head != "causal_lm":
        cache_row = 0  # the graph of a head scoring whole texts has no cache
    d = m.to_dict()
    stored = int(m.summary.get("parameters") or 0)  # absent or null in a hand-edited manifest: not counted
    tied = a.tie_word_embeddings and a.head == "causal_lm" and stored > a.vocab_size * a.hidden_size
    return {
        "model": d["model"], "head": a.head, "precision": m.precision, "max_context": m.max_context,
        # a head scoring whole texts has no cache (its record's capacity is the causal graph's, unused): null; its
        # layers' attention windows as the export's plan set them (None: full causal; a window at least max_context
        # long is none), as the cache record holds them for a causal LM
        "cache": {**d["cache"], "bytes_per_row": cache_row} if a.head == "causal_lm" else None,
        "attention_windows": list(d["cache"]["windows"]),
        "backends": list(m.backends),
        # the model's parameters; a tied embedding table is stored twice (the input table and, transposed, lm_head)
        "parameters": stored - (a.vocab_size * a.hidden_size if tied else 0), "stored_parameters": stored,
        "parameter_bytes": m.summary.get("parameter_bytes") or 0,
        "ops": dict(m.summary.get("ops", {})), "attention_body": m.summary.get("attention_body"),
        "files": m.files, "versions": m.versions,
        "format_version": m.format_version, "features": list(m.features),
        "chat": d["chat"], "chat_format": m.chat.describe(),
        "generation_defaults": m.chat.generation.describe(a.eos_token_ids),
        "quantization": d["quantization"], "bytes_per_token": m.summary.get("bytes_per_token"),
    }
