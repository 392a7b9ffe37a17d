"""mixtrt.runtime: torch-free model description, tokenizer, KV cache, sampling, generation, backends."""

from mixtrt.runtime.args import ModelArgs, MoeArgs
from mixtrt.runtime.errors import ArtifactError, BackendError, CheckpointError, ConfigError, MixtrtError
from mixtrt.runtime.generation import GenerationConfig, GenerationOutput, Generator, StreamEvent
from mixtrt.runtime.tokenizer import Tokenizer

__all__ = [
    "ArtifactError", "BackendError", "CheckpointError", "ConfigError", "GenerationConfig", "GenerationOutput",
    "Generator", "MixtrtError", "ModelArgs", "MoeArgs", "StreamEvent", "Tokenizer", "__version__",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixtrt")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+unknown"


__version__ = _version()
