"""The optional extras of the distribution and the modules each provides: one table, read by every check.

A command or backend that needs an extra calls `require(extra, what)` before importing anything from it,
so a missing dependency is named with its install command, and an ImportError raised later (a bug, or a
broken installation) is never mistaken for "not installed". pyproject.toml's
`[project.optional-dependencies]` holds the package requirements of the same extras
(tests/test_packaging.py keeps the two in step).

    >>> require("base", "mixtrt generate")
    >>> EXTRAS["export"].modules
    ('torch', 'onnx', 'onnxscript', 'onnx_ir', 'tqdm')
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mixtrt.runtime.errors import MissingExtraError


@dataclass(frozen=True)
class Extra:
    modules: tuple[str, ...]  # top-level modules that must be importable
    what: str  # one phrase for README and errors


EXTRAS: dict[str, Extra] = {
    "base": Extra(("numpy", "onnxruntime", "onnx", "sentencepiece", "safetensors", "jinja2"),
                  "the runtime: generate, chat, inspect on the CPU"),
    "export": Extra(("torch", "onnx", "onnxscript", "onnx_ir", "tqdm"), "export checkpoints to artifacts"),
    "mistral": Extra(("mistral_common",), "Mistral's own tokenizer files (v3, v7, tekken)"),
    "serve": Extra(("fastapi", "uvicorn", "prometheus_client"), "the OpenAI-compatible server"),
    "structured": Extra(("llguidance",), "structured output: replies constrained to JSON or a JSON schema"),
    "ray": Extra(("ray",), "scale-out on Ray Serve"),
    "gpu": Extra(("torch", "triton"), "the Triton GPU backend"),
    "tensorrt": Extra(("tensorrt", "polygraphy"),
                      "TensorRT engines; building and running one needs an NVIDIA GPU with CUDA"),
    "bench": Extra(("torch", "transformers", "mistral_common", "matplotlib"), "the benchmark scripts and their charts"),
    "test": Extra(("pytest", "transformers", "mistral_common", "polygraphy", "mypy", "triton", "hypothesis", "fastapi",
                   "openai", "ray"),
                  "the test suite"),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    return [m for m in EXTRAS[extra].modules if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise MissingExtraError naming the extra to install when one of its modules is absent."""
    absent = missing(extra)
    if absent:
        install = "pip install mixtrt" if extra == "base" else f"pip install 'mixtrt[{extra}]'"
        if "torch" in absent:  # a bare torch requirement pulls a multi-GB CUDA build
            install += " (on a machine without a GPU, the CPU build of torch first: README's Install)"
        raise MissingExtraError(f"{what} needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} "
                                f"not installed ({EXTRAS[extra].what}): {install}")
