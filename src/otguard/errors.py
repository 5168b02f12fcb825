"""Exceptions raised by otguard.

Every error is an :class:`OtguardError` *and* the builtin it refines (``ValueError``,
``FileNotFoundError``...), so callers can catch either. Messages say what is wrong, the values
seen, and what to do about it.
"""

from __future__ import annotations


class OtguardError(Exception):
    """Base class of all otguard errors."""


class UnsupportedArchitectureError(OtguardError, ValueError):
    """No head site is known for this model architecture."""


class ModelLoadError(OtguardError, OSError):
    """A model or tokenizer could not be loaded (missing file, no network...)."""


class DataError(OtguardError, ValueError):
    """A data file is missing, malformed, or unusable for the requested task."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file the source needs does not exist."""


class PolicyError(OtguardError, ValueError):
    """A policy directory is corrupted, of an unknown version, or otherwise unusable."""


class PolicyMismatchError(PolicyError):
    """A policy is attached to (or loaded for) a model it was not fitted on."""


class OutputDirError(OtguardError, ValueError):
    """An output path cannot be used (a non-empty folder of something else, a file, no permission)."""


class ResultsError(OtguardError, ValueError):
    """A ``results.json`` file is malformed or of an unknown format version."""


class ConfigError(OtguardError, ValueError):
    """An invalid run configuration (unknown dataset or method, folds < 2...), found before model work."""


class NotFittedError(OtguardError, RuntimeError):
    """An estimator was used before ``fit``."""


class SolverError(OtguardError, ArithmeticError):
    """The Stage-2 transport problem could not be solved (invalid probe, non-finite input...)."""


class UsageError(OtguardError, ValueError):
    """An argument has a value otguard cannot use (``--limit 0``, an empty prompt, a missing device)."""
