"""Cluster-aware distillation (onnxopt.cluster_training): clustered weights train as latents snapped to centroids.

Before training the student computes what onnxruntime computes from the codes; training changes the
codes and codebooks, never the graph (same nodes, initializer names, shapes, dtypes); a sparse
weight's zeros stay zeros; on the digits CNN at 1 bit it beats training the codebook alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from graphs import run  # noqa: E402
from onnxopt.distill import distill  # noqa: E402
from onnxopt.passes import ClusterWeights, FoldBatchNorm, Simplify, SparsifyWeights  # noqa: E402
from onnxopt.student import build_student, check_matches, student_outputs  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digits(*passes) -> ir.Model:
    model = ir.load(DIGITS / "digits_cnn.onnx")
    Simplify()(model)
    FoldBatchNorm()(model)
    for p in passes:
        p(model)
    return model


def _inputs(name: str) -> np.ndarray:
    return np.load(DIGITS / name)["input"]


def _structure(model: ir.Model) -> tuple:
    nodes = [(n.op_type, n.name, tuple(v.name if v is not None else "" for v in n.inputs), tuple(v.name for v in n.outputs),
              tuple(sorted(n.attributes))) for n in model.graph]
    inits = {name: (v.const_value.dtype, tuple(v.const_value.shape)) for name, v in model.graph.initializers.items()}
    return nodes, inits


def _codes(model: ir.Model) -> dict[str, bytes]:
    return {name: v.const_value.tobytes() for name, v in model.graph.initializers.items() if name.endswith(("_codes", "_codes_packed"))}


def _decoded(model: ir.Model) -> dict[str, np.ndarray]:
    """Each clustered weight's decoded value (a fresh student's latent starts there)."""
    student = build_student(model, cluster_aware=True)
    return {cw.codebook: student.params[cw.latent_key].detach().numpy().copy() for cw in student.clustered}


CASES = {
    "binary per channel (packed 8 a byte)": lambda: [ClusterWeights(bits=1)],
    "ternary": lambda: [ClusterWeights(bits=2)],
    "4 bits per tensor (packed 2 a byte)": lambda: [ClusterWeights(bits=4)],
    "5 bits per channel (a byte a code)": lambda: [ClusterWeights(bits=5, per_channel=True)],
    "sparse 0.7 then 4 bits (a zero centroid)": lambda: [SparsifyWeights(0.7), ClusterWeights(bits=4)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_clustered_weight_is_recognized_and_the_ste_forward_equals_onnxruntime(case):
    passes = CASES[case]()
    model = _digits(*passes)
    student = build_student(model, cluster_aware=True)
    assert len(student.clustered) == len(passes[-1].details["layers"]) >= 6
    assert not any(n.op_type == "BitShift" for *_, n in student._program), "decoders leave the program"
    check_matches(student, model, {"input": _inputs("digits_test.npz")[:128]})


def test_training_changes_codes_and_codebooks_not_the_graph():
    model = _digits(ClusterWeights(bits=1))
    structure, codes = _structure(model), _codes(model)
    books = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items() if n.endswith("_codebook")}
    student = build_student(model, cluster_aware=True)
    with torch.no_grad():  # a latent that changes sign moves its code
        for cw in student.clustered:
            student.params[cw.latent_key].neg_()
    x = {"input": _inputs("digits_test.npz")[:64]}
    expected = student_outputs(student, x)["output"]
    from onnxopt.student import write_back

    write_back(model, student)
    assert _structure(model) == structure
    after = _codes(model)
    assert all(after[name] != codes[name] for name in codes)
    np.testing.assert_allclose(run(model, x)[0], expected, rtol=1e-5, atol=1e-5)
    for name, book in books.items():  # XNOR: alpha of the negated latents is the same: codebook equal
        np.testing.assert_allclose(model.graph.initializers[name].const_value.numpy(), book, rtol=1e-6)


def test_distilled_codes_decode_to_what_the_student_computed_and_sparse_zeros_hold():
    teacher = ir.load(DIGITS / "digits_cnn.onnx")
    model = _digits(SparsifyWeights(0.7), ClusterWeights(bits=4))
    structure, codes, before = _structure(model), _codes(model), _decoded(model)
    held_out = _inputs("digits_test.npz")[:270]
    distill(model, teacher, {"input": _inputs("digits_calib.npz")}, steps=60, lr=3e-3, eval=[{"input": held_out}],
            eval_every=20, patience=100, cosine=False)
    assert _structure(model) == structure
    assert _codes(model) != codes
    after = _decoded(model)
    for name, weight in before.items():
        assert np.array_equal(weight == 0, after[name] == 0), f"{name}: the sparse mask moved"
    moved = sum(int((before[n] != after[n]).sum()) for n in before)
    assert moved > 0
    check_matches(build_student(model, cluster_aware=True), model, {"input": held_out[:64]})


def _agreement(teacher: ir.Model, student: ir.Model, x: np.ndarray) -> float:
    (t,), (s,) = run(teacher, {"input": x}), run(student, {"input": x})
    return float((t.argmax(1) == s.argmax(1)).mean())


def test_cluster_aware_training_beats_the_codebook_alone_on_binary_digits():
    """Same seed, data, steps and learning rate; the codes are what binary weights need to move.
    Measured (held-out agreement, 300 steps, seeds 0 / 1 / 2): 88.3 / 89.1 / 88.9% codebook alone,
    94.1 / 93.5 / 95.6% cluster-aware: a margin of 4.4 points at least; 3 asked."""
    from models.digits.train import load_splits

    teacher = ir.load(DIGITS / "digits_cnn.onnx")
    x, y = load_splits()["train"]
    held_out = _inputs("digits_test.npz")
    agreement = {}
    for aware in (False, True):
        model = _digits(ClusterWeights(bits=1))
        distill(model, teacher, {"input": x}, labels=y, steps=300, lr=3e-3, seed=0, cluster_aware=aware)
        agreement[aware] = _agreement(teacher, model, held_out)
    assert agreement[True] >= agreement[False] + 0.03, agreement


def test_one_or_two_bit_clusters_distil_longer_unless_the_run_says():
    from onnxopt.pipeline import LOW_BIT_EPOCHS, LOW_BIT_LR, _low_bit_defaults

    notes = []
    assert _low_bit_defaults([ClusterWeights(bits=1)], None, None, 1e-3, notes) == (LOW_BIT_EPOCHS, LOW_BIT_LR)
    assert notes and "1-bit" in notes[0]
    assert _low_bit_defaults([ClusterWeights(bits=4)], None, None, 1e-3, []) == (None, 1e-3)
    assert _low_bit_defaults([ClusterWeights(bits=2)], 5, None, 1e-2, []) == (5, 1e-2)
    assert _low_bit_defaults([ClusterWeights(bits=2)], None, 100, 1e-3, []) == (None, LOW_BIT_LR)
    assert _low_bit_defaults([ClusterWeights(bits=1)], None, None, 1e-2, []) == (LOW_BIT_EPOCHS, 1e-2)


def test_low_bit_defaults_read_what_the_cluster_pass_did_after_the_budget():
    """The budget's fallback may undo every 1-bit layer: then the 60-epoch default does not apply."""
    from onnxopt.pipeline import LOW_BIT_EPOCHS, _low_bit_defaults

    model = ir.load(DIGITS / "digits_cnn.onnx")
    ran = ClusterWeights(bits=1)
    ran(model.clone())
    assert _low_bit_defaults([ran], None, None, 1e-3, [])[0] == LOW_BIT_EPOCHS
    undone = ran.excluding(ran.units)
    undone(model.clone())
    assert undone.details["layers"] == {} and _low_bit_defaults([undone], None, None, 1e-3, []) == (None, 1e-3)
