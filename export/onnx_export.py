"""Export a checkpoint to an artifact directory: manifest.json + model.onnx (+ .data) + the checkpoint's
tokenizer file (tokenizer.model, tokenizer.model.v3, tekken.json, ...; which one and the chat format are
decided by `resolve_chat_format` and recorded as the manifest's `chat`).

The reference model's `CausalLM.step` (a causal LM) or one cache-less pass of its head (the base model and
the classifier heads: Manifest.graph_io) is traced with torch.onnx.export(dynamo=True). Attention and
the MoE reach the graph through our torch custom ops, which translate to `mixtrt::SlidingWindowAttention`
and `mixtrt::MoE` nodes; each node type carries a model-local ONNX function body (onnxruntime contrib
ops), so onnxruntime runs the graph as is and TensorRT can swap in our plugins.

The model is traced on the meta device (no weights in memory); the weights are then streamed from the
checkpoint into model.onnx.data one tensor at a time (export/weights_writer.py), with weights.json saying
where each lives. Memory stays a few tensors whatever the model's size.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mixtrt import __version__
from mixtrt.export.model import HEADS, CausalLM, SequenceClassifier, Transformer, finish_loaded
from mixtrt.export.progress import Progress, to_stderr
from mixtrt.export.quantize import (
    Int4Options,
    Int4Plan,
    bytes_per_token,
    check_patterns,
    graph_facts,
    rtn,
    rtn_max7,
)
from mixtrt.export.weights_writer import (
    GraphWeight,
    Stored,
    Transform,
    our_name,
    prepare_graph,
    weight_bytes,
    write_weights,
)
from mixtrt.runtime.args import ModelArgs, described_by
from mixtrt.runtime.backends import EXPORT_BACKENDS, window_slack
from mixtrt.runtime.cache import CachePlan
from mixtrt.runtime.chat_format import GENERATION_CONFIG, load_chat_tokenizer, resolve_chat_format, unused_choices
from mixtrt.runtime.errors import ConfigError, MixtrtWarning
from mixtrt.runtime.manifest import (
    HEADS_FEATURE,
    INT4_FEATURE,
    MANIFEST,
    MODEL_FILE,
    WEIGHT_INDEX_FEATURE,
    Manifest,
    atomic_dir,
    check_target,
    file_entries,
)
from mixtrt.runtime.precision import PRECISIONS
from mixtrt.runtime.weights import DATA_FILE, WEIGHTS_FILE

GPTQ_DIR = ".gptq"  # --method gptq's roundings, inside the artifact being written until the writer read them

# Linear (no-window) caches cost memory per position, so their default context is bounded.
DEFAULT_LINEAR_CONTEXT = 4096
# The most positions an artifact serves (its rope tables hold them; the graph's sequence dimension stops here).
MAX_CONTEXT = 1 << 20
OPSET = 20


class _Step(torch.nn.Module):
    """The traced entry point of a causal LM: (input_ids, total_lengths, logit_positions, [k0, v0, k1, v1, ...])
    -> (logits, presents...)."""

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, total_lengths, logit_positions, past_key_values: list[torch.Tensor]):
        return self.lm.step(input_ids, total_lengths, logit_positions, *past_key_values)


class _Pass(torch.nn.Module):
    """The traced entry point of the other heads: one pass over right-padded rows, no cache: input_ids ->
    the head's outputs (Manifest.graph_io)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        m = self.model
        if isinstance(m, Transformer):
            return m.run(input_ids)[0]  # last_hidden_state [B, T, H]
        if isinstance(m, SequenceClassifier):
            return m.pooled(input_ids)  # [B, L] at the last non-pad token (any batch size)
        return m(input_ids)  # token classification [B, T, L]; question answering (start, end) [B, T] each


def default_out_dir(checkpoint_dir: Path, precision: str) -> Path:
    """engines/<name>-<precision>: the checkpoint folder's name, or for a Hugging Face hub cache's snapshot
    (`models--ORG--NAME/snapshots/<commit>`) the model's NAME, not the commit hash.

        >>> default_out_dir(Path("/c/hub/models--mistralai--Mistral-7B-v0.1/snapshots/" + "a" * 40), "int4").as_posix()
        'engines/Mistral-7B-v0.1-int4'
    """
    path = Path(checkpoint_dir).resolve()
    name = path.name
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        name = path.parent.parent.name.split("--")[-1] or name
    return Path("engines") / f"{name}-{precision}"


def resolve_max_context(args: ModelArgs, max_context: int | None) -> int:
    """The positions the artifact serves: at least 2 (a prompt token and a generated one), at most
    max_position_embeddings and MAX_CONTEXT (an artifact holds rope tables of that many positions). The
    default: max_position_embeddings, bounded by DEFAULT_LINEAR_CONTEXT for a causal LM with a linear cache
    (a head without a cache has no cache memory to bound)."""
    if max_context is None:
        windowed = CachePlan.for_model(args, args.max_position_embeddings).windowed
        bounded = not windowed and args.head == "causal_lm"
        max_context = min(args.max_position_embeddings, DEFAULT_LINEAR_CONTEXT) if bounded \
            else args.max_position_embeddings
        if max_context > MAX_CONTEXT:
            raise ConfigError(f"max_position_embeddings={args.max_position_embeddings} is more positions than an "
                              f"artifact serves ({MAX_CONTEXT}); pass --max-context N <= {MAX_CONTEXT}")
        return max_context
    if not isinstance(max_context, int) or isinstance(max_context, bool):
        raise ConfigError(f"--max-context must be an integer, got {max_context!r}")
    high = min(args.max_position_embeddings, MAX_CONTEXT)
    if not 2 <= max_context <= high:
        raise ConfigError(f"--max-context {max_context} must be in [2, {high}] (a prompt token and a generated one, "
                          f"up to max_position_embeddings={args.max_position_embeddings}"
                          + (f" and the {MAX_CONTEXT} positions an artifact serves)" if high == MAX_CONTEXT else ")"))
    return max_context


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    precision: str = "fp32",
    max_context: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = to_stderr,
    progress_bar: bool | None = None,
    transform: Transform | None = None,
    int4: Int4Options | None = None,
    chat_format: str = "auto",
) -> Path:
    """Export `checkpoint_dir` to the artifact directory `out_dir` (default engines/<name>-<precision>).

    progress: where stage lines go (None: quiet). progress_bar: a tqdm bar over the bytes written, on
    stderr (None: when stderr is a terminal). transform: the per-weight hook of export/weights_writer.py.
    precision "int4": INT4 weights (export/quantize.py), as `int4` says (default Int4Options(): RTN, block 32).
    chat_format: "auto", "mistral-common" or "jinja": which chat format a checkpoint that ships both a mistral-common
    tokenizer file and a Jinja template gets (runtime/chat_format.py's `prefer`).
    """
    from mixtrt.export.checkpoint import open_checkpoint, warn_untied
    from mixtrt.plugins.onnx_common import custom_translation_table

    say = Progress(progress, progress_bar)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {sorted(PRECISIONS)}")
    if int4 is not None and precision != "int4":
        raise ConfigError(f"int4 options given for precision {precision}: pass --precision int4")
    if precision == "int4":
        if isinstance(int4, Mapping):  # the options as keyword arguments
            try:
                int4 = Int4Options(**int4)
            except TypeError:
                raise ConfigError(f"int4: unknown options {sorted(set(int4) - set(Int4Options.__dataclass_fields__))};"
                                  f" the options are {list(Int4Options.__dataclass_fields__)}") from None
        int4 = int4 or Int4Options()
        if not isinstance(int4, Int4Options):
            raise ConfigError(f"int4 must be an Int4Options (mixtrt.export.quantize) or a dict of its fields, got "
                              f"{type(int4).__name__}")
        int4.check()
    checkpoint_dir = Path(checkpoint_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint_dir, precision)
    args = ModelArgs.from_checkpoint_dir(checkpoint_dir)
    if precision == "int4" and args.head != "causal_lm":
        raise ConfigError(f"--precision int4 serves causal LMs; {checkpoint_dir} is a {args.head} model")
    max_context = resolve_max_context(args, max_context)
    attention = attention_body(args)
    lm = args.head == "causal_lm"
    if lm:
        plan = CachePlan.for_model(args, max_context, PRECISIONS[precision], slack=window_slack(EXPORT_BACKENDS))
    else:  # scores whole texts: no cache in the graph (docs/DESIGN.md, "Heads without a cache")
        plan = CachePlan.one_pass(args, max_context, PRECISIONS[precision])
    # the tokenizer and chat format, checked against the model before the (slow) weight writing
    chat = resolve_chat_format(checkpoint_dir, vocab_size=args.vocab_size, prefer=chat_format)
    tokenizer = load_chat_tokenizer(None, chat, args.vocab_size)
    if chat.note:  # a substituted tokenizer: said whatever `progress` is (the CLI prints it as one line)
        warnings.warn(f"{checkpoint_dir}: {chat.note}", MixtrtWarning, stacklevel=2)
    unused = unused_choices(checkpoint_dir) if lm else []
    if unused:  # transformers' generate would honour them: say so once, at export (inspect lists every unused key)
        warnings.warn(f"{Path(checkpoint_dir) / GENERATION_CONFIG}: {', '.join(unused)} would change transformers' "
                      "tokens and have no counterpart in mixtrt: not used", MixtrtWarning, stacklevel=2)
    eos, where = chat.generation.eos(args.eos_token_ids)
    if chat.kind == "jinja" and tokenizer.eos_id not in eos and args.head == "causal_lm":
        # a ChatML fine-tune whose generation_config.json still names </s>: replies would not end at <|im_end|>
        warnings.warn(f"{checkpoint_dir}: the chat template's eos_token {chat.special_tokens.get('eos_token')!r} "
                      f"(id {tokenizer.eos_id}) is not among the eos ids generation stops on, {eos} (from {where}): "
                      "replies will not end at it; add it to generation_config.json's eos_token_id",
                      MixtrtWarning, stacklevel=2)
    check_target(out_dir, overwrite=overwrite)

    t0 = time.perf_counter()
    dtype = getattr(torch, PRECISIONS[precision])
    if int4 is not None:  # a --keep-float / --int8 typo is said now, not after calibrating or tracing
        check_patterns(int4, _meta_model(args, plan, dtype))
    calibration = None
    seqs: list[list[int]] = []
    if int4 is not None and int4.method != "rtn":
        from mixtrt.export.calibration import MAX_TOKENS, calibration_ids

        # a sequence must fit the model's positions and, without a window, the cache the plan gives each row
        longest = args.max_position_embeddings if plan.windowed else min(args.max_position_embeddings, plan.capacity)
        seqs, source, tokens, total = calibration_ids(int4.calibration, tokenizer, longest)
        calibration = {"source": source, "tokens": tokens}
        read = min(total, MAX_TOKENS)
        cut = "".join((f" of its {total}" if tokens < total else "",
                       f": the first {MAX_TOKENS} are read" if total > MAX_TOKENS else "",
                       f"{',' if total > MAX_TOKENS else ':'} in {len(seqs)} sequences of {len(seqs[0])}, the last "
                       f"{read - tokens} left over" if tokens < read else ""))
        say(f"{int4.method}: calibrating on {source} ({tokens} tokens{cut})")
    if int4 is not None and int4.method == "awq":  # scales moved into the float weights, written by the hook
        from mixtrt.export.awq import awq_transform

        transform, nearest = awq_transform(checkpoint_dir, plan, seqs, int4, say, transform)
        if nearest and calibration is not None:
            calibration["nearest"] = nearest
    # which description was read (a Hugging Face repository of a Mistral model may hold both, as transformers
    # reads config.json)
    described = described_by(checkpoint_dir)
    if described == "params.json" and (Path(checkpoint_dir) / "config.json").is_file():
        warnings.warn(f"{checkpoint_dir}: config.json has no safetensors weights beside it (no model.safetensors, no "
                      "shard its index names): exporting the raw Mistral checkpoint there (params.json and its "
                      "consolidated weights)",
                      MixtrtWarning, stacklevel=2)
    say(f"reading {checkpoint_dir} ({described}: {args.architecture}, {args.num_hidden_layers} layers)")
    with open_checkpoint(checkpoint_dir) as ckpt:  # headers only: names, shapes, dtypes checked up front
        if ckpt.args != args:  # a tied lm_head whose weights differ from the embedding: untied, as transformers
            warn_untied(checkpoint_dir)
            args = ckpt.args
        model = _meta_model(args, plan, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        # int4: the float weights before quantizing (the written size follows the writing)
        floats = f"{n_params * dtype.itemsize / 2**20:.0f} MiB in {precision if precision != 'int4' else 'fp32'}"
        say(f"  {n_params / 1e6:.1f} M parameters, {floats}")
        inputs, outputs = Manifest.graph_io(args, plan.capacity, precision)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            shape = f"cache capacity {plan.capacity}, {plan.layout} layout" if lm else f"{args.head} head, no cache"
            say(f"tracing the graph ({shape}, attention body {attention})")
            t1 = time.perf_counter()
            program = _trace(model, args, plan.capacity, custom_translation_table(),
                             [t.name for t in inputs], [t.name for t in outputs])
            weights = _prepare(program.model, model, args, max_context)
            say(f"  traced in {time.perf_counter() - t1:.1f} s")
            hook, int4_plan = transform, None
            if int4 is not None:  # quantized tensor by tensor as the writer streams (export/quantize.py)
                say(f"quantizing to int4 ({int4.method}, block {int4.block_size}) while writing")
                # awq has moved activation scales into the float weights already (the hook before this one)
                int4_plan = Int4Plan.of_graph(program.model, weights, int4, rtn if int4.method == "rtn" else rtn_max7,
                                              _node_label)
                targets = int4_plan.targets()
                # the plan's blocks first, then each int4 linear rounded layer by layer (none: nothing to round)
                if int4.method == "gptq" and any(bits == 4 for _, bits in targets.values()):
                    from mixtrt.export.gptq import gptq_pass

                    gptq = gptq_pass(checkpoint_dir, plan, seqs, targets, tmp / GPTQ_DIR, say,
                                     int4_plan.table_roundtrip())
                    int4_plan.quantizer = gptq.quantizer
                    if gptq.nearest and calibration is not None:
                        calibration["nearest"] = gptq.nearest
                hook = _chain(transform, int4_plan.transform)
                if not int4_plan.int4_tensors:  # said whatever `progress` is: the artifact is int4 in name only
                    reasons = sorted(set(int4_plan.floats.values()))
                    if int4_plan.eight:
                        reasons.append(f"INT8 for {len(int4_plan.eight)} by --int8 or its default")
                    warnings.warn(f"{checkpoint_dir}: --precision int4 stores no weight in INT4 here "
                                  f"({'; '.join(reasons) or 'nothing to quantize'}): the artifact keeps its linears "
                                  "in float or INT8", MixtrtWarning, stacklevel=2)
                elif int4_plan.experts_unblocked:
                    # most of a MoE model's bytes: said whatever `progress` is, not only in the summary (every block
                    # size was tried: no --block-size helps)
                    warnings.warn(f"{checkpoint_dir}: --precision int4 keeps the experts in float: "
                                  f"{int4_plan.experts_unblocked}", MixtrtWarning, stacklevel=2)
                eight = [i.label for i in int4_plan.items.values() if i.kind == "linear" and i.bits == 8]
                if int4_plan.options.accuracy_level == 0 and eight:  # README's INT4: --accuracy-level
                    shown = ", ".join(eight[:3]) + (f" and {len(eight) - 3} more" if len(eight) > 3 else "")
                    warnings.warn(f"{checkpoint_dir}: --accuracy-level 0 with {shown} in INT8: onnxruntime has no "
                                  "fp32-activation kernel for an 8-bit MatMulNBits and dequantizes those weights "
                                  "every step (decode tens of times slower); use --accuracy-level 4, or --int8 "
                                  "embed_tokens to put them in INT4", MixtrtWarning, stacklevel=2)
            total = sum(weight_bytes(w) for w in weights)
            t2 = time.perf_counter()
            with say.bytes(total, f"writing {DATA_FILE}") as tick:
                index, sha, size = write_weights(program.model, weights, ckpt.tensor, ckpt.sources, dtype, tmp,
                                                 on_bytes=tick, transform=hook)
            if (tmp / GPTQ_DIR).exists():  # gptq's roundings, each read by the writer: never left in the artifact
                shutil.rmtree(tmp / GPTQ_DIR)
            seconds = time.perf_counter() - t2
            say(f"  {size / 2**20:.0f} MiB in {seconds:.1f} s ({size / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
            say(f"writing {MODEL_FILE}")
            _save(program.model, tmp)
            quantization = None
            moe = args.moe

            def rewrite(m) -> dict:  # the int4 form (if any), then the summary's facts
                if int4_plan is not None:
                    int4_plan.rewrite(m, index)
                if not lm:  # a head that scores whole texts decodes nothing
                    return graph_facts(m)
                return {**graph_facts(m), "bytes_per_token": bytes_per_token(
                    m, moe.num_experts_per_tok if moe else None, moe.num_experts if moe else None)}

            if int4_plan is not None:
                quantization = int4_plan.record(calibration, MODEL_FILE)
                say(int4_plan.summary())
            opsets, summary = _finish_graph(tmp / MODEL_FILE,
                                            Manifest.graph_metadata(args, precision, max_context, plan), rewrite)
            summary["attention_body"] = attention
            index.save(tmp)
            names = [MODEL_FILE, WEIGHTS_FILE]
            for name, source in chat.files.items():
                shutil.copyfile(source, tmp / name)
                names.append(name)
            files = file_entries(tmp, names)  # small files; the data file was hashed as it was written
            files[DATA_FILE] = {"sha256": sha, "bytes": size}
            manifest = Manifest(
                args=args,
                precision=precision,
                max_context=max_context,
                cache=plan,
                inputs=inputs,
                outputs=outputs,
                opsets=opsets,
                files=files,
                # the GPU backends run causal LMs only (int4 ones too: the triton backend reads the int4 graph)
                backends=EXPORT_BACKENDS if lm else ("onnxruntime",),
                summary=summary,
                versions=_versions(),
                source=str(checkpoint_dir.resolve()),
                chat=chat,
                features=(() if lm else (HEADS_FEATURE,)) + ((INT4_FEATURE,) if quantization else ())
                + (WEIGHT_INDEX_FEATURE,),
                weight_index=WEIGHTS_FILE,
                quantization=quantization,
            )
            manifest.save(tmp)
    say(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def _meta_model(args: ModelArgs, plan: CachePlan, dtype: torch.dtype) -> torch.nn.Module:
    """The module for the checkpoint's head on the meta device (no weights in memory), parameters in
    `dtype`, rope tables fp32 (their values are set in the graph: `_prepare`)."""
    with torch.device("meta"):
        model = HEADS[args.head](args, plan).to(dtype)
        return finish_loaded(model)


def _prepare(ir_model, model: torch.nn.Module, args: ModelArgs, max_context: int) -> list[GraphWeight]:
    """The traced graph's initializers sorted out (weights_writer.prepare_graph): parameters by our
    checkpoint name, in the module's order; the rope tables computed for the positions the artifact serves
    (max_context rows: a table of max_position_embeddings rows was written whole, 124 MiB of it never read for a
    Nemo-shaped config's 1024000 positions at head dim 16)."""
    from mixtrt.plugins.swa.torch_op import rope_tables

    wrapper = "lm" if isinstance(model, CausalLM) else "model"
    base = isinstance(model, Transformer)
    first: dict[int, str] = {}  # a tied parameter (lm_head = embed_tokens) is read under its first name
    parameters = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), our_name(f"{wrapper}.{n}", wrapper, base))
        parameters[f"{wrapper}.{n}"] = first[id(p)]
    cos, sin = rope_tables(args.head_dim, args.rope_theta, max_context)
    prefix = f"{wrapper}." if base else f"{wrapper}.model."
    constants = {f"{prefix}rope_cos": cos.numpy(), f"{prefix}rope_sin": sin.numpy()}
    return prepare_graph(ir_model, parameters, constants)


def attention_body(args: ModelArgs) -> str:
    """The onnxruntime body of the attention op for this model (plugins/swa/SPEC.md, "onnxruntime bodies"),
    decided before any work; a head dim no body serves is refused here, naming the limit."""
    from mixtrt.plugins.swa.onnx_op import path_for

    try:
        return path_for(args.head_dim)
    except ValueError as e:
        raise ConfigError(f"cannot export {args.architecture}: {e}") from None


def is_current(artifact_dir: str | Path, checkpoint_dir: str | Path) -> bool:
    """True when artifact_dir holds an artifact exported from checkpoint_dir after the checkpoint's files
    last changed, with this mixtrt's graph IO (else it should be exported again)."""
    from mixtrt.runtime.errors import ArtifactError

    artifact_dir, checkpoint_dir = Path(artifact_dir), Path(checkpoint_dir)
    try:
        built = (artifact_dir / MANIFEST).stat().st_mtime
        m = Manifest.load(artifact_dir, verify=False)
        m.check_graph_io(artifact_dir)
        if _graph_metadata(artifact_dir / MODEL_FILE) != Manifest.graph_metadata(m.args, m.precision, m.max_context,
                                                                                 m.cache):
            return False
        return (m.source == str(checkpoint_dir.resolve())
                and all(f.stat().st_mtime <= built for f in checkpoint_dir.iterdir() if f.is_file()))
    except (ArtifactError, OSError):
        return False


def _graph_metadata(path: Path) -> dict[str, str]:
    """The graph's metadata_props (read without its weights)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - onnx raises protobuf's DecodeError and others: not a graph we wrote
        return {}
    return {p.key: p.value for p in model.metadata_props}


def _trace(model: torch.nn.Module, args: ModelArgs, capacity: int, table: dict,
           in_names: list[str], out_names: list[str], optimize: bool = False):
    """The ONNXProgram of `model` (examples on the model's device: meta for an export). Not optimized by
    default: the optimizer runs once the parameters are out of its way (weights_writer.prepare_graph);
    optimize=True runs torch's own on a model with real weights (what the tests compare a streaming
    export with)."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    # example sizes, all different: every dim is dynamic (size-1 examples would be specialised, equal
    # sizes would be taken for the same dim)
    batch, seq, picked = 2, 3, 4  # picked: logit positions
    b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=1, max=1 << 20)
    ids = torch.ones(batch, seq, dtype=torch.int64, device=device)
    module: torch.nn.Module
    if isinstance(model, CausalLM):
        kv_shape = (batch, args.num_key_value_heads, capacity, args.head_dim)
        past = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(2 * args.num_hidden_layers)]
        positions = torch.zeros(batch, picked, dtype=torch.int64, device=device)  # [batch, picked]
        example: tuple = (ids, torch.full((batch,), seq, dtype=torch.int32, device=device), positions, past)
        p = torch.export.Dim("positions", min=1, max=1 << 20)
        dynamic: tuple = ({0: b, 1: s}, {0: b}, {0: b, 1: p}, [{0: b}] * len(past))
        module = _Step(model)
    else:
        example, dynamic, module = (ids,), ({0: b, 1: s},), _Pass(model)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # for this export only: the host's logging is put back as it was
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            return torch.onnx.export(
                module.eval(), example, dynamo=True, custom_translation_table=table,
                dynamic_shapes=dynamic, input_names=in_names, output_names=out_names,
                opset_version=OPSET, optimize=optimize, verbose=False,
            )
    finally:
        logger.setLevel(level)


def _finish_graph(path: Path, metadata: dict[str, str], rewrite: Callable[[Any], dict] | None = None
                  ) -> tuple[dict[str, int], dict]:
    """Attach the custom ops' function bodies, name the nodes, rewrite (the int4 form: `rewrite(model)` returns
    the summary's facts), record `metadata` (Manifest.graph_metadata) in the graph, check; return the opsets and
    the graph summary (op counts, parameters and their bytes) that `mixtrt inspect` shows without needing onnx.

    Works on the graph without loading external data, so it costs the same for a 7B model as for a tiny one.
    """
    import onnx

    from mixtrt.plugins.onnx_common import attach_functions

    model = onnx.load(str(path), load_external_data=False)
    attach_functions(model)
    _divide_by_sqrt(model.graph)
    _name_nodes(model.graph)
    facts = rewrite(model) if rewrite is not None else None
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return opsets, facts if facts is not None else graph_facts(model)


def _node_label(node) -> str:
    """An onnx_ir node's module path as export/quantize.py labels tensors ("layers.0.attention.wq"), from the
    same metadata `_name_nodes` names the node by."""
    from mixtrt.export.quantize import label

    return label(f"{_scope_path(node.metadata_props.get('pkg.torch.onnx.name_scopes', ''))}/{node.op_type}")


def _chain(first: Transform | None, then: Transform) -> Transform:
    """The hook that applies `first` (if any), then `then` to each tensor it returns."""
    if first is None:
        return then
    return lambda name, array: [r for n, a in first(name, array)
                                for r in ([(n, a)] if isinstance(a, Stored) else then(n, a))]


def _divide_by_sqrt(graph) -> int:
    """Rewrite each RMSNorm's ``x * Reciprocal(Sqrt(ms))`` (torch's rsqrt) as ``Div(x, Sqrt(ms))`` in place;
    the number rewritten.

    The division is the pattern onnxruntime fuses into one SimplifiedLayerNormalization kernel (Pow,
    ReduceMean, Add, Sqrt, Div, Mul: six nodes become one per norm, 2L+1 norms per step). The values differ
    from the reference's rsqrt by rounding only (within the onnxruntime-vs-reference tolerance); the
    reference itself keeps transformers' rsqrt.

        ms ─► Sqrt ─► Reciprocal ─► Mul(x, ·)      becomes      ms ─► Sqrt ─► Div(x, ·)
    """
    producers = {o: n for n in graph.node for o in n.output}
    uses: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    dead = []
    for rec in graph.node:
        if rec.op_type != "Reciprocal" or rec.domain not in ("", "ai.onnx"):
            continue
        sqrt = producers.get(rec.input[0])
        consumers = uses.get(rec.output[0], [])
        if sqrt is None or sqrt.op_type != "Sqrt" or len(consumers) != 1 or rec.output[0] in outputs:
            continue
        (mul,) = consumers
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or list(mul.input).count(rec.output[0]) != 1:
            continue
        other = mul.input[1] if mul.input[0] == rec.output[0] else mul.input[0]
        mul.op_type = "Div"
        del mul.input[:]
        mul.input.extend([other, sqrt.output[0]])
        dead.append(rec)
    for rec in dead:
        graph.node.remove(rec)
    return len(dead)


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


def _save(ir_model, directory: Path) -> None:
    """The graph, its initializers pointing into model.onnx.data (small constants stay inline)."""
    import onnx_ir as ir

    ir.save(ir_model, directory / MODEL_FILE)


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
