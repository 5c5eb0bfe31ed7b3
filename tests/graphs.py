"""Small graph builders and an onnxruntime harness for the pass tests.

``build`` turns ONNX text plus named numpy weights into an ``ir.Model``; ``assert_equivalent``
checks a rewritten model with ``onnx.checker`` and compares its onnxruntime outputs with the
original's (graph optimizations disabled on both, so only the pass can make a difference).
"""

from __future__ import annotations

__all__ = [
    "build",
    "build_proto",
    "snapshot",
    "run",
    "random_feeds",
    "bn_params",
    "assert_equivalent",
    "op_types",
    "value_names",
    "small_cnn",
]

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort


def build_proto(text: str, weights: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """An ``onnx.ModelProto`` from ONNX text, with ``weights`` added as main-graph initializers."""
    proto = onnx.parser.parse_model(text)
    for name, array in (weights or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name=name))
    return proto


def build(text: str, weights: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """An ``ir.Model`` from ONNX text, with ``weights`` added as main-graph initializers."""
    return ir.serde.deserialize_model(build_proto(text, weights))


def small_cnn(seed: int = 0, *, batch: str | int = "N") -> onnx.ModelProto:
    """Conv, BatchNormalization, Relu, pooling and a Gemm head: x [batch,3,8,8] → y [batch,10]."""
    rng = np.random.default_rng(seed)
    weights = {
        "W": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(8).astype(np.float32),
        **bn_params("bn", 8, seed),
        "FW": rng.standard_normal((10, 8)).astype(np.float32),
        "FB": rng.standard_normal(10).astype(np.float32),
    }
    return build_proto(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[{batch},3,8,8] x) => (float[{batch},10] y) {{
            c = Conv <pads=[1, 1, 1, 1]> (x, W, B)
            b = BatchNormalization (c, bn_scale, bn_bias, bn_mean, bn_var)
            r = Relu(b)
            p = GlobalAveragePool(r)
            f = Flatten(p)
            y = Gemm <transB=1> (f, FW, FB)
        }}""",
        weights,
    )


def snapshot(model: ir.Model | onnx.ModelProto) -> bytes:
    """The model serialized now; later in-place changes to ``model`` do not reach it."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return proto.SerializeToString()


def run(model: ir.Model | onnx.ModelProto | bytes, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``model`` on ``feeds``, under onnxruntime with graph optimizations disabled."""
    data = model if isinstance(model, bytes) else snapshot(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def random_feeds(
    model: ir.Model, dims: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer; named dims from ``dims``, else 2."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = [d if isinstance(d, int) else (dims or {}).get(d.value, 2) for d in value.shape]
        dtype = value.dtype.numpy()
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def bn_params(prefix: str, channels: int, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """BatchNormalization scale, bias, mean and var named ``{prefix}_scale`` … , all far from identity."""
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}_scale": rng.uniform(0.5, 2.0, channels).astype(dtype),
        f"{prefix}_bias": rng.standard_normal(channels).astype(dtype),
        f"{prefix}_mean": rng.standard_normal(channels).astype(dtype),
        f"{prefix}_var": rng.uniform(0.2, 2.0, channels).astype(dtype),
    }


def op_types(model: ir.Model) -> list[str]:
    """Op types of every node, subgraphs included."""
    return [node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)]


def value_names(model: ir.Model) -> list[str]:
    """Names defined anywhere in the model (graph inputs, initializers, node outputs; every scope).

    ONNX values live in one namespace with their outer scopes: a name listed twice is a clash.
    """
    names = []
    for graph in (model.graph, *model.graph.subgraphs()):
        names += [v.name for v in graph.inputs if not v.is_initializer()]
        names += list(graph.initializers)
        names += [v.name for node in graph for v in node.outputs if v.name]
    return names


def assert_equivalent(
    before: bytes,
    after: ir.Model,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    *,
    rtol: float,
    atol: float = 0.0,
) -> None:
    """``after`` passes onnx.checker and matches ``before`` on every feed: |diff| <= atol + rtol * max|ref|.

    Output names, order, shapes and dtypes must match too.
    """
    proto = ir.to_proto(after)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == [
        o.name for o in onnx.load_from_string(before).graph.output
    ], "graph output names changed"
    for feed in [feeds] if isinstance(feeds, Mapping) else feeds:
        ref = run(before, feed)
        got = run(proto, feed)
        assert len(ref) == len(got)
        for i, (r, g) in enumerate(zip(ref, got)):
            assert r.shape == g.shape, f"output {i}: shape {g.shape} != {r.shape}"
            assert r.dtype == g.dtype, f"output {i}: dtype {g.dtype} != {r.dtype}"
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            bound = atol + rtol * float(np.abs(r64).max())
            err = float(np.abs(r64 - g64).max())
            assert err <= bound, f"output {i}: max |diff| {err:.3g} > {bound:.3g}"


# Two unnamed Convs around a Resize whose scales are computed from a Shape (Cast, Div, Add, Concat):
# the scales must stay float when quantizing, and counting MACs folds them. Weights: W1 [C,3,3,3], W2.
COMPUTED_RESIZE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,?,16,16] y) {
    c = Conv <pads=[1,1,1,1]> (x, W1)
    s = Shape <start=0, end=2> (c)
    f = Cast <to=1> (s)
    ones = Div(f, f)
    twos = Add(ones, ones)
    scales = Concat <axis=0> (ones, twos)
    u = Resize <mode="nearest"> (c, , scales)
    y = Conv (u, W2)
}"""


def int8_storage_cnn(seed: int = 0) -> onnx.ModelProto:
    """A compact export: int8 weights dequantized in the graph by Cast + Mul (a per-channel scale) or
    DequantizeLinear, a BatchNormalization after the Conv: x [N,4,8,8] → y [N,10]."""
    rng = np.random.default_rng(seed)
    weights = {
        "Wq": rng.integers(-127, 128, size=(16, 4, 3, 3)).astype(np.int8),
        "Ws": rng.uniform(0.005, 0.02, size=(16, 1, 1, 1)).astype(np.float32),
        "B": rng.standard_normal(16).astype(np.float32),
        **bn_params("bn", 16, seed),
        "Mq": rng.integers(-127, 128, size=(16, 10)).astype(np.int8),
        "Ms": rng.uniform(0.005, 0.02, size=(10,)).astype(np.float32),
        "Dq": rng.integers(-127, 128, size=(10, 10)).astype(np.int8),
        "Ds": np.float32(0.01),
    }
    return build_proto(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,8,8] x) => (float[N,10] y) {
            wf = Cast <to=1> (Wq)
            w = Mul(wf, Ws)
            c = Conv <pads=[1, 1, 1, 1]> (x, w, B)
            b = BatchNormalization (c, bn_scale, bn_bias, bn_mean, bn_var)
            r = Relu(b)
            p = GlobalAveragePool(r)
            f = Flatten(p)
            mf = Cast <to=1> (Mq)
            m = Mul(mf, Ms)
            h = MatMul(f, m)
            d = DequantizeLinear(Dq, Ds)
            y = MatMul(h, d)
        }""",
        weights,
    )
