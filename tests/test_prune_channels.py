"""PruneChannels: lossless removal and where a zero channel's constant folds or keeps it; given
channels; importance (l1, l2, bn, activation; per group, global, round-to); the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphs import assert_equivalent, bn_params, build, random_feeds, run, snapshot
from onnxopt.cli import main
from onnxopt.passes import REGISTRY, PruneChannels
from onnxopt.passes._base import constant_array
from onnxopt.passes.channel_groups import find_channel_groups

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
RTOL = 1e-5
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def chain(pads: str, zero: list[int], consumer: str = "conv") -> ir.Model:
    """Conv(6) -> BN -> Relu -> consumer, with producer channels ``zero`` all zero (bias kept)."""
    w = randn(6, 3, 3, 3)
    w[zero] = 0
    bias = randn(6)
    bias[zero] = 0
    bn = bn_params("bn", 6, seed=1)
    bn["bn_bias"] = np.abs(bn["bn_bias"]) + 1  # the zero channels carry a positive constant through Relu
    bn["bn_mean"] = np.zeros(6, np.float32)
    tail = (
        f"y = Conv <pads={pads}> (r, W2, B2)" if consumer == "conv"
        else "p = GlobalAveragePool (r)\n f = Flatten (p)\n y = Gemm <transB=1> (f, FW, FB)"
    )
    out = "float[1,4,6,6] y" if consumer == "conv" and pads == "[1,1,1,1]" else (
        "float[1,4,4,4] y" if consumer == "conv" else "float[1,4] y")
    return build(
        f"""{OPSET}
        g (float[1,3,6,6] x) => ({out}) {{
            c = Conv <pads=[1,1,1,1]> (x, W, B)
            b = BatchNormalization (c, bn_scale, bn_bias, bn_mean, bn_var)
            r = Relu (b)
            {tail}
        }}""",
        {"W": w, "B": bias, **bn, "W2": randn(4, 6, 3, 3), "B2": randn(4), "FW": randn(4, 6), "FB": randn(4)},
    )


def prune(model: ir.Model, p: PruneChannels | None = None, *, rtol: float | None = RTOL) -> PruneChannels:
    feeds = random_feeds(model)
    before = snapshot(model)
    p = p or PruneChannels()
    p(model)
    if rtol is not None:
        assert_equivalent(before, model, feeds, rtol=rtol, atol=1e-6)
    return p


def test_registered_as_prune():
    assert REGISTRY["prune"] is PruneChannels


def test_constant_of_a_zero_channel_folds_into_an_unpadded_conv():
    model = chain("[0,0,0,0]", [1, 4])
    p = prune(model)
    assert p.details["removed"] == {0: [1, 4]} and p.details["kept_zero_channels"] == 0
    assert p.details["sizes"][0] == 6  # the group's channels before: the report plots kept = size - removed
    conv2 = list(model.graph)[-1]
    assert constant_array(conv2.inputs[1]).shape == (4, 4, 3, 3)


def test_kept_channels_say_which_positions_each_value_keeps():
    """Distillation slices the teacher's activations with these: per tracked value, its channel axis
    and the positions that survive, and the values consumers read by channel (the boundaries)."""
    model = chain("", [0, 2, 5], consumer="gemm")
    p = prune(model)
    for name in ("c", "b", "r", "p", "f"):
        assert p.kept_channels[name][0] == 1
        assert p.kept_channels[name][1].tolist() == [1, 3, 4]
    assert p.boundaries == ["f"]
    from onnxopt.passes.prune_channels import compose_kept

    again = compose_kept(p.kept_channels, {"r": (1, np.array([0, 2]))})
    assert again["r"][1].tolist() == [1, 4] and again["c"][1].tolist() == [1, 3, 4]


def test_constant_of_a_zero_channel_keeps_it_before_a_padded_conv():
    model = chain("[1,1,1,1]", [1, 4])
    p = prune(model)
    assert p.details["channels_removed"] == 0 and p.details["kept_zero_channels"] == 2


def test_constant_folds_through_flatten_into_gemm():
    model = chain("", [0, 2, 5], consumer="gemm")
    p = prune(model)
    assert p.details["removed"] == {0: [0, 2, 5]}


def test_shared_weight_is_copied_not_mutated():
    w = randn(4, 3, 1, 1)
    w[2] = 0
    model = build(
        f"""{OPSET}
        g (float[1,3,4,4] x) => (float[1,2,4,4] y, float[1,4,4,4] z) {{
            a = Conv (x, W)
            y = Conv (a, W2)
            z = Conv (x, W)
        }}""",
        {"W": w, "W2": randn(2, 4, 1, 1)},
    )
    p = prune(model)
    assert p.details["channels_removed"] == 1
    assert constant_array(list(model.graph)[2].inputs[1]).shape == (4, 3, 1, 1)


def residual() -> ir.Model:
    return build(
        f"""{OPSET}
        g (float[1,3,6,6] x) => (float[1,5] y) {{
            a = Conv <pads=[1,1,1,1]> (x, W1, B1)
            r = Relu (a)
            c = Conv <pads=[1,1,1,1]> (r, W2, B2)
            d = Relu (c)
            e = Conv (d, W3, B3)
            s = Add (d, e)
            p = GlobalAveragePool (s)
            f = Flatten (p)
            y = Gemm <transB=1> (f, FW, FB)
        }}""",
        {"W1": randn(8, 3, 3, 3), "B1": randn(8), "W2": randn(16, 8, 3, 3), "B2": randn(16), "W3": randn(16, 16, 1, 1),
         "B3": randn(16), "FW": randn(5, 16), "FB": randn(5)},
    )


def l1_scores(model: ir.Model, group) -> np.ndarray:
    """Torch-Pruning's group L1: per member, sum |w| over the channel's slice; averaged over members."""
    total = np.zeros(group.size)
    for m in group.members:
        if m.index != 1 or m.role not in ("out", "in"):
            continue
        w = np.abs(constant_array(m.node.inputs[m.index])).astype(np.float64)
        total += np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1).sum(axis=1)
    return total


def test_l1_per_group_removes_the_lowest_scores_and_protects_the_first_layer():
    model = residual()
    groups = find_channel_groups(model)
    first = next(g for g in groups if g.first)
    coupled = next(g for g in groups if g.size == 16 and g.prunable)
    expected = np.sort(np.argsort(l1_scores(model, coupled))[:8])
    p = prune(model, PruneChannels(ratio=0.5, importance="l1"), rtol=None)
    assert p.details["removed"] == {coupled.id: expected.tolist()}
    assert first.id not in p.details["removed"]
    out = run(model, random_feeds(model))[0]
    assert out.shape == (1, 5) and np.isfinite(out).all()


def test_round_to_and_first_layer_unprotected():
    model = residual()
    p = prune(model, PruneChannels(ratio=0.3, importance="l2", round_to=4, protect_first=False), rtol=None)
    sizes = {g.id: g.size for g in find_channel_groups(residual())}
    for gid, channels in p.details["removed"].items():
        assert (sizes[gid] - len(channels)) % 4 == 0
    assert len(p.details["removed"]) == 2


def test_global_scope_prunes_the_requested_fraction_overall():
    model = residual()
    p = prune(model, PruneChannels(ratio=0.5, importance="l1", scope="global", protect_first=False), rtol=None)
    assert p.details["channels_removed"] == 12  # half of 8 + 16, groups may lose unequal shares


def test_given_channels_and_an_unprunable_group():
    model = residual()
    groups = find_channel_groups(model)
    head = next(g for g in groups if not g.prunable)
    coupled = next(g for g in groups if g.size == 16)
    p = prune(model, PruneChannels({coupled.id: [0, 3], head.id: [1]}), rtol=None)
    assert p.details["removed"] == {coupled.id: [0, 3]}
    assert f"group {head.id}" in p.details["left"]


def test_bn_importance_uses_batchnorm_scale():
    model = chain("[0,0,0,0]", [])
    scale = constant_array(next(n for n in model.graph if n.op_type == "BatchNormalization").inputs[1])
    p = prune(model, PruneChannels(ratio=0.5, importance="bn", protect_first=False), rtol=None)
    assert p.details["removed"] == {0: sorted(np.argsort(np.abs(scale))[:3].tolist())}


def test_activation_importance_needs_statistics():
    with pytest.raises(ValueError, match="activation"):
        PruneChannels(ratio=0.5, importance="activation")


@pytest.mark.parametrize("importance", ["activation", "apoz"])
def test_command_line_prune_activation_with_calibration(tmp_path, importance):
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code = main([
        str(DIGITS / "digits_cnn.onnx"), "-o", str(out), "--prune", "0.25", "--importance", importance,
        "--calibration", str(DIGITS / "digits_calib.npz"), "--eval", str(DIGITS / "digits_test.npz"),
        "--no-latency", "--report", str(report), "-q",
    ])
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["after"]["params"] < data["before"]["params"] and data["after"]["macs"] < data["before"]["macs"]
    assert data["validation"]["accuracy_after"] is not None


def test_command_line_lossless_prune_in_the_pass_list(tmp_path):
    out = tmp_path / "p.onnx"
    code = main([str(DIGITS / "digits_cnn.onnx"), "-o", str(out), "--passes", "simplify,fold-bn,prune,share-init",
                 "--data", str(DIGITS / "digits_test.npz"), "--no-latency", "-q"])
    assert code == 0


def test_channels_zeroed_in_torch_leave_losslessly(tmp_path):
    """torch.nn.utils.prune zeroes 30% of each block's first conv (and its BN); the export is pruned
    by the default lossless ``prune``: those channels leave, outputs stay within tolerance."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune as torch_prune

    from models.digits.train import DigitsCNN
    from models.zoo import export_module

    torch.manual_seed(0)
    net = DigitsCNN().eval()
    zeroed = 0
    for block in (net.features[1], net.features[2]):
        conv, bn = block.body[0][0], block.body[0][1]
        torch_prune.ln_structured(conv, "weight", amount=0.3, n=1, dim=0)
        mask = conv.weight_mask[:, 0, 0, 0]
        with torch.no_grad():  # network slimming zeroes the channel's BN too
            bn.weight.mul_(mask)
            bn.bias.mul_(mask)
        torch_prune.remove(conv, "weight")
        zeroed += int((mask == 0).sum())
    source = tmp_path / "pruned.onnx"
    source.write_bytes(export_module(net, torch.zeros(1, 1, 8, 8)))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main([str(source), "-o", str(out), "--passes", "simplify,fold-bn,prune,share-init",
                 "--data", str(DIGITS / "digits_test.npz"), "--no-latency", "--report", str(report), "-q"])
    data = json.loads(report.read_text())
    assert code == 0 and data["ok"]
    prune_record = next(p for p in data["passes"] if p["name"] == "prune")
    assert prune_record["details"]["channels_removed"] == zeroed == 5 + 10


def test_a_depthwise_conv_loses_its_group_with_its_channels():
    """Pointwise(8) -> depthwise(group 8) -> pointwise: zeroing 3 of the first conv's channels
    removes them from the depthwise conv too, whose ``group`` must shrink to the 5 left."""
    w1 = randn(8, 3, 1, 1)
    w1[[1, 4, 6]] = 0
    model = build(
        f"""{OPSET}
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
            a = Conv (x, W1)
            r = Relu (a)
            d = Conv <group=8, pads=[1,1,1,1]> (r, DW, DB)
            s = Relu (d)
            y = Conv (s, W3, B3)
        }}""",
        {"W1": w1, "DW": randn(8, 1, 3, 3), "DB": np.zeros(8, np.float32), "W3": randn(4, 8, 1, 1), "B3": randn(4)},
    )
    p = prune(model)
    depthwise = next(n for n in model.graph if n.op_type == "Conv" and n.attributes.get("group") is not None
                     and n.attributes["group"].value > 1)
    assert depthwise.attributes["group"].value == 5
    assert constant_array(depthwise.inputs[1]).shape == (5, 1, 3, 3)
    assert p.details["channels_removed"] == 3
