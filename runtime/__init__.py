"""mixtrt.runtime: torch-free model description, tokenizer, KV cache, sampling, generation, backends."""

from mixtrt.runtime.args import ModelArgs, MoeArgs
from mixtrt.runtime.errors import ArtifactError, CheckpointError, ConfigError, MixtrtError

__all__ = [
    "ArtifactError", "CheckpointError", "ConfigError", "MixtrtError", "ModelArgs", "MoeArgs", "__version__",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixtrt")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+unknown"


__version__ = _version()
