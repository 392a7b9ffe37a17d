"""`mixtrt build`: a TensorRT engine from an artifact's graph, added to the artifact.

Through Polygraphy's loaders (`NetworkFromOnnxPath(strongly_typed=True)`, `CreateConfig` with one optimisation
profile, `EngineFromNetwork`, `SaveEngine`): TensorRT 10.x/11 strongly typed, so an FP16 artifact gives an FP16
engine (the graph's types decide; no precision flags). Our two ops reach TensorRT as plugins of the same name
(`plugins/<op>/trt_plugin.py`, registered before parsing; the parser prefers a registered plugin over the
node's ONNX function body).

The plan (`engine.plan`) and its build config (`engine.json`: profile, optimisation level, TensorRT and
Polygraphy versions) are written beside the artifact first; then both are moved in and the manifest, rewritten
to list them (feature `tensorrt_engine`, backend `tensorrt`, versions.tensorrt), is moved in last
(`manifest.artifact_update`): an interrupted or failed build leaves the artifact as it was, and the artifact
always holds exactly the files its manifest lists.

Nothing here ran against TensorRT (it needs an NVIDIA GPU; none was available: see README, "GPU path").
The builder is a parameter, so the file handling is tested with a fake one.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixtrt import __version__
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.manifest import (
    ENGINE_CONFIG,
    ENGINE_FILE,
    MANIFEST,
    MODEL_FILE,
    TENSORRT_FEATURE,
    Manifest,
    artifact_update,
    file_entries,
)

MAX_BATCH = 4096  # the graph's batch dimension bound (export)
# (onnx path, profile {input: (min, opt, max)}, opt level, timing cache or None, plan path) -> versions used
Builder = Callable[[Path, dict[str, tuple[tuple[int, ...], ...]], int, "Path | None", Path], dict[str, str]]


STATE_ACC, STATE_COUNT = "moe_state.acc", "moe_state.count"  # the MoE plugin's zeroed state (graph inputs)


def step_tokens(manifest: Manifest) -> int:
    """The most new tokens one engine step takes: the SWA plugin's fused ring write bounds a windowed cache's step
    to C - W + 1 (`trt_plugins.max_step_tokens`); a linear cache takes up to its capacity."""
    from mixtrt.plugins.trt_plugins import max_step_tokens

    return max_step_tokens(manifest.cache.capacity, manifest.cache.window or -1)


def profile_shapes(manifest: Manifest, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """One optimisation profile over every graph input: batch 1..max_batch (opt: max_batch, decode), new tokens
    and logit positions 1..step_tokens (opt: 1), the cache buffers at their fixed size."""
    C = step_tokens(manifest)
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for t in manifest.inputs:
        if t.name in ("input_ids", "logit_positions"):
            shapes[t.name] = ((1, 1), (max_batch, 1), (max_batch, C))
        elif t.name == "total_lengths":
            shapes[t.name] = ((1,), (max_batch,), (max_batch,))
        else:  # past_key_values.{i}.key/value [batch, K, C, D]
            fixed = tuple(int(d) for d in t.shape[1:])
            shapes[t.name] = ((1, *fixed), (max_batch, *fixed), (max_batch, *fixed))
    return shapes


def build_engine(artifact: str | Path, *, max_batch: int = 8, opt_level: int = 3,
                 timing_cache: str | Path | None = None, force: bool = False, builder: Builder | None = None,
                 progress: Callable[[str], None] | None = print) -> Path:
    """Build `artifact`'s TensorRT engine and add it to the artifact (see the module docstring); returns the plan."""
    say = progress or (lambda _m: None)
    for name, value, low, high in (("--max-batch", max_batch, 1, MAX_BATCH), ("--opt-level", opt_level, 0, 5)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    artifact = Path(artifact)
    manifest = Manifest.load(artifact)
    if manifest.args.head != "causal_lm":
        raise ConfigError(f"{artifact}: TensorRT engines are built for causal LMs; this artifact holds a "
                          f"{manifest.args.head} model")
    if manifest.quantization is not None:  # docs/DESIGN.md "INT4 weight-only": what a TensorRT build must rewrite
        raise ConfigError(f"{artifact}: an int4 artifact; its TensorRT graph (the embedding's GatherBlockQuantized and "
                          "the MoE op's int4 inputs rewritten for TensorRT) is not written yet: build an fp16 artifact")
    if TENSORRT_FEATURE in manifest.features and not force:
        raise ConfigError(f"{artifact}: already holds a TensorRT engine ({ENGINE_FILE}); pass --force to rebuild it")
    cache = Path(timing_cache) if timing_cache is not None else None
    if cache is not None and (cache.is_dir() or not cache.parent.is_dir()):
        raise ConfigError(f"--timing-cache {cache}: must be a file in an existing directory (read if it exists, "
                          "written after the build)")
    profile = profile_shapes(manifest, max_batch)
    build = builder or polygraphy_builder
    max_tokens = max_batch * step_tokens(manifest)
    with artifact_update(artifact) as staging, tempfile.TemporaryDirectory(dir=staging) as scratch:
        say(f"building {ENGINE_FILE} (max batch {max_batch}, optimisation level {opt_level})")
        trt_graph = Path(scratch) / "tensorrt.onnx"
        facts = tensorrt_graph(artifact / MODEL_FILE, trt_graph, max_tokens)
        versions = build(trt_graph, profile, opt_level, cache, staging / ENGINE_FILE)
        if not (staging / ENGINE_FILE).is_file():
            raise ConfigError(f"{artifact}: the builder wrote no {ENGINE_FILE}")
        config = {"max_batch": max_batch, "opt_level": opt_level, "strongly_typed": True,
                  "max_step_tokens": step_tokens(manifest), **facts,
                  "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                  "timing_cache": str(cache) if cache is not None else None, "mixtrt": __version__, **versions}
        (staging / ENGINE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        files = {k: v for k, v in manifest.files.items() if k not in (ENGINE_FILE, ENGINE_CONFIG)}
        files.update(file_entries(staging, [ENGINE_FILE, ENGINE_CONFIG]))
        new = dataclasses.replace(
            manifest, files=files,
            features=tuple(dict.fromkeys((*manifest.features, TENSORRT_FEATURE))),
            backends=tuple(dict.fromkeys((*manifest.backends, "tensorrt"))),
            versions={**manifest.versions, "tensorrt": versions.get("tensorrt")})
        new.save(staging)
    assert (artifact / MANIFEST).is_file()
    say(f"added {ENGINE_FILE} to {artifact}")
    return artifact / ENGINE_FILE


def tensorrt_graph(model_path: Path, out_path: Path, max_tokens: int) -> dict[str, Any]:
    """The graph TensorRT parses, written to `out_path` (weights in `out_path`.data): model.onnx with

    - every custom-op node's `plugin_version` "1" (a tensorrt.plugin creator's version, whatever the op's);
    - every MoE node in the plugins' stacked fixed-input form: inputs hidden, router_logits, fc1 [E, 2I, H],
      fc2 [E, H, I] (new initializers, the per-expert ones stacked), then the decode kernel's state (acc fp32
      [max_tokens, H], count int32 [max_tokens]); outputs the MoE output and the state (aliased by the plugin).
      The state is one pair of graph inputs threaded through the layers in order (each node takes the previous
      node's state outputs), zeroed once by the runtime and zero again after every node;
    - the custom ops' ONNX function bodies dropped (TensorRT runs the plugins).

    Returns facts for the build config (MoE layers, state shapes)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    acc, count = STATE_ACC, STATE_COUNT
    hidden_size = 0
    moe_layers = 0
    for node in graph.node:
        if node.domain != "mixtrt":
            continue
        for a in node.attribute:
            if a.name == "plugin_version":
                a.s = b"1"
        if node.op_type != "MoE":
            continue
        E = (len(node.input) - 2) // 2
        experts = [numpy_helper.to_array(inits[n]) for n in node.input[2:]]
        hidden_size = int(experts[E].shape[0])
        stacked = []
        for part, arrays in (("fc1", experts[:E]), ("fc2", experts[E:])):
            name = f"{node.name}/{part}_stacked"
            graph.initializer.append(numpy_helper.from_array(np.stack(arrays), name))
            stacked.append(name)
        acc_out, count_out = f"{node.name}/acc_out", f"{node.name}/count_out"
        new_inputs = [node.input[0], node.input[1], *stacked, acc, count]
        del node.input[:]
        node.input.extend(new_inputs)
        node.output.extend([acc_out, count_out])
        acc, count = acc_out, count_out
        moe_layers += 1
    if moe_layers:
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        graph.input.extend([helper.make_tensor_value_info(STATE_ACC, onnx.TensorProto.FLOAT, [max_tokens, hidden_size]),
                            helper.make_tensor_value_info(STATE_COUNT, onnx.TensorProto.INT32, [max_tokens])])
        graph.output.extend([helper.make_tensor_value_info(acc, onnx.TensorProto.FLOAT, [max_tokens, hidden_size]),
                             helper.make_tensor_value_info(count, onnx.TensorProto.INT32, [max_tokens])])
    kept = [f for f in model.functions if f.domain != "mixtrt"]
    del model.functions[:]
    model.functions.extend(kept)
    onnx.save(model, str(out_path), save_as_external_data=True, location=out_path.name + ".data")
    state = {STATE_ACC: [max_tokens, hidden_size], STATE_COUNT: [max_tokens]} if moe_layers else None
    return {"moe_layers": moe_layers, "moe_state": state}


def polygraphy_builder(onnx_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]], opt_level: int,
                       timing_cache: Path | None, plan: Path) -> dict[str, str]:
    """The real build (needs TensorRT and a CUDA GPU): plugins registered, strongly typed network, one profile,
    aliased plugin IO (the KV cache written in place), timing cache read and written."""
    import polygraphy
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    from mixtrt.plugins.trt_plugins import register_all

    register_all()
    prof = Profile()
    for name, (lo, opt, hi) in profile.items():
        prof.add(name, min=lo, opt=opt, max=hi)
    preview = [f for f in (getattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None),) if f is not None]
    kwargs: dict[str, Any] = {"profiles": [prof], "builder_optimization_level": opt_level,
                              "preview_features": preview}
    if timing_cache is not None:
        kwargs["load_timing_cache"] = str(timing_cache) if timing_cache.exists() else None
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    engine = EngineFromNetwork(network, CreateConfig(**kwargs),
                               save_timing_cache=str(timing_cache) if timing_cache is not None else None)
    SaveEngine(engine, path=str(plan))()
    return {"tensorrt": trt.__version__, "polygraphy": polygraphy.__version__}
