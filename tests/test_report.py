"""The terminal view of a report: it fits 100 columns, counts agree with their nouns, and a lossy
run's outputs read as changed, not failed."""

from __future__ import annotations

from onnxopt.report import (
    TABLE_WIDTH,
    ModelStats,
    OutputComparison,
    PassRecord,
    Report,
    Validation,
    render_table,
)


def _report(*, lossy: bool, samples: int, summary: str, note: str) -> Report:
    stats = ModelStats(nodes=10, params=1000, bytes=4000, macs=5000, op_counts={})
    output = OutputComparison("logits", max_abs=3.0, max_rel=0.5, cosine=0.4, top1_agreement=0.2, ok=False)
    validation = Validation(
        ok=False, providers=["CPUExecutionProvider"], samples=samples, batches=1, rtol=None, atol=1e-6,
        data="inputs.npz", synthetic=True, outputs=[output],
    )
    return Report(
        model="a/very/long/path/" * 6 + "model.onnx", output="out.onnx", before=stats, after=stats,
        passes=[PassRecord("prune", True, 0.1, summary, after=stats)], validation=validation,
        notes=[note], lossy=lossy,
    )


def test_long_summaries_and_notes_wrap_within_the_width():
    summary = "removed 40 of 96 prunable channels in 3 of 4 prunable groups (l1 importance, ratio 0.5); " * 3
    note = "prune: group 4 left: reaches the graph output 'output' and " * 4
    text = render_table(_report(lossy=True, samples=3, summary=summary, note=note))
    body = text.splitlines()[1:]  # the first line names the model's path, which is not cut
    assert max(len(line) for line in body) <= TABLE_WIDTH
    # nothing is lost by wrapping: every word of the summary and the note is still there
    words = " ".join(body).split()
    assert all(w in words for w in summary.split())
    assert all(w in words for w in note.split())


def test_a_lossy_run_shows_changed_outputs_and_a_header_over_every_column():
    text = render_table(_report(lossy=True, samples=1, summary="s", note="n"))
    row = next(line for line in text.splitlines() if line.strip().startswith("logits"))
    assert row.split()[-1] == "changed"
    header = next(line for line in text.splitlines() if line.strip().startswith("output"))
    assert header.split()[-1] == "status"
    assert "1 synthetic sample;" in text


def test_a_lossless_run_that_fails_says_fail():
    text = render_table(_report(lossy=False, samples=2, summary="s", note="n"))
    row = next(line for line in text.splitlines() if line.strip().startswith("logits"))
    assert row.split()[-1] == "FAIL"
    assert "2 synthetic samples;" in text


def test_help_names_the_bench_subcommand(capsys):
    from onnxopt.cli import main

    assert main(["--help"]) == 0
    assert "onnxopt bench" in capsys.readouterr().out
