"""The library's own errors: one base class, and subclasses that keep the builtin they refine."""

__all__ = ["CheckpointError", "ConfigError", "DmdcopyError", "NonFiniteError", "RunInterrupted", "ShapeError"]


class DmdcopyError(Exception):
    """Base class of every error dmdcopy raises on purpose."""


class ShapeError(DmdcopyError, ValueError):
    """A tensor does not have the shape a function's contract asks for."""


class ConfigError(DmdcopyError, ValueError):
    """A configuration field has an invalid value; the message names the field."""


class CheckpointError(DmdcopyError, ValueError):
    """A checkpoint file is missing, truncated, of another format, or does not fit the model."""


class NonFiniteError(DmdcopyError, FloatingPointError):
    """Training produced non-finite values too many times in a row."""


class RunInterrupted(DmdcopyError):
    """A run stopped on SIGINT / SIGTERM after finishing its step (and writing a checkpoint).

    ``signum`` is the signal's number (a CLI exits with ``128 + signum``), ``step`` the steps done.
    """

    def __init__(self, message: str, *, signum: int, step: int) -> None:
        super().__init__(message)
        self.signum, self.step = signum, step
