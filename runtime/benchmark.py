"""Speed of an artifact on this machine (`mixtrt bench`): prefill and decode rates, the decode step time,
peak memory, and how close decode comes to the memory-bandwidth limit. Torch-free.

    >>> args = ModelArgs.from_hf_config(dict(architectures=["MistralForCausalLM"], vocab_size=100, hidden_size=8,
    ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> weight_bytes_per_token(args, bytes_per_parameter=4)  # 4 * (q,k,v,o 192 + ffn 384 + norms 24 + lm_head 800)
    5600

A decode step reads every weight it uses once: the attention and (dense) feed-forward matrices of every
layer, the k routed experts and the router of a MoE layer, the norms and the lm_head (the embedding row is
negligible): the manifest's `summary.bytes_per_token`, counted at export from the graph's tensors as stored
(INT4, INT8 and float alike); `weight_bytes_per_token` estimates it for an artifact without that count.
At batch 1 the fastest possible decode is the measured read bandwidth / those bytes; the
benchmark reports the measured rate as a fraction of that limit. The bandwidth is a short probe: numpy
sums over 512 MiB with `threads` threads (numpy releases the GIL), best of a few passes.

Method (what benchmarks/bench_generate.py and its peers use): random prompt ids, greedy decoding with no
end-of-sequence token, so every row makes exactly `new_tokens` tokens; a warm-up generation first. Prefill
rate = prompt tokens / the rows' prefill time (rows are prefilled one at a time); decode rate = tokens made
by the decode steps after the first engine step / their time.
"""

from __future__ import annotations

import numbers
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.errors import ArtifactError, ConfigError
from mixtrt.runtime.hugepages import Collapsed


@dataclass(frozen=True)
class BenchResult:
    artifact: str
    batch: int
    threads: int | None  # None: onnxruntime's default (all cores)
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # all rows together
    decode_step_ms: dict[str, float]  # median, min, max of one decode step (every row advances one token)
    peak_rss_mib: float  # of this process, measured before the bandwidth probe
    weight_bytes_per_token: int  # read by a batch-1 decode step
    read_bandwidth_gb_s: float
    # the decode rate streaming the weights allows: batch x read bandwidth / the weight bytes a step reads
    bandwidth_limit_tokens_per_s: float
    bandwidth_fraction: float  # decode steps/s * weight bytes per step / read bandwidth (batch 1's bytes)
    # repeated measurements (llama-bench's -r): the rates above are their means, here their sample standard
    # deviations (0 for one) and each repetition's rate
    repetitions: int = 1
    prefill_tokens_per_s_stddev: float = 0.0
    decode_tokens_per_s_stddev: float = 0.0
    prefill_samples: tuple[float, ...] = ()
    decode_samples: tuple[float, ...] = ()
    load_s: float = 0.0  # Generator.load: the artifact checked (sha256 unless --no-verify) and the session made
    # resident size right after loading (what the process holds once load's transient copies are gone; None where
    # the platform does not say): peak_rss_mib above it is what loading or running took on top
    rss_after_load_mib: float | None = None
    # of the memory loading took, how much is on transparent huge pages (runtime/hugepages.py; 0 where the
    # kernel has none, refused, or MIXTRT_HUGEPAGES=0)
    huge_pages_mib: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_bytes_per_token(args: ModelArgs, bytes_per_parameter: float) -> int:
    """Weight bytes a batch-1 decode step reads (routed experts only; the embedding row left out)."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    attn = h * d * (2 * args.num_attention_heads + 2 * args.num_key_value_heads)
    ffn = 3 * h * i if args.moe is None else args.moe.num_experts_per_tok * 3 * h * i + args.moe.num_experts * h
    params = args.num_hidden_layers * (attn + ffn + 2 * h) + h + args.vocab_size * h
    return int(params * bytes_per_parameter)


def read_bandwidth_gb_s(threads: int, total_bytes: int = 512 << 20, passes: int = 6) -> float:
    """Best read rate (GB/s) of `passes` numpy sums over `total_bytes` split among `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [np.ones(total_bytes // 4 // threads, np.float32) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, sum(p.nbytes for p in parts) / (time.perf_counter() - t))
    return best / 1e9


def _status_mib(field: str) -> float | None:
    """A size field of /proc/self/status (VmHWM, VmRSS) in MiB; None where there is no such file."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set size (MiB): VmHWM on Linux, else getrusage."""
    peak_mib = _status_mib("VmHWM")
    if peak_mib is not None:
        return peak_mib
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float | None:
    """This process's resident set size now (MiB): VmRSS on Linux, None elsewhere."""
    return _status_mib("VmRSS")


def _positive(name: str, value: Any, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


def bench(artifact: str | Path, *, prompt_tokens: int = 128, new_tokens: int = 128, batch: int = 1,
          threads: int | None = None, seed: int = 0, verify: bool = True, repetitions: int = 1) -> BenchResult:
    """Measure `artifact` (a causal LM artifact directory) as the module docstring says, `repetitions` times
    over the same prompts (the rates: their means; the step times: over every repetition's steps)."""
    from mixtrt.runtime.generation import Engine, GenerationConfig, Generator
    from mixtrt.runtime.manifest import Manifest
    from mixtrt.runtime.threads import available_cores, check_threads

    prompt_tokens = _positive("prompt_tokens", prompt_tokens, 1)
    new_tokens = _positive("new_tokens", new_tokens, 3)  # the first engine step prefills; decode timed from the 2nd
    batch = _positive("batch", batch, 1)
    repetitions = _positive("repetitions", repetitions, 1)
    threads = check_threads(threads)
    t_load = time.perf_counter()
    gen = Generator.load(artifact, threads=threads, verify=verify)
    load_s, loaded_rss = time.perf_counter() - t_load, current_rss_mib()
    backend = gen.backend
    if prompt_tokens + new_tokens > backend.max_positions:
        raise ConfigError(f"prompt_tokens + new_tokens (--prompt-tokens + --new-tokens) = {prompt_tokens + new_tokens}"
                          f" is more than the {backend.max_positions} positions {artifact} serves (max context "
                          "chosen at export): give smaller ones")
    args = backend.args
    summary = Manifest.read(artifact).summary
    wbytes = summary.get("bytes_per_token")  # counted from the graph's own tensors at export
    if not wbytes:  # an artifact exported before that count: estimated from the shapes and the mean parameter size
        if not summary.get("parameters") or not summary.get("parameter_bytes"):
            raise ArtifactError(f"{artifact}: manifest.json's summary has neither bytes_per_token nor parameters and "
                                "parameter_bytes to count the bytes a step reads: export it again")
        wbytes = weight_bytes_per_token(args, summary["parameter_bytes"] / summary["parameters"])
    rng = np.random.default_rng(seed)
    low = min(3, args.vocab_size - 1)
    prompts = [[int(t) for t in rng.integers(low, args.vocab_size, prompt_tokens)] for _ in range(batch)]
    cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=(), do_sample=False)

    def run(rows: list[list[int]], config: GenerationConfig) -> tuple[list[Any], list[float]]:
        engine = Engine(backend, gen.tokenizer, max_batch=len(rows))
        added = [engine.add(p, config, sample_index=i) for i, p in enumerate(rows)]
        steps = []
        while engine.busy:
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        return added, steps

    run([prompts[0][:8]], GenerationConfig(max_new_tokens=4, eos_token_id=(), do_sample=False))  # warm-up
    decode: list[float] = []
    prefill_rates, decode_rates = [], []
    for _ in range(repetitions):
        rows, steps = run(prompts, cfg)
        if any(len(r.tokens) != new_tokens for r in rows):
            raise ConfigError(f"{artifact}: a row stopped before {new_tokens} new tokens")
        decode += steps[1:]  # step 0 prefilled every row (and decoded once)
        prefill_rates.append(batch * prompt_tokens / sum(r.t_prefill for r in rows))
        decode_rates.append(batch * len(steps[1:]) / sum(steps[1:]))
    rss = peak_rss_mib()
    bw = read_bandwidth_gb_s(threads or available_cores())
    rate = statistics.fmean(decode_rates)
    return BenchResult(
        artifact=str(artifact), batch=batch, threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        prefill_tokens_per_s=statistics.fmean(prefill_rates),
        decode_tokens_per_s=rate,
        decode_step_ms={"median": statistics.median(decode) * 1e3, "min": min(decode) * 1e3,
                        "max": max(decode) * 1e3},
        peak_rss_mib=rss, weight_bytes_per_token=wbytes, read_bandwidth_gb_s=bw,
        bandwidth_limit_tokens_per_s=batch * bw * 1e9 / wbytes,
        bandwidth_fraction=rate / batch * wbytes / (bw * 1e9),
        repetitions=repetitions,
        prefill_tokens_per_s_stddev=statistics.stdev(prefill_rates) if repetitions > 1 else 0.0,
        decode_tokens_per_s_stddev=statistics.stdev(decode_rates) if repetitions > 1 else 0.0,
        prefill_samples=tuple(prefill_rates), decode_samples=tuple(decode_rates),
        load_s=load_s, rss_after_load_mib=loaded_rss,
        huge_pages_mib=getattr(backend, "huge_pages", Collapsed()).huge_bytes / 2**20,
    )
