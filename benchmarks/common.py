"""Shared pieces of the benchmark scripts: the benchmark model shapes, checkpoint creation, timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

# The shapes named in the issues: random weights written by transformers.
SHAPES = {
    "mixtral": dict(
        family="mixtral", vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=512, max_position_embeddings=8192,
    ),
    "mistral": dict(
        family="mistral", vocab_size=32000, hidden_size=768, intermediate_size=2688, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, sliding_window=512, max_position_embeddings=8192,
    ),
}


from mixtrt.cli.options import at_least  # noqa: E402  (an integer >= low, as argparse errors)

positive = at_least(1)


def exit_on_sigterm() -> None:
    """SIGTERM (timeout, a CI runner, kill) ends the script as Ctrl-C does, through its `finally` blocks, which stop
    the servers and children it started (Python's default leaves them running, orphaned, holding their ports)."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def make_benchmark_checkpoint(name: str, root: Path) -> Path:
    """Write (once) a random checkpoint of the named shape under root/<name>; returns its path."""
    import shutil

    import torch
    import transformers
    from mistral_common import __file__ as mc_file

    path = root / name
    if (path / "config.json").is_file():
        return path
    kw = dict(SHAPES[name])
    family = kw.pop("family")
    cfg_cls = transformers.MixtralConfig if family == "mixtral" else transformers.MistralConfig
    model_cls = transformers.MixtralForCausalLM if family == "mixtral" else transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw, initializer_range=0.02, router_jitter_noise=0.0) if family == "mixtral"
                      else cfg_cls(**kw, initializer_range=0.02))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    shutil.copy(Path(mc_file).parent / "data" / "tokenizer.model.v1", path / "tokenizer.model")
    return path


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
