"""Deterministic torch models for the zoo, exported to ONNX opset 17 with BatchNormalization nodes.

Every model is built from a fixed seed: Conv/Linear weights are He-normal, BatchNorm running
statistics are first measured on random batches (so each BN really normalises and activations
stay near unit scale) and then perturbed, and BN affine parameters are random, so that folding a
BatchNormalization is tested on non-trivial figures.

Export uses the TorchScript exporter (``dynamo=False``) in eval mode with
``do_constant_folding=False``: constant folding is what would fold BatchNormalization into the
preceding Conv. The graph input is ``input`` and the graph output is ``output``; the batch axis
(and the transformer's sequence axis) is dynamic.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = ["NAMES", "bn_count", "build", "example_input", "export", "export_bytes", "export_module"]

OPSET = 17
_SEED = 0
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


# --- building blocks --------------------------------------------------------------------------


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias unless asked) + BatchNorm2d + activation (ReLU, ReLU6 or none)."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, bias=False, act=nn.ReLU):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 ConvBNAct and a shortcut: identity, or 1x1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNAct(cin, cout, 3, stride), ConvBNAct(cout, cout, 3, act=None)
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = ConvBNAct(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 conv + BN + ReLU6, then pointwise 1x1 conv + BN + ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            ConvBNAct(cin, cin, 3, stride, groups=cin, act=nn.ReLU6),
            ConvBNAct(cin, cout, 1, act=nn.ReLU6),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project + BN,
    and the residual Add."""

    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            ConvBNAct(channels, hidden, 1, act=nn.ReLU6),
            ConvBNAct(hidden, hidden, 3, groups=hidden, act=nn.ReLU6),
            ConvBNAct(hidden, channels, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class InceptionBlock(nn.Module):
    """Three branches (1x1; 1x1 then 3x3; 3x3 max-pool then 1x1) concatenated along channels."""

    def __init__(self, cin: int, branch: int):
        super().__init__()
        self.b1 = ConvBNAct(cin, branch, 1)
        self.b2 = nn.Sequential(ConvBNAct(cin, branch, 1), ConvBNAct(branch, branch, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBNAct(cin, branch, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)


class DenseBlock(nn.Module):
    """DenseNet-style: each layer sees the concatenation of the input and all earlier layers."""

    def __init__(self, cin: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(ConvBNAct(cin + i * growth, growth, 3) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


def _classifier_head(channels: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


# --- the models -------------------------------------------------------------------------------


def _resnet_bn() -> nn.Module:
    """Stem (conv with bias), identity block, downsampling block (1x1 conv+BN shortcut), block."""
    return nn.Sequential(
        ConvBNAct(3, 16, 3, bias=True),
        ResidualBlock(16, 16),
        ResidualBlock(16, 32, stride=2),
        ResidualBlock(32, 32),
        _classifier_head(32),
    )


def _decoder_convtranspose_bn() -> nn.Module:
    """8x8 -> 32x32: ConvTranspose+BN+ReLU three times (plain, groups=2, no bias), then 1x1 conv."""
    return nn.Sequential(
        nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 3, 1),
    )


def _mlp_bn() -> nn.Module:
    """(Linear -> BatchNorm1d -> ReLU) twice, then Linear: 64 -> 128 -> 64 -> 10."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


class _EncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose self-attention receives the value as a distinct tensor.

    When query, key and value are one tensor, MultiheadAttention takes its packed in-projection,
    whose ``unflatten`` the TorchScript exporter (torch 2.13) shapes with the traced sequence
    length: the exported model then fails on any other length (pytorch/pytorch#110347). Given a
    distinct value, it projects q, k and v separately: the same result, with a dynamic sequence.
    """

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        value = x.view_as(x)
        x = self.self_attn(
            x,
            x,
            value,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout1(x)


class TransformerEncoderNet(nn.Module):
    """Token embedding + learned positions, nn.TransformerEncoder (2 post-norm layers, d_model 64,
    4 heads, batch_first), and a Linear to per-token logits over the vocabulary."""

    def __init__(
        self,
        vocab: int = 100,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        max_len: int = 64,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(1, max_len, d_model) * 0.1)
        layer = _EncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        return self.head(self.encoder(x))


def _mobilenet_dw() -> nn.Module:
    """Conv-BN-ReLU6 stem, two depthwise-separable blocks, one inverted-residual block, head."""
    return nn.Sequential(
        ConvBNAct(3, 16, 3, stride=2, act=nn.ReLU6),
        DepthwiseSeparable(16, 32),
        DepthwiseSeparable(32, 64, stride=2),
        InvertedResidual(64),
        _classifier_head(64),
    )


def _concat_net() -> nn.Module:
    """Stem, Inception block (Concat), transition, dense block (Concats), BN after a Concat."""
    return nn.Sequential(
        ConvBNAct(3, 16, 3),
        InceptionBlock(16, 8),
        ConvBNAct(24, 32, 3, stride=2),
        DenseBlock(32, 16, 2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        _classifier_head(64),
    )


class Bottleneck(nn.Module):
    """YOLO-style residual bottleneck: 1x1 conv to half the channels, 3x3 conv back, SiLU, Add."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNAct(channels, channels // 2, 1, act=nn.SiLU), ConvBNAct(channels // 2, channels, 3, act=nn.SiLU)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Detector(nn.Module):
    """A YOLO-style single-stage detector, about 1.4 M parameters (5.5 MB in fp32).

    SiLU Conv-BN backbone with residual bottlenecks down to strides 8, 16 and 32; a top-down neck
    (1x1 conv, nearest 2x Upsample, Concat with the finer map, 3x3 conv); a 1x1 head per scale with
    3 anchors of 4 box + 1 objectness + 20 class values, decoded the way YOLO exports are
    (reshape, transpose, concat over scales, sigmoid) into one output [N, boxes, 25].
    """

    def __init__(self, classes: int = 20, anchors: int = 3):
        super().__init__()
        act = nn.SiLU
        self.values = 5 + classes
        self.anchors = anchors
        self.stem = nn.Sequential(ConvBNAct(3, 16, 3, 2, act=act), ConvBNAct(16, 32, 3, 2, act=act), Bottleneck(32))
        self.p3 = nn.Sequential(ConvBNAct(32, 64, 3, 2, act=act), Bottleneck(64), Bottleneck(64))
        self.p4 = nn.Sequential(ConvBNAct(64, 128, 3, 2, act=act), Bottleneck(128), Bottleneck(128))
        self.p5 = nn.Sequential(ConvBNAct(128, 256, 3, 2, act=act), Bottleneck(256))
        self.lateral5 = ConvBNAct(256, 128, 1, act=act)
        self.merge4 = ConvBNAct(256, 128, 3, act=act)
        self.lateral4 = ConvBNAct(128, 64, 1, act=act)
        self.merge3 = ConvBNAct(128, 64, 3, act=act)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.heads = nn.ModuleList(nn.Conv2d(c, anchors * self.values, 1, bias=True) for c in (64, 128, 256))

    @torch.no_grad()
    def settle(self) -> None:
        """Scales of a trained detector after the zoo's random BN draw: each bottleneck's branch
        enters its residual at a quarter scale (as a zero-initialised residual trains to), and the
        heads give logits of a few units with objectness and classes mostly negative, not the
        +-100 that stacked random residuals reach (every output would saturate the sigmoid)."""
        for block in self.modules():
            if isinstance(block, Bottleneck):
                last = block.body[-1][1]
                last.weight.mul_(0.25)
                last.bias.mul_(0.25)
        for head in self.heads:
            head.weight.mul_(2.0)
            bias = head.bias.view(self.anchors, self.values)
            bias[:, 4:] -= 4.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.p3(self.stem(x))
        c4 = self.p4(c3)
        c5 = self.p5(c4)
        top = self.lateral5(c5)
        n4 = self.merge4(torch.cat([self.up(top), c4], dim=1))
        side = self.lateral4(n4)
        n3 = self.merge3(torch.cat([self.up(side), c3], dim=1))
        outputs = []
        for head, feature in zip(self.heads, (n3, n4, c5)):
            y = head(feature)
            n, _, h, w = y.shape
            y = y.view(n, self.anchors, self.values, h * w).permute(0, 1, 3, 2).reshape(n, -1, self.values)
            outputs.append(y)
        return torch.cat(outputs, dim=1).sigmoid()


@dataclass(frozen=True)
class _Spec:
    builder: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    dynamic_axes: dict[int, str] = field(default_factory=lambda: {0: "batch"})
    vocab: int = 0  # for integer token inputs: values in [0, vocab)


_SPECS: dict[str, _Spec] = {
    "resnet_bn": _Spec(_resnet_bn, (1, 3, 32, 32)),
    "decoder_convtranspose_bn": _Spec(_decoder_convtranspose_bn, (1, 16, 8, 8)),
    "mlp_bn": _Spec(_mlp_bn, (1, 64)),
    "transformer_encoder": _Spec(
        TransformerEncoderNet, (1, 16), torch.int64, {0: "batch", 1: "seq"}, vocab=100
    ),
    "mobilenet_dw": _Spec(_mobilenet_dw, (1, 3, 32, 32)),
    "concat_net": _Spec(_concat_net, (1, 3, 32, 32)),
    "detector": _Spec(Detector, (1, 3, 320, 320)),
}

NAMES = list(_SPECS)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}")
    return _SPECS[name]


# --- public functions -------------------------------------------------------------------------


def build(name: str) -> nn.Module:
    """The zoo model ``name`` in eval mode, with weights and BN statistics fixed by the seed."""
    spec = _spec(name)
    torch.manual_seed(_SEED)
    model = spec.builder()
    _init_weights(model)
    if any(isinstance(m, _BN_TYPES) for m in model.modules()):
        _calibrate_bn(model, spec)
        _randomize_bn(model)
    if hasattr(model, "settle"):
        model.settle()
    return model.eval()


def example_input(name: str, batch: int = 1, seq: int | None = None) -> torch.Tensor:
    """A fixed random input for ``name``; ``batch`` and ``seq`` (tokens only) may be changed."""
    spec = _spec(name)
    shape = list(spec.input_shape)
    shape[0] = batch
    if seq is not None:
        shape[1] = seq
    generator = torch.Generator().manual_seed(_SEED + 1)
    if spec.dtype == torch.int64:
        return torch.randint(0, spec.vocab, shape, generator=generator)
    return torch.randn(shape, generator=generator)


def export_bytes(name: str) -> bytes:
    """The serialized ONNX model for ``name`` (opset 17, BN kept, dynamic batch), unchecked."""
    return _to_onnx(build(name), name)


def export_module(
    model: nn.Module, example: torch.Tensor, dynamic_axes: dict[int, str] | None = None
) -> bytes:
    """Serialize any eval-mode module the zoo's way: opset 17, TorchScript exporter, BN kept as
    nodes, graph input ``input``, output ``output``, ``dynamic_axes`` (default: batch) on both."""
    axes = dict(dynamic_axes or {0: "batch"})
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch warns that the TorchScript exporter is deprecated; it is the one that keeps BN.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=False,  # constant folding would fold BatchNormalization into Conv
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": axes, "output": axes},
        )
    return buffer.getvalue()


def export(name: str, path: str | os.PathLike) -> Path:
    """Export ``name`` to ``path``, checked: onnx.checker, BN count, onnxruntime matches torch."""
    model = build(name)
    data = _to_onnx(model, name)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    if bn_count(model) != bn_count(proto):
        raise RuntimeError(
            f"{name}: {bn_count(model)} BatchNorm modules but {bn_count(proto)} nodes"
        )
    _check_against_torch(name, model, data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def bn_count(model: nn.Module | onnx.ModelProto) -> int:
    """BatchNorm modules in a torch model, or BatchNormalization nodes in an ONNX model."""
    if isinstance(model, onnx.ModelProto):
        return sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    return sum(isinstance(m, _BN_TYPES) for m in model.modules())


# --- initialisation ---------------------------------------------------------------------------


@torch.no_grad()
def _init_weights(model: nn.Module) -> None:
    """He-normal Conv/Linear weights, Xavier attention projections, random biases and LayerNorms.

    Every layer gets its own draw: nn.TransformerEncoder deep-copies one layer, and identical
    layers would be exported as shared initializers behind Identity nodes.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(module.weight, std=(2.0 / _fan_in(module)) ** 0.5)
            if module.bias is not None:
                nn.init.uniform_(module.bias, -0.1, 0.1)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.uniform_(module.in_proj_bias, -0.1, 0.1)
        elif isinstance(module, nn.LayerNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)


def _fan_in(module: nn.Conv2d | nn.ConvTranspose2d | nn.Linear) -> int:
    """Inputs feeding one output unit: C_in/groups * kernel (ConvTranspose: weight.shape[0]/g)."""
    if isinstance(module, nn.ConvTranspose2d):
        return module.weight.shape[0] // module.groups * module.weight[0, 0].numel()
    return module.weight[0].numel()


@torch.no_grad()
def _calibrate_bn(model: nn.Module, spec: _Spec, batches: int = 4, batch: int = 32) -> None:
    """Set BN running statistics to their cumulative average over random batches (train mode)."""
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    generator = torch.Generator().manual_seed(_SEED + 2)
    model.train()
    for _ in range(batches):
        model(torch.randn((batch, *spec.input_shape[1:]), generator=generator))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


@torch.no_grad()
def _randomize_bn(model: nn.Module) -> None:
    """Perturb BN statistics and draw random affine parameters, per channel."""
    generator = torch.Generator().manual_seed(_SEED + 3)

    def uniform(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(like.shape, generator=generator) * (high - low) + low

    for bn in (m for m in model.modules() if isinstance(m, _BN_TYPES)):
        std = bn.running_var.sqrt()
        bn.running_mean += uniform(std, -0.1, 0.1) * std
        bn.running_var *= uniform(std, 0.5, 1.5)
        bn.weight.copy_(uniform(std, 0.5, 1.5))
        bn.bias.copy_(uniform(std, -0.1, 0.1))


# --- export ----------------------------------------------------------------------------------


def _to_onnx(model: nn.Module, name: str) -> bytes:
    return export_module(model, example_input(name), _spec(name).dynamic_axes)


def _check_against_torch(name: str, model: nn.Module, data: bytes) -> None:
    """onnxruntime must match torch on a batch of 3 (and 7 tokens): the axes really are dynamic."""
    x = example_input(name, batch=3, seq=7 if 1 in _spec(name).dynamic_axes else None)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (actual,) = session.run(["output"], {"input": x.numpy()})
    if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=1e-3, atol=1e-4):
        error = np.abs(actual - expected).max() if actual.shape == expected.shape else actual.shape
        raise RuntimeError(f"{name}: onnxruntime differs from torch ({error})")
