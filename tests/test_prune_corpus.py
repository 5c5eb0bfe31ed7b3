"""Lossless channel removal over the corpus: zero a random 30% of the channels of every prunable
group (every producer's weights and bias), then ``prune`` must remove them without moving any output
beyond the tolerance; onnx.checker and onnxruntime accept every result. Run after ``fold-bn`` (the
zeroed channels then carry no constant: every one leaves, with exactly its parameters) and before it
(BatchNormalization present: its shift is a constant that is folded into the next layer's bias where
that is exact, and the channel is kept where it is not). ShuffleNet's channel shuffle is refused.

VGG-19 is left out: loading it with random weights takes ~15 s and its plain chain adds nothing that
the others do not test.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs import random_feeds, run, snapshot
from models.light import load_light
from onnxopt.passes import FoldBatchNorm, PruneChannels, Simplify
from onnxopt.passes._base import constant_array
from onnxopt.passes.channel_groups import find_channel_groups
from onnxopt.pipeline import check_model
from onnxopt.stats import model_stats

# Removing channels and folding constants re-associates float32 sums: a few ulps of the output range.
RTOL, ATOL = 1e-5, 1e-6
ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "models" / "zoo").glob("*.onnx")) + [ROOT / "models" / "digits" / "digits_cnn.onnx"]
LIGHT = ["resnet50", "densenet121", "inception_v1", "inception_v2", "squeezenet"]
# Models whose zeroed channels all leave once BatchNormalization is folded (no constant left to keep them).
ALL_LEAVE_AFTER_FOLD = {"resnet_bn", "concat_net", "mobilenet_dw", "mlp_bn", "digits_cnn", "transformer_encoder",
                        "decoder_convtranspose_bn", "resnet50", "inception_v1", "squeezenet"}


@lru_cache(maxsize=None)
def _proto(name: str) -> bytes:
    path = next((p for p in ZOO if p.stem == name), None)
    return (onnx.load(str(path)) if path else load_light(name)).SerializeToString()


def _model(name: str, fold: bool) -> ir.Model:
    model = ir.from_proto(onnx.load_from_string(_proto(name)))
    Simplify()(model)
    if fold:
        FoldBatchNorm()(model)
    return model


def zero_channels(model: ir.Model, fraction: float = 0.3, seed: int = 0) -> dict[int, np.ndarray]:
    """Zero ``fraction`` of each prunable group's channels in every producer's weight and bias."""
    rng = np.random.default_rng(seed)
    zeroed = {}
    for g in find_channel_groups(model):
        if not g.prunable or g.size < 2:
            continue
        channels = np.sort(rng.choice(g.size, max(1, round(fraction * g.size)), replace=False))
        zeroed[g.id] = channels
        for m in g.producers:
            value = m.node.inputs[m.index]
            array = constant_array(value).copy()
            index = [slice(None)] * array.ndim
            index[m.axis] = m.positions(channels)
            array[tuple(index)] = 0
            value.const_value = ir.tensor(array, name=value.name)
    return zeroed


def expected_params(model: ir.Model, removed: dict[int, list[int]]) -> int:
    """Parameters that the removed channels own: in every member tensor, the elements on a removed
    position of any sliced axis (computed from the groups before the pass). A tensor that n members
    share (simplify merges equal BatchNormalization shifts) is freed once and written n times sliced."""
    cut: dict[tuple[int, int], tuple[np.ndarray, dict[int, set[int]]]] = {}
    readers: dict[int, tuple[int, int]] = {}  # id of a shared value -> (members that read it, its size)
    for g in find_channel_groups(model):
        for m in g.members if g.id in removed else ():
            if m.index is None or m.role == "reshape":
                continue
            array = constant_array(m.node.inputs[m.index])
            if (id(m.node), m.index) not in cut:
                n, _ = readers.get(id(m.node.inputs[m.index]), (0, 0))
                readers[id(m.node.inputs[m.index])] = (n + 1, array.size)
            entry = cut.setdefault((id(m.node), m.index), (array, {}))
            entry[1].setdefault(m.axis, set()).update(m.positions(removed[g.id]).tolist())
    total = 0
    for array, axes in cut.values():
        kept = [n - len(axes.get(axis, ())) for axis, n in enumerate(array.shape)]
        total += array.size - int(np.prod(kept))
    return total - sum((n - 1) * size for n, size in readers.values())


def _feeds(model: ir.Model) -> dict[str, np.ndarray]:
    feeds = random_feeds(model, {"batch": 2, "seq": 16})
    for value in model.graph.inputs:
        if value.dtype.numpy().kind in "iu":
            shape = feeds[value.name].shape
            feeds[value.name] = np.random.default_rng(0).integers(0, 10, shape).astype(value.dtype.numpy())
    return feeds


@pytest.mark.parametrize("fold", [True, False], ids=["after-fold-bn", "with-bn"])
@pytest.mark.parametrize("name", [p.stem for p in ZOO] + LIGHT)
def test_lossless_removal(name: str, fold: bool):
    model = _model(name, fold)
    zeroed = zero_channels(model)
    assert zeroed, "every corpus model has a prunable group"
    feeds = _feeds(model)
    before = snapshot(model)
    reference = run(before, feeds)
    params_before = model_stats(model).params
    p = PruneChannels()
    p(model)
    check_model(model)
    outputs = run(model, feeds)
    for ref, out in zip(reference, outputs):
        assert ref.shape == out.shape
        err = float(np.abs(ref - out).max())
        assert err <= ATOL + RTOL * float(np.abs(ref).max()), f"{name}: max error {err:.3g}"
    removed = p.details["removed"]
    # Only zeroed channels leave; the parameters that leave are exactly theirs.
    for gid, channels in removed.items():
        assert set(channels) <= set(zeroed[gid].tolist())
    assert params_before - model_stats(model).params == p.details["params_removed"]
    reference_model = _model(name, fold)
    zero_channels(reference_model)
    # (net of the biases created to hold folded constants, with BatchNormalization present)
    assert p.details["params_removed"] + p.details["bias_params_added"] == expected_params(reference_model, removed)
    if fold and name in ALL_LEAVE_AFTER_FOLD:
        assert p.details["channels_removed"] == sum(len(c) for c in zeroed.values()) - sum(
            1 for gid, c in zeroed.items() if len(c) == model_group_size(reference_model, gid))
        assert p.details["kept_zero_channels"] == 0


def model_group_size(model: ir.Model, gid: int) -> int:
    return find_channel_groups(model)[gid].size


def test_shufflenet_shuffle_is_refused_not_broken():
    model = _model("shufflenet", True)
    groups = find_channel_groups(model)
    assert not any(g.prunable for g in groups)
    assert any("mixes channels" in g.reason for g in groups)
    feeds = _feeds(model)
    before = snapshot(model)
    result = PruneChannels()(model)
    assert not result.modified
    check_model(model)
    np.testing.assert_array_equal(run(before, feeds)[0], run(model, feeds)[0])


def test_lossless_removal_vgg19():
    """VGG-19 (575 MB of weights, no BatchNormalization): one run, after fold-bn, which is a no-op."""
    test_lossless_removal("vgg19", True)
