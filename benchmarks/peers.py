"""Drive the benchmark peers that benchmarks/setup_peers.sh builds: llama.cpp (through llama-cpp-python, and its
`llama-server`) and onnxruntime-genai. Every engine runs in its own subprocess of the peers' venv, so the peak RSS
each reports is its own; this module itself needs only the standard library and numpy.

    import peers                                    # benchmark scripts put benchmarks/ on sys.path
    gguf = peers.gguf_from_checkpoint(ckpt, work, "q4_K_M")
    r = peers.llama_generate(gguf, prompt_ids, new_tokens=256, threads=2)
    r["prefill_tok_s"], r["decode_tok_s"], r["peak_rss_mib"], r["token_ids"]
    model_dir, why = peers.genai_model_from_checkpoint(ckpt, work / "genai-int4", "int4")   # (None, why) for Mixtral
    with peers.start_llama_server(gguf, port=8090, threads=2, slots=8) as server:
        ...  # POST server.url + "/completion"

The peers live in $MIXTRT_PEERS_DIR, else <repo>/.peers (DIR/peers.json names the paths and versions). Generation is
measured as benchmarks/bench_generate.py measures mixtrt: a warm-up, then prefill rate = prompt tokens / time to the
first new token, decode rate = the remaining new tokens / the remaining time; greedy, EOS ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_K_M")  # f32 / f16 straight from the converter, the rest via llama-quantize
GENAI_PRECISIONS = ("fp32", "int4")
# The converter and the builder open the checkpoint through transformers: keep them off the network (no hub look-ups).
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class PeersMissing(RuntimeError):
    """setup_peers.sh has not been run (or not into this DIR), or one of its outputs is gone."""


def peers_dir() -> Path:
    return Path(os.environ.get("MIXTRT_PEERS_DIR") or ROOT / ".peers")


def _peers(*need: str) -> dict:
    """DIR/peers.json, after checking that the named entries ("python", "convert_hf_to_gguf", a binary) exist."""
    d = peers_dir()
    manifest = d / "peers.json"
    if not manifest.is_file():
        raise PeersMissing(f"{manifest} not found: run benchmarks/setup_peers.sh {d} first")
    info = json.loads(manifest.read_text())
    for name in need:
        path = Path(info["bin"][name] if name.startswith("llama-") else info[name])
        if not path.exists():
            raise PeersMissing(f"{name} missing at {path}: run benchmarks/setup_peers.sh {d} again")
    return info


def require(*need: str) -> None:
    """Exit with one line where the peers (or the named entries) are missing: a script checks before its minutes of
    exports, not after them with a traceback."""
    try:
        _peers("python", *need)
    except PeersMissing as e:
        raise SystemExit(f"{Path(sys.argv[0]).name}: {e}") from None


def _run(cmd: Sequence[object], what: str, log: Path | None = None, **kw) -> str:
    """Run a command and return its stdout (stdout and stderr are written to `log`); on failure raise naming `what`,
    with the end of its output."""
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout


def _child(fn: str, **args) -> dict:
    """Run `_child_<fn>(args)` in the peers' venv (this file as its script); return the JSON it prints last."""
    info = _peers("python")
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"])}
    text = _run([info["python"], __file__, "--child", fn], f"{fn} (peers venv)", input=json.dumps(args), env=env)
    return json.loads(text.strip().splitlines()[-1])


def _fresh(out: Path, src: Path) -> bool:
    """out exists and is newer than every file of the checkpoint src."""
    return out.exists() and out.stat().st_mtime >= max(f.stat().st_mtime for f in src.iterdir())


def _staged_checkpoint(checkpoint_dir: Path, tmp: Path) -> Path:
    """A temporary view of the checkpoint for the genai builder: its files linked, config.json copied with
    `layer_types` added (one "sliding_attention" per layer) when the model has a window and lists none. The user's
    checkpoint is never written."""
    stage = tmp / checkpoint_dir.name
    stage.mkdir(parents=True)
    for f in checkpoint_dir.iterdir():
        if f.name != "config.json":
            (stage / f.name).symlink_to(f.resolve())
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    if cfg.get("sliding_window") and not cfg.get("layer_types"):
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    (stage / "config.json").write_text(json.dumps(cfg, indent=1))
    return stage


# ---- llama.cpp -----------------------------------------------------------------------------------------------------

def gguf_from_checkpoint(checkpoint_dir: Path | str, out_dir: Path | str, quant: str = "f32") -> Path:
    """Convert a transformers Mistral / Mixtral checkpoint to GGUF with llama.cpp's own tools (vendored
    convert_hf_to_gguf.py, then llama-quantize for q8_0 / q4_0 / q4_K_M, quantized from the f32 file) and return
    out_dir/<checkpoint name>-<quant>.gguf; an existing file newer than the checkpoint is reused.

    llama-quantize's output is kept beside the file (<name>.quantize.log): where a k-quant cannot be used (a row length
    not a multiple of 256) it falls back to another type; `quantize_fallbacks(path)` lists what it printed."""
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r}: expected one of {QUANTS}")
    ckpt, out_dir = Path(checkpoint_dir), Path(out_dir)
    out = out_dir / f"{ckpt.name}-{quant}.gguf"
    if _fresh(out, ckpt):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".gguf.tmp")
    if quant in ("f32", "f16"):
        info = _peers("python", "convert_hf_to_gguf")
        _run([info["python"], info["convert_hf_to_gguf"], ckpt, "--outfile", tmp_out, "--outtype", quant],
             f"convert_hf_to_gguf.py {ckpt} ({quant})", log=out.with_suffix(".convert.log"), env=OFFLINE)
    else:
        info = _peers("llama-quantize")
        src = gguf_from_checkpoint(ckpt, out_dir, "f32")
        _run([info["bin"]["llama-quantize"], src, tmp_out, quant.upper(), os.cpu_count() or 1],
             f"llama-quantize {src.name} {quant}", log=out.with_suffix(".quantize.log"))
    tmp_out.replace(out)
    return out


def quantize_fallbacks(gguf: Path | str) -> list[str]:
    """The lines in which llama-quantize reported a fallback type for `gguf` (empty for f32 / f16 or none)."""
    log = Path(gguf).with_suffix(".quantize.log")
    if not log.exists():
        return []
    return [line.strip() for line in log.read_text().splitlines() if re.search(r"fall(ing )?back", line, re.I)]


def llama_generate(gguf: Path | str, prompt_ids: Sequence[int] | Sequence[Sequence[int]], new_tokens: int,
                   threads: int, batch: int = 1, *, f32_attention: bool = False) -> dict:
    """Greedy generation with llama.cpp (llama-cpp-python's C API, argmax of the logits, no sampler, EOS ignored):
    exactly `new_tokens` per row, all rows decoded together (one sequence each). prompt_ids: one prompt (batch 1)
    or `batch` prompts, used as given (no BOS added). llama.cpp's own defaults (f16 KV cache, flash attention)
    unless f32_attention. Returns {"prefill_tok_s", "decode_tok_s", "peak_rss_mib", "generated" (count),
    "token_ids" (one list per row)}."""
    rows = _rows(prompt_ids, batch)
    return _child("llama_generate", gguf=str(gguf), rows=rows, new_tokens=new_tokens, threads=threads,
                  f32_attention=f32_attention)


def llama_logits(gguf: Path | str, token_ids: Sequence[int], threads: int = 2, *,
                 f32_attention: bool = False) -> np.ndarray:
    """Teacher-forced logits [T, V] (float32) of llama.cpp for `token_ids` (as given, no BOS added; every position's
    logits, like logits_all=True): row t predicts token t+1.

    llama.cpp's defaults store the KV cache in f16 and use flash attention, which moves f32 logits by about 1e-3
    relative (0.02 on logits of 20 for a tiny Mistral); f32_attention=True (f32 cache, no flash attention) matches
    transformers' f32 logits to about 5e-6 relative (where the window does not bite: llama.cpp ignores Mistral's
    sliding window)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "logits.npy"
        _child("llama_logits", gguf=str(gguf), ids=[int(t) for t in token_ids], threads=threads,
               out=str(path), f32_attention=f32_attention)
        return np.load(path)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 is never behind a proxy


@dataclass
class LlamaServer:
    url: str  # e.g. "http://127.0.0.1:8090"
    process: subprocess.Popen
    log: Path  # the server's stdout and stderr

    def peak_rss_mib(self) -> float:
        """VmHWM of the server process, MiB (read while it runs)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


@contextlib.contextmanager
def start_llama_server(gguf: Path | str, port: int, threads: int, slots: int, *, ctx_per_slot: int = 1024,
                       timeout_s: float = 120.0, extra_args: Sequence[str] = ()) -> Iterator[LlamaServer]:
    """Run `llama-server` on 127.0.0.1:port with continuous batching over `slots` slots (each with its own
    ctx_per_slot-token KV cache), `threads` threads for prefill and decode; yields once GET /health answers 200,
    stops the server (SIGTERM, then SIGKILL after 10 s) on exit. Its output goes to a log file kept on failure.
    extra_args: more llama-server flags (`--no-repack`: on this project's machines quantized GGUFs of the benchmark
    models crash llama.cpp's repacked CPU kernels at load, exit -11, llama-cpp-python included)."""
    info = _peers("llama-server")
    log = Path(tempfile.mkstemp(prefix=f"llama-server-{port}-", suffix=".log")[1])
    cmd = [info["bin"]["llama-server"], "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "--parallel", str(slots), "--cont-batching", "--no-kv-unified",
           "-c", str(slots * ctx_per_slot), "--no-webui", "--metrics", *extra_args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    server = LlamaServer(f"http://127.0.0.1:{port}", proc, log)
    ok = False
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode} while starting:\n"
                                   f"{log.read_text()[-3000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with _NO_PROXY.open(server.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not answer /health within {timeout_s:.0f} s; log: {log}")
            time.sleep(0.2)
        yield server
        ok = True
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if ok:
            log.unlink(missing_ok=True)


# ---- onnxruntime-genai ---------------------------------------------------------------------------------------------

def genai_model_from_checkpoint(checkpoint_dir: Path | str, out_dir: Path | str,
                                precision: str = "fp32") -> tuple[Path | None, str]:
    """Build an onnxruntime-genai model (its builder, CPU execution provider) into out_dir; returns (out_dir, "") or,
    where the builder refuses the model (Mixtral in 0.18), (None, the builder's reason). An existing build newer than
    the checkpoint is reused.

    The builder (0.18) drops Mistral's sliding window unless config.json lists `layer_types` (transformers 5 writes
    none): it is added to a temporary copy of config.json, so the built model attends over the window."""
    if precision not in GENAI_PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {GENAI_PRECISIONS}")
    ckpt, out_dir = Path(checkpoint_dir), Path(out_dir)
    if _fresh(out_dir / "genai_config.json", ckpt):
        return out_dir, ""
    info = _peers("python")
    tmp_out = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = _staged_checkpoint(ckpt, Path(tmp))
        cmd = [info["python"], "-m", "onnxruntime_genai.models.builder", "-i", stage, "-o", tmp_out,
               "-p", precision, "-e", "cpu", "-c", Path(tmp) / "cache"]
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=OFFLINE)
    text = (out.stdout + out.stderr).replace(str(stage), str(ckpt))
    if out.returncode:
        shutil.rmtree(tmp_out, ignore_errors=True)
        refused = re.search(r"NotImplementedError: (.*not currently supported.*)", text)
        if refused:
            return None, f"onnxruntime-genai builder: {refused.group(1).strip()}"
        raise RuntimeError(f"onnxruntime-genai builder on {ckpt} ({precision}) failed:\n{text[-3000:]}")
    (tmp_out / "builder.log").write_text(text)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_out.replace(out_dir)
    return out_dir, ""


def genai_generate(model_dir: Path | str, prompt_ids: Sequence[int], new_tokens: int, threads: int) -> dict:
    """Greedy generation with onnxruntime-genai's Generator (batch 1: its windowed cache rejects a batched prefill),
    exactly `new_tokens` (min_length holds EOS off). Returns the same dict as llama_generate."""
    (row,) = _rows(prompt_ids, 1)
    return _child("genai_generate", model_dir=str(model_dir), rows=[row], new_tokens=new_tokens,
                  threads=threads)


def _rows(prompt_ids: Sequence[int] | Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    rows = [[int(t) for t in prompt_ids]] if np.ndim(prompt_ids[0]) == 0 else [[int(t) for t in r] for r in prompt_ids]
    if len(rows) != batch:
        raise ValueError(f"{len(rows)} prompts given for batch {batch}")
    return rows


# ---- child side: runs in the peers' venv ---------------------------------------------------------------------------

def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Llama:
    """A llama.cpp model + context through llama-cpp-python's ctypes API, with one reusable llama_batch."""

    def __init__(self, gguf: str, n_ctx: int, n_batch: int, n_seq: int, threads: int, f32_attention: bool,
                 logits_all: bool = False):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = n_ctx, n_batch, n_seq
        cp.n_ubatch = n_batch if logits_all else min(n_batch, 512)
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False  # each sequence its own n_ctx / n_seq cells
        if f32_attention:
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_batch, 0, n_seq)

    def decode(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, want logits) items."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        rc = self.L.llama_decode(self.ctx, b)
        if rc:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, i: int) -> np.ndarray:
        """Logits of the i-th item of the last decode (a view, valid until the next decode)."""
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)


def _round_up(n: int, m: int = 256) -> int:
    return -(-n // m) * m


def _child_llama_generate(a: dict) -> dict:
    rows, n_new = a["rows"], a["new_tokens"]
    per_row = _round_up(max(len(r) for r in rows) + n_new)
    n_prompt = sum(len(r) for r in rows)
    llm = _Llama(a["gguf"], per_row * len(rows), max(n_prompt, len(rows), 512), len(rows), a["threads"],
                 a["f32_attention"])

    def generate(rows: list[list[int]], n_new: int) -> tuple[list[list[int]], float, float]:
        t0 = time.perf_counter()
        items, last = [], []
        for s, row in enumerate(rows):
            items += [(tok, pos, s, pos == len(row) - 1) for pos, tok in enumerate(row)]
            last.append(len(items) - 1)
        llm.decode(items)  # prefill: every row in one batch
        out = [[int(np.argmax(llm.logits(i)))] for i in last]
        ttft = time.perf_counter() - t0
        for step in range(n_new - 1):
            llm.decode([(o[-1], len(row) + step, s, True) for s, (row, o) in enumerate(zip(rows, out, strict=True))])
            for s, o in enumerate(out):
                o.append(int(np.argmax(llm.logits(s))))
        total = time.perf_counter() - t0
        llm.clear()
        return out, ttft, total

    generate(rows[:1], 4)  # warm-up
    out, ttft, total = generate(rows, n_new)
    return {"prefill_tok_s": n_prompt / ttft, "decode_tok_s": len(rows) * (n_new - 1) / max(total - ttft, 1e-9),
            "peak_rss_mib": _peak_rss_mib(), "generated": sum(len(o) for o in out), "token_ids": out}


def _child_llama_logits(a: dict) -> dict:
    ids = a["ids"]
    llm = _Llama(a["gguf"], _round_up(len(ids)), len(ids), 1, a["threads"], a["f32_attention"], logits_all=True)
    llm.decode([(tok, pos, 0, True) for pos, tok in enumerate(ids)])
    logits = np.stack([llm.logits(i) for i in range(len(ids))]).astype(np.float32)
    np.save(a["out"], logits)
    return {"shape": list(logits.shape)}


def _child_genai_generate(a: dict) -> dict:
    import onnxruntime_genai as og

    config = og.Config(a["model_dir"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": a["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    row, n_new = a["rows"][0], a["new_tokens"]
    # The windowed KV cache is sized min(max_length, window + slack) and GroupQueryAttention rejects one smaller than
    # the window, so max_length is at least the window; min_length keeps EOS away until the last token we take.
    decoder = json.loads((Path(a["model_dir"]) / "genai_config.json").read_text())["model"]["decoder"]
    window = (decoder.get("sliding_window") or {}).get("window_size", 0)

    def generate(row: list[int], n_new: int) -> tuple[list[int], float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max(len(row) + n_new, window),
                                  min_length=len(row) + n_new)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(row)
        gen.generate_next_token()
        out = [int(gen.get_next_tokens()[0])]
        ttft = time.perf_counter() - t0
        while len(out) < n_new:
            if gen.is_done():
                raise RuntimeError(f"onnxruntime-genai stopped after {len(out)} of {n_new} tokens")
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out, ttft, time.perf_counter() - t0

    generate(row, 4)  # warm-up
    out, ttft, total = generate(row, n_new)
    return {"prefill_tok_s": len(row) / ttft, "decode_tok_s": (n_new - 1) / max(total - ttft, 1e-9),
            "peak_rss_mib": _peak_rss_mib(), "generated": len(out), "token_ids": [out]}


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    result = {"llama_generate": _child_llama_generate, "llama_logits": _child_llama_logits,
              "genai_generate": _child_genai_generate}[sys.argv[2]](json.loads(sys.stdin.read()))
    print(json.dumps(result))
