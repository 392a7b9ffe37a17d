"""INT4 weight-only: mixtrt int4 vs mixtrt fp32 vs llama.cpp q4_0 / q4_K_M vs onnxruntime-genai int4 (Mistral only:
its builder refuses Mixtral), on the Mixtral- and Mistral-shaped benchmark models (random 0.02-init weights).

Batch 1, a 128-token prompt, 256 greedy tokens, 2 threads, each engine in its own subprocess (peak RSS is its own),
`--passes` interleaved passes over the engines (medians and min-max reported):
prefill and decode tok/s, peak RSS, artifact bytes, weight bytes per decoded token and the decode rate as a fraction
of the read-bandwidth limit (int4: from the manifest's bytes_per_token). llama.cpp runs as llama-server with
`--no-repack`: its repacked CPU kernels crash (exit -11) on quantized GGUFs of these models on this machine.

Quality, each quantized engine against its own fp32: teacher-forced over prompt + 255 tokens (mixtrt fp32's greedy
continuation; argmax agreement, max / rms logit error) for mixtrt and for llama.cpp (its q4_0 / q4_K_M logits of the
same ids against its f32 ones, f32 cache and attention); mean KL and top-1 agreement with llama.cpp's
own `llama-perplexity --kl-divergence` for llama.cpp and `mixtrt perplexity --reference` for mixtrt, on the
same text and context (the bench models: 8 chunks of 384 tokens of heldout.txt; the built-in model: its held-out
text in chunks of 64, where llama.cpp's missing sliding window does not bite). llama-perplexity scores the
second half of each chunk and starts each with BOS; mixtrt scores all but a chunk's first token.
"mixtrt int4 lm4" is mixtrt int4 with the lm_head in INT4 as well (`--int8 embed_tokens`), the form onnxruntime-genai's
builder writes (its int4 lm_head is MatMulNBits bits 4, block 32, accuracy level 4; its embedding stays fp32): the
like-for-like row against genai (benchmarks/profile_int4.py compares the steps op by op). "mixtrt int4 gptq" is
mixtrt int4 with `--method gptq` (calibrated on the packaged text): the same format and bytes per token as rtn's,
so it is in the quality comparisons and timed only when asked (`--engines`).
Needs the peers (benchmarks/setup_peers.sh, MIXTRT_PEERS_DIR).

    .venv/bin/python benchmarks/bench_int4.py [--models mixtral mistral] [--threads 2] [--engines ...] [--passes 3]
        [--no-quality] [--no-builtin] [--prompt-len 128] [--new-tokens 256] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generate import bandwidth_gb_s, bytes_per_token, prompts, run_child  # noqa: E402
from common import SHAPES, at_least, exit_on_sigterm, make_benchmark_checkpoint, positive  # noqa: E402


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def mixtrt_logits(artifact: Path, ids: list[int], threads: int) -> np.ndarray:
    from mixtrt.runtime.backends.onnxruntime import OrtBackend

    b = OrtBackend.load(artifact, threads=threads)
    cache, out = b.new_cache(1), []
    for i in range(0, len(ids), b.capacity):
        out.append(b.step(cache, np.asarray([ids[i:i + b.capacity]], np.int64))[0])
    return np.concatenate(out)


def quality(test: np.ndarray, ref: np.ndarray) -> str:
    scale = np.abs(ref).max()
    agree = float((test.argmax(-1) == ref.argmax(-1)).mean())
    return (f"argmax agreement {agree:.1%}, max|err| {np.abs(test - ref).max() / scale:.3f}, "
            f"rms {np.sqrt(((test - ref) ** 2).mean()) / scale:.4f} (of max|ref|)")


def llama_server_generate(gguf: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    import json
    import urllib.request

    from peers import _NO_PROXY, start_llama_server

    def post(srv, n: int) -> dict:
        body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True,
                           "cache_prompt": False}).encode()
        req = urllib.request.Request(srv.url + "/completion", body, {"Content-Type": "application/json"})
        with _NO_PROXY.open(req, timeout=600) as r:
            return json.load(r)

    with start_llama_server(gguf, 8597, threads, 1, ctx_per_slot=1024, extra_args=("--no-repack",)) as srv:
        post(srv, 4)  # warm-up
        t = post(srv, new_tokens)["timings"]
        return {"prefill_tok_s": t["prompt_per_second"], "decode_tok_s": t["predicted_per_second"],
                "peak_rss_mib": srv.peak_rss_mib()}


def llama_kl(f32: Path, quant: Path, text: Path, ctx: int, chunks: int, threads: int, work: Path) -> str:
    import re

    from peers import _peers

    exe = _peers("llama-perplexity")["bin"]["llama-perplexity"]
    base = work / f"{f32.stem}-c{ctx}.kld"
    common = ["-f", str(text), "-c", str(ctx), "-t", str(threads), "--no-repack", "--chunks", str(chunks)]
    if not base.exists():
        subprocess.run([exe, "-m", str(f32), *common, "--kl-divergence-base", str(base)], capture_output=True,
                       check=True)
    out = subprocess.run([exe, "-m", str(quant), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
                         capture_output=True, text=True, check=True)
    text_out = out.stdout + out.stderr
    kld = re.search(r"Mean\s+KLD:\s+([-\d.]+)", text_out)
    top = re.search(r"Same top p:\s+([\d.]+)", text_out)
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", text_out)
    return (f"mean KL {float(kld.group(1)):.5f}, top-1 agreement {float(top.group(1)):.1f}%"
            + (f", PPL(Q) {float(ppl.group(1)):.3f}" if ppl else "")) if kld and top else text_out[-500:]


def mixtrt_kl(test: Path, ref: Path, text: Path, ctx: int, chunks: int | None, threads: int) -> str:
    from mixtrt.runtime.generation import Generator
    from mixtrt.runtime.perplexity import evaluate

    g, r = Generator.load(test, threads=threads), Generator.load(ref, threads=threads)
    ids = g.tokenizer.encode(text.read_text(encoding="utf-8"))
    ids = ids[:ctx * chunks] if chunks else ids
    out = evaluate(g.backend, ids, ctx, reference=r.backend)
    return (f"mean KL {out['mean_kl']:.5f}, top-1 agreement {out['top1_agreement']:.1%}, "
            f"perplexity {out['perplexity']:.3f}")


ENGINES = ["mixtrt fp32", "mixtrt int4", "mixtrt int4 lm4", "llama q4_0", "llama q4_K_M", "genai int4"]
# the int4 artifacts: name -> (method, the tensors kept at 8 bits: Int4Options.int8, None: the defaults)
INT4_FORMS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "int4": ("rtn", None), "int4 lm4": ("rtn", ("embed_tokens",)), "int4 gptq": ("gptq", None)}


def int8_as_asked(recorded: list[str], int8: tuple[str, ...] | None, moe: bool) -> bool:
    """Whether an artifact's INT8 tensors (the record's labels) are the ones `int8` patterns ask for."""
    from mixtrt.export.quantize import INT8_DEFAULT, INT8_DEFAULT_MOE, kept

    patterns = int8 if int8 is not None else INT8_DEFAULT_MOE if moe else INT8_DEFAULT
    return all(kept(lbl, patterns) for lbl in recorded) and all(any(kept(lbl, [p]) for lbl in recorded)
                                                                for p in patterns)


def int4_artifact(ckpt: Path, art: Path, method: str, int8: tuple[str, ...] | None, moe: bool) -> Path:
    """`art`, an int4 export of `ckpt` by `method` with `int8` (Int4Options.int8; None: the defaults of a MoE model
    or a dense one), exported again unless it is current for `ckpt` with that method and those INT8 tensors (also
    benchmarks/rss_floor_int4.py's)."""
    from mixtrt.export.onnx_export import export_onnx, is_current
    from mixtrt.export.quantize import Int4Options
    from mixtrt.runtime.manifest import Manifest

    q = Manifest.read(art).quantization if is_current(art, ckpt) else None
    if q is None or q.method != method or not int8_as_asked(q.int8, int8, moe):
        export_onnx(ckpt, art, precision="int4", int4=Int4Options(method=method, int8=int8), overwrite=True,
                    progress=None)
    return art


def fp32_artifact(ckpt: Path, art: Path) -> Path:
    """`art`, the fp32 export of `ckpt`, exported again unless it is current."""
    from mixtrt.export.onnx_export import export_onnx, is_current
    from mixtrt.runtime.manifest import Manifest

    if not is_current(art, ckpt) or Manifest.read(art).precision != "fp32":
        export_onnx(ckpt, art, overwrite=True, progress=None)
    return art


def _ratios(rows: list[dict]) -> str:
    """The issue's targets as ratios of this run's medians: mixtrt int4 (and lm4) decode against llama.cpp q4_0,
    onnxruntime-genai int4 and mixtrt fp32, and its peak RSS against q4_0's (target <= 1.25x)."""
    def median(engine: str, key: str) -> float | None:
        got = [r[key] for r in rows if r["engine"] == engine]
        return statistics.median(got) if got else None

    lines = []
    for form in ("mixtrt int4", "mixtrt int4 lm4"):
        mine = median(form, "decode_tok_s")
        if mine is None:
            continue
        ratios = [f"{peer} {mine / theirs:.2f}x" for peer in ("llama q4_0", "genai int4", "mixtrt fp32")
                  if (theirs := median(peer, "decode_tok_s"))]
        if not ratios:  # no peer timed in this run: nothing to compare against
            continue
        line = f"{form} decode / " + ", ".join(ratios)
        q4 = [r["peak_rss_mib"] for r in rows if r["engine"] == "llama q4_0"]
        if q4:
            line += f"; peak RSS / q4_0's {max(r['peak_rss_mib'] for r in rows if r['engine'] == form) / max(q4):.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral", "mistral"], choices=sorted(SHAPES))
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--prompt-len", type=positive, default=128)
    ap.add_argument("--new-tokens", type=at_least(3), default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ap.add_argument("--no-builtin", action="store_true", help="skip the built-in model's KL comparison")
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES + ["mixtrt int4 gptq"],
                    help="the engines to time")
    ap.add_argument("--no-quality", dest="quality", action="store_false", help="timings only (no KL, no agreement)")
    ap.add_argument("--passes", type=positive, default=3, help="interleaved passes over the engines (medians reported)")
    ns = ap.parse_args()
    from peers import genai_generate, genai_model_from_checkpoint, gguf_from_checkpoint, llama_logits, require

    if any(not e.startswith("mixtrt") for e in ns.engines):
        require("convert_hf_to_gguf", "llama-quantize", "llama-server")

    from mixtrt.runtime.manifest import Manifest

    bw = bandwidth_gb_s(ns.threads)
    load = os.getloadavg()
    print(f"threads {ns.threads}, batch 1, prompt {ns.prompt_len}, {ns.new_tokens} greedy tokens; read bandwidth "
          f"{bw:.1f} GB/s; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    for name in ns.models:
        ckpt = make_benchmark_checkpoint(name, ns.work)
        arts = {"fp32": fp32_artifact(ckpt, ns.work / f"{name}-fp32")}
        # the int4 forms this run times or compares (gptq's export takes minutes: made only when asked)
        forms = [f for f in INT4_FORMS if ns.quality or f"mixtrt {f}" in ns.engines]
        for form in forms:
            arts[form] = int4_artifact(ckpt, ns.work / f"{name}-{form.replace(' ', '-')}", *INT4_FORMS[form],
                                       SHAPES[name]["family"] == "mixtral")
        llama = ns.quality or any(e.startswith("llama") for e in ns.engines)
        ggufs = {q: gguf_from_checkpoint(ckpt, ns.work / "gguf", q) for q in ("f32", "q4_0", "q4_K_M")} if llama else {}
        genai = None
        if SHAPES[name]["family"] == "mistral" and "genai int4" in ns.engines:
            genai, why = genai_model_from_checkpoint(ckpt, ns.work / f"{name}-genai-int4", "int4")
            if genai is None:
                print(why)
        prompt = prompts(1, ns.prompt_len)
        kw = dict(threads=ns.threads, prompt_len=ns.prompt_len, new_tokens=ns.new_tokens, batch=1)
        fp32_bpt = bytes_per_token(SHAPES[name])
        int4_bpt = {f: Manifest.read(arts[f]).summary["bytes_per_token"] for f in forms}
        rows = []
        for rep in range(ns.passes):  # interleaved: a change of machine load hits every engine alike
            for eng in ns.engines:
                t = time.perf_counter()
                if eng.startswith("mixtrt"):
                    r = run_child("mixtrt", artifact=arts[eng.removeprefix("mixtrt ")], **kw)
                elif eng.startswith("llama"):
                    r = llama_server_generate(ggufs[eng.split()[1]], prompt[0], ns.new_tokens, ns.threads)
                elif genai is not None:
                    r = genai_generate(genai, prompt[0], ns.new_tokens, ns.threads)
                else:
                    continue
                r["engine"], r["rep"], r["wall"] = eng, rep, time.perf_counter() - t
                rows.append(r)
        print(f"\n{name}: fp32 weights {fp32_bpt / 2**20:.1f} MiB/token"
              + "".join(f", {f} {b / 2**20:.1f} MiB/token" for f, b in int4_bpt.items()))
        print(f"{'engine':<17}{'prefill tok/s':>14}{'decode tok/s (min-max)':>25}{'peak RSS MiB':>13}"
              f"{'artifact MiB':>13}{'of bw limit':>12}   (medians of {ns.passes} interleaved passes)")
        for eng in dict.fromkeys(r["engine"] for r in rows):
            mine = [r for r in rows if r["engine"] == eng]
            decode = [r["decode_tok_s"] for r in mine]
            med = statistics.median(decode)
            art = arts[eng.removeprefix("mixtrt ")] if eng.startswith("mixtrt") else genai if eng == "genai int4" \
                else ggufs[eng.split()[1]]
            bpt = fp32_bpt if eng == "mixtrt fp32" else int4_bpt.get(eng.removeprefix("mixtrt "))
            frac = f"{med * bpt / (bw * 1e9):>11.0%}" if bpt else f"{'':>11}"
            spread = f"{med:.1f} ({min(decode):.1f}-{max(decode):.1f})"
            print(f"{eng:<17}{statistics.median(r['prefill_tok_s'] for r in mine):>14.1f}{spread:>25}"
                  f"{max(r['peak_rss_mib'] for r in mine):>13.0f}{size(Path(art)) / 2**20:>13.1f}{frac}")
        print(_ratios(rows))
        if not ns.quality:
            continue
        # quality: teacher-forced over prompt + 255 tokens of the fp32 greedy continuation
        from mixtrt.runtime.generation import GenerationConfig, Generator

        gen = Generator.load(arts["fp32"], threads=ns.threads)
        cont = gen.generate(prompt, GenerationConfig(max_new_tokens=ns.new_tokens, eos_token_id=()))[0].token_ids
        ids = prompt[0] + list(cont[:-1])
        ref = mixtrt_logits(arts["fp32"], ids, ns.threads)
        for form in INT4_FORMS:
            print(f"mixtrt {form} vs mixtrt fp32:" + " " * (10 - len(form)) +
                  quality(mixtrt_logits(arts[form], ids, ns.threads), ref))
        # llama.cpp's the same way: its own logits of the same ids (f32 cache, no flash attention; these ids are
        # shorter than the window it ignores), each quantized GGUF against its f32 one
        lref = llama_logits(ggufs["f32"], ids, ns.threads, f32_attention=True)
        for q in ("q4_0", "q4_K_M"):
            print(f"llama {q} vs llama f32:" + " " * (14 - len(q)) +
                  quality(llama_logits(ggufs[q], ids, ns.threads, f32_attention=True), lref))
        text = HERE.parent / "models" / "tiny-mixtral" / "heldout.txt"
        print("KL, 8 chunks of 384 tokens of heldout.txt:")
        for form in INT4_FORMS:
            print(f"  mixtrt {form} vs fp32:" + " " * (10 - len(form)) +
                  mixtrt_kl(arts[form], arts["fp32"], text, 384, 8, ns.threads))
        for q in ("q4_0", "q4_K_M"):
            print(f"  llama {q} vs f32:" + " " * (9 - len(q)) + llama_kl(ggufs["f32"], ggufs[q], text, 384, 8,
                                                                         ns.threads, ns.work))
    if ns.quality and not ns.no_builtin:
        model = HERE.parent / "models" / "tiny-mixtral"
        text = model / "heldout.txt"
        print("\nbuilt-in model, held-out text in chunks of 64 (all 225):")
        fp32 = fp32_artifact(model, ns.work / "builtin-fp32")
        for method, form in (("rtn", "int4"), ("awq", "int4"), ("gptq", "int4"), ("rtn", "int4 lm4")):
            art = int4_artifact(model, ns.work / f"builtin-{form.replace(' ', '-')}-{method}", method,
                                INT4_FORMS[form][1], True)
            print(f"  mixtrt {form} {method} vs fp32:" + " " * (9 - len(form)) +
                  mixtrt_kl(art, fp32, text, 64, None, ns.threads))
        ggufs = {q: gguf_from_checkpoint(model, ns.work / "gguf", q) for q in ("f32", "q4_0", "q4_K_M")}
        for q in ("q4_0", "q4_K_M"):
            print(f"  llama {q} vs f32:" + " " * (10 - len(q)) + llama_kl(ggufs["f32"], ggufs[q], text, 64, -1,
                                                                          ns.threads, ns.work))
    subprocess.run(["uptime"])


if __name__ == "__main__":
    main()
