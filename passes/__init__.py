"""onnxopt's graph passes: each an onnx-ir in-place pass, usable in any onnx-ir PassManager.

``REGISTRY`` maps command-line names to pass classes.
"""

from __future__ import annotations

from onnxopt.passes._base import OnnxoptPass
from onnxopt.passes.cluster import ClusterWeights
from onnxopt.passes.equalize import EqualizeCrossLayer
from onnxopt.passes.fix_shapes import FixInputShapes
from onnxopt.passes.fold_batchnorm import FoldBatchNorm
from onnxopt.passes.lowrank import LowRankFactorize
from onnxopt.passes.precision import ConvertFloat16
from onnxopt.passes.prune_channels import PruneChannels
from onnxopt.passes.quantize import QuantizeQDQ
from onnxopt.passes.quantize_dynamic import QuantizeDynamic
from onnxopt.passes.quantize_int4 import QuantizeWeightsInt4
from onnxopt.passes.share_initializers import ShareInitializers
from onnxopt.passes.simplify import Simplify
from onnxopt.passes.smooth_quant import SmoothQuant
from onnxopt.passes.sparsify import SparsifyWeights

__all__ = [
    "OnnxoptPass", "Simplify", "FoldBatchNorm", "ShareInitializers", "QuantizeQDQ", "PruneChannels", "EqualizeCrossLayer",
    "FixInputShapes", "LowRankFactorize", "ClusterWeights", "SparsifyWeights", "QuantizeDynamic", "QuantizeWeightsInt4",
    "SmoothQuant", "ConvertFloat16", "REGISTRY",
]

REGISTRY: dict[str, type[OnnxoptPass]] = {
    cls.name: cls
    for cls in (
        Simplify, FoldBatchNorm, ShareInitializers, QuantizeQDQ, PruneChannels, EqualizeCrossLayer, FixInputShapes,
        LowRankFactorize, ClusterWeights, SparsifyWeights, QuantizeDynamic, QuantizeWeightsInt4, ConvertFloat16,  # lossy: never in DEFAULT_PASSES
    )
}
