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
from mixtrt.export.progress import to_stderr
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
ProfileShapes = dict[str, tuple[tuple[int, ...], ...]]  # input -> (min, opt, max) shapes
# (onnx path, optimisation profiles, opt level, timing cache or None, plan path) -> versions used
Builder = Callable[[Path, list[ProfileShapes], int, "Path | None", Path], dict[str, str]]


STATE_ACC, STATE_COUNT = "moe_state.acc", "moe_state.count"  # the MoE plugin's zeroed state (graph inputs)


def step_tokens(manifest: Manifest) -> int:
    """The most new tokens one engine step takes: the SWA plugin's fused ring write bounds a windowed cache's step
    to C - W + 1 (`trt_plugins.max_step_tokens`); a linear cache takes up to its capacity."""
    from mixtrt.plugins.trt_plugins import max_step_tokens

    return max_step_tokens(manifest.cache.capacity, manifest.cache.window or -1)


def profile_shapes(manifest: Manifest, max_batch: int, prefill: bool = False) -> ProfileShapes:
    """An optimisation profile over every graph input. The decode profile (profile 0): batch 1..max_batch (opt:
    max_batch), new tokens and logit positions 1..step_tokens (opt: 1); it serves every step. The prefill profile
    (`prefill`; profile 1, the runtime's for steps of 2 tokens or more): batch 1..max_batch (opt 1), new tokens
    2..step_tokens (opt: step_tokens), logit positions 1..step_tokens (opt 1). The cache buffers at their fixed size.
    TensorRT tunes each profile on its own, so the SWA plugin's tile (a tactic) is chosen per profile."""
    C = step_tokens(manifest)
    b_opt = 1 if prefill else max_batch
    shapes: ProfileShapes = {}
    for t in manifest.inputs:
        if t.name == "input_ids":
            shapes[t.name] = ((1, 2), (1, C), (max_batch, C)) if prefill else ((1, 1), (max_batch, 1), (max_batch, C))
        elif t.name == "logit_positions":
            shapes[t.name] = ((1, 1), (b_opt, 1), (max_batch, C))
        elif t.name == "total_lengths":
            shapes[t.name] = ((1,), (b_opt,), (max_batch,))
        else:  # past_key_values.{i}.key/value [batch, K, C, D]
            fixed = tuple(int(d) for d in t.shape[1:])
            shapes[t.name] = ((1, *fixed), (b_opt, *fixed), (max_batch, *fixed))
    return shapes


def profiles(manifest: Manifest, max_batch: int) -> list[ProfileShapes]:
    """The engine's profiles: decode, then prefill where a step may take 2 tokens or more."""
    decode = profile_shapes(manifest, max_batch)
    return [decode, profile_shapes(manifest, max_batch, prefill=True)] if step_tokens(manifest) >= 2 else [decode]


def build_engine(artifact: str | Path, *, max_batch: int = 8, opt_level: int = 3,
                 timing_cache: str | Path | None = None, force: bool = False, builder: Builder | None = None,
                 progress: Callable[[str], None] | None = to_stderr) -> Path:
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
    if TENSORRT_FEATURE in manifest.features and not force:
        raise ConfigError(f"{artifact}: already holds a TensorRT engine ({ENGINE_FILE}); pass --force to rebuild it")
    cache = Path(timing_cache) if timing_cache is not None else None
    if cache is not None and (cache.is_dir() or not cache.parent.is_dir()):
        raise ConfigError(f"--timing-cache {cache}: must be a file in an existing directory (read if it exists, "
                          "written after the build)")
    shapes = profiles(manifest, max_batch)
    build = builder or polygraphy_builder
    max_tokens = max_batch * step_tokens(manifest)
    with artifact_update(artifact) as staging, tempfile.TemporaryDirectory(dir=staging) as scratch:
        say(f"building {ENGINE_FILE} (max batch {max_batch}, optimisation level {opt_level})")
        trt_graph = Path(scratch) / "tensorrt.onnx"
        facts = tensorrt_graph(artifact / MODEL_FILE, trt_graph, max_tokens)
        versions = build(trt_graph, shapes, opt_level, cache, staging / ENGINE_FILE)
        if not (staging / ENGINE_FILE).is_file():
            raise ConfigError(f"{artifact}: the builder wrote no {ENGINE_FILE}")
        config = {"max_batch": max_batch, "opt_level": opt_level, "strongly_typed": True,
                  "max_step_tokens": step_tokens(manifest), **facts,
                  "profile": {k: [list(s) for s in v] for k, v in shapes[0].items()},
                  "prefill_profile": ({k: [list(s) for s in v] for k, v in shapes[1].items()} if len(shapes) > 1
                                      else None),
                  "timing_cache": str(cache) if cache is not None else None, "mixtrt": __version__, **versions}
        (staging / ENGINE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        files = {k: v for k, v in manifest.files.items() if k not in (ENGINE_FILE, ENGINE_CONFIG)}
        files.update(file_entries(staging, [ENGINE_FILE, ENGINE_CONFIG]))
        new = dataclasses.replace(
            manifest, files=files,
            features=tuple(dict.fromkeys((*manifest.features, TENSORRT_FEATURE))),
            backends=tuple(dict.fromkeys((*manifest.backends, "tensorrt"))),
            versions={**manifest.versions, "tensorrt": versions.get("tensorrt")},
            quantization=None if manifest.quantization is None else dataclasses.replace(
                manifest.quantization, graphs={**manifest.quantization.graphs, "tensorrt": MODEL_FILE}))
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
    - the custom ops' ONNX function bodies dropped (TensorRT runs the plugins);
    - for an int4 artifact (`int4_forms`): the int4 MoE node as a `MoEInt4` node (the INT4 plugin's fixed inputs),
      the embedding's GatherBlockQuantized and any MatMulNBits as DequantizeLinear + Gather / MatMul, INT8 scales
      made positive. The dense layers' INT4 DequantizeLinear -> MatMul stay as they are.

    Returns facts for the build config (MoE layers, state shapes, the int4 rewrites)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    int4 = int4_forms(graph, inits)
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
        if node.op_type == MOE_INT4:
            hidden_size = int(inits[node.input[4]].dims[1])  # fc2 [E, H, I/8]
            new_inputs = list(node.input)
        elif node.op_type == "MoE":
            E = (len(node.input) - 2) // 2
            experts = [numpy_helper.to_array(inits[n]) for n in node.input[2:]]
            hidden_size = int(experts[E].shape[0])
            stacked = []
            for part, arrays in (("fc1", experts[:E]), ("fc2", experts[E:])):
                name = f"{node.name}/{part}_stacked"
                graph.initializer.append(numpy_helper.from_array(np.stack(arrays), name))
                stacked.append(name)
            new_inputs = [node.input[0], node.input[1], *stacked]
        else:
            continue
        acc_out, count_out = f"{node.name}/acc_out", f"{node.name}/count_out"
        del node.input[:]
        node.input.extend([*new_inputs, acc, count])
        node.output.extend([acc_out, count_out])
        acc, count = acc_out, count_out
        moe_layers += 1
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if moe_layers:
        graph.input.extend([helper.make_tensor_value_info(STATE_ACC, onnx.TensorProto.FLOAT, [max_tokens, hidden_size]),
                            helper.make_tensor_value_info(STATE_COUNT, onnx.TensorProto.INT32, [max_tokens])])
        graph.output.extend([helper.make_tensor_value_info(acc, onnx.TensorProto.FLOAT, [max_tokens, hidden_size]),
                             helper.make_tensor_value_info(count, onnx.TensorProto.INT32, [max_tokens])])
    kept = [f for f in model.functions if f.domain != "mixtrt"]
    del model.functions[:]
    model.functions.extend(kept)
    onnx.save(model, str(out_path), save_as_external_data=True, location=out_path.name + ".data")
    state = {STATE_ACC: [max_tokens, hidden_size], STATE_COUNT: [max_tokens]} if moe_layers else None
    return {"moe_layers": moe_layers, "moe_state": state, "int4": int4 or None}


MOE_INT4 = "MoEInt4"  # the int4 MoE node of the TensorRT graph (plugin mixtrt::MoEInt4, plugins/trt_plugins.py)


def int4_forms(graph: Any, inits: dict[str, Any]) -> dict[str, int]:
    """Rewrite an int4 graph's quantized nodes in place into what TensorRT parses (docs/DESIGN.md "TensorRT"); returns
    how many of each were rewritten ({} for a float graph). Weights are found through the nodes that use them, as
    runtime/backends/graph_weights.py finds them:

    - `mixtrt::MoE` with 2 + 4E inputs (per expert MatMulNBits bytes [N, K/block, block/2] + scales [N, K/block])
      -> `mixtrt::MoEInt4(hidden, router_logits, fc1, fc1_scales, fc2, fc2_scales)`: fc1 [E, 2I, H/8] / fc2
      [E, H, I/8] INT32 words holding plugins/int4.py's bytes (two's complement, element 2j in the low nibble:
      the per-expert bytes XOR 0x88, stacked; INT32 because TensorRT takes no UINT8 tensor into a plugin), scales
      [E, N, K/block] fp32 unchanged; the state inputs are added by `tensorrt_graph`;
    - `com.microsoft.GatherBlockQuantized` (the embedding; uint8, zero point 2^(bits-1)) -> `DequantizeLinear`
      (signed INT4 / INT8 table [V, H], scales [V, H/block], axis 1, block_size) -> `Gather`;
    - `com.microsoft.MatMulNBits` (bits 4 / 8, no zero points) -> `DequantizeLinear` (INT4 / INT8 W^T [K, N], axis 0,
      block_size) -> `MatMul`;
    - INT8 `DequantizeLinear` scales made positive (TensorRT's parser refuses a scale <= 0 for INT8: a zero scale,
      an all-zero block, becomes 1; a negative one moves its sign into the INT8 values, exact as |q| <= 127).
      INT4 scales stay as they are: RTN's signed scales are negative where a block's largest-magnitude weight is
      positive, and TensorRT-RTX 1.7's parser takes negative and zero INT4 scales (tested); folding the sign into
      INT4 values is not exact (-(-8) = 8 is no INT4 value)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from mixtrt.runtime.backends.graph_weights import _unsigned

    done: dict[str, int] = {}
    arrays: dict[str, Any] = {}
    new_inits: list[Any] = []

    def array(name: str) -> Any:
        if name not in inits:
            raise ConfigError(f"{name}: a quantized weight that is not an initializer; this graph was not exported by "
                              "this mixtrt")
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    def attrs(node: Any) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def signed_tensor(name: str, q: Any, bits: int) -> Any:
        """int8 values q (in [-8, 7] for 4 bits) -> an INT4 / INT8 initializer of q's shape."""
        if bits == 8:
            return numpy_helper.from_array(np.ascontiguousarray(q.astype(np.int8)), name)
        flat = q.astype(np.int8).reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.int8)])
        nib = flat.view(np.uint8) & 0x0F
        raw = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
        return helper.make_tensor(name, TensorProto.INT4, list(q.shape), raw, raw=True)

    def positive(q: Any, scales: Any, axis: int, block: int, where: str) -> tuple[Any, Any]:
        """INT8 values and scales with every scale > 0 and the same products."""
        scales = np.asarray(scales, np.float32)
        neg = np.repeat(scales < 0, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        if (q[neg] == -128).any():
            raise ConfigError(f"{where}: an INT8 value -128 under a negative scale cannot move its sign into the value")
        q = np.where(neg, -q.astype(np.int16), q).astype(np.int8)
        scales = np.abs(scales)
        return q, np.where(scales == 0, np.float32(1.0), scales)

    def count(kind: str) -> None:
        done[kind] = done.get(kind, 0) + 1

    nodes: list[Any] = []
    for node in graph.node:
        a = attrs(node)
        if node.domain == "mixtrt" and node.op_type == "MoE" and inits.get(node.input[2]) is not None \
                and inits[node.input[2]].data_type == TensorProto.UINT8:
            E = (len(node.input) - 2) // 4
            if len(node.input) != 2 + 4 * E:
                raise ConfigError(f"MoE node {node.name}: {len(node.input)} inputs, not the int4 form's 2 + 4E")
            new_inputs = list(node.input[:2])
            for j, fc in enumerate(("fc1", "fc2")):
                part = list(node.input[2 + 2 * E * j: 2 + 2 * E * (j + 1)])
                packed = [array(n) for n in part[0::2]]
                blocks = [array(n) for n in part[1::2]]
                if any(p.dtype != np.uint8 or p.ndim != 3 or (p.shape[1] * p.shape[2]) % 4 for p in packed):
                    raise ConfigError(f"MoE node {node.name}: {fc} bytes are not uint8 [N, K/block, block/2] with K a "
                                      "multiple of 8")
                words = np.stack([p.reshape(p.shape[0], -1) ^ 0x88 for p in packed]).view(np.int32)
                new_inits += [numpy_helper.from_array(np.ascontiguousarray(words), f"{node.name}/{fc}_int4"),
                              numpy_helper.from_array(np.stack(blocks).astype(np.float32),
                                                      f"{node.name}/{fc}_scales")]
                new_inputs += [f"{node.name}/{fc}_int4", f"{node.name}/{fc}_scales"]
            node.op_type = MOE_INT4
            del node.input[:]
            node.input.extend(new_inputs)
            count("moe")
        elif node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft":
            bits, block = int(a.get("bits", 4)), int(a["block_size"])
            if int(a.get("gather_axis", 0)) != 0 or int(a.get("quantize_axis", 1)) != 1 or bits not in (4, 8) \
                    or (len(node.input) > 3 and node.input[3]):
                raise ConfigError(f"GatherBlockQuantized node {node.name} ({a}, {len(node.input)} inputs): only "
                                  "gather_axis 0, quantize_axis 1, bits 4 or 8, the default zero point are rewritten")
            table, scales = array(node.input[0]), array(node.input[2])
            name = f"{node.name}/table"
            if inits[node.input[0]].data_type in (TensorProto.INT4, TensorProto.INT8):
                q = table.astype(np.int8)
            else:
                q = _unsigned(table, bits).reshape(table.shape[0], -1).astype(np.int16) - (1 << (bits - 1))
            if bits == 8:
                q, scales = positive(q, scales, 1, block, f"GatherBlockQuantized node {node.name}")
            new_inits += [signed_tensor(name, q, bits),
                          numpy_helper.from_array(np.ascontiguousarray(scales, np.float32), f"{name}_scales")]
            nodes.append(helper.make_node("DequantizeLinear", [name, f"{name}_scales"], [f"{name}_dq"],
                                          name=f"{node.name}/table_DequantizeLinear", axis=1, block_size=block))
            node.CopyFrom(helper.make_node("Gather", [f"{name}_dq", node.input[1]], list(node.output), name=node.name,
                                           axis=0))
            count("gather")
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            n, k, bits, block = int(a["N"]), int(a["K"]), int(a.get("bits", 4)), int(a["block_size"])
            if bits not in (4, 8) or k % block or any(node.input[3:]):
                raise ConfigError(f"MatMulNBits node {node.name}: bits {bits}, block {block}, K {k}, "
                                  f"{len(node.input)} inputs: only bits 4 / 8 without zero points, g_idx or bias "
                                  "are rewritten")
            q = _unsigned(array(node.input[1]), bits).reshape(n, -1)[:, :k].astype(np.int16) - (1 << (bits - 1))
            scales = np.asarray(array(node.input[2]), np.float32).reshape(n, -1)
            if bits == 8:
                q, scales = positive(q, scales, 1, block, f"MatMulNBits node {node.name}")
            name = f"{node.name}/weight"
            new_inits += [signed_tensor(name, np.ascontiguousarray(q.T), bits),
                          numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{name}_scales")]
            nodes.append(helper.make_node("DequantizeLinear", [name, f"{name}_scales"], [f"{name}_dq"],
                                          name=f"{node.name}/weight_DequantizeLinear", axis=0, block_size=block))
            node.CopyFrom(helper.make_node("MatMul", [node.input[0], f"{name}_dq"], list(node.output), name=node.name))
            count("matmulnbits")
        elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") \
                and inits.get(node.input[0]) is not None and inits[node.input[0]].data_type == TensorProto.INT8:
            scales = array(node.input[1])
            if (scales <= 0).any():
                block = int(a.get("block_size", 0))
                axis = int(a.get("axis", 1)) % array(node.input[0]).ndim
                if block <= 0:
                    raise ConfigError(f"DequantizeLinear node {node.name}: INT8 scales <= 0 outside blocks")
                q, scales = positive(array(node.input[0]), scales, axis, block, f"DequantizeLinear node {node.name}")
                name = f"{node.name}/positive"
                new_inits += [signed_tensor(name, q, 8), numpy_helper.from_array(scales, f"{name}_scales")]
                node.input[0], node.input[1] = name, f"{name}_scales"
                count("int8_scales")
        nodes.append(node)
    if done:
        del graph.node[:]
        graph.node.extend(nodes)  # each new DequantizeLinear comes before the node that reads it
        graph.initializer.extend(new_inits)
    return done


def polygraphy_builder(onnx_path: Path, shapes: list[ProfileShapes], opt_level: int, timing_cache: Path | None,
                       plan: Path) -> dict[str, str]:
    """The real build (needs TensorRT and a CUDA GPU): plugins registered, strongly typed network, the profiles
    (decode, prefill), aliased plugin IO (the KV cache written in place), timing cache read and written."""
    import polygraphy
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    from mixtrt.plugins.trt_plugins import register_all

    register_all()
    profs = []
    for shape in shapes:
        prof = Profile()
        for name, (lo, opt, hi) in shape.items():
            prof.add(name, min=lo, opt=opt, max=hi)
        profs.append(prof)
    preview = [f for f in (getattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None),) if f is not None]
    kwargs: dict[str, Any] = {"profiles": profs, "builder_optimization_level": opt_level,
                              "preview_features": preview}
    if timing_cache is not None:
        kwargs["load_timing_cache"] = str(timing_cache) if timing_cache.exists() else None
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    engine = EngineFromNetwork(network, CreateConfig(**kwargs),
                               save_timing_cache=str(timing_cache) if timing_cache is not None else None)
    SaveEngine(engine, path=str(plan))()
    return {"tensorrt": trt.__version__, "polygraphy": polygraphy.__version__}
