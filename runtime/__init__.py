"""mixtrt.runtime: torch-free model description, tokenizer, KV cache, sampling, generation, backends."""

from mixtrt import __version__
from mixtrt.runtime.args import ModelArgs, MoeArgs
from mixtrt.runtime.errors import ArtifactError, BackendError, CheckpointError, ConfigError, MixtrtError
from mixtrt.runtime.generation import GenerationConfig, GenerationOutput, Generator, StreamEvent
from mixtrt.runtime.heads import Encoder, QuestionAnswerer, SequenceClassifier, TokenClassifier
from mixtrt.runtime.tokenizer import Tokenizer

__all__ = [
    "ArtifactError", "BackendError", "CheckpointError", "ConfigError", "Encoder", "GenerationConfig",
    "GenerationOutput", "Generator", "MixtrtError", "ModelArgs", "MoeArgs", "QuestionAnswerer", "SequenceClassifier",
    "StreamEvent", "TokenClassifier", "Tokenizer", "__version__",
]

