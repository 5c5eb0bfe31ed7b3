"""Choosing by measurement where int8 pays: per-layer kernel times (``onnxopt.profiling``) and the
quantization step's speed fallback (``onnxopt.speed_fallback``)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import onnxopt
import onnxopt.quantization
import onnxopt.speed_fallback
from graphs import build, random_feeds
from onnxopt.calibrate import calibrate
from onnxopt.cli import main
from onnxopt.latency import timing_settings
from onnxopt.passes import QuantizeQDQ
from onnxopt.passes.quantize import node_label
from onnxopt.profiling import kernel_times, layer_times
from onnxopt.report import LatencyComparison
from onnxopt.runtime import ModelSnapshot

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
DIGITS_CONVS = 6  # and one Gemm

CNN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,16,16] x) => (float[N,10] y) {
    c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
    r1 = Relu(c1)
    c2 = Conv <pads=[1,1,1,1]> (r1, W2, B2)
    r2 = Relu(c2)
    c3 = Conv (r2, W3, B3)
    a = Add(c3, r2)
    p = GlobalAveragePool(a)
    f = Flatten(p)
    y = Gemm <transB=1> (f, FW, FB)
}"""


def cnn() -> ir.Model:
    """Every node named after its output, as exporters name them (onnxruntime reports node names)."""
    r = np.random.default_rng(0)
    shapes = {"W1": (16, 3, 3, 3), "B1": (16,), "W2": (16, 16, 3, 3), "B2": (16,), "W3": (16, 16, 1, 1), "B3": (16,),
              "FW": (10, 16), "FB": (10,)}
    model = build(CNN, {k: r.standard_normal(v).astype(np.float32) for k, v in shapes.items()})
    for node in model.graph:
        node.name = f"{node.outputs[0].name}_node"
    return model


def int8_layers(model: ir.Model) -> set[str]:
    """Conv/Gemm/MatMul nodes whose weight is dequantized from int8: the placement in the graph,
    which every CPU shares (which kernels onnxruntime fuses them into is its own, per CPU)."""
    return {n.name for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1
            and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear"}


DIGITS_LAYERS = {
    "/features/features.0/features.0.0/Conv", "/features/features.1/body/body.0/body.0.0/Conv",
    "/features/features.1/body/body.1/body.1.0/Conv", "/features/features.2/body/body.0/body.0.0/Conv",
    "/features/features.2/body/body.1/body.1.0/Conv", "/features/features.2/shortcut/shortcut.0/Conv",
    "/head/head.2/Gemm",
}


def quantized(model: ir.Model) -> tuple[ir.Model, QuantizeQDQ]:
    copy = model.clone()
    p = QuantizeQDQ()
    p.ranges = calibrate(copy, p.plan(copy).tensors, [random_feeds(copy, {"N": 4}, seed=i) for i in range(4)])
    p(copy)
    return copy, p


def test_layer_times_follow_onnxruntime_names_back_to_the_layers():
    model, p = quantized(cnn())
    layers = p.details["quantized_nodes"]
    assert {"c1_node", "c2_node", "c3_node", "y_node"} <= set(layers)
    input_q = next(n.name for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x")
    times = {
        "c1_node_token_3": 10.0,  # a QLinearConv after the NHWC conversion
        "fused c2_node": 7.0,  # fused with its activation: onnxruntime prefixes "fused "
        "y_node/MatMulAddFusion": 3.0,  # a MatMul and its Add fused into a Gemm
        input_q: 4.0,  # quantizing the input is the first conv's cost
        "Transpose_token_9": 100.0,  # onnxruntime's own node: nobody's
    }
    assert layer_times(model, times, layers) == {"c1_node": 14.0, "c2_node": 7.0, "y_node": 3.0}
    # A float NCHWc conv is named after the tensor its fused activations write.
    float_model = cnn()
    assert layer_times(float_model, {"r2_nchwc": 5.0, "c3_nchwc": 2.0}, ["c2_node", "c3_node"]) == {"c2_node": 5.0,
                                                                                                     "c3_node": 2.0}


def test_every_layer_is_timed_in_onnxruntimes_float_and_int8_graphs():
    # onnxruntime's real names: NCHWc convs with fused Relu and Add, QLinearConv, QGemm.
    float_model = cnn()
    model, p = quantized(float_model)
    layers = p.details["quantized_nodes"]
    snapshots = [ModelSnapshot(float_model), ModelSnapshot(model)]
    try:
        k_float, k_int8 = kernel_times(snapshots, {"x": np.ones((4, 3, 16, 16), np.float32)}, timing_settings("cpu", 1),
                                       seconds=0.2)
    finally:
        for s in snapshots:
            s.close()
    weighted = ["c1_node", "c2_node", "c3_node", "y_node"]
    for times, graph in ((k_float, float_model), (k_int8, model)):
        charged = layer_times(graph, times, layers)
        assert set(weighted) <= set(charged), (sorted(times), charged)
        assert all(charged[n] > 0 for n in weighted)


@pytest.fixture
def digits(tmp_path) -> Path:
    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    return tmp_path


def comparison(ratio: float, verdict: str) -> LatencyComparison:
    return LatencyComparison(median_a_ms=1.0, median_b_ms=ratio, p90_a_ms=1.1, p90_b_ms=ratio * 1.1, ratio=ratio,
                             ratio_low=ratio * 0.98, ratio_high=ratio * 1.02, confidence=0.95, repetitions=40,
                             providers=["CPUExecutionProvider"], threads=1, verdict=verdict)


def stub_timing(monkeypatch, slow: set[str] | None, verdict: str = "faster", ratio: float = 0.8,
                versus: tuple[str, float] = ("no difference", 1.0)) -> list:
    """Kernel times where the ``slow`` layers (None: all) take 5x float in int8, the rest half; each
    whole-model comparison answers ``verdict``, the last one (the chosen model against the float
    model before quantize) ``versus``. Returns the list of the sets compared, that last one left out."""
    compared = []

    def fake_kernel_times(snapshots, feed, settings, **kwargs):
        graph = ir.from_proto(onnxopt.io.onnx.load_from_string(snapshots[1].data))
        names = [n.name for n in graph.graph if n.op_type in ("Conv", "Gemm", "GlobalAveragePool")]
        return [{n: 10.0 for n in names}, {n: 50.0 if slow is None or n in slow else 5.0 for n in names}]

    def fake_compare(a, b, feed, **kwargs):
        if not any(n.op_type == "QuantizeLinear" for n in ir.from_proto(onnxopt.io.onnx.load_from_string(a.data)).graph):
            return comparison(versus[1], versus[0])  # against the float model
        graph = ir.from_proto(onnxopt.io.onnx.load_from_string(b.data))
        compared.append({n.name for n in graph.graph if n.op_type == "Conv"
                         and (n.inputs[1].producer() is None or n.inputs[1].producer().op_type != "DequantizeLinear")})
        return comparison(ratio, verdict)

    monkeypatch.setattr(onnxopt.speed_fallback, "kernel_times", fake_kernel_times)
    monkeypatch.setattr(onnxopt.speed_fallback, "compare_latency", fake_compare)
    return compared


def onnxruntime_failure(message: str):
    """A stand-in that fails as onnxruntime does: its errors derive from Exception, not RuntimeError."""

    class Fail(Exception):
        pass

    def fail(*args, **kwargs):
        raise Fail(message)

    return fail


def test_a_layer_slower_in_int8_stays_float_when_the_model_is_then_faster(digits, monkeypatch):
    first = "/features/features.0/features.0.0/Conv"
    compared = stub_timing(monkeypatch, {first})
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    details = result.report.passes[-1].details
    assert details["speed"]["kept_float"] == [first] and details["speed"]["ratio"] == 0.8
    # every timed layer's [int8, float] microseconds, for the HTML report's plot
    assert set(details["speed"]["layers"]) == set(details["speed"]["timed"])
    assert details["speed"]["layers"][first] == [50.0, 10.0]
    assert compared == [{first}]  # the float Conv is the one left in the model timed
    assert details["left"][first] == "kept float for speed: int8 kernels 50 us, float 10 us"
    assert "6 of 7 Conv/Gemm/MatMul" in result.report.passes[-1].summary
    assert any("kept 1 layers float whose int8 kernels ran slower" in n and "0.80x" in n for n in result.report.notes)
    assert f"quantize: kept {first} float for speed: int8 kernels 50 us, float 10 us" in result.report.notes
    assert not any(n.startswith(f"quantize: {first} left") for n in result.report.notes)  # said once
    assert int8_layers(result.model) == DIGITS_LAYERS - {first}
    assert result.ok


def test_when_keeping_them_float_is_not_faster_every_layer_stays_int8(digits, monkeypatch):
    compared = stub_timing(monkeypatch, {"/features/features.0/features.0.0/Conv", "/head/head.2/Gemm"},
                           verdict="no difference", ratio=1.01)
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    details = result.report.passes[-1].details
    assert details["speed"]["kept_float"] == [] and len(compared) == 2  # both sets, then two misses end it
    assert not details["left"] and int8_layers(result.model) == DIGITS_LAYERS
    assert any("not faster with them float" in n for n in result.report.notes)


@pytest.mark.parametrize("verdict, ratio, noted", [("slower", 1.08, True), ("faster", 0.7, False),
                                                    ("no difference", 1.01, False)])
def test_the_chosen_model_is_timed_against_the_float_model_of_the_other_passes(digits, monkeypatch, verdict,
                                                                               ratio, noted):
    # A speed-up over the original can be simplify's alone (the zoo transformer: 0.79x the export,
    # 1.08x the simplified float model); the report says when quantization itself costs time.
    stub_timing(monkeypatch, {"/head/head.2/Gemm"}, versus=(verdict, ratio))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    versus = result.report.passes[-1].details["speed"]["vs_float"]
    assert versus["verdict"] == verdict and versus["ratio"] == ratio
    said = [n for n in result.report.notes if "the time of the float model the other passes made" in n]
    assert bool(said) == noted and (not said or f"{ratio:.2f}x" in said[0])
    assert result.ok  # information, not a failure


def test_when_int8_is_slower_than_the_original_one_note_says_so(digits, monkeypatch):
    # Slower than the original and than the float model of the other passes: the int8_slower note
    # alone (there is no speed-up to attribute).
    stub_timing(monkeypatch, {"/head/head.2/Gemm"}, versus=("slower", 1.18))
    monkeypatch.setattr(onnxopt.pipeline, "compare_latency", lambda *a, **k: comparison(1.19, "slower"))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=True, speed_fallback=True)
    notes = [n for n in result.report.notes if "x the float model's time" in n or "the other passes made" in n]
    assert len(notes) == 1 and "1.19x the float model's time" in notes[0], notes
    assert result.report.passes[-1].details["int8_slower"] == 1.19


def test_the_speed_fallback_never_leaves_so_much_float_that_the_run_fails(digits, monkeypatch):
    stub_timing(monkeypatch, None)  # every layer slower in int8
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    details = result.report.passes[-1].details
    assert details["speed"]["kept_float"] and details["float_mac_share"] <= onnxopt.quantization.MAX_FLOAT_SHARE
    assert len(details["speed"]["slower_in_int8"]) < DIGITS_CONVS + 2
    assert result.ok


def test_no_latency_means_no_speed_fallback_and_the_flag_needs_quantize(digits, capsys, monkeypatch):
    calls = stub_timing(monkeypatch, None)
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False)
    assert "speed" not in result.report.passes[-1].details and not calls
    for option in (["--no-speed-fallback"], ["--activations", "auto"], ["--per-tensor"], ["--calibrate", "entropy"],
                   ["--percentile", "99.9"]):
        code = main([str(digits / "digits_cnn.onnx"), *option])
        err = capsys.readouterr().err
        assert code == 2 and option[0] in err and "apply to --quantize int8" in err, err
    assert not (digits / "digits_cnn.opt.onnx").exists()


def test_mobilenet_measured_for_real_every_layer_timed_and_only_a_faster_model_kept():
    # No stubs: the zoo's depthwise CNN at batch 32. Which layers stay float depends on the CPU; that
    # every quantized layer is timed in both graphs, and that a change is kept only when faster, does not.
    zoo = ROOT / "models" / "zoo" / "mobilenet_dw.onnx"
    rng = np.random.default_rng(0)
    calibration = [{"input": rng.random((32, 3, 32, 32), dtype=np.float32)} for _ in range(4)]
    result = onnxopt.optimize(zoo, "simplify,fold-bn,quantize", calibration=calibration, data=calibration[:1],
                              validate=True, latency=True, latency_budget=1.0)
    details = result.report.passes[-1].details
    speed = details["speed"]
    weighted = {n.name for n in onnxopt.io.load_model(zoo).graph if n.op_type in ("Conv", "Gemm")}
    assert len(weighted) == 9 and weighted <= set(speed["timed"]) and speed["batch"] == 32
    if speed["kept_float"]:
        assert speed["ratio"] < 1 and all(details["left"][n].startswith("kept float for speed") for n in speed["kept_float"])
    assert all(t["verdict"] in ("faster", "no difference", "slower") or t["verdict"].startswith("not timed")
               for t in speed["tried"])
    assert result.ok


def test_where_shapes_are_unknown_the_cap_counts_layers():
    # A Reshape to a shape fed at run time: no MatMul after it has a known shape, so at most half the
    # 4 layers go float.
    weights = {f"w{i}": np.ones((8, 8), np.float32) for i in range(4)}
    model = build(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x, int64[2] shape) => (float[M, 8] y) {
            r = Reshape(x, shape)
            a = MatMul(r, w0)
            b = MatMul(a, w1)
            c = MatMul(b, w2)
            y = MatMul(c, w3)
        }
        """,
        weights,
    )
    layers = [node_label(n) for n in model.graph if n.op_type == "MatMul"]
    assert len(layers) == 4 and onnxopt.speed_fallback.float_mac_share(model, set()) is None
    step = onnxopt.speed_fallback.SpeedFallback("cpu", None, mac_dims={}, max_float_share=onnxopt.quantization.MAX_FLOAT_SHARE)
    chosen = step.slower_layers(model, layers, dict.fromkeys(layers, 10.0), dict.fromkeys(layers, 1.0))
    assert len(chosen) == 2


def test_the_cap_counts_macs_at_the_calibration_data_dims():
    # The zoo transformer at 16 tokens: its 17 MatMul/Gemm layers have known MACs; making every layer
    # float except the head (6% of the MACs) would leave 94% float, so the cap stops at half the MACs.
    model = onnxopt.optimize(ROOT / "models" / "zoo" / "transformer_encoder.onnx", "simplify", validate=False,
                             latency=False).model
    layers = [n.name for n in model.graph if n.op_type in ("MatMul", "Gemm")]
    share = onnxopt.speed_fallback.float_mac_share(model, set(), dims={"seq": 16})
    assert len(layers) == 17 and share == 1.0
    step = onnxopt.speed_fallback.SpeedFallback("cpu", None, mac_dims={"seq": 16},
                                                max_float_share=onnxopt.quantization.MAX_FLOAT_SHARE)
    chosen = step.slower_layers(model, layers, dict.fromkeys(layers, 10.0), dict.fromkeys(layers, 1.0))
    macs = onnxopt.stats.node_macs(model, dims={"seq": 16})
    left = sum(macs[n] for n in chosen) / sum(macs.values())
    assert chosen and left <= onnxopt.quantization.MAX_FLOAT_SHARE
    assert all(left + macs[n] / sum(macs.values()) > onnxopt.quantization.MAX_FLOAT_SHARE for n in set(layers) - set(chosen))


def test_a_profiler_that_fails_stops_the_speed_fallback_and_says_so(digits, monkeypatch):
    monkeypatch.setattr(onnxopt.speed_fallback, "kernel_times", onnxruntime_failure("profiling is not supported here"))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    assert "not supported" in result.report.passes[-1].details["speed"]["error"]
    assert any(n.startswith("quantize: speed fallback stopped: profiling is not supported") for n in result.report.notes)
    assert result.ok and int8_layers(result.model) == DIGITS_LAYERS


def test_on_another_execution_provider_the_speed_fallback_says_it_is_cpu_only(digits, monkeypatch):
    # CUDA's profiler times kernel launches, TensorRT one engine node: per-layer times are CPU only.
    from onnxopt.latency import TimingSettings

    calls = stub_timing(monkeypatch, None)
    monkeypatch.setattr(onnxopt.speed_fallback, "timing_settings",
                        lambda *a, **k: TimingSettings(("CUDAExecutionProvider",), 1, 1, "all", False))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    assert "CPU only" in result.report.passes[-1].details["speed"]["skipped"] and not calls
    assert any("speed fallback skipped" in n for n in result.report.notes)


def test_a_failure_while_trying_keeps_the_best_model_so_far(digits, monkeypatch):
    stub_timing(monkeypatch, {"/features/features.0/features.0.0/Conv"})

    monkeypatch.setattr(onnxopt.speed_fallback, "compare_latency", onnxruntime_failure("session creation failed"))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    speed = result.report.passes[-1].details["speed"]
    assert speed["error"] == "session creation failed" and speed["kept_float"] == []
    assert any("speed fallback stopped: session creation failed" in n for n in result.report.notes)
    assert result.ok and int8_layers(result.model) == DIGITS_LAYERS


def stub_formats(monkeypatch, verdict: str, ratio: float) -> list:
    """The uint8-against-int8 timing answers ``verdict``; no layer is slower in int8. Returns the
    activation dtypes of each pair compared."""
    compared = []

    def fake_compare(a, b, feed, **kwargs):
        dtypes = []
        for snapshot in (a, b):
            graph = ir.from_proto(onnxopt.io.onnx.load_from_string(snapshot.data))
            dtypes.append(next(n.outputs[0].dtype for n in graph.graph if n.op_type == "QuantizeLinear").name)
        compared.append(dtypes)
        return comparison(ratio, verdict)

    monkeypatch.setattr(onnxopt.speed_fallback, "compare_latency", fake_compare)
    monkeypatch.setattr(onnxopt.speed_fallback, "kernel_times", lambda snapshots, *a, **k: [{} for _ in snapshots])
    return compared


@pytest.mark.parametrize("verdict, chosen", [("faster", "int8"), ("slower", "uint8"), ("no difference", "uint8")])
def test_activations_auto_keeps_int8_only_when_measured_faster(digits, monkeypatch, verdict, chosen):
    compared = stub_formats(monkeypatch, verdict, {"faster": 0.8, "slower": 3.0, "no difference": 1.0}[verdict])
    result = onnxopt.optimize(digits / "digits_cnn.onnx", ["simplify", "fold-bn", QuantizeQDQ(activations="auto")],
                              calibration=digits / "digits_calib.npz", latency=False, speed_fallback=True)
    details = result.report.passes[-1].details
    assert compared == [["UINT8", "INT8"]]  # uint8 first, int8 second: the ratio is int8's time over uint8's
    assert details["activations_choice"]["chosen"] == chosen and details["activations"] == chosen
    q_types = {n.outputs[0].dtype.name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert q_types == {chosen.upper()}
    assert any(n.startswith(f"quantize: activations {chosen} (--activations auto") for n in result.report.notes)
    assert result.ok


def test_activations_auto_without_timing_or_on_tensorrt_is_not_measured(digits, monkeypatch):
    from onnxopt.latency import TimingSettings

    compared = stub_formats(monkeypatch, "faster", 0.5)
    plain = onnxopt.optimize(digits / "digits_cnn.onnx", ["simplify", "fold-bn", QuantizeQDQ(activations="auto")],
                             calibration=digits / "digits_calib.npz", latency=False)
    assert plain.report.passes[-1].details["activations_choice"]["chosen"] == "uint8" and not compared
    monkeypatch.setattr(onnxopt.speed_fallback, "timing_settings",
                        lambda *a, **k: TimingSettings(("TensorrtExecutionProvider",), 1, 1, "all", False))
    trt = onnxopt.optimize(digits / "digits_cnn.onnx", ["simplify", "fold-bn", QuantizeQDQ(activations="auto")],
                           calibration=digits / "digits_calib.npz", latency=False, speed_fallback=True)
    choice = trt.report.passes[-1].details["activations_choice"]
    assert choice["chosen"] == "int8" and "TensorRT" in choice["why"] and not compared
    with pytest.raises(ValueError, match="chosen by measurement"):
        model, p = quantized(cnn())
        QuantizeQDQ(p.ranges, activations="auto")(cnn())


def test_activations_auto_from_the_command_line_measured_for_real(digits, capsys):
    import json

    code = main([str(digits / "digits_cnn.onnx"), "--quantize", "int8", "--activations", "auto", "--calibration",
                 str(digits / "digits_calib.npz"), "--eval", str(digits / "digits_test.npz"), "-o", str(digits / "a.onnx"),
                 "--latency-budget", "1", "--report", str(digits / "a.json"), "-q"])
    assert code == 0, capsys.readouterr()
    details = next(p for p in json.loads((digits / "a.json").read_text())["passes"] if p["name"] == "quantize")["details"]
    choice = details["activations_choice"]
    assert choice["batch"] == 32 and choice["int8_vs_uint8"] > 0 and details["activations"] == choice["chosen"]


def test_unnamed_layers_are_profiled_under_their_labels():
    # Many exports leave node names empty; onnxruntime reports names, so the profiled copies carry labels.
    model = cnn()
    for node in model.graph:
        node.name = ""
    feed = [{"x": np.random.default_rng(i).standard_normal((4, 3, 16, 16)).astype(np.float32)} for i in range(2)]
    result = onnxopt.optimize(model, "quantize", calibration=feed, data=feed[:1], latency=True, latency_budget=0.5)
    speed = result.report.passes[-1].details["speed"]
    assert {"Conv(c1)", "Conv(c2)", "Conv(c3)", "Gemm(y)"} <= set(speed["timed"]), speed
    assert all(not node.name or node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in result.model.graph)


def test_a_set_whose_profiled_gain_is_below_the_threshold_is_not_timed(digits, monkeypatch):
    # The first conv's int8 kernels take 2.5 us more than float in a model of 7 ms: keeping it float
    # cannot make the model the 2% faster a timing must show, so no timing is spent on it (a miss),
    # and the float-model figure comes from the profiled runs themselves (no timing either).
    first = "/features/features.0/features.0.0/Conv"
    compared = []

    def fake_kernel_times(snapshots, feed, settings, totals=None, **kwargs):
        graph = ir.from_proto(onnxopt.io.onnx.load_from_string(snapshots[1].data))
        names = [n.name for n in graph.graph if n.op_type in ("Conv", "Gemm", "GlobalAveragePool")]
        if totals is not None:
            totals += [[1000.0] * 6, [700.0, 710.0, 690.0, 705.0, 695.0, 700.0]]
        return [{n: 10.0 if n == first else 1000.0 for n in names}, {n: 12.5 if n == first else 1000.0 for n in names}]

    monkeypatch.setattr(onnxopt.speed_fallback, "kernel_times", fake_kernel_times)
    monkeypatch.setattr(onnxopt.speed_fallback, "compare_latency", lambda *a, **k: compared.append(a) or comparison(0.5, "faster"))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    speed = result.report.passes[-1].details["speed"]
    assert speed["slower_in_int8"] == {first: [12.5, 10.0]} and not compared
    assert [t["verdict"] for t in speed["tried"]] == ["not timed: profiled gain below the threshold"]
    assert speed["tried"][0]["profiled_gain"] < onnxopt.speed_fallback.SPEED_MIN_GAIN
    assert speed["kept_float"] == [] and int8_layers(result.model) == DIGITS_LAYERS
    assert speed["vs_float"] == {"ratio": 0.7, "low": 0.69, "high": 0.71, "verdict": "faster", "profiled": True}
    assert any("by its kernels, not timed" in n for n in result.report.notes)
    assert result.ok


def test_calls_too_slow_for_a_verdict_in_the_budget_are_neither_profiled_nor_timed(digits, monkeypatch):
    """A call of 0.12 s (a 320x320 detector at batch 2): the 6 blocks of a verdict do not fit the
    speed fallback's budget, so every timing would stop undecided after a block, and profiling the
    layers would decide nothing: neither is spent, and the report says why."""
    spent = []
    monkeypatch.setattr(onnxopt.speed_fallback, "call_seconds", lambda *a, **k: 0.12)
    monkeypatch.setattr(onnxopt.speed_fallback, "kernel_times", lambda *a, **k: spent.append("profile") or [{}, {}])
    monkeypatch.setattr(onnxopt.speed_fallback, "compare_latency", lambda *a, **k: spent.append("time") or comparison(0.5, "faster"))
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                              latency=False, speed_fallback=True)
    speed = result.report.passes[-1].details["speed"]
    assert not spent and speed["kept_float"] == [] and "a call takes 0.12 s" in speed["skipped"]
    assert any(n.startswith("quantize: speed fallback skipped: a call takes 0.12 s") for n in result.report.notes)
    assert int8_layers(result.model) == DIGITS_LAYERS and result.ok
    # a call of a millisecond: profiled as before
    monkeypatch.setattr(onnxopt.speed_fallback, "call_seconds", lambda *a, **k: 0.001)
    onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,quantize", calibration=digits / "digits_calib.npz",
                     latency=False, speed_fallback=True)
    assert spent[:1] == ["profile"]


def test_pair_seconds_needed_is_what_measure_pair_takes_to_a_finite_interval(monkeypatch):
    """The prediction the speed fallback skips timings by: equal to the virtual time measure_pair
    spends on warm-up and 6 blocks, for slow and fast calls."""
    from test_latency import VirtualClock

    import onnxopt.latency as latency

    for cost in (0.12, 0.001):
        clock = VirtualClock()
        monkeypatch.setattr(latency, "time", clock)
        times, _ = latency.measure_pair(clock.model(cost), clock.model(cost), budget_seconds=1000, max_pairs=6)
        assert len(times) == 6
        assert latency.pair_seconds_needed(cost) == pytest.approx(clock.now, rel=0.25)


def test_the_profiled_ratio_pairs_the_interleaved_runs():
    figures = onnxopt.speed_fallback._profiled_ratio([100.0] * 6, [130.0, 125.0, 128.0, 131.0, 127.0, 129.0])
    assert figures["verdict"] == "slower" and figures["ratio"] == pytest.approx(1.285)
    few = onnxopt.speed_fallback._profiled_ratio([100.0] * 3, [50.0] * 3)  # too few runs for an interval
    assert few["verdict"] == "no difference" and few["high"] == math.inf


def test_kernel_times_gives_the_whole_run_times_of_the_profiled_runs():
    float_model = cnn()
    model, _ = quantized(float_model)
    snapshots = [ModelSnapshot(float_model), ModelSnapshot(model)]
    totals: list[list[float]] = []
    try:
        kernel_times(snapshots, {"x": np.ones((4, 3, 16, 16), np.float32)}, timing_settings("cpu", 1), seconds=0.1,
                     min_runs=5, max_runs=5, totals=totals)
    finally:
        for s in snapshots:
            s.close()
    assert len(totals) == 2 and all(len(t) >= 5 and all(d > 0 for d in t) for t in totals)


def test_a_run_that_misses_its_accuracy_budget_times_nothing():
    """It fails and writes nothing: the speed fallback and the latency comparison would only cost time
    (the PaddleOCR detector's failing default run: 43 -> 28 s, AMD EPYC)."""
    import onnxopt

    digits = Path(__file__).resolve().parents[1] / "models" / "digits"
    result = onnxopt.optimize(digits / "digits_cnn.onnx", "simplify,fold-bn,share-init,quantize",
                              calibration=digits / "digits_calib.npz", min_cosine=1.0, latency_budget=0.5)
    details = result.report.passes[-1].details
    assert not result.ok and details["budget"]["met"] is False
    assert "skipped" in details["speed"] and result.report.latency is None
    assert any("latency not compared" in n for n in result.report.notes)
