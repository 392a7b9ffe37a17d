"""`mixtrt serve` against llama.cpp's `llama-server` on the Mixtral-shaped benchmark model, in the same run.

    python benchmarks/bench_serve.py                       # needs the peers (benchmarks/setup_peers.sh)
    python benchmarks/bench_serve.py --no-llama            # mixtrt only

Both servers get the same fp32 weights (our artifact; an f32 GGUF converted by llama.cpp's own tool), the
same threads, continuous batching with 16 rows / slots, and the same requests: streaming /v1/completions
with token-id prompts of different lengths, greedy, EOS ignored, `--new-tokens` each. At 1, 4 and 16
concurrent clients (each sending `--per-client` requests one after another) it prints aggregate generated
tokens/s and TTFT / inter-token latency p50 / p99 as the clients see them (one request's gaps between
SSE chunks), medians over interleaved rounds (`--runs` at 1 client, `--multi-runs` above). At 1 client it
adds what the server itself adds, from its own timestamps (request received -> first token handed to the
socket, minus the engine's prefill), and its decode rate against `mixtrt generate --json` on the same prompt
(interleaved runs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, exit_on_sigterm, make_benchmark_checkpoint, positive  # noqa: E402

# llama-server reuses a slot's cached prompt prefix (prompts repeat across rounds here); mixtrt has no prompt cache,
# so both do the same work only with it off
EXTRA = {"llama-server": {"cache_prompt": False}}


def stream_request(port: int, prompt: list[int], new_tokens: int, extra: dict | None = None) -> dict:
    """One streaming completion; client-side times of every SSE chunk."""
    body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}, **(extra or {})})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()[:500]
    times, tokens = [], None
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            if line.strip() == b"data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens")
            if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("finish_reason")):
                times.append(time.perf_counter())
    conn.close()
    return {"t0": t0, "times": times, "tokens": new_tokens if tokens is None else tokens}


def load(port: int, prompts: list[list[int]], clients: int, per_client: int, new_tokens: int,
         extra: dict | None = None) -> dict:
    """`clients` threads, each sending per_client requests in turn; aggregate tok/s, TTFT and ITL lists."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            out = stream_request(port, prompts[(c * per_client + r) % len(prompts)], new_tokens, extra)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["t0"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    decode = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in results if len(r["times"]) > 1]
    short = [r["tokens"] for r in results if r["tokens"] < new_tokens]
    if short:  # counted as generated, never as asked: a server that stops early is not credited
        print(f"  port {port}: {len(short)} of {len(results)} requests got fewer than {new_tokens} tokens "
              f"({min(short)}-{max(short)})", file=sys.stderr)
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft": ttft, "itl": itl, "decode": decode}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_mixtrt(art: Path, port: int, threads: int, log: Path, prefill_chunk: int | None,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mixtrt", "serve", str(art), "--port", str(port), "--threads", str(threads),
           "--max-batch", "16", "--max-queue", "64", "--no-verify", *extra]
    if prefill_chunk is not None:
        cmd += ["--prefill-chunk", str(prefill_chunk)]
    proc = subprocess.Popen(cmd, stderr=open(log, "w"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:  # never take another process's /health for this one's
            raise RuntimeError(f"mixtrt serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mixtrt serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def server_records(log: Path) -> list[dict]:
    return [r for r in (json.loads(line) for line in log.read_text().splitlines() if line.startswith("{"))
            if r.get("event") == "request"]


def generate_decode(art: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "mixtrt", "generate", str(art), "--prompt-ids", ",".join(map(str, prompt)),
           "--max-new-tokens", str(new_tokens), "--threads", str(threads), "--json", "--no-verify"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return out["stats"]["decode_tokens_per_s"]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: only a listener conflicts
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--clients", nargs="+", type=positive, default=[1, 4, 16])
    ap.add_argument("--per-client", type=positive, default=2, help="requests each client sends in turn")
    ap.add_argument("--new-tokens", type=at_least(2), default=64)
    ap.add_argument("--runs", type=positive, default=5, help="interleaved 1-client rounds (medians)")
    ap.add_argument("--multi-runs", type=positive, default=3,
                    help="interleaved rounds at each client count above 1 (medians; each round is clients x "
                         "--per-client requests)")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixtrt-bench"))
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="mixtrt serve's --prefill-chunk (default: the server's default)")
    ap.add_argument("--separate", action="store_true",
                    help="also run a mixtrt server with --separate-prefill (each prompt chunk a pass of its own)")
    ap.add_argument("--compare-chunk", type=at_least(1), nargs="+", default=[], metavar="TOKENS",
                    help="also run a mixtrt server with each of these --prefill-chunk values (in the same rounds)")
    ns = ap.parse_args()
    if not ns.no_llama:
        from peers import require

        require("convert_hf_to_gguf", "llama-server")
    if len(set(ns.compare_chunk)) != len(ns.compare_chunk):
        ap.error(f"--compare-chunk {' '.join(map(str, ns.compare_chunk))}: a value twice (one server each)")
    extra_ports = [ns.port + 3 + i for i in range(len(ns.compare_chunk))]
    ports = [ns.port] + [ns.port + 2] * ns.separate + [ns.port + 1] * (not ns.no_llama) + extra_ports
    busy = [p for p in ports if port_in_use(p)]
    if busy:  # a server left from an earlier run would answer /health and be measured
        ap.error(f"port {', '.join(map(str, busy))} is in use (a server left running?): stop it or pass --port")

    from mixtrt.export.onnx_export import export_onnx, is_current

    ckpt = make_benchmark_checkpoint("mixtral", ns.work)
    art = ns.work / "mixtral-fp32"
    if not is_current(art, ckpt):
        export_onnx(ckpt, art, overwrite=True, progress=None)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 32000, size=int(n) - 1).tolist() for n in rng.integers(16, 129, size=64)]
    engines = {"mixtrt": ns.port}
    log = ns.work / "bench-serve-mixtrt.log"
    procs: list[subprocess.Popen] = []
    llama_cm = None
    try:  # every server started is stopped, whatever fails after it
        procs.append(start_mixtrt(art, ns.port, ns.threads, log, ns.prefill_chunk))
        if ns.separate:
            procs.append(start_mixtrt(art, ns.port + 2, ns.threads, ns.work / "bench-serve-separate.log",
                                      ns.prefill_chunk, ("--separate-prefill",)))
            engines["mixtrt-separate"] = ns.port + 2
        for chunk, port in zip(ns.compare_chunk, extra_ports, strict=True):
            procs.append(start_mixtrt(art, port, ns.threads, ns.work / f"bench-serve-chunk{chunk}.log", chunk))
            engines[f"mixtrt chunk {chunk}"] = port
        if not ns.no_llama:
            import peers

            gguf = peers.gguf_from_checkpoint(ckpt, ns.work, "f32")
            # a slot holds the longest prompt (128) and every new token: a shorter one stops a request early
            cm = peers.start_llama_server(gguf, port=ns.port + 1, threads=ns.threads, slots=16,
                                          ctx_per_slot=max(256, 128 + ns.new_tokens + 16))
            cm.__enter__()
            llama_cm = cm
            engines["llama-server"] = ns.port + 1
        print(f"Mixtral-shaped benchmark model (benchmarks/common.py), fp32 / f32 GGUF, {ns.threads} threads, "
              f"16 rows/slots, prompts 16-128 tokens, {ns.new_tokens} new tokens, greedy, EOS ignored; mixtrt "
              f"--prefill-chunk {ns.prefill_chunk if ns.prefill_chunk is not None else 'default'}; "
              f"load: {os.getloadavg()[0]:.2f}")
        for name, port in engines.items():  # warm-up
            load(port, prompts, 2, 1, 8, EXTRA.get(name))

        # 1 client: interleaved with `mixtrt generate`
        single: dict[str, list[dict]] = {e: [] for e in engines}
        gen_decode: list[float] = []
        before = len(server_records(log))
        for r in range(ns.runs):
            # `mixtrt generate` first: llama.cpp's OpenMP threads spin for a while after its requests
            gen_decode.append(generate_decode(art, prompts[r], ns.new_tokens, ns.threads))
            for name, port in engines.items():
                single[name].append(load(port, prompts[r:], 1, ns.per_client, ns.new_tokens, EXTRA.get(name)))
                time.sleep(1.0)
        records = server_records(log)[before:]
        overhead = [r["overhead_s"] for r in records if r["overhead_s"] is not None]
        queue = [r["queue_s"] for r in records if r["queue_s"] is not None]
        rows = {1: single}
        for clients in [c for c in ns.clients if c != 1]:
            rows[clients] = {e: [] for e in engines}
            for _ in range(ns.multi_runs):
                for name, port in engines.items():
                    rows[clients][name].append(load(port, prompts, clients, ns.per_client, ns.new_tokens,
                                                    EXTRA.get(name)))
                    time.sleep(1.0)

        print(f"\n{'clients':>7} {'server':<16}{'agg tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
              f"{'ITL p50':>9}{'ITL p99':>9}   (ms; medians of rounds)")
        for clients, per_engine in rows.items():
            for name, runs in per_engine.items():
                tok = statistics.median(r["tok_s"] for r in runs)
                cols = [statistics.median(pct(r[k], q) * 1e3 for r in runs) for k, q in
                        (("ttft", 50), ("ttft", 99), ("itl", 50), ("itl", 99))]
                print(f"{clients:>7} {name:<16}{tok:>10.1f}" + "".join(f"{c:>10.1f}" if i < 2 else f"{c:>9.1f}"
                                                                  for i, c in enumerate(cols)))
        serve_decode = statistics.median(d for r in single["mixtrt"] for d in r["decode"])
        gen = statistics.median(gen_decode)
        # each round's serve runs against the generate run just before it on the same prompt: the machine's drift
        # between rounds (memory bandwidth moves on these VMs) cancels in the ratio
        paired = [statistics.median(r["decode"]) / g for r, g in zip(single["mixtrt"], gen_decode, strict=True)
                  if r["decode"]]
        print(f"\n1 client, mixtrt serve: server-added latency before the first token (received -> first token "
              f"handed to the socket, minus prefill; server timestamps, {len(overhead)} requests): "
              f"p50 {pct(overhead, 50) * 1e3:.2f} ms, p99 {pct(overhead, 99) * 1e3:.2f} ms "
              f"(of which waiting for the engine loop: p50 {pct(queue, 50) * 1e3:.2f} ms)")
        print(f"1 client decode: mixtrt serve {serve_decode:.1f} tok/s (client-side) vs mixtrt generate "
              f"{gen:.1f} tok/s (median of {ns.runs}): {serve_decode / gen - 1:+.1%}; median of the rounds' paired "
              f"ratios {statistics.median(paired) - 1:+.1%} (rounds {', '.join(f'{x - 1:+.1%}' for x in paired)})")
        print(f"load after: {os.getloadavg()[0]:.2f}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        if llama_cm is not None:
            llama_cm.__exit__(None, None, None)


if __name__ == "__main__":
    main()
