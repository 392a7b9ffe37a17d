"""The command table: every `mixtrt` subcommand, the module implementing it and the extra it needs.

Each command module has `add_arguments(parser)` and `run(namespace) -> exit code`, and imports at module
level only what building its parser needs (argparse, pathlib), so `mixtrt --help` and every
`mixtrt COMMAND --help` work on a runtime-only install. Before `run`, the CLI checks the command's extra
(`mixtrt.runtime.extras`) and names it when something is missing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # implements add_arguments(parser) and run(namespace) -> int
    extra: str  # extras.EXTRAS key whose modules must be importable to run it
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("export", "mixtrt.cli.commands.export", "export",
            "Export a Hugging Face or raw Mistral checkpoint to an ONNX artifact directory."),
    Command("inspect", "mixtrt.cli.commands.inspect", "base",
            "Summarise an artifact directory: manifest, op counts, parameter and cache memory."),
    Command("generate", "mixtrt.cli.commands.generate", "base",
            "Generate text from an artifact directory, streaming it to the terminal."),
    Command("run", "mixtrt.cli.commands.run", "base",
            "Run a base-model or classifier artifact over texts: hidden states, labels (the config's id2label), "
            "token labels, or answer spans (--question)."),
    Command("perplexity", "mixtrt.cli.commands.perplexity", "base",
            "Held-out perplexity of an artifact on a text file; with --reference, mean KL divergence and top-1 "
            "agreement against another artifact (e.g. int4 against fp32)."),
    Command("chat", "mixtrt.cli.commands.chat", "base",
            "Interactive multi-turn chat with the model's chat template (an empty line or Ctrl-D ends)."),
    Command("build", "mixtrt.cli.commands.build", "tensorrt",
            "Build a TensorRT engine (strongly typed, our plugins) from an artifact and add it to the artifact "
            "(needs an NVIDIA GPU and TensorRT)."),
    Command("serve", "mixtrt.cli.commands.serve", "serve",
            "Serve an artifact over an OpenAI-compatible HTTP API (completions, chat, streaming) with continuous "
            "batching; --ray runs it on Ray Serve."),
    Command("bench", "mixtrt.cli.commands.bench", "base",
            "Measure an artifact on this machine: prefill and decode tok/s, decode step time, peak RSS and the "
            "fraction of the memory-bandwidth limit decode reaches."),
    Command("demo", "mixtrt.cli.commands.demo", "export",
            "Export the built-in tiny Mixtral (once) and generate from it on the CPU, with speed "
            "(sampling with temperature 0.8, top-p 0.95, seed 0 unless told otherwise)."),
)
