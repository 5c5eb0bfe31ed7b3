"""--target: detection, the weights each target gets, and proof that int8 is right where kernels saturate.

This machine may have VNNI (exact int32 sums); an AVX2 one adds product pairs into int16 with
saturation. ``u8s8`` simulates the latter, so every assertion here holds on any CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import OptionError
from onnxopt.passes import QuantizeQDQ
from onnxopt.target import TARGETS, detect_cpu, resolve
from u8s8 import int8_weights, kernel_order, pair_sums, simulate, worst_pair

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"
INT16_MAX = 32767


def cpuinfo(*flags: str) -> str:
    return f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_1 {' '.join(flags)}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("flags, expected", [
    (("avx2",), "avx2"),
    (("avx2", "avx512f", "avx512bw"), "avx512"),
    (("avx2", "avx512bw", "avx512_vnni"), "vnni"),
    (("avx2", "avx_vnni"), "vnni"),          # Alder Lake: AVX-VNNI without AVX-512
    (("avx2", "amx_tile", "amx_int8"), "vnni"),
    ((), "avx2"),                             # SSE4.1 only: its kernels saturate too
])
def test_x86_flags_give_the_target(flags, expected):
    name, why = detect_cpu(cpuinfo(*flags), machine="x86_64")
    assert name == expected and why


def test_arm_and_unknown_machines():
    assert detect_cpu("", machine="aarch64")[0] == "arm64"
    assert detect_cpu("Features\t: fp asimd asimddp\n", machine="arm64")[0] == "arm64"
    # Flags that cannot be read: 7-bit weights, exact on every kernel.
    assert detect_cpu("", machine="x86_64")[0] == "avx2"
    assert detect_cpu("", machine="riscv64")[0] == "avx2"


def test_resolve_auto_follows_the_provider_then_the_cpu():
    assert resolve("auto", "cuda").name == "tensorrt"
    assert resolve("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider"]).name == "tensorrt"
    here = resolve("auto", "cpu")
    assert here.detected and here.name == detect_cpu()[0]
    assert resolve("auto", "cpu", cpuinfo=cpuinfo("avx2"), machine="x86_64").weight_max == 63
    explicit = resolve("AVX2", "cuda")  # a name given wins over detection
    assert explicit.name == "avx2" and not explicit.detected and explicit.as_dict()["weight_range"] == [-63, 63]
    assert resolve("vnni").weight_max == resolve("arm64").weight_max == resolve("tensorrt").weight_max == 127
    assert resolve("tensorrt").activations == "int8" and resolve("vnni").activations is None
    with pytest.raises(OptionError, match="unknown target"):
        resolve("avx9")


def test_the_pass_takes_the_arithmetic_not_the_detection():
    assert QuantizeQDQ(target="avx2").weight_bits == 7 and QuantizeQDQ(target="avx512").weight_max == 63
    assert QuantizeQDQ(target="vnni").weight_bits == QuantizeQDQ().weight_bits == 8
    assert QuantizeQDQ(weight_bits=7).weight_max == 63
    assert QuantizeQDQ(target="avx2").excluding({"n": "why"}).weight_bits == 7  # the fallback keeps it
    with pytest.raises(ValueError, match="auto"):
        QuantizeQDQ(target="auto")
    with pytest.raises(ValueError, match="int8"):
        QuantizeQDQ(target="tensorrt")
    assert QuantizeQDQ(target="tensorrt", activations="int8").weight_bits == 8
    with pytest.raises(ValueError, match="weight_bits"):
        QuantizeQDQ(weight_bits=4)


def test_pair_sums_saturate_as_pmaddubsw_does():
    x = np.array([[255, 255, 255]], np.uint8)
    sums, saturated = pair_sums(x, np.array([[127, 127, 1]], np.int8))
    assert sums[0, 0] == INT16_MAX + 255 and saturated == 1  # 64770 clamped to 32767, then + 255
    sums, saturated = pair_sums(x, np.array([[63, 63, 63]], np.int8))
    assert sums[0, 0] == 255 * 189 and saturated == 0
    sums, saturated = pair_sums(x, np.array([[-128, -128, 0]], np.int8))
    assert sums[0, 0] == -32768 and saturated == 1
    # Opposite signs reach one product at most (255 * 127 < 32767); the worst pair is one sign's sum.
    assert worst_pair(np.array([[127, -127, 63, 63]], np.int8)).tolist() == [255 * 127]
    assert worst_pair(np.array([[100, 27, -1, 0]], np.int8)).tolist() == [255 * 127]
    # Channels-last order: a 1-channel 3x3 kernel pairs horizontal neighbours.
    w = np.arange(9, dtype=np.int8).reshape(1, 1, 3, 3)
    assert kernel_order("Conv", w).tolist() == [list(range(9))]
    w = np.arange(8, dtype=np.int8).reshape(1, 2, 2, 2)  # [O, C, kh, kw]
    assert kernel_order("Conv", w).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


def _digits(target: str):
    return onnxopt.optimize(
        str(DIGITS / "digits_cnn.onnx"), passes=["simplify", "fold-bn", "quantize"],
        calibration=str(DIGITS / "digits_calib.npz"), validate=False, latency=False, target=target,
    )


@pytest.fixture(scope="module")
def digits_int8():
    """The digits model quantized for each target, every Conv/Gemm int8 (no fallback runs without validation)."""
    return {t: _digits(t) for t in ("avx2", "vnni")}


@pytest.fixture(scope="module")
def test_set():
    data = np.load(DIGITS / "digits_test.npz")
    return data["input"], data["labels"]


def _accuracy(proto: onnx.ModelProto, x, y) -> float:
    """Top-1 in % with onnxruntime's reference kernels (graph optimizations off: DQ, float op, Q;
    the result of exact int32 sums, as VNNI and arm64 compute them)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == y).mean() * 100)


def test_avx2_weights_cannot_saturate_any_pair(digits_int8):
    result = digits_int8["avx2"]
    proto = ir.to_proto(result.model)
    weights = int8_weights(proto)
    assert len(weights) == 7  # 6 Conv and the Gemm
    for name, (op, w, _, attrs) in weights.items():
        # |w| <= 63 bounds every pair by 255 * 126, whatever order a kernel pairs K in ...
        assert np.abs(w.astype(np.int32)).max() <= 63, name
        # ... and in the order onnxruntime's kernels pair it.
        assert worst_pair(kernel_order(op, w, attrs.get("transB", 0))).max() <= INT16_MAX, name
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["onnxopt.quantization.target"] == "avx2"
    assert props["onnxopt.quantization.weight_range"] == "[-63, 63]"
    record = next(r for r in result.report.passes if r.name == "quantize").details
    assert record["target"]["name"] == "avx2" and record["target"]["weight_range"] == [-63, 63]
    assert any("target avx2" in note for note in result.report.notes)


def test_8bit_weights_do_saturate_under_avx2_arithmetic(digits_int8, test_set):
    # What the avx2 target prevents is real on this model: the same check fails for 8-bit weights.
    proto = ir.to_proto(digits_int8["vnni"].model)
    weights = int8_weights(proto)
    assert max(np.abs(w.astype(np.int32)).max() for _, w, _, _ in weights.values()) == 127
    worst = {n: worst_pair(kernel_order(op, w, a.get("transB", 0))).max() for n, (op, w, _, a) in weights.items()}
    assert max(worst.values()) > INT16_MAX
    x, _ = test_set
    _, counts = simulate(proto, {"input": x[:64]})
    assert sum(saturated for saturated, _ in counts.values()) > 0, counts


def test_digits_int8_every_conv_within_half_a_point_of_float_on_both_arithmetics(digits_int8, test_set):
    x, y = test_set
    float_accuracy = _accuracy(onnx.load(DIGITS / "digits_cnn.onnx"), x, y)
    for target, result in digits_int8.items():
        details = next(r for r in result.report.passes if r.name == "quantize").details
        assert details["weighted"]["float"] == 0 and details["left"] == {}, target  # every Conv and the Gemm
        assert _accuracy(ir.to_proto(result.model), x, y) >= float_accuracy - 0.5, target
    # The avx2 model computed as an AVX2 CPU does: no sum saturates, and the accuracy holds.
    proto = ir.to_proto(digits_int8["avx2"].model)
    outputs, counts = simulate(proto, {"input": x})
    assert all(saturated == 0 for saturated, _ in counts.values()), counts
    assert float((outputs[0].argmax(1) == y).mean() * 100) >= float_accuracy - 0.5


def test_the_simulator_agrees_with_onnxruntime_where_nothing_saturates(digits_int8, test_set):
    # Its zero points, padding, bias and scales are onnxruntime's: only rounding of intermediate
    # requantization may differ (one step of an activation, here and there).
    proto = ir.to_proto(digits_int8["avx2"].model)
    x = test_set[0][:128]
    simulated = simulate(proto, {"input": x})[0][0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(proto.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(simulated - reference).max() <= 0.02 * np.abs(reference).max()
    assert (simulated.argmax(1) == reference.argmax(1)).mean() >= 0.99


def test_cli_target_is_recorded_and_needs_quantize(tmp_path, capsys):
    out, report = tmp_path / "d.onnx", tmp_path / "r.json"
    code = main([str(DIGITS / "digits_cnn.onnx"), "--quantize", "int8", "--calibration", str(DIGITS / "digits_calib.npz"),
                 "--target", "avx512", "--no-validate", "--no-latency", "-o", str(out), "--report", str(report), "-q"])
    assert code == 0, capsys.readouterr()
    details = next(p for p in json.loads(report.read_text())["passes"] if p["name"] == "quantize")["details"]
    assert details["target"]["name"] == "avx512" and details["weight_range"] == [-63, 63]
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props["onnxopt.quantization.target"] == "avx512"
    assert main([str(DIGITS / "digits_cnn.onnx"), "--target", "avx2", "-q"]) == 2
    assert "--target" in capsys.readouterr().err
    assert main([str(DIGITS / "digits_cnn.onnx"), "--quantize", "int8", "--target", "sse", "-q"]) == 2
    assert set(TARGETS) == {"auto", "avx2", "avx512", "vnni", "arm64", "tensorrt"}


def test_tensorrt_target_quantizes_activations_symmetrically():
    result = _digits("tensorrt")
    proto = ir.to_proto(result.model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)
    assert any("activations int8 for target tensorrt" in note for note in result.report.notes)
