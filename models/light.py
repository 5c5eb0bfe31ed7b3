"""The onnx package's "light" ImageNet architectures, given seeded random weights.

The onnx package ships nine classic architectures (``onnx/backend/test/data/light``) whose weights
are stubs: each weight is a ``ConstantOfShape(<name>__SHAPE)`` node filled with 0.02, and a few are
small float initializers. ``load_light`` turns one into a runnable model:

1. convert it from opset 9 to ``opset`` with ``onnx.version_converter``;
2. replace every stub by a seeded random initializer chosen by the weight's role, found from its
   consumer (looking through ``Unsqueeze`` and ``Reshape``):

   - Conv / ConvTranspose / Gemm weight: He-normal, N(0, 2 / fan_in);
   - Conv / Gemm bias and per-channel shift (``Add`` after ``Unsqueeze``): U(-0.1, 0.1);
   - per-channel scale (``Mul`` after ``Unsqueeze``): U(0.5, 1.5);
   - BatchNormalization: scale U(0.5, 1.5), bias U(-0.1, 0.1), mean U(-0.1, 0.1), var U(0.5, 1.5);

3. drop initializers from the graph inputs (IR 3 listed them there, which would let a caller
   override them and forbid folding) and drop initializers that nothing reads;
4. rescale each Conv/Gemm weight so that its output has unit RMS on a standard-normal input.
   He-normal alone keeps plain chains (VGG, Inception) near unit scale, but in residual nets the
   eval-mode BatchNormalization with random statistics does not renormalise, so each residual Sum
   doubles the variance (ResNet-50 logits reached ~1e3, ShuffleNet ~1e4). Each round measures
   Conv/Gemm outputs and merges (Sum, Concat) in one onnxruntime run and propagates the scale
   changes through the graph; two to five rounds reach 5% (ResNet-50 logits then have RMS ~1);
5. check the result with ``onnx.checker`` and one onnxruntime run whose outputs must be finite.

Only onnx, numpy and onnxruntime are used: no torch. Nothing is cached on disk.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, version_converter

__all__ = ["LIGHT_NAMES", "light_path", "load_light", "random_input", "save_light"]

LIGHT_NAMES = [
    "resnet50",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "bvlc_alexnet",
    "zfnet512",
]

_LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# Ops that only change a weight's shape: a weight's role is that of the consumer behind them.
_SHAPE_OPS = {"Unsqueeze", "Reshape"}
# Ops whose weight (input 1) is rescaled so that their output has unit RMS.
_LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm"}
# Multi-activation ops whose output scale is the product of their inputs' scales.
_PRODUCT_OPS = {"Mul", "MatMul"}

_UNIFORM_RANGES = {
    "bn_scale": (0.5, 1.5),
    "bn_bias": (-0.1, 0.1),
    "bn_mean": (-0.1, 0.1),
    "bn_var": (0.5, 1.5),
    "shift": (-0.1, 0.1),
    "scale": (0.5, 1.5),
}
_BN_ROLES = {1: "bn_scale", 2: "bn_bias", 3: "bn_mean", 4: "bn_var"}
# Scale normalisation stops when every Conv/Gemm output RMS is within exp(+-0.05) of 1.
_RMS_TOLERANCE = 0.05
_MAX_ROUNDS = 8


def light_path(name: str) -> Path:
    """The path of the stub model ``light_<name>.onnx`` inside the installed onnx package."""
    if name not in LIGHT_NAMES:
        raise ValueError(f"unknown light model {name!r}; known: {', '.join(LIGHT_NAMES)}")
    return _LIGHT_DIR / f"light_{name}.onnx"


def load_light(name: str, opset: int = 17, seed: int = 0, verify: bool = True) -> onnx.ModelProto:
    """Load ``light_<name>.onnx`` at ``opset`` with seeded random weights (see module docstring).

    ``verify`` runs onnx.checker and onnxruntime on the result (about half the time for the
    large ones); the weights are the same either way.
    """
    model = _convert(onnx.load(light_path(name)), opset)
    min_ir = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    model.ir_version = max(model.ir_version, min_ir)
    weights = _take_stub_weights(model.graph, np.random.default_rng(seed))
    feeds = random_input(model, seed)
    _normalize_scales(model, weights, feeds)
    model.graph.initializer.extend(numpy_helper.from_array(w, name) for name, w in weights.items())
    if verify:
        _verify(model, name, feeds)
    return model


def save_light(name: str, path: str | os.PathLike, opset: int = 17, seed: int = 0) -> Path:
    """Write ``load_light(name, opset, seed)`` to ``path`` and return the path."""
    path = Path(path)
    onnx.save(load_light(name, opset=opset, seed=seed), path)
    return path


def random_input(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for the model's graph inputs (symbolic dims become 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims, dtype=np.float32)
    return feeds


# --- conversion -------------------------------------------------------------------------------


def _convert(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default-domain opset, naming the model in the converter's error."""
    try:
        return version_converter.convert_version(model, opset)
    except Exception as error:  # the converter raises bare RuntimeErrors from C++
        raise RuntimeError(
            f"{model.graph.name}: cannot convert to opset {opset}: {error}"
        ) from error


# --- random weights ---------------------------------------------------------------------------


def _take_stub_weights(graph: onnx.GraphProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Remove the stub weights (and every initializer from the graph inputs, and initializers
    that nothing reads) from ``graph``; return random arrays for the stubs, by name."""
    _drop_initializer_inputs(graph)
    weights = _random_weights(graph, rng)
    _keep(
        graph.node,
        lambda node: not (node.op_type == "ConstantOfShape" and node.output[0] in weights),
    )
    _keep(graph.initializer, lambda init: init.name not in weights)
    _drop_unused_initializers(graph)
    return weights


def _random_weights(graph: onnx.GraphProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random arrays for the stub weights: ConstantOfShape outputs and float initializers."""
    initializers = {init.name: init for init in graph.initializer}
    consumers = _consumers(graph)
    shapes = {
        node.output[0]: _shape_of(initializers[node.input[0]])
        for node in graph.node
        if _is_weight_stub(node, initializers)
    }
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.name in consumers:
            shapes[init.name] = tuple(init.dims)
    weights = {}
    for name, shape in shapes.items():
        kind, fan_in = _role(graph, name, shape, consumers, initializers)
        weights[name] = _sample(kind, fan_in, shape, rng)
    return weights


def _is_weight_stub(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    return node.op_type == "ConstantOfShape" and bool(node.input) and node.input[0] in initializers


def _shape_of(shape_tensor: onnx.TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in numpy_helper.to_array(shape_tensor))


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Map each value name to the (node, input index) pairs that read it."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, value in enumerate(node.input):
            consumers.setdefault(value, []).append((node, index))
    return consumers


def _role(graph, name, shape, consumers, initializers) -> tuple[str, int | None]:
    """The weight's role and, for a Conv/Gemm weight, its fan-in, from its single real consumer."""
    users = consumers.get(name, [])
    if len(users) != 1:
        raise ValueError(f"{graph.name}: weight {name!r} has {len(users)} consumers; expected 1")
    node, index = users[0]
    if node.op_type in _SHAPE_OPS:
        if node.op_type == "Reshape":
            shape = _reshaped(shape, initializers[node.input[1]])
        return _role(graph, node.output[0], shape, consumers, initializers)
    if node.op_type == "BatchNormalization" and index in _BN_ROLES:
        return _BN_ROLES[index], None
    if node.op_type in _LINEAR_OPS and index == 1:
        return "weight", _fan_in(node, shape)
    if (node.op_type in _LINEAR_OPS and index == 2) or (node.op_type == "Add" and index == 1):
        return "shift", None
    if node.op_type == "Mul" and index == 1:
        return "scale", None
    raise ValueError(
        f"{graph.name}: no random-weight rule for {name!r} as input {index} of {node.op_type}"
    )


def _reshaped(shape: tuple[int, ...], target: onnx.TensorProto) -> tuple[int, ...]:
    """The shape after ``Reshape`` to ``target`` (0 copies the input dim, -1 is inferred)."""
    dims = [shape[i] if d == 0 else d for i, d in enumerate(_shape_of(target))]
    return np.empty(shape, dtype=np.bool_).reshape(dims).shape


def _fan_in(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    """Inputs feeding one output unit: C_in/group * kernel for Conv, K for Gemm."""
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if node.op_type == "Gemm" and not trans_b:
        return shape[0]
    if node.op_type == "ConvTranspose":  # weight (C_in, C_out/group, k...)
        return shape[0] // _group(node) * math.prod(shape[2:])
    return math.prod(shape[1:])


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _sample(
    kind: str, fan_in: int | None, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    if kind == "weight":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
    low, high = _UNIFORM_RANGES[kind]
    return rng.uniform(low, high, size=shape).astype(np.float32)


def _keep(container, predicate) -> None:
    """Keep only the items of a protobuf repeated field for which ``predicate`` holds."""
    kept = [item for item in container if predicate(item)]
    del container[:]
    container.extend(kept)


def _drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    names = {init.name for init in graph.initializer}
    _keep(graph.input, lambda value: value.name not in names)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {value for node in graph.node for value in node.input}
    _keep(graph.initializer, lambda init: init.name in used)


# --- scale normalisation ----------------------------------------------------------------------


def _normalize_scales(
    model: onnx.ModelProto, weights: dict[str, np.ndarray], feeds: dict[str, np.ndarray]
) -> None:
    """Rescale, in place, every Conv/Gemm weight so that its output has unit RMS on ``feeds``.

    Rounds of measure-then-rescale (``_rescale``) repeat until every Conv/Gemm output is within
    exp(+-_RMS_TOLERANCE) of unit RMS; a model that does not get there keeps the last round's
    weights, with a warning.
    """
    graph = model.graph
    activations = _activations(graph)
    merges = [node for node in graph.node if sum(v in activations for v in node.input) > 1]
    linear_outputs = [node.output[0] for node in graph.node if node.op_type in _LINEAR_OPS]
    if not linear_outputs:
        return
    probed = set(linear_outputs) | {
        v for n in merges for v in (*n.input, n.output[0]) if v in activations
    }
    session = _probe_session(model, weights, sorted(probed))
    for _ in range(_MAX_ROUNDS):
        rms, size = _probe(session, {**feeds, **weights})
        if max(abs(math.log(rms[v])) for v in linear_outputs) < _RMS_TOLERANCE:
            return
        _rescale(graph, weights, rms, size)
    warnings.warn(
        f"{graph.name}: Conv/Gemm output scales not normalised after {_MAX_ROUNDS} rounds",
        stacklevel=3,
    )


def _rescale(
    graph: onnx.GraphProto,
    weights: dict[str, np.ndarray],
    rms: dict[str, float],
    size: dict[str, int],
) -> None:
    """One round: walk the graph in order, rescaling each Conv/Gemm weight towards unit output RMS.

    ``gain[v]`` is the factor by which value ``v``'s RMS will change. Unary ops pass it on, as if
    positively homogeneous; a Conv/Gemm divides its weight by its predicted output RMS; a merge
    combines its inputs' RMS weighted by element count (exact for Concat, and for a Sum of
    uncorrelated terms). Relu after a residual Sum whose terms change balance is not homogeneous,
    which is why rounds repeat.
    """
    producers = {out: node for node in graph.node for out in node.output}
    gain = {value.name: 1.0 for value in graph.input}
    for node in graph.node:
        inputs = [v for v in node.input if v in gain]
        if not inputs:
            continue
        if node.op_type in _LINEAR_OPS:
            weight = _weight_source(node.input[1], producers)
            weights[weight] /= np.float32(gain[inputs[0]] * rms[node.output[0]])
            out_gain = 1.0 / rms[node.output[0]]
        elif len(inputs) == 1:
            out_gain = gain[inputs[0]]
        elif node.op_type in _PRODUCT_OPS:
            out_gain = math.prod(gain[v] for v in inputs)
        else:
            num = sum(size[v] * (gain[v] * rms[v]) ** 2 for v in inputs)
            den = sum(size[v] * rms[v] ** 2 for v in inputs)
            out_gain = math.sqrt(num / den)
        for out in node.output:
            gain[out] = out_gain


def _activations(graph: onnx.GraphProto) -> set[str]:
    """Values computed from a graph input (as opposed to from weights and constants)."""
    reached = {value.name for value in graph.input}
    for node in graph.node:
        if any(v in reached for v in node.input):
            reached.update(node.output)
    return reached


def _probe_session(
    model: onnx.ModelProto, weights: dict[str, np.ndarray], names: list[str]
) -> ort.InferenceSession:
    """A session on a copy of ``model`` that takes the weights as inputs and returns ``names``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.input.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, array.shape)
        for name, array in weights.items()
    )
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return _session(probe)


def _probe(session: ort.InferenceSession, feeds) -> tuple[dict[str, float], dict[str, int]]:
    """RMS and element count of every output of the probe session."""
    names = [out.name for out in session.get_outputs()]
    values = session.run(names, feeds)
    rms = {
        name: float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))
        for name, v in zip(names, values, strict=True)
    }
    return rms, {name: v.size for name, v in zip(names, values, strict=True)}


def _weight_source(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The weight behind a Conv/Gemm weight input, looking through Reshape/Unsqueeze."""
    node = producers.get(name)
    while node is not None and node.op_type in _SHAPE_OPS:
        name = node.input[0]
        node = producers.get(name)
    return name


# --- verification -----------------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _verify(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> None:
    """onnx.checker, then one onnxruntime run whose outputs must be finite and not constant."""
    onnx.checker.check_model(model)
    session = _session(model)
    for info, out in zip(session.get_outputs(), session.run(None, feeds), strict=True):
        if not np.all(np.isfinite(out)) or float(np.std(out)) == 0.0:
            raise RuntimeError(f"light {name}: output {info.name!r} is not finite or is constant")
