"""Errors a user can act on. The CLI prints any MixtrtError as one line naming the problem."""


class MixtrtError(Exception):
    """Base class: the message names the file / tensor / argument at fault."""


class ConfigError(MixtrtError, ValueError):
    """A config.json / params.json / option value that does not describe something we can run."""


class CheckpointError(MixtrtError, ValueError):
    """A checkpoint directory whose weights are missing, unexpected, mis-shaped or unreadable."""


class ArtifactError(MixtrtError, ValueError):
    """An artifact directory that is incomplete, tampered with, or of an unknown format version."""


class NewerRecordError(ArtifactError):
    """A manifest record holds a name or value of the right type that this mixtrt does not know (a generation
    default, a quantization method): written by a newer mixtrt, or edited; said as such, not as damage."""


class BackendError(MixtrtError, RuntimeError):
    """The inference backend failed on a step (the message carries its own error)."""


class RowError(BackendError):
    """A row of an Engine step failed and was cancelled; `events` holds the other rows' events of that step (those
    rows go on); `rows` maps a failed row's id to its own message, where it has one (a server tells each request its
    own rows' failure, not the others')."""

    def __init__(self, message: str, events: list | None = None, rows: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.events = events or []
        self.rows = rows or {}


class NonFiniteLogitsError(RowError):
    """The model produced NaN or infinite logits for a row: its weights or config are broken, or fp16
    overflowed."""


class GuideError(MixtrtError, RuntimeError):
    """A row's structured-output constraint cannot go on (runtime/structured.py: llguidance's limits on a large
    schema); the Engine cancels that row only."""


class MissingExtraError(MixtrtError, ImportError):
    """An optional dependency is not installed; the message names the extra (`pip install 'mixtrt[X]'`)."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line: its first line, or its type's name when it has none (what the
    one-line errors quote of a library's exception)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class MixtrtWarning(UserWarning):
    """Something a user must know but that does not stop the work (a substituted file); the CLI prints it
    as one line."""


class Terminated(SystemExit):
    """SIGTERM / SIGHUP arrived while mixtrt was writing an artifact: raised so the partial one is removed;
    the process then exits with 128 + the signal number, as it would have."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
