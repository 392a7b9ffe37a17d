"""mixtrt.runtime: torch-free model description, tokenizer, KV cache, sampling, generation, backends."""

from mixtrt import __version__
from mixtrt.runtime.args import ModelArgs, MoeArgs
from mixtrt.runtime.errors import ArtifactError, BackendError, CheckpointError, ConfigError, MixtrtError
from mixtrt.runtime.generation import GenerationConfig, GenerationOutput, Generator, StreamEvent
from mixtrt.runtime.tokenizer import Tokenizer

__all__ = [
    "ArtifactError", "BackendError", "CheckpointError", "ConfigError", "GenerationConfig", "GenerationOutput",
    "Generator", "MixtrtError", "ModelArgs", "MoeArgs", "StreamEvent", "Tokenizer", "__version__",
]

