"""The library's own errors: one base class, and subclasses that keep the builtin they refine."""

__all__ = ["CheckpointError", "ConfigError", "DmdcopyError", "NonFiniteError", "ShapeError"]


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
