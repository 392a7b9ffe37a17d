"""`mixtrt demo`: export the built-in checkpoint (once) and sample from it, with speed."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixtrt.cli.options import (
    add_sampling,
    generation_config,
    generation_overrides,
    load_generator,
    path,
    print_stream,
    stats_line,
    status,
)

DEMO_PROMPTS = ("It is a truth universally acknowledged", "Mrs. Bennet was", "The weather was so fine that")


def builtin_checkpoint() -> Path:
    """The small trained Mixtral shipped in the source tree (models/tiny-mixtral; not in the wheel)."""
    return Path(__file__).resolve().parents[3] / "models" / "tiny-mixtral"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=path, default=None, help="checkpoint to use instead of the built-in one")
    p.add_argument("--out", type=path, default=None, help="artifact directory (default: engines/<name>-fp32)")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: three stories)")
    p.add_argument("--reexport", action="store_true", help="export again even if the artifact is up to date")
    add_sampling(p, "generation (the demo's defaults: 48 new tokens, sampled at temperature 0.8 and top-p 0.95 "
                    "with seed 0; --temperature 0 means greedy)")
    # a model this small loops under greedy decoding; the demo samples, seeded, so it prints the same text
    # every run (--temperature 0 for greedy)
    p.set_defaults(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0)
    for action in p._actions:  # the shared options' help names generate's defaults: the demo's instead
        action.help = _DEMO_HELP.get(action.dest, action.help)


_DEMO_HELP = {"max_new_tokens": "most tokens to generate (default 48)",
              "temperature": "sampling temperature, 0 .. (0 = greedy; default 0.8)",
              "top_p": "1.0 = off (default 0.95)",
              "seed": "seed of the sampling (default 0: the same text each run)"}


def run(ns: argparse.Namespace) -> int:
    from mixtrt.export.onnx_export import export_onnx, is_current
    from mixtrt.runtime.errors import ConfigError

    ckpt = ns.checkpoint or builtin_checkpoint()
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"{ckpt}: no checkpoint there; pass --checkpoint DIR (the built-in one lives in the "
                          "source tree's models/ folder)")
    ns.artifact = ns.out or Path("engines") / f"{ckpt.name}-fp32"
    if not is_current(ns.artifact, ckpt) or ns.reexport:
        other = _other_source(ns.artifact, ckpt)
        if other is not None and not ns.reexport:  # only its own outdated artifact is replaced unasked
            raise ConfigError(f"{ns.artifact}: holds an artifact exported from another checkpoint ({other}); pass "
                              "--reexport to replace it, or --out another folder")
        export_onnx(ckpt, ns.artifact, overwrite=True, progress=status)
    else:
        status(f"using the artifact in {ns.artifact} (pass --reexport to rebuild it)")
    overrides = generation_overrides(ns)
    gen = load_generator(ns)
    cfg = generation_config(gen, overrides)
    for prompt in ns.prompt or DEMO_PROMPTS:
        print()
        print(stats_line(print_stream(gen.stream(prompt, cfg, continuation=True), before=prompt)))
    return 0


def _other_source(artifact: Path, ckpt: Path) -> str | None:
    """The checkpoint an existing artifact in `artifact` was exported from, where that is not `ckpt`."""
    from mixtrt.runtime.args import read_json
    from mixtrt.runtime.errors import ArtifactError
    from mixtrt.runtime.manifest import MANIFEST, Manifest, is_artifact

    if artifact.is_symlink() or not (artifact / MANIFEST).is_file():
        return None  # the export's own refusals name what else is there
    try:
        source = Manifest.load(artifact, verify=False).source
    except (ArtifactError, OSError):
        if not is_artifact(artifact):
            return None  # not an artifact: the export refuses the folder itself
        # an artifact this mixtrt cannot load (a newer format, damaged files): its source as its manifest says
        recorded = read_json(artifact / MANIFEST, ArtifactError).get("source")
        source = recorded if isinstance(recorded, str) else "a checkpoint its manifest does not name"
    return source if source != str(ckpt.resolve()) else None

