"""A trainable torch copy of an ONNX graph: an op-set interpreter whose weights are ``nn.Parameter``s.

Distillation needs gradients through the student, and the trained weights must go back into the
*same* ONNX graph (same nodes, same initializer names, dtypes and shapes). A converter to torch
modules (onnx2torch) would give a different structure to map back from, and pins an old onnx; this
interpreter runs the ``onnx_ir`` graph node by node in its own order with one torch function per
op, so the mapping back is the identity: a parameter is named by its initializer.

- Float tensors that are used only as weights (a Conv/Gemm/MatMul operand, a normalization's scale
  or bias, an elementwise constant, an embedding table; see ``_WEIGHT_SLOTS``) become parameters;
  every other constant (shapes, indices, BatchNorm statistics, Clip bounds, Resize scales) is a
  buffer that training leaves alone.
- QDQ models: the integer weight behind a ``DequantizeLinear`` with constant scale and zero point
  becomes a float parameter initialised to its dequantized value; the forward pass fake-quantizes
  it at those fixed scales (rounding with a straight-through estimator, clamped to the integer
  range, narrowed to the model's ``onnxopt.quantization.weight_range`` when it declares one), and
  ``write_back`` stores it re-quantized at the same scale. ``QuantizeLinear`` on activations is the
  same fake quantization, so the student computes what onnxruntime's reference kernels compute.
- Before training, ``check_matches`` proves the interpreter equal to onnxruntime (graph
  optimizations off) on real inputs; an op without an implementation raises
  ``UnsupportedOpError`` when the student is built, never halfway through training.

torch is imported by this module: nothing in onnxopt's core imports it at module level
(``onnxopt[train]``).
"""

from __future__ import annotations

__all__ = [
    "UnsupportedOpError",
    "StudentMismatchError",
    "Student",
    "build_student",
    "check_supported",
    "check_matches",
    "has_quantize_nodes",
    "QDQ_MISMATCH_FRACTION",
    "student_outputs",
    "write_back",
    "supported_ops",
]

import math
import re
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxopt.errors import DataError, OnnxoptError


class UnsupportedOpError(OnnxoptError):
    """The graph has an op (or an op's setting) that the training interpreter does not implement."""


class StudentMismatchError(OnnxoptError):
    """The torch student does not compute what onnxruntime computes for the same graph and inputs."""


# Inputs of an op that hold a trainable weight when they are constant (input index sets; None: all).
_WEIGHT_SLOTS: dict[str, set[int] | None] = {
    "Conv": {1, 2},
    "ConvTranspose": {1, 2},
    "Gemm": {0, 1, 2},
    "MatMul": {0, 1},
    "BatchNormalization": {1, 2},
    "LayerNormalization": {1, 2},
    "InstanceNormalization": {1, 2},
    "PRelu": {1},
    "Add": None,
    "Sub": None,
    "Mul": None,
    "Div": None,
    "Gather": {0},
    "ScatterElements": {2},  # a sparse weight's stored values (passes/sparsify.py): trained, positions held
    "Concat": None,
    "Slice": {0},
    "Reshape": {0},
    "Transpose": {0},
    "Unsqueeze": {0},
    "Squeeze": {0},
    "Flatten": {0},
    "Identity": {0},
}
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_INT_RANGES = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
}


def _torch_dtype(dtype: ir.DataType) -> torch.dtype:
    if dtype == ir.DataType.BFLOAT16:
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, dtype=dtype.numpy())).dtype


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as onnxruntime's QuantizeLinear), with an identity gradient."""
    return x + (torch.round(x) - x).detach()


def _axis_view(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A 1-D per-axis tensor shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if t.ndim == 0:
        return t
    shape = [1] * rank
    shape[axis % rank] = -1
    return t.reshape(shape)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The integer value of quantizing ``x`` (as float: gradients flow through the rounding)."""
    return torch.clamp(_round_ste(x / scale) + zero, lo, hi)


# --- op implementations ---------------------------------------------------------------------------
# Each takes (inputs: list[Tensor | None], attrs: dict, node) and returns a tensor or a tuple.

_OPS: dict[str, Callable] = {}


def _op(*names: str):
    def register(fn):
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def supported_ops() -> list[str]:
    """The op types (default domain) the student implements."""
    return sorted(_OPS)


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pads(attrs: dict, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads (begin..., end...) resolved from ``pads`` or ``auto_pad``."""
    spatial = x.ndim - 2
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return list(attrs.get("pads", [0] * (2 * spatial))) if auto == "NOTSET" else [0] * (2 * spatial)
    begin, end = [], []
    for i in range(spatial):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _symmetric(pads: list[int]) -> list[int] | None:
    half = len(pads) // 2
    return pads[:half] if pads[:half] == pads[half:] else None


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX (begin..., end...) to torch's F.pad order (last axis first: begin, end)."""
    half = len(pads) // 2
    out = []
    for i in reversed(range(half)):
        out += [pads[i], pads[half + i]]
    return out


@_op("Conv")
def _conv(inputs, attrs, node):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    spatial = x.ndim - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    pads = _pads(attrs, x, kernel, strides, dilations)
    same = _symmetric(pads)
    if same is None:
        x, same = F.pad(x, _torch_pad(pads)), [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(spatial)
    if conv is None:
        raise UnsupportedOpError(f"Conv with {spatial} spatial axes is not supported by the training interpreter")
    return conv(x, w, b, strides, same, dilations, attrs.get("group", 1))


@_op("ConvTranspose")
def _conv_transpose(inputs, attrs, node):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    spatial = x.ndim - 2
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOpError("ConvTranspose with output_shape or auto_pad SAME_* is not supported by the training interpreter")
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    same = _symmetric(pads)
    if same is None:
        raise UnsupportedOpError("ConvTranspose with asymmetric pads is not supported by the training interpreter")
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(spatial)
    if conv is None:
        raise UnsupportedOpError(f"ConvTranspose with {spatial} spatial axes is not supported by the training interpreter")
    output_padding = list(attrs.get("output_padding", [0] * spatial))
    return conv(x, w, b, strides, same, output_padding, attrs.get("group", 1), dilations)


@_op("Gemm")
def _gemm(inputs, attrs, node):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


_OPS["MatMul"] = lambda i, a, n: torch.matmul(i[0], i[1])
_OPS["Add"] = lambda i, a, n: i[0] + i[1]
_OPS["Sub"] = lambda i, a, n: i[0] - i[1]
_OPS["Mul"] = lambda i, a, n: i[0] * i[1]
_OPS["Relu"] = lambda i, a, n: torch.relu(i[0])
_OPS["Sigmoid"] = lambda i, a, n: torch.sigmoid(i[0])
_OPS["Tanh"] = lambda i, a, n: torch.tanh(i[0])
_OPS["Exp"] = lambda i, a, n: torch.exp(i[0])
_OPS["Log"] = lambda i, a, n: torch.log(i[0])
_OPS["Sqrt"] = lambda i, a, n: torch.sqrt(i[0])
_OPS["Neg"] = lambda i, a, n: -i[0]
_OPS["Abs"] = lambda i, a, n: torch.abs(i[0])
_OPS["Reciprocal"] = lambda i, a, n: torch.reciprocal(i[0])
_OPS["Erf"] = lambda i, a, n: torch.erf(i[0])
_OPS["Pow"] = lambda i, a, n: torch.pow(i[0], i[1])
_OPS["Identity"] = lambda i, a, n: i[0]
_OPS["Dropout"] = lambda i, a, n: i[0]
_OPS["Softmax"] = lambda i, a, n: torch.softmax(i[0], a.get("axis", -1))
_OPS["LogSoftmax"] = lambda i, a, n: torch.log_softmax(i[0], a.get("axis", -1))
_OPS["LeakyRelu"] = lambda i, a, n: F.leaky_relu(i[0], a.get("alpha", 0.01))
_OPS["Elu"] = lambda i, a, n: F.elu(i[0], a.get("alpha", 1.0))
_OPS["PRelu"] = lambda i, a, n: torch.where(i[0] < 0, i[0] * i[1], i[0])
_OPS["HardSigmoid"] = lambda i, a, n: torch.clamp(i[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0, 1)
_OPS["HardSwish"] = lambda i, a, n: i[0] * torch.clamp(i[0] / 6 + 0.5, 0, 1)
_OPS["Shape"] = lambda i, a, n: torch.tensor(i[0].shape[a.get("start", 0): a.get("end", None)], dtype=torch.int64, device=i[0].device)
_OPS["Size"] = lambda i, a, n: torch.tensor(i[0].numel(), dtype=torch.int64)
_OPS["Equal"] = lambda i, a, n: i[0] == i[1]
_OPS["Where"] = lambda i, a, n: torch.where(i[0], i[1], i[2])


@_op("Div")
def _div(inputs, attrs, node):
    a, b = inputs
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@_op("Gelu")
def _gelu(inputs, attrs, node):
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


@_op("Clip")
def _clip(inputs, attrs, node):
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    return torch.clamp(x, lo, hi) if lo is not None or hi is not None else x


@_op("Cast")
def _cast(inputs, attrs, node):
    return inputs[0].to(_torch_dtype(ir.DataType(attrs["to"])))


@_op("GlobalAveragePool")
def _global_average_pool(inputs, attrs, node):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(inputs, attrs, node):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


@_op("MaxPool", "AveragePool")
def _pool(inputs, attrs, node):
    x = inputs[0]
    spatial = x.ndim - 2
    if len(node.outputs) > 1 and node.outputs[1].name:
        raise UnsupportedOpError("MaxPool with an Indices output is not supported by the training interpreter")
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    pads = _pads(attrs, x, kernel, strides, dilations)
    same = _symmetric(pads)
    ceil = bool(attrs.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        if same is None or any(p > k // 2 for p, k in zip(same, kernel)):
            x, same = F.pad(x, _torch_pad(pads), value=-math.inf), [0] * spatial
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return pool(x, kernel, strides, same, dilations, ceil)
    if any(d != 1 for d in dilations) or same is None:
        raise UnsupportedOpError("AveragePool with dilations or asymmetric pads is not supported by the training interpreter")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return pool(x, kernel, strides, same, ceil, bool(attrs.get("count_include_pad", 0)))


@_op("BatchNormalization")
def _batchnorm(inputs, attrs, node):
    x, scale, bias, mean, var = inputs[:5]
    if attrs.get("training_mode", 0):
        raise UnsupportedOpError("BatchNormalization in training_mode is not supported by the training interpreter")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


@_op("LayerNormalization")
def _layernorm(inputs, attrs, node):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.ndim
    if len(node.outputs) > 1 and any(v.name for v in node.outputs[1:]):
        raise UnsupportedOpError("LayerNormalization with Mean/InvStdDev outputs is not supported by the training interpreter")
    return F.layer_norm(x, x.shape[axis:], scale.expand(x.shape[axis:]), None if bias is None else bias.expand(x.shape[axis:]),
                        attrs.get("epsilon", 1e-5))


@_op("InstanceNormalization")
def _instancenorm(inputs, attrs, node):
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


@_op("Flatten")
def _flatten(inputs, attrs, node):
    x = inputs[0]
    axis = attrs.get("axis", 1) % max(x.ndim, 1) if x.ndim else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


@_op("Reshape")
def _reshape(inputs, attrs, node):
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@_op("Transpose")
def _transpose(inputs, attrs, node):
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.ndim))))
    return x.permute(*perm)


@_op("Concat")
def _concat(inputs, attrs, node):
    parts = [t for t in inputs if t is not None and not (t.ndim == 1 and t.shape[0] == 0)] or [inputs[0]]
    dtype = parts[0].dtype
    return torch.cat([p.to(dtype) for p in parts], attrs["axis"])


@_op("Split")
def _split(inputs, attrs, node):
    x = inputs[0]
    axis = attrs.get("axis", 0)
    sizes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    if sizes is None:
        n = attrs.get("num_outputs", len(node.outputs))
        sizes = [-(-x.shape[axis] // n)] * n
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, _ints(sizes), axis))


@_op("Slice")
def _slice(inputs, attrs, node):
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), size), min(max(end, 0), size), step)
        else:  # negative steps: torch slices forward only; index explicitly
            start, end = min(max(start, -1), size - 1), min(max(end, -1), size - 1)
            flips.append((axis, torch.arange(start, end, step, dtype=torch.int64)))
    y = x[tuple(index)]
    for axis, idx in flips:
        y = y.index_select(axis, idx.to(y.device))
    return y


@_op("Gather")
def _gather(inputs, attrs, node):
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.ndim
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).to(x.device)
    y = x.index_select(axis, idx.reshape(-1))
    return y.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


@_op("ScatterElements")
def _scatter_elements(inputs, attrs, node):
    x, idx, updates = inputs
    if attrs.get("reduction", "none") != "none":
        raise UnsupportedOpError(f"ScatterElements with reduction (node '{node.name}') is not supported by the training interpreter")
    axis = attrs.get("axis", 0) % x.ndim
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).to(torch.int64).to(x.device)
    return x.scatter(axis, idx, updates.to(x.dtype))


def _axes(inputs, attrs) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return _ints(inputs[1])
    return list(attrs["axes"]) if "axes" in attrs else None


@_op("Unsqueeze")
def _unsqueeze(inputs, attrs, node):
    x = inputs[0]
    axes = sorted(a % (x.ndim + len(_axes(inputs, attrs))) for a in _axes(inputs, attrs))
    for a in axes:
        x = x.unsqueeze(a)
    return x


@_op("Squeeze")
def _squeeze(inputs, attrs, node):
    x = inputs[0]
    axes = _axes(inputs, attrs)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.ndim for a in axes))


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceSumSquare")
def _reduce(inputs, attrs, node):
    """The Reduce* ops; ReduceL2 is the norm a sentence encoder divides its pooled embedding by."""
    x = inputs[0]
    axes = _axes(inputs, attrs)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    dims = tuple(a % x.ndim for a in axes)
    if node.op_type == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if node.op_type == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    if node.op_type in ("ReduceL2", "ReduceL1"):  # vector_norm: a zero vector's gradient is 0, not NaN
        return torch.linalg.vector_norm(x, 2 if node.op_type == "ReduceL2" else 1, dim=dims, keepdim=keep)
    if node.op_type == "ReduceSumSquare":
        return (x * x).sum(dim=dims, keepdim=keep)
    return (x.amax if node.op_type == "ReduceMax" else x.amin)(dim=dims, keepdim=keep)


@_op("Expand")
def _expand(inputs, attrs, node):
    x, shape = inputs[0], _ints(inputs[1])
    rank = max(x.ndim, len(shape))
    shape = [1] * (rank - len(shape)) + shape
    dims = [1] * (rank - x.ndim) + list(x.shape)
    return x.reshape(dims).expand([max(a, b) for a, b in zip(dims, shape)])


@_op("Range")
def _range(inputs, attrs, node):
    """start, start + delta, ... below ``limit`` (the position ids of a transformer's embeddings)."""
    start, limit, delta = (t.reshape(()) for t in inputs[:3])
    values = torch.arange(start.item(), limit.item(), delta.item(), device=start.device)
    return values.to(start.dtype)


@_op("CumSum")
def _cumsum(inputs, attrs, node):
    """Rebuilds a sparse weight's positions from its stored gaps (passes/sparsify.py)."""
    x, axis = inputs[0], int(inputs[1].reshape(-1)[0])
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis).to(x.dtype)
    if attrs.get("exclusive", 0):
        y = y - x
    return y.flip(axis) if attrs.get("reverse", 0) else y


@_op("BitShift")
def _bitshift(inputs, attrs, node):
    """Unpacks packed cluster codes (passes/_weights.py): bits shifted out of the type are lost."""
    x, shift = inputs[0], inputs[1].to(inputs[0].dtype)
    return torch.bitwise_left_shift(x, shift) if attrs["direction"] == "LEFT" else torch.bitwise_right_shift(x, shift)


@_op("ConstantOfShape")
def _constant_of_shape(inputs, attrs, node):
    value = attrs.get("value")
    array = np.zeros(1, np.float32) if value is None else value.numpy().reshape(1)
    return torch.from_numpy(array.copy()).to(inputs[0].device).expand(_ints(inputs[0])).clone()


@_op("Resize")
def _resize(inputs, attrs, node):
    x = inputs[0]
    roi, scales = (inputs + [None, None, None])[1:3]
    sizes = inputs[3] if len(inputs) > 3 else None
    mode = attrs.get("mode", "nearest")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    if attrs.get("axes") or attrs.get("antialias", 0) or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedOpError("Resize with axes, antialias or keep_aspect_ratio_policy is not supported by the training interpreter")
    if sizes is not None and sizes.numel():
        out = _ints(sizes)
        factors = [o / i for o, i in zip(out, x.shape)]
    else:
        factors = [float(s) for s in scales.tolist()]
        out = [int(math.floor(i * s)) for i, s in zip(x.shape, factors)]
    if mode == "nearest":
        rounding = {
            "floor": math.floor, "ceil": math.ceil,
            "round_prefer_floor": lambda v: math.ceil(v - 0.5), "round_prefer_ceil": lambda v: math.floor(v + 0.5),
        }[attrs.get("nearest_mode", "round_prefer_floor")]
        y = x
        for axis, (size_in, size_out, factor) in enumerate(zip(x.shape, out, factors)):
            if size_in == size_out:
                continue
            index = []
            for o in range(size_out):
                if transform == "asymmetric":
                    c = o / factor
                elif transform == "half_pixel":
                    c = (o + 0.5) / factor - 0.5
                elif transform == "pytorch_half_pixel":
                    c = (o + 0.5) / factor - 0.5 if size_out > 1 else 0.0
                elif transform == "align_corners":
                    c = o * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
                else:
                    raise UnsupportedOpError(f"Resize with coordinate_transformation_mode '{transform}' is not supported by the training interpreter")
                index.append(min(max(int(rounding(c)), 0), size_in - 1))
            y = y.index_select(axis, torch.tensor(index, dtype=torch.int64, device=x.device))
        return y
    if mode == "linear" and x.ndim in (3, 4, 5) and list(out[:2]) == list(x.shape[:2]) and transform in ("half_pixel", "align_corners", "pytorch_half_pixel"):
        if transform == "pytorch_half_pixel" and min(out[2:]) <= 1:
            raise UnsupportedOpError("Resize linear pytorch_half_pixel to size 1 is not supported by the training interpreter")
        interp = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.ndim]
        return F.interpolate(x, size=out[2:], mode=interp, align_corners=transform == "align_corners")
    raise UnsupportedOpError(f"Resize mode '{mode}' with '{transform}' is not supported by the training interpreter")


@_op("QuantizeLinear")
def _quantize_linear(inputs, attrs, node):
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    if attrs.get("block_size", 0):
        raise UnsupportedOpError("QuantizeLinear with block_size is not supported by the training interpreter")
    dtype = node.outputs[0].dtype if node.outputs[0].dtype is not None else ir.DataType.UINT8
    if dtype not in _INT_RANGES:
        raise UnsupportedOpError(f"QuantizeLinear to {dtype.name} is not supported by the training interpreter")
    axis = attrs.get("axis", 1)
    scale = _axis_view(scale, axis, x.ndim)
    zero = torch.zeros((), dtype=x.dtype, device=x.device) if zero is None else _axis_view(zero.to(x.dtype), axis, x.ndim)
    return _fake_quantize(x, scale, zero, *_INT_RANGES[dtype])


@_op("DequantizeLinear")
def _dequantize_linear(inputs, attrs, node):
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    if attrs.get("block_size", 0):
        raise UnsupportedOpError("DequantizeLinear with block_size is not supported by the training interpreter")
    axis = attrs.get("axis", 1)
    x = x.to(scale.dtype)
    scale = _axis_view(scale, axis, x.ndim)
    if zero is not None:
        x = x - _axis_view(zero.to(scale.dtype), axis, x.ndim)
    return x * scale


# --- the student -----------------------------------------------------------------------------------


def _attr_value(attr: ir.Attr):
    value = attr.value
    if attr.type == ir.AttributeType.TENSOR:
        return value
    if isinstance(value, tuple):
        return list(value)
    return value


def _constant_tensor(node: ir.Node) -> np.ndarray | None:
    """The array a Constant node produces (``value`` or a ``value_*`` scalar/list attribute)."""
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].value.numpy()
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key].value, dtype=dtype)
    return None


def _is_weight(value: ir.Value, array: np.ndarray) -> bool:
    """A float constant used only where a trained weight makes sense (see ``_WEIGHT_SLOTS``)."""
    floating = value.dtype in _FLOAT_TYPES if value.dtype is not None else np.issubdtype(array.dtype, np.floating)
    if not floating or value.is_graph_output():
        return False
    uses = list(value.uses())
    if not uses:
        return False
    for use in uses:
        node, index = use[0], use[1]
        slots = _WEIGHT_SLOTS.get(node.op_type, set()) if node.domain in ("", "ai.onnx") else set()
        if slots is not None and index not in slots:
            return False
    return True


def _quantized_weight(value: ir.Value, node_outputs: set[str]) -> tuple[ir.Value, ir.Value | None, int] | None:
    """For an integer constant read only by DequantizeLinear nodes that share constant scale and
    zero point: (scale, zero point, axis); else None."""
    if value.dtype not in _INT_RANGES:
        return None
    uses = list(value.uses())
    found = None
    for use in uses:
        node, index = use[0], use[1]
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or index != 0:
            return None
        if "block_size" in node.attributes and node.attributes["block_size"].value:
            return None
        scale = node.inputs[1]
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        if scale.name in node_outputs or (zero is not None and zero.name in node_outputs):
            return None  # a computed scale: not a fixed quantization grid
        axis = node.attributes["axis"].value if "axis" in node.attributes else 1
        key = (scale.name, None if zero is None else zero.name, axis)
        if found is not None and found[3] != key:
            return None
        found = (scale, zero, axis, key)
    return None if found is None else found[:3]


def _weight_range(model: ir.Model) -> tuple[int, int] | None:
    text = model.metadata_props.get("onnxopt.quantization.weight_range")
    if not text:
        return None
    numbers = re.findall(r"-?\d+", text)
    return (int(numbers[0]), int(numbers[1])) if len(numbers) == 2 else None


def check_supported(model: ir.Model) -> None:
    """Raise ``UnsupportedOpError`` (one line) for the first node the interpreter cannot run, and
    ``DataError`` for a scalar (0-d) graph input: training cuts its inputs into samples along
    their first axis. Cheap: no weight is read."""
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"op {node.domain}::{node.op_type} is not supported by the training interpreter")
        if node.op_type not in _OPS and node.op_type != "Constant":
            raise UnsupportedOpError(f"op {node.op_type} (node '{node.name}') is not supported by the training interpreter")
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise UnsupportedOpError(f"op {node.op_type} with a subgraph (node '{node.name}') is not supported by the training interpreter")
    for value in model.graph.inputs:
        if value.const_value is None and value.shape is not None and len(value.shape) == 0:
            raise DataError(f"input '{value.name}' is a scalar (0-d): distillation needs inputs with a first "
                               "axis of samples")


class Student(nn.Module):
    """An ONNX graph as a torch module: ``forward(feed) -> outputs``, both dicts by tensor name.

    ``weights`` maps each trained tensor's ONNX name to its parameter; ``quantized`` maps the names
    of integer weights (behind a DequantizeLinear) to (scale, zero point, lo, hi) of their grid.

    ``cluster_aware``: each weight that ``cluster`` stored as a codebook and codes is trained as a
    latent float weight snapped to its centroids (``onnxopt.cluster_training``; ``clustered`` lists
    them), its codes and codebook written back; else only its codebook trains, codes held.
    """

    def __init__(self, model: ir.Model, cluster_aware: bool = False):
        super().__init__()
        graph = model.graph
        check_supported(model)
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self.output_dtypes = {v.name: v.dtype for v in graph.outputs}
        self.params = nn.ParameterDict()
        self.weights: dict[str, nn.Parameter] = {}
        self.quantized: dict[str, tuple] = {}
        self.constant_nodes: dict[str, str] = {}  # trained Constant-node outputs: name -> node name
        self._keys: dict[str, str] = {}  # ONNX name -> parameter or buffer key
        node_outputs = {v.name for node in graph for v in node.outputs if node.op_type != "Constant"}
        weight_range = _weight_range(model)
        inputs = set(self.input_names)

        constants: list[tuple[ir.Value, np.ndarray, ir.Node | None]] = [
            (v, v.const_value.numpy(), None) for v in graph.initializers.values() if v.const_value is not None
        ]
        self._program = []
        for node in graph:
            if node.op_type == "Constant":
                array = _constant_tensor(node)
                if array is None:
                    raise UnsupportedOpError(f"Constant node '{node.name}' with a sparse or string value is not supported by the training interpreter")
                constants.append((node.outputs[0], array, node))
                continue
            attrs = {k: _attr_value(a) for k, a in node.attributes.items()}
            self._program.append((_OPS[node.op_type], [None if v is None else v.name for v in node.inputs],
                                  [v.name for v in node.outputs], attrs, node))
        # Quantized weights first: their scales and zero points are buffers they read.
        grids = {}
        for value, array, _ in constants:
            grid = _quantized_weight(value, node_outputs) if value.name not in inputs else None
            if grid is not None:
                grids[value.name] = grid
        for value, array, producer in constants:
            name = value.name
            if name in grids:
                scale, zero, axis = grids[name]
                lo, hi = _INT_RANGES[value.dtype]
                if weight_range is not None and value.dtype == ir.DataType.INT8:
                    lo, hi = max(lo, weight_range[0]), min(hi, weight_range[1])
                s = _axis_view(torch.from_numpy(scale.const_value.numpy().copy()), axis, array.ndim)
                z = torch.zeros((), dtype=s.dtype) if zero is None else _axis_view(
                    torch.from_numpy(zero.const_value.numpy().astype(np.float64)).to(s.dtype), axis, array.ndim)
                dequantized = (torch.from_numpy(array.astype(np.float64)).to(s.dtype) - z) * s
                key = f"w{len(self._keys)}"
                self.params[key] = nn.Parameter(dequantized)
                self.register_buffer(f"{key}_scale", s)
                self.register_buffer(f"{key}_zero", z)
                self.quantized[name] = (f"{key}_scale", f"{key}_zero", lo, hi, value.dtype)
            elif name not in inputs and _is_weight(value, array) and (producer is None or "value" in producer.attributes):
                key = f"w{len(self._keys)}"
                self.params[key] = nn.Parameter(torch.from_numpy(array.copy()))
                if producer is not None:
                    self.constant_nodes[name] = producer.name
            else:
                key = f"c{len(self._keys)}"
                self.register_buffer(key, torch.from_numpy(np.array(array, copy=True)))
            self._keys[name] = key
        self.weights = {name: self.params[key] for name, key in self._keys.items() if key in self.params}
        self.clustered: list = []
        if cluster_aware:
            self._cluster_latents(graph)

    def _cluster_latents(self, graph: ir.Graph) -> None:
        """Give each recognized clustered weight a latent parameter (its decoded value) and run its
        Gather as the latent snapped to the centroids; its decoder nodes leave the program."""
        from onnxopt import cluster_training as ct

        entries = {id(entry[4]): i for i, entry in enumerate(self._program)}
        dropped: set[int] = set()
        for cw in ct.find_clustered(graph):
            book_key = self._keys.get(cw.codebook)
            codes = graph.initializers[cw.codes]
            if book_key not in self.params or any(use.node not in cw.decoder for use in codes.uses()):
                continue
            env = {name: self._constant(name) for name in self._keys}
            with torch.no_grad():
                for node in cw.decoder:
                    fn, in_names, out_names, attrs, _ = self._program[entries[id(node)]]
                    result = fn([None if n is None or n == "" else env[n] for n in in_names], attrs, node)
                    for n, r in zip(out_names, result if isinstance(result, (tuple, list)) else (result,)):
                        env[n] = r
            index = env[cw.gather.inputs[1].name].cpu().numpy()
            offsets = None if cw.offsets is None else graph.initializers[cw.offsets].const_value.numpy()
            book = self.params[book_key].detach().cpu().numpy()
            local = ct.layout(cw, index, offsets, book, codes.const_value.numpy())
            if local is None:
                continue
            zero = torch.from_numpy(book.reshape(cw.channels, cw.k) == 0)
            held = zero.gather(1, ct.channels_first(torch.from_numpy(local.astype(np.int64)), cw))
            cw.latent_key, cw.zero_key, cw.held_key = f"{book_key}_latent", f"{book_key}_zero", f"{book_key}_held"
            self.params[cw.latent_key] = nn.Parameter(torch.from_numpy(np.ascontiguousarray(book.reshape(-1)[index])))
            self.register_buffer(cw.zero_key, zero)
            self.register_buffer(cw.held_key, held)
            i = entries[id(cw.gather)]
            _, in_names, out_names, attrs, node = self._program[i]
            self._program[i] = (lambda inputs, attrs, node, cw=cw: self._clustered_weight(cw), [], out_names, attrs, node)
            dropped.update(id(n) for n in cw.decoder)
            self.clustered.append(cw)
        self._program = [entry for entry in self._program if id(entry[4]) not in dropped]

    def _cluster_state(self, cw) -> tuple:
        return (self.params[cw.latent_key], self.params[self._keys[cw.codebook]], getattr(self, cw.zero_key),
                getattr(self, cw.held_key))

    def _clustered_weight(self, cw) -> torch.Tensor:
        from onnxopt.cluster_training import quantized

        return quantized(cw, *self._cluster_state(cw))

    def _constant(self, name: str) -> torch.Tensor:
        key = self._keys[name]
        if name in self.quantized:
            scale_key, zero_key, lo, hi, _ = self.quantized[name]
            scale, zero = getattr(self, scale_key), getattr(self, zero_key)
            # The float weight on its integer grid (STE), handed to DequantizeLinear as integers.
            return _fake_quantize(self.params[key], scale, zero, lo, hi)
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, feed: Mapping[str, torch.Tensor], outputs: list[str] | None = None,
                taps: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """Run the graph on ``feed`` (tensors by input name); returns the graph outputs (or ``outputs``).

        ``taps``: value name -> function applied to that value where it is computed, its result
        what every consumer reads (``onnxopt.gradients`` multiplies activations by channel masks)."""
        env: dict[str, torch.Tensor] = {name: self._constant(name) for name in self._keys}
        taps = taps or {}
        for name in self.input_names:
            if name in feed:
                env[name] = feed[name]
            elif name not in env:
                raise OnnxoptError(f"student: no value for input '{name}'")
            if name in taps:
                env[name] = taps[name](env[name])
        for fn, in_names, out_names, attrs, node in self._program:
            result = fn([None if n is None or n == "" else env[n] for n in in_names], attrs, node)
            for n, r in zip(out_names, result if isinstance(result, (tuple, list)) else (result,)):
                env[n] = taps[n](r) if n in taps else r
        return {name: env[name] for name in (outputs or self.output_names)}


def build_student(model: ir.Model, cluster_aware: bool = False) -> Student:
    """A trainable torch copy of ``model`` (raises ``UnsupportedOpError`` for ops it cannot run);
    ``cluster_aware``: clustered weights train as latents snapped to their centroids (see ``Student``)."""
    return Student(model, cluster_aware=cluster_aware)


def _to_torch(feed: Mapping[str, np.ndarray], device=None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()}


def _device(student: Student) -> torch.device:
    for t in list(student.parameters()) + list(student.buffers()):
        return t.device
    return torch.device("cpu")


def student_outputs(student: Student, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The student's outputs on a numpy feed, as numpy arrays of the graph's output dtypes."""
    with torch.no_grad():
        outs = student(_to_torch(feed, _device(student)))
    result = {}
    for name, t in outs.items():
        dtype = student.output_dtypes.get(name)
        array = t.detach().cpu().numpy()
        result[name] = array.astype(dtype.numpy()) if dtype is not None else array
    return result


def has_quantize_nodes(model: ir.Model) -> bool:
    return any(node.op_type == "QuantizeLinear" for node in model.graph)


# QDQ graphs: torch and onnxruntime sum a Conv in different orders, so a value that lies on a rounding
# tie of the next QuantizeLinear can land one integer step apart (measured: 3 of 540 digits test images
# with the int8 digits CNN); the rest must match exactly as for float graphs.
QDQ_MISMATCH_FRACTION = 0.02


def check_matches(student: Student, model: ir.Model, feed: Mapping[str, np.ndarray], rtol: float | None = None,
                  atol: float | None = None, *, mismatch_fraction: float = 0.0) -> None:
    """Raise ``StudentMismatchError`` unless the student's outputs equal onnxruntime's (graph
    optimizations disabled) on ``feed``: |student - ort| <= atol + rtol * max|ort| per output.

    ``mismatch_fraction``: the fraction of samples (rows of the first axis) allowed outside that
    bound (0 for float graphs; ``QDQ_MISMATCH_FRACTION`` for QDQ graphs, whose rounding ties may flip)."""
    from onnxopt.runtime import create_session, run_session
    from onnxopt.validate import DEFAULT_ATOL, default_rtol

    reference = run_session(create_session(model, optimization="disabled"), feed)
    got = student_outputs(student, feed)
    for name, ref in reference.items():
        mine = got[name]
        if mine.shape != ref.shape:
            raise StudentMismatchError(f"student output '{name}' has shape {mine.shape}, onnxruntime's {ref.shape}")
        r = default_rtol(ref.dtype) if rtol is None else rtol
        a = DEFAULT_ATOL if atol is None else atol
        if not ref.size:
            continue
        ref64, mine64 = ref.astype(np.float64), mine.astype(np.float64)
        bound = a + r * float(np.abs(ref64).max())
        diff = np.abs(mine64 - ref64)
        err = float(np.nan_to_num(diff, nan=np.inf).max())
        if err <= bound:
            continue
        rows = np.nan_to_num(diff, nan=np.inf).reshape(diff.shape[0], -1).max(axis=1) if diff.ndim else diff.reshape(1)
        off = int((rows > bound).sum())
        if off > mismatch_fraction * len(rows):
            raise StudentMismatchError(f"student output '{name}' differs from onnxruntime by {err:.3g} (allowed {bound:.3g}) "
                                       f"on {off} of {len(rows)} samples: the training interpreter does not compute this graph exactly")


def write_back(model: ir.Model, student: Student) -> ir.Model:
    """Store the student's trained weights into ``model`` in place (same names, dtypes, shapes;
    integer weights re-quantized on their grid; clustered weights trained as latents: their codes and
    codebook); no node is added, removed or rewired. Returns ``model``."""
    graph = model.graph
    constants = {node.outputs[0].name: node for node in graph if node.op_type == "Constant"}
    with torch.no_grad():
        for name, key in student._keys.items():
            if key not in student.params:
                continue
            if name in student.quantized:
                array = student._constant(name).detach().cpu().numpy()
                dtype = student.quantized[name][4]
                array = np.round(array).astype(dtype.numpy())
            else:
                array = student.params[key].detach().cpu().numpy()
            value = graph.initializers.get(name)
            if value is not None:
                old = value.const_value
                array = array.astype(old.dtype.numpy()).reshape(old.shape.numpy())
                value.const_value = ir.tensor(array, dtype=old.dtype, name=name)
            elif name in constants:
                node = constants[name]
                old = node.attributes["value"].value
                array = array.astype(old.dtype.numpy()).reshape(old.shape.numpy())
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, dtype=old.dtype, name=old.name))
        if student.clustered:
            from onnxopt.cluster_training import write_codes

            for cw in student.clustered:  # after the codebooks above: codes and codebook from the latents
                write_codes(graph, cw, *(t.detach().cpu() for t in student._cluster_state(cw)))
    return model
