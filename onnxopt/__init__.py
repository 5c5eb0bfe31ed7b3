"""onnxopt: an ONNX graph optimizer whose every result is proven under onnxruntime.

    import onnxopt
    result = onnxopt.optimize("model.onnx", passes=["simplify", "fold-bn", "share-init"], data="inputs.npz")
    result.save("model.opt.onnx")
"""

from __future__ import annotations

from onnxopt.errors import (
    DataError,
    ExternalDataError,
    ModelLoadError,
    OnnxoptError,
    OptionError,
    OutputPathError,
    ProviderError,
    UnknownPassError,
)
from onnxopt.io import load_model, save_model
from onnxopt.pipeline import DEFAULT_PASSES, OptimizeResult, optimize
from onnxopt.recipe import Recipe
from onnxopt.report import Report

__all__ = [
    "optimize",
    "OptimizeResult",
    "Recipe",
    "Report",
    "DEFAULT_PASSES",
    "load_model",
    "save_model",
    "OnnxoptError",
    "ModelLoadError",
    "ExternalDataError",
    "OutputPathError",
    "DataError",
    "UnknownPassError",
    "OptionError",
    "ProviderError",
]

__version__ = "0.1.0"
