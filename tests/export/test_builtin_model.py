"""The shipped tiny Mixtral: it exports, and its held-out perplexity stays at the recorded value.

Protocol (training/evaluate.py): ids = [BOS] + encode(heldout.txt); non-overlapping chunks of 256 tokens,
each from an empty cache; every token but a chunk's first is scored; perplexity = exp(mean NLL).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtrt.export import export_onnx, load_model
from mixtrt.runtime.generation import Generator
from mixtrt.runtime.tokenizer import Tokenizer

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-mixtral"
CHUNK = 256


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return export_onnx(MODEL, tmp_path_factory.mktemp("builtin") / "art", progress=None)


def _heldout_ids() -> list[int]:
    text = (MODEL / "heldout.txt").read_bytes().decode("utf-8")
    return Tokenizer.load(MODEL).encode(text, bos=True)


def _reference_perplexity(ids: list[int]) -> float:
    model = load_model(MODEL)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), CHUNK):
            chunk = torch.tensor([ids[i:i + CHUNK]])
            if chunk.shape[1] < 2:
                continue
            logp = torch.log_softmax(model(chunk)[0, :-1].float(), dim=-1)
            nll -= float(logp.gather(1, chunk[0, 1:, None]).double().sum())
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def test_shipped_checkpoint_is_small_and_complete():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "heldout.txt", "eval.json"} <= names
    assert sum(p.stat().st_size for p in MODEL.iterdir()) <= 21 * 2**20
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["num_local_experts"] >= 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["sliding_window"] is not None


def test_heldout_perplexity_matches_the_record_on_onnxruntime_and_reference(artifact):
    recorded = json.loads((MODEL / "eval.json").read_text())["heldout_perplexity"]
    ids = _heldout_ids()
    ppl_ort = Generator.load(artifact, threads=2).perplexity(ids, window=CHUNK)
    ppl_ref = _reference_perplexity(ids)
    print(f"held-out perplexity: onnxruntime {ppl_ort:.5f}, reference {ppl_ref:.5f}, recorded {recorded:.5f}")
    assert abs(ppl_ort - recorded) / recorded <= 0.01
    assert abs(ppl_ort - ppl_ref) / ppl_ref <= 5e-5, "onnxruntime and the reference must agree to 4 digits"
    assert ppl_ort < 200, "a trained model, not random weights (those give ~32000)"


def _demo(out: Path, max_new_tokens: int, status: bool = False) -> str:
    """`mixtrt demo --out OUT --prompt "It was"` in a subprocess; its stdout (the text), or with status its stderr
    (the export's progress and what artifact it used)."""
    r = subprocess.run([sys.executable, "-m", "mixtrt", "demo", "--out", str(out),
                        "--prompt", "It was", "--max-new-tokens", str(max_new_tokens)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ("wrote" not in r.stdout and "using the artifact" not in r.stdout), r.stdout  # status stays off stdout
    return r.stderr if status else r.stdout


def test_demo_command_generates_from_the_builtin_model(tmp_path, artifact):
    stdout = _demo(tmp_path / "demo", 12)
    assert "It was" in stdout and "generated" in stdout
    words = stdout.split("It was", 1)[1].split("[")[0].split()
    assert len(words) >= 3
    assert np.mean([w.strip(".,;:!?\"'").isalpha() for w in words]) >= 0.6, stdout


def test_demo_reexports_an_artifact_with_outdated_graph_io(tmp_path):
    """An artifact exported by an older mixtrt (other graph inputs) is rebuilt, not reused."""
    assert "wrote" in _demo(tmp_path / "demo", 2, status=True)
    assert "using the artifact" in _demo(tmp_path / "demo", 2, status=True)
    manifest_path = tmp_path / "demo" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["inputs"] = [t for t in manifest["inputs"] if t["name"] != "logit_positions"]
    manifest_path.write_text(json.dumps(manifest))
    assert "wrote" in _demo(tmp_path / "demo", 2, status=True)


def _readme_quotes() -> list[str]:
    """The README's blockquoted samples, each flattened to one line (markdown bold and '>' removed)."""
    quotes, current = [], []
    for line in (MODEL.parents[1] / "README.md").read_text().splitlines() + [""]:
        if line.startswith(">"):
            current.append(line.lstrip(">").strip())
        elif current:
            quotes.append(" ".join(" ".join(current).replace("**", "").split()))
            current = []
    return quotes


def test_readme_samples_are_what_the_demo_prints(artifact):
    """README quotes `mixtrt demo`'s default output; a change in the model, sampler or graph numerics
    that changes the demo must update the README too."""
    from mixtrt.cli.commands.demo import DEMO_PROMPTS
    from mixtrt.runtime.generation import GenerationConfig

    gen = Generator.load(artifact, threads=2)
    cfg = GenerationConfig(max_new_tokens=48, do_sample=True, temperature=0.8, top_p=0.95, seed=0)
    quotes = _readme_quotes()
    for prompt in DEMO_PROMPTS:
        ids = gen.tokenizer.encode(prompt)  # decoded with the prompt, the continuation keeps its first space
        text = " ".join(gen.tokenizer.decode(ids + gen.generate(ids, cfg)[0].token_ids).split())
        assert text in quotes, f"README lacks the demo output {text!r}"


def test_readme_structured_output_sample_completes(artifact):
    """README's structured-output sample, run as written on the built-in model: the bounded schema lets greedy
    decoding finish the document (without the bounds it ran on in one integer's digits until max_new_tokens)."""
    text = (MODEL.parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    [sample] = [b for b in blocks if "Describe Mr. Darcy as JSON" in b]
    printed: list[object] = []
    scope = {"gen": Generator.load(artifact, threads=2), "json": json, "print": printed.append}
    exec(sample, scope)  # noqa: S102 (the README's own text)
    out = scope["out"]
    assert out.finish_reason == "eos" and printed == [json.loads(out.text)]  # type: ignore[attr-defined]
    assert set(printed[0]) == {"name", "age"} and 0 <= printed[0]["age"] <= 120  # type: ignore[index]
