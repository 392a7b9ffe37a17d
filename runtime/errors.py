"""Errors a user can act on. The CLI prints any MixtrtError as one line naming the problem."""


class MixtrtError(Exception):
    """Base class: the message names the file / tensor / argument at fault."""


class ConfigError(MixtrtError, ValueError):
    """A config.json / params.json / option value that does not describe something we can run."""


class CheckpointError(MixtrtError, ValueError):
    """A checkpoint directory whose weights are missing, unexpected, mis-shaped or unreadable."""


class ArtifactError(MixtrtError, ValueError):
    """An artifact directory that is incomplete, tampered with, or of an unknown format version."""


class BackendError(MixtrtError, RuntimeError):
    """The inference backend failed on a step (the message carries its own error)."""


class MissingExtraError(MixtrtError, ImportError):
    """An optional dependency is not installed; the message names the extra (`pip install 'mixtrt[X]'`)."""


class MixtrtWarning(UserWarning):
    """Something a user must know but that does not stop the work (a substituted file); the CLI prints it
    as one line."""
