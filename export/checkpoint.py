"""Load a Mistral / Mixtral checkpoint directory into our parameter names (export/model.py).

Formats, told apart by the files present (never by directory names):
- Hugging Face: config.json + model.safetensors, or model.safetensors.index.json + shards; transformers
  4.x names (`block_sparse_moe.experts.{e}.w1/w2/w3`) or 5.x fused experts (`mlp.experts.gate_up_proj`
  [E, 2I, H] = [gate; up], `mlp.experts.down_proj` [E, H, I]), each expert becoming its own tensor.
- raw Mistral: params.json + consolidated.safetensors or consolidated*.pth (torch.load weights_only);
  wq/wk there use the interleaved RoPE layout and are permuted to HF's rotate_half layout.

Every tensor goes through ONE explicit name map (`name_map`): our name -> the checkpoint tensors it is
built from, their shapes, and how they combine. Missing, unexpected and mis-shaped tensors are errors
naming the tensor and the file. Tensors are read one at a time (safe_open / mmap'd torch.load).

    args, weights = load_checkpoint("ckpt/")          # our names, e.g. "model.layers.0.attention.wq.weight"
    model = load_model("ckpt/", dtype=torch.float16)  # CausalLM / Transformer / a classifier head, eval()
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mixtrt.export.model import HEADS, Transformer, finish_loaded
from mixtrt.runtime.args import ModelArgs, described_by, read_json
from mixtrt.runtime.cache import CachePlan
from mixtrt.runtime.errors import CheckpointError, ConfigError, MixtrtWarning, first_line

Shape = tuple[int, ...]
# Stored dtypes a weight may have (safetensors' names and torch's): anything else is refused, never cast.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"})


@dataclass(frozen=True)
class Source:
    """How one of our tensors is built: checkpoint tensors `names` (of `shapes`), joined by `combine`."""

    names: tuple[str, ...]
    shapes: tuple[Shape, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]
    part: int | None = None
    """Read only `[part]` (first dimension) of each named tensor: one expert of a fused tensor."""


def _one(name: str, shape: Shape) -> Source:
    return Source((name,), (shape,))


def _rope_to_halves(heads: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Raw Mistral wq/wk rows (pairs 2j, 2j+1 rotate together) -> HF rows (j, j + D/2 rotate together)."""

    def f(ts: list[torch.Tensor]) -> torch.Tensor:
        w = ts[0]
        rows, H = w.shape
        # [n*D, H] -> [n, D/2, 2, H] -> [n, 2, D/2, H] -> [n*D, H]
        return w.view(heads, rows // heads // 2, 2, H).transpose(1, 2).reshape(rows, H)

    return f


def name_map(args: ModelArgs, fmt: str, prefix: str = "model.") -> dict[str, Source]:
    """Our name -> Source, for fmt "hf4" (transformers 4.x names), "hf5" (fused experts) or "raw".

    `prefix` is what the HF file puts before `layers.` / `embed_tokens` ("" for a saved *Model).
    """
    H, V, I = args.hidden_size, args.vocab_size, args.intermediate_size  # noqa: E741
    N, K, D = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    raw = fmt == "raw"
    p = "" if raw else prefix
    embed = "tok_embeddings.weight" if raw else f"{p}embed_tokens.weight"
    m: dict[str, Source] = {"model.embed_tokens.weight": _one(embed, (V, H))}
    for i in range(args.num_hidden_layers):
        src, our = f"{p}layers.{i}.", f"model.layers.{i}."
        attn = {"wq": (N * D, H), "wk": (K * D, H), "wv": (K * D, H), "wo": (H, N * D)}
        hf_attn = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        for w, shape in attn.items():
            name = f"{src}attention.{w}.weight" if raw else f"{src}self_attn.{hf_attn[w]}.weight"
            if raw and w in ("wq", "wk"):
                m[f"{our}attention.{w}.weight"] = Source((name,), (shape,), _rope_to_halves(N if w == "wq" else K))
            else:
                m[f"{our}attention.{w}.weight"] = _one(name, shape)
        m[f"{our}attention_norm.weight"] = _one(f"{src}{'attention_norm' if raw else 'input_layernorm'}.weight", (H,))
        m[f"{our}ffn_norm.weight"] = _one(f"{src}{'ffn_norm' if raw else 'post_attention_layernorm'}.weight", (H,))
        ff = f"{our}feed_forward."
        if args.moe is None:
            hf_mlp = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
            for w, shape in (("w1", (I, H)), ("w2", (H, I)), ("w3", (I, H))):
                name = f"{src}feed_forward.{w}.weight" if raw else f"{src}mlp.{hf_mlp[w]}.weight"
                m[f"{ff}{w}.weight"] = _one(name, shape)
            continue
        E = args.moe.num_experts
        if fmt == "hf5":  # fused experts: gate_up_proj [E, 2I, H] is [gate; up] per expert already
            m[f"{ff}gate.weight"] = _one(f"{src}mlp.gate.weight", (E, H))
            for e in range(E):
                m[f"{ff}fc1.{e}"] = Source((f"{src}mlp.experts.gate_up_proj",), ((E, 2 * I, H),), part=e)
                m[f"{ff}fc2.{e}"] = Source((f"{src}mlp.experts.down_proj",), ((E, H, I),), part=e)
            continue
        moe = f"{src}feed_forward." if raw else f"{src}block_sparse_moe."
        m[f"{ff}gate.weight"] = _one(f"{moe}gate.weight", (E, H))
        for e in range(E):
            w1, w3 = f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight"
            m[f"{ff}fc1.{e}"] = Source((w1, w3), ((I, H), (I, H)), torch.cat)  # [gate; up]
            m[f"{ff}fc2.{e}"] = _one(f"{moe}experts.{e}.w2.weight", (H, I))
    m["model.norm.weight"] = _one(f"{p}norm.weight", (H,))
    head, L = args.head, args.num_labels
    if head == "causal_lm" and not args.tie_word_embeddings:
        m["lm_head.weight"] = _one("output.weight" if raw else "lm_head.weight", (V, H))
    elif head == "sequence_classification":
        m["score.weight"] = _one("score.weight", (L, H))
    elif head == "token_classification":
        m["score.weight"] = _one("score.weight", (L, H))
        m["score.bias"] = _one("score.bias", (L,))
    elif head == "question_answering":
        m["qa_outputs.weight"] = _one("qa_outputs.weight", (2, H))
        m["qa_outputs.bias"] = _one("qa_outputs.bias", (2,))
    return m


# ---- reading files -------------------------------------------------------------------------------

class _Files:
    """name -> (file, handle) over every weight file of a checkpoint; tensors read on demand.

    The handles answer names, shapes and dtypes (headers only). `get` reads one tensor through a handle of
    its own, closed after the read: a mapped file's pages then leave the process with the tensor, so
    streaming a checkpoint holds one tensor at a time, not every page read so far."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.where: dict[str, tuple[Path, Any]] = {}  # handle: a safetensors file or a .pth dict

    def _add(self, key: str, path: Path, handle: Any) -> None:
        if key in self.where:
            raise CheckpointError(f"tensor {key!r} appears in both {self.where[key][0]} and {path}")
        self.where[key] = (path, handle)

    def add_safetensors(self, path: Path) -> None:
        try:  # the OS's reason first: safetensors reports an unreadable file as "No such file or directory"
            with open(path, "rb"):
                pass
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it ({e.strerror or first_line(e)})") from None
        try:
            handle = self.stack.enter_context(safe_open(str(path), framework="pt"))
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
        for key in keys:
            self._add(key, path, handle)

    def add_pth(self, path: Path) -> None:
        sd = _load_pth(path)
        for key in sd:
            self._add(key, path, sd)

    def dtype(self, key: str) -> str:
        """The stored dtype's name: safetensors' ("F16", "BF16", "I64", ...) or torch's ("float16", ...)."""
        path, h = self.where[key]
        return str(h[key].dtype).removeprefix("torch.") if isinstance(h, dict) else h.get_slice(key).get_dtype()

    def shape(self, key: str) -> Shape:
        path, h = self.where[key]
        return tuple(h[key].shape) if isinstance(h, dict) else tuple(h.get_slice(key).get_shape())

    def equal(self, a: str, b: str, rows: int = 4096) -> bool:
        """Whether the tables a and b (2-d) hold the same values (compared as float32, `rows` rows at a time, so
        two vocabulary tables are never both in memory whole)."""
        if self.shape(a) != self.shape(b):
            return False
        return all(torch.equal(self.get(a, torch.float32, slice(i, i + rows)),
                               self.get(b, torch.float32, slice(i, i + rows)))
                   for i in range(0, self.shape(a)[0], rows))

    def get(self, key: str, dtype: torch.dtype | None = None, part: int | slice | None = None) -> torch.Tensor:
        """The tensor (cast to `dtype` unless None), or only its row `part` (or rows, a slice) along the first
        dimension (read alone from safetensors)."""
        path, h = self.where[key]
        try:
            if isinstance(h, dict):
                sd = _load_pth(path)
                t = sd[key] if part is None else sd[key][part]
                t = t.clone()  # off the mapping, which closes with `sd`
                del sd
            else:
                with safe_open(str(path), framework="pt") as f:
                    t = f.get_tensor(key) if part is None else f.get_slice(key)[part]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({first_line(e)})") from None
        return t if dtype is None else t.to(dtype)


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable .pth file (not a zip archive, as torch writes them since 1.6: "
                              "an older torch's format, or not a torch file); save it again with a current torch, or "
                              "convert it to safetensors")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: needs pickle code beyond plain tensors to load (refused: torch.load weights_only=True); "
            "convert it to safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .pth file ({first_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return sd


@contextlib.contextmanager
def _open_weights(path: Path, args_from: str) -> Iterator[_Files]:
    with contextlib.ExitStack() as stack:
        files = _Files(stack)
        if args_from == "hf":
            index = path / "model.safetensors.index.json"
            if index.is_file() and (path / "model.safetensors").is_file():
                # transformers loads the single file when both are there: so do we, and say the shards are unread
                warnings.warn(f"{path}: both model.safetensors and model.safetensors.index.json; reading "
                              "model.safetensors, as transformers does (the index and its shards are not read)",
                              MixtrtWarning, stacklevel=3)
                files.add_safetensors(path / "model.safetensors")
            elif index.is_file():
                data = read_json(index, CheckpointError)
                weight_map = data.get("weight_map") if isinstance(data, dict) else None
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) and v and Path(v).name == v and v not in (".", "..")
                        for v in weight_map.values()):
                    raise CheckpointError(f"{index}: not a safetensors index (needs a \"weight_map\" of tensor "
                                          "names to shard file names in this directory)")
                for shard in sorted(set(weight_map.values())):
                    if not (path / shard).is_file():
                        raise CheckpointError(f"{index}: shard {shard} is missing")
                    files.add_safetensors(path / shard)
                for key, shard in weight_map.items():
                    if key not in files.where or files.where[key][0].name != shard:
                        raise CheckpointError(f"{index}: tensor {key!r} is not in shard {shard}")
            elif (path / "model.safetensors").is_file():
                files.add_safetensors(path / "model.safetensors")
            else:
                for name in ("model.safetensors.index.json", "model.safetensors"):
                    if (path / name).is_symlink():  # is_file() follows links: this one points nowhere
                        raise CheckpointError(f"{path / name}: a link to a missing file (a hub cache's blob deleted?)")
                pickles = sorted(path.glob("pytorch_model*.bin"))
                if pickles:
                    raise CheckpointError(
                        f"{path}: {pickles[0].name} holds pickled weights, which are never loaded (unpickling can run "
                        "code): convert them to safetensors (transformers' save_pretrained does by default)")
                raise CheckpointError(
                    f"{path}: no model.safetensors or model.safetensors.index.json "
                    "(only safetensors weights are loaded for config.json checkpoints)"
                )
        else:
            pths = sorted(path.glob("consolidated*.pth"))
            if (path / "consolidated.safetensors").is_file() and pths:  # as mistral-inference refuses it
                raise CheckpointError(f"{path}: both consolidated.safetensors and {pths[0].name}: keep one "
                                      f"(which weights are the model's is not for us to guess)")
            if (path / "consolidated.safetensors").is_file():
                files.add_safetensors(path / "consolidated.safetensors")
            elif pths:
                for f in pths:
                    files.add_pth(f)
            else:
                raise CheckpointError(f"{path}: params.json but no consolidated.safetensors or consolidated*.pth")
        yield files


def _hf_layout(args: ModelArgs, keys: set[str]) -> tuple[str, str]:
    """(fmt, prefix) of an HF file: fused experts or not; 'model.', '' (a base model) or 'transformer.' (transformers'
    Ministral question answering keeps that older name) before the base model names."""
    prefix = ("" if args.head == "base" and "embed_tokens.weight" in keys
              else "transformer." if "transformer.embed_tokens.weight" in keys else "model.")
    fused = any(k.endswith(".mlp.experts.gate_up_proj") for k in keys)
    return ("hf5" if fused else "hf4"), prefix


class Checkpoint:
    """An open checkpoint, checked (every tensor present, of its shape and a floating dtype), read one
    tensor at a time: `tensor(name)` builds one of our tensors from its checkpoint tensors (the raw Mistral
    RoPE row order and fused experts undone per tensor). Use through `open_checkpoint`."""

    def __init__(self, path: Path, args: ModelArgs, files: _Files, mapping: dict[str, Source]) -> None:
        self.path, self.args, self.files, self.mapping = path, args, files, mapping

    @property
    def names(self) -> list[str]:
        """Our names, in name_map order (tied lm_head excluded: it is model.embed_tokens.weight)."""
        return list(self.mapping)

    def sources(self, name: str) -> str:
        """Where our tensor `name` comes from, for messages: "tensor 'x' of model.safetensors"."""
        src = self.mapping[name]
        return " + ".join(f"tensor {n!r}{f'[{src.part}]' if src.part is not None else ''} of "
                          f"{self.files.where[n][0].name}" for n in src.names)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Our tensor `name`, contiguous, in `dtype` (None: the stored dtype, its parts cast to the first's)."""
        src = self.mapping[name]
        parts = [self.files.get(n, dtype, src.part) for n in src.names]
        if dtype is None:
            parts = [p.to(parts[0].dtype) for p in parts]
        return src.combine(parts).contiguous()


def _quant_method(path: Path) -> str | None:
    """config.json's quantization_config.quant_method ("gptq", "awq", "bitsandbytes", "fp8", ...; "no quant_method"
    when the record names none), or None without one."""
    config = read_json(path / "config.json", CheckpointError)
    record = config.get("quantization_config") if isinstance(config, dict) else None
    if not record:
        return None
    method = record.get("quant_method") if isinstance(record, dict) else None
    return str(method) if method else "no quant_method"


def _first(names: list[str]) -> str:
    """The first name, and how many more: "'a.weight' (and 3 more)"."""
    return f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


@contextlib.contextmanager
def open_checkpoint(checkpoint_dir: str | Path) -> Iterator[Checkpoint]:
    """Open and check a checkpoint without reading its weights (headers only): every tensor the model
    needs present, none unexpected, each of its shape and a floating dtype; else one CheckpointError."""
    path = Path(checkpoint_dir)
    args = ModelArgs.from_checkpoint_dir(path)
    kind = "hf" if described_by(path) == "config.json" else "raw"
    with _open_weights(path, kind) as files:
        keys = set(files.where)
        if kind == "hf":
            fmt, prefix = _hf_layout(args, keys)
        else:
            fmt, prefix = "raw", ""
        mapping = name_map(args, fmt, prefix)
        # the rotary tables older transformers saved as buffers: recomputed from rope_theta, ignored as transformers
        # ignores them
        ignored: set[str] = {k for k in keys if k.endswith(".rotary_emb.inv_freq")}
        if args.head == "causal_lm" and args.tie_word_embeddings and "lm_head.weight" in keys:
            # tied in config.json, as transformers loads it: an lm_head in the files that differs from the
            # embedding is kept (untied); files holding only the lm_head tie the embedding to it
            embed = mapping["model.embed_tokens.weight"].names[0]
            if embed not in keys:
                mapping["model.embed_tokens.weight"] = _one("lm_head.weight", (args.vocab_size, args.hidden_size))
            elif files.equal(embed, "lm_head.weight"):
                ignored.add("lm_head.weight")
            else:
                args = dataclasses.replace(args, tie_word_embeddings=False)
                mapping = name_map(args, fmt, prefix)
        wanted = [(n, s) for src in mapping.values() for n, s in zip(src.names, src.shapes, strict=True)]
        missing = [n for n, _ in wanted if n not in keys]
        unexpected = sorted(keys - {n for n, _ in wanted} - ignored)
        quantized = _quant_method(path) if kind == "hf" else None
        if quantized is not None:
            integral = [(n, files.dtype(n)) for n, _ in wanted if n in keys and files.dtype(n) not in FLOAT_DTYPES]
            if missing or unexpected or integral:
                odd = (f"no tensor {missing[0]!r}" if missing else f"a tensor {unexpected[0]!r}" if unexpected
                       else f"tensor {integral[0][0]!r} stored as {integral[0][1]}")
                raise CheckpointError(f"{path}: a quantized checkpoint (config.json's quantization_config: "
                                      f"{quantized}; {odd} for {args.architecture}): mixtrt reads float weights "
                                      "(float32, float16, bfloat16) and quantizes them itself: export the unquantized "
                                      "checkpoint, with --precision int4 for INT4")
            warnings.warn(f"{path}: config.json's quantization_config ({quantized}) is ignored: the weights are float "
                          "and are exported as they are stored (transformers would quantize them as it loads them)",
                          MixtrtWarning, stacklevel=3)
        if missing:
            # a layout we do not read (fused experts, another naming) shows as tensors missing *and* tensors we
            # did not expect: the second says which layout it is, so both are named
            weights = ", ".join(sorted({files.where[k][0].name for k in keys})) or "no weight file"
            also = f"; the files hold {_first(unexpected)}, which {args.architecture} does not have" \
                if unexpected else ""
            raise CheckpointError(f"{path}: missing tensor {_first(missing)} for {args.architecture} in "
                                  f"{weights}{also}")
        if unexpected:
            raise CheckpointError(
                f"{files.where[unexpected[0]][0]}: unexpected tensor {_first(unexpected)} for {args.architecture}"
            )
        for name, shape in wanted:
            got = files.shape(name)
            if got != shape:
                raise CheckpointError(
                    f"{files.where[name][0]}: tensor {name!r} has shape {list(got)}, expected {list(shape)}"
                )
            stored = files.dtype(name)
            if stored not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{files.where[name][0]}: tensor {name!r} is stored as {stored}; weights must be floating point "
                    f"({', '.join(sorted(FLOAT_DTYPES))}): integer, bool and fp8 tensors are not cast (quantized "
                    "checkpoints are not supported)"
                )
        yield Checkpoint(path, args, files, mapping)


def warn_untied(checkpoint_dir: str | Path) -> None:
    """Say that the checkpoint's lm_head is kept untied although config.json ties it (open_checkpoint found an
    lm_head.weight with other values than the embedding, as transformers loads it)."""
    warnings.warn(f"{checkpoint_dir}: config.json ties the lm_head to the embedding (tie_word_embeddings: true) but "
                  "the weights hold an lm_head.weight with other values: both are kept, untied, as transformers "
                  "loads them (set tie_word_embeddings to false to silence this)", MixtrtWarning, stacklevel=3)


def load_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32
                    ) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, weights by our name). Names are those of export/model.py for the checkpoint's head
    (base-model names always start with "model."); with tied embeddings "lm_head.weight" of a causal LM
    is the same tensor as "model.embed_tokens.weight"."""
    with open_checkpoint(checkpoint_dir) as ck:
        args = ck.args
        weights = {name: ck.tensor(name, dtype) for name in ck.names}
    if args.head == "causal_lm" and args.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return args, weights


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
               plan: CachePlan | None = None) -> torch.nn.Module:
    """The module for the checkpoint's head (CausalLM, Transformer, SequenceClassifier, TokenClassifier,
    QuestionAnswering), built on the meta device, weights assigned, rope tables computed, eval mode.
    plan: the artifact's cache plan, for a model built for export (its attention windows and cache mode)."""
    args, weights = load_checkpoint(checkpoint_dir, dtype)
    cls = HEADS[args.head]
    with torch.device("meta"):
        model = cls(args, plan)
    if cls is Transformer:
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:  # a name map / model mismatch is our bug, but say which checkpoint
        raise ConfigError(f"{checkpoint_dir}: weights do not fit {cls.__name__} ({first_line(e)})") from None
    return finish_loaded(model)
