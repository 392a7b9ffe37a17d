"""`mixtrt bench`: prefill / decode speed, peak memory and bandwidth fraction of an artifact on this machine."""

from __future__ import annotations

import argparse
import json

from mixtrt.cli.options import at_least, path, threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="artifact directory of a causal LM (written by `mixtrt export`)")
    p.add_argument("--prompt-tokens", type=at_least(1), default=128, help="random prompt ids per row (default 128)")
    p.add_argument("--new-tokens", type=at_least(3), default=128,
                   help="greedy tokens per row, end-of-sequence ignored (default 128, at least 3)")
    p.add_argument("--batch", type=at_least(1), default=1, help="rows decoded together (default 1)")
    p.add_argument("--threads", type=threads, default=None,
                   help="onnxruntime intra-op threads, 1 .. the available cores (default: all of them)")
    p.add_argument("-r", "--repetitions", type=at_least(1), default=1,
                   help="measure this many times over the same prompts, as llama-bench's -r: rates as mean ± "
                        "standard deviation (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files at load (sizes are still checked)")


def run(ns: argparse.Namespace) -> int:
    from mixtrt.runtime.benchmark import bench

    r = bench(ns.artifact, prompt_tokens=ns.prompt_tokens, new_tokens=ns.new_tokens, batch=ns.batch,
              threads=ns.threads, verify=not ns.no_verify, repetitions=ns.repetitions)
    if ns.json:
        print(json.dumps(r.to_dict(), allow_nan=False))
        return 0
    step = r.decode_step_ms
    print(f"artifact      {r.artifact}")
    print(f"run           batch {r.batch}, prompt {r.prompt_tokens} tokens, {r.new_tokens} new tokens (greedy), "
          f"threads {r.threads or 'all'}")
    spread = (lambda sd: f" ± {sd:.1f}") if r.repetitions > 1 else (lambda sd: "")
    reps = f" (mean of {r.repetitions} repetitions)" if r.repetitions > 1 else ""
    print(f"prefill       {r.prefill_tokens_per_s:.1f}{spread(r.prefill_tokens_per_s_stddev)} tok/s{reps}")
    print(f"decode        {r.decode_tokens_per_s:.1f}{spread(r.decode_tokens_per_s_stddev)} tok/s{reps}; one step "
          f"{step['median']:.2f} ms median ({step['min']:.2f}-{step['max']:.2f})")
    print(f"peak RSS      {r.peak_rss_mib:.0f} MiB"
          + (f" ({r.rss_after_load_mib:.0f} MiB right after loading)" if r.rss_after_load_mib is not None else ""))
    print(f"load          {r.load_s:.2f} s"
          + ("" if ns.no_verify else " (with the sha256 check; --no-verify skips it)")
          + (f"; {r.huge_pages_mib:.0f} MiB of weights on huge pages" if r.huge_pages_mib else ""))
    print(f"bandwidth     {r.read_bandwidth_gb_s:.1f} GB/s read (probe); a step reads "
          f"{r.weight_bytes_per_token / 2**20:.1f} MiB of weights: limit {r.bandwidth_limit_tokens_per_s:.1f} "
          f"tok/s at batch {r.batch}, decode at {r.bandwidth_fraction:.0%} of it")
    if r.bandwidth_fraction > 1:  # the probe reads memory; weights this small are read from the CPU's caches
        print(f"              (above 100%: the {r.weight_bytes_per_token / 2**20:.1f} MiB a step reads stay in the "
              "CPU's caches between steps, while the probe reads 512 MiB from memory; the limit holds for models "
              "larger than the caches)")
    return 0
