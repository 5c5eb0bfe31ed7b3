"""The exceptions a user can cause: one type, a one-line message, exit code 2 on the command line."""

from __future__ import annotations

__all__ = [
    "OnnxoptError",
    "ModelLoadError",
    "ExternalDataError",
    "OutputPathError",
    "DataError",
    "UnknownPassError",
    "OptionError",
    "ProviderError",
    "one_line",
]


class OnnxoptError(Exception):
    """Base class of every error caused by the user's input (a model, data, an option)."""


class ModelLoadError(OnnxoptError):
    """The model file is missing, not ONNX, truncated or structurally empty."""


class ExternalDataError(OnnxoptError):
    """An external-data reference is missing, out of bounds, or escapes the model's folder."""


class OutputPathError(OnnxoptError):
    """The output path would overwrite the input or cannot be written."""


class DataError(OnnxoptError):
    """Input data does not fit the model: names, shapes, dtypes or file format."""


class UnknownPassError(OnnxoptError):
    """A pass name that no registered pass answers to."""


class OptionError(OnnxoptError):
    """An option value that cannot be understood."""


class ProviderError(OnnxoptError):
    """An execution provider that onnxruntime does not offer on this machine."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message (its type's name when empty) on one line, at most ``limit`` characters:
    onnxruntime's messages span lines and paths."""
    return " ".join((str(exc).strip() or type(exc).__name__).split())[:limit]
