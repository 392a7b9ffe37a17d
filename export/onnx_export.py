"""Export a checkpoint to an artifact directory: manifest.json + model.onnx (+ .data) + tokenizer.model.

The reference model's `CausalLM.step` is traced with torch.onnx.export(dynamo=True). Attention and
the MoE reach the graph through our torch custom ops, which translate to `mixtrt::SlidingWindowAttention`
and `mixtrt::MoE` nodes; each node type carries a model-local ONNX function body (onnxruntime contrib
ops), so onnxruntime runs the graph as is and TensorRT can swap in our plugins.

One graph serves prefill and decode:

    input_ids [batch, sequence] int64 ─────┐
    total_lengths [batch] int32 ───────────┼─► 32 x Block ─► norm ─► Gather(positions) ─► lm_head ─► logits
    logit_positions [batch, positions] ────┤                                         [batch, positions, vocab]
    past_key_values.{i}.key/value ─────────┘                 present.{i}.key/value  (same shape as past)
        [batch, kv_heads, C, head_dim]

C (cache capacity) is fixed at export: window + slack for sliding-window models, else the max context.
logit_positions picks which of the new tokens get logits: [[sequence-1]] for a prefill that only samples
the next token (the lm_head then runs on one row instead of `sequence`), arange(sequence) for prompt
logprobs.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mixtrt.runtime import __version__
from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.cache import cache_capacity
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.manifest import CacheSpec, Manifest, atomic_dir, check_target, file_entries

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# Linear (no-window) caches cost memory per position, so their default context is bounded.
DEFAULT_LINEAR_CONTEXT = 4096
# Past this many bytes of weights the graph keeps them in model.onnx.data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30
OPSET = 20


class _Step(torch.nn.Module):
    """The traced entry point: (input_ids, total_lengths, logit_positions, [k0, v0, k1, v1, ...])
    -> (logits, presents...)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, total_lengths, logit_positions, past_key_values: list[torch.Tensor]):
        return self.lm.step(input_ids, total_lengths, logit_positions, *past_key_values)


def default_out_dir(checkpoint_dir: Path, precision: str) -> Path:
    return Path("engines") / f"{Path(checkpoint_dir).resolve().name}-{precision}"


def resolve_max_context(args: ModelArgs, max_context: int | None) -> int:
    if max_context is None:
        _, windowed = cache_capacity(args, args.max_position_embeddings)
        return args.max_position_embeddings if windowed else min(args.max_position_embeddings, DEFAULT_LINEAR_CONTEXT)
    if max_context < 1 or max_context > args.max_position_embeddings:
        raise ConfigError(f"--max-context {max_context} must be in [1, max_position_embeddings="
                          f"{args.max_position_embeddings}]")
    return max_context


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    precision: str = "fp32",
    max_context: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Export `checkpoint_dir` to the artifact directory `out_dir` (default engines/<name>-<precision>)."""
    from mixtrt.export.checkpoint import load_model
    from mixtrt.plugins.onnx_functions import custom_translation_table

    say = progress or (lambda _msg: None)
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {sorted(PRECISIONS)}")
    checkpoint_dir = Path(checkpoint_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint_dir, precision)
    args = ModelArgs.from_checkpoint_dir(checkpoint_dir)
    if args.head != "causal_lm":
        raise ConfigError(f"{checkpoint_dir}: {args.architecture} has no language-model head; export needs a "
                          "*ForCausalLM checkpoint")
    max_context = resolve_max_context(args, max_context)
    capacity, windowed = cache_capacity(args, max_context)
    tokenizer_src = _find_tokenizer(checkpoint_dir, args)
    check_target(out_dir, overwrite=overwrite)  # before the (slow) weight loading

    t0 = time.perf_counter()
    say(f"loading {checkpoint_dir} ({args.architecture}, {args.num_hidden_layers} layers)")
    model = load_model(checkpoint_dir, dtype=PRECISIONS[precision])
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    say(f"  {n_params / 1e6:.1f} M parameters, {weight_bytes / 2**20:.0f} MiB ({time.perf_counter() - t0:.1f} s)")

    inputs, outputs = Manifest.graph_io(args, capacity, precision)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        say(f"tracing the graph (cache capacity {capacity}, {'windowed' if windowed else 'linear'} layout)")
        t1 = time.perf_counter()
        program = _trace(model, args, capacity, custom_translation_table(),
                         [t.name for t in inputs], [t.name for t in outputs])
        say(f"  traced in {time.perf_counter() - t1:.1f} s")
        say("writing model.onnx")
        names = _save(program.model, tmp, external=weight_bytes > EXTERNAL_DATA_BYTES)
        opsets = _finish_graph(tmp / "model.onnx", windowed=windowed, max_context=max_context)
        shutil.copyfile(tokenizer_src, tmp / "tokenizer.model")
        names.append("tokenizer.model")
        say("hashing files")
        manifest = Manifest(
            args=args,
            precision=precision,
            max_context=max_context,
            cache=CacheSpec(capacity=capacity, layout="windowed" if windowed else "linear",
                            window=args.sliding_window if windowed else None,
                            dtype="float16" if precision == "fp16" else "float32"),
            inputs=inputs,
            outputs=outputs,
            opsets=opsets,
            files=file_entries(tmp, names),
            versions=_versions(),
            source=str(checkpoint_dir.resolve()),
        )
        manifest.save(tmp)
    say(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def is_current(artifact_dir: str | Path, checkpoint_dir: str | Path) -> bool:
    """True when artifact_dir holds an artifact exported from checkpoint_dir after the checkpoint's files
    last changed, with this mixtrt's graph IO (else it should be exported again)."""
    from mixtrt.runtime.errors import ArtifactError

    artifact_dir, checkpoint_dir = Path(artifact_dir), Path(checkpoint_dir)
    try:
        built = (artifact_dir / "manifest.json").stat().st_mtime
        m = Manifest.load(artifact_dir, verify=False)
        m.check_graph_io(artifact_dir)
        return (m.source == str(checkpoint_dir.resolve())
                and all(f.stat().st_mtime <= built for f in checkpoint_dir.iterdir() if f.is_file()))
    except (ArtifactError, OSError):
        return False


def _find_tokenizer(checkpoint_dir: Path, args: ModelArgs) -> Path:
    from mixtrt.runtime.tokenizer import Tokenizer

    tok = Tokenizer.load(checkpoint_dir)
    if tok.vocab_size > args.vocab_size:
        raise ConfigError(f"{tok.path}: the tokenizer has {tok.vocab_size} pieces but the model only "
                          f"{args.vocab_size} embeddings; put the model's own tokenizer.model in {checkpoint_dir}")
    return tok.path


def _trace(model: torch.nn.Module, args: ModelArgs, capacity: int, table: dict,
           in_names: list[str], out_names: list[str]):
    dtype = next(model.parameters()).dtype
    # example sizes, all different: every dim is dynamic (size-1 examples would be specialised, equal
    # sizes would be taken for the same dim)
    batch, seq, picked = 2, 3, 4  # picked: logit positions
    kv_shape = (batch, args.num_key_value_heads, capacity, args.head_dim)
    past = [torch.zeros(kv_shape, dtype=dtype) for _ in range(2 * args.num_hidden_layers)]
    positions = torch.arange(picked).clamp(max=seq - 1).repeat(batch, 1)  # [batch, picked] int64
    example = (torch.ones(batch, seq, dtype=torch.int64), torch.full((batch,), seq, dtype=torch.int32), positions,
               past)
    b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=1, max=1 << 20)
    p = torch.export.Dim("positions", min=1, max=1 << 20)
    dynamic = ({0: b, 1: s}, {0: b}, {0: b, 1: p}, [{0: b}] * len(past))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        return torch.onnx.export(
            _Step(model).eval(), example, dynamo=True, custom_translation_table=table,
            dynamic_shapes=dynamic, input_names=in_names, output_names=out_names,
            opset_version=OPSET, optimize=True, verbose=False,
        )


def _finish_graph(path: Path, *, windowed: bool, max_context: int) -> dict[str, int]:
    """Attach the custom ops' function bodies, set the attention nodes' cache layout, name the nodes, check.

    Works on the graph without loading external data, so it costs the same for a 7B model as for a tiny one.
    """
    import onnx

    from mixtrt.plugins.onnx_functions import attach_functions

    model = onnx.load(str(path), load_external_data=False)
    attach_functions(model)
    _set_cache_layout(model.graph, windowed=windowed, max_context=max_context)
    _name_nodes(model.graph)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def _set_cache_layout(graph, *, windowed: bool, max_context: int) -> None:
    """The traced nodes carry each layer's model window; the artifact's cache layout decides the rest.

    A window at least as long as the context never bites (window -> -1, full causal). A linear cache
    (no window anywhere, or a full-attention layer beside windowed ones) keeps row j = position j, so
    windowed layers mask their window inside it (windowed_cache=0, onnxruntime's shared-buffer mode).
    """
    from onnx import helper

    for node in graph.node:
        if node.domain != "mixtrt" or node.op_type != "SlidingWindowAttention":
            continue
        attrs = {a.name: a for a in node.attribute}
        if attrs["window"].i >= max_context:
            attrs["window"].CopyFrom(helper.make_attribute("window", -1))
        attrs["windowed_cache"].CopyFrom(helper.make_attribute("windowed_cache", int(windowed)))


def _name_nodes(graph) -> None:
    """Stable node names from the module path: /model/layers.3/attention/MatMul_0 (torch's metadata)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        base = f"{_scope_path(props.get('pkg.torch.onnx.name_scopes', ''))}/{node.op_type}"
        n = counts.get(base, 0)
        counts[base] = n + 1
        node.name = f"{base}_{n}"


def _scope_path(scope: str) -> str:
    """"['', 'lm.model', 'lm.model.layers.0.attention', 'linear_3']" -> "/model/layers.0/attention".

    The last entry is the fx node's own name; the one before it is the deepest module.
    """
    import ast

    try:
        scopes = ast.literal_eval(scope) if scope else []
    except (ValueError, SyntaxError):
        scopes = []
    parts = (scopes[-2] if len(scopes) >= 2 else "").split(".")
    while parts and (parts[0] in ("", "lm") or parts[0].startswith("_")):
        parts = parts[1:]
    out, i = [], 0
    while i < len(parts):  # keep "layers.3" together
        if parts[i] == "layers" and i + 1 < len(parts):
            out.append(f"layers.{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return "/" + "/".join(out) if out else ""


def _save(ir_model, directory: Path, *, external: bool) -> list[str]:
    import onnx_ir as ir

    path = directory / "model.onnx"
    if external:
        ir.save(ir_model, path, external_data="model.onnx.data")
        return ["model.onnx", "model.onnx.data"]
    ir.save(ir_model, path)
    return ["model.onnx"]


def _versions() -> dict[str, str | None]:
    import onnx
    import onnxruntime

    try:
        import onnxscript

        onnxscript_version = onnxscript.__version__
    except ImportError:
        onnxscript_version = None
    return {"mixtrt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript_version, "onnxruntime": onnxruntime.__version__, "tensorrt": None}
