"""The record of a run (per-pass records, figures before and after, validation, latency) and its rendering.

Everything that formats a figure for a person or for JSON lives here.
"""

from __future__ import annotations

__all__ = [
    "ModelStats",
    "PassRecord",
    "OutputComparison",
    "Validation",
    "LatencyComparison",
    "Report",
    "render_table",
    "to_json",
    "write_json",
    "write_json_file",
    "stage_json_file",
    "json_safe",
    "render_bench",
]

import dataclasses
import json
import math
import os
import textwrap
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from onnxopt.errors import OutputPathError

if TYPE_CHECKING:
    from onnxopt.bench import BenchResult


@dataclass
class ModelStats:
    """Figures of one model: node count (subgraphs included), weight elements and bytes, MACs, ops."""

    nodes: int
    params: int
    bytes: int
    macs: int | None
    op_counts: dict[str, int]


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    summary: str
    after: ModelStats | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputComparison:
    """How one output of the candidate differs from the reference, over all batches.

    ``max_rel`` is ``max_abs`` divided by the largest magnitude in the reference output, so
    that values near zero do not blow it up. ``cosine`` is the worst cosine over samples (each index
    of the first axis; one over everything for outputs of rank 0 or 1), ``cosine_mean`` their mean:
    a lossy budget judges the worst. ``judged`` False: reported, not judged (``--outputs``).
    ``masked``: values left out as padding (an attention mask).
    """

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    ok: bool
    rtol: float | None = None  # the relative tolerance this output was judged by
    runtime_floor: float | None = None  # max difference onnxruntime's own optimizations make on the original
    cosine_mean: float | None = None  # mean over samples (None: not computed, e.g. an old report)
    cosine_worst: float | None = None  # least over samples: the same as ``cosine``
    samples: int | None = None  # samples the per-sample cosines are over
    masked: int = 0
    judged: bool = True
    worst_samples: list[int] = field(default_factory=list)  # samples (0-based, in data order) of least cosine, worst first


@dataclass
class Validation:
    ok: bool
    providers: list[str]
    samples: int
    batches: int
    rtol: float | None  # None: the default for each output's dtype
    atol: float
    data: str
    synthetic: bool
    outputs: list[OutputComparison]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    criterion: str | None = None  # a lossy pass's verdict rule, shown instead of the lossless tolerance


@dataclass
class LatencyComparison:
    """Side-by-side latency, A the original and B the optimized; ratio = B / A (below 1 is faster)."""

    median_a_ms: float
    median_b_ms: float
    p90_a_ms: float
    p90_b_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float
    confidence: float
    repetitions: int
    providers: list[str]
    threads: int | None
    verdict: str
    machine: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    model: str
    output: str | None
    before: ModelStats
    after: ModelStats
    passes: list[PassRecord] = field(default_factory=list)
    validation: Validation | None = None
    latency: LatencyComparison | None = None
    notes: list[str] = field(default_factory=list)
    lossy: bool = False  # a pass changes outputs by request (importance pruning): validation reports, never fails
    # bytes before and after: {"before": {...}, "after": {...}} of onnxopt.compressed_size.run_sizes
    sizes: dict[str, Any] | None = None
    # a preset's search (onnxopt.presets): the settings tried, the chosen one stage by stage
    search: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        if self.lossy and self.validation is not None:
            return self.validation.error is None
        return self.validation is None or self.validation.ok

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self)) | {"ok": self.ok}


def failure_reason(report: Report) -> str:
    """Why ``report`` is not ok, in a line: the validation's error, a pass's FAILED note, or the
    outputs outside the tolerance."""
    v = report.validation
    if v is not None and v.error:
        return v.error
    failed = next((n for n in report.notes if "FAILED" in n), None)
    if failed:
        return failed
    if v is not None:
        outside = [o.name for o in v.outputs if not o.ok and o.judged]
        if outside:
            return f"output(s) {', '.join(outside)} outside {v.criterion or 'the tolerance'}"
        if v.criterion:
            return v.criterion
    return "validation failed"


def json_safe(obj):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)


def write_json(report: Report, path: str | os.PathLike) -> None:
    """Write the JSON report atomically."""
    write_json_file(report.to_dict(), path)


def write_json_file(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as JSON through a temporary file, so that no half-written file is left."""
    os.replace(stage_json_file(data, path), path)


def stage_json_file(data: dict, path: str | os.PathLike) -> str:
    """``data`` as JSON in a new temporary file of a unique name beside ``path`` (concurrent runs and
    an existing ``<path>.tmp`` are safe); the caller commits it with ``os.replace`` or removes it."""
    from onnxopt.io import stage_text

    return stage_text(json.dumps(json_safe(data), indent=2) + "\n", path, "--report")


def _human(n: float | int | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def _change(before, after) -> str:
    if before is None or after is None:
        return "-"
    if before == after:
        return "="
    if before == 0:
        return "new"
    return f"{(after - before) / before * 100:+.1f}%"


TABLE_WIDTH = 100  # the terminal view fits this many columns; a long last text column wraps


def _wrap_last(rows: list[list[str]], header: list[str], width: int) -> list[list[str]]:
    """Rows whose last column would pass ``width`` continue on rows of their own, under that column."""
    lead = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    room = max(width - sum(lead) - 2 * len(lead), 30)
    wrapped = []
    for row in rows:
        pieces = textwrap.wrap(str(row[-1]), room) or [""]
        wrapped.append([*row[:-1], pieces[0]])
        wrapped += [[""] * (len(row) - 1) + [piece] for piece in pieces[1:]]
    return wrapped


def _table(rows: list[list[str]], header: list[str], *, rule: bool = True, text_columns=(0,)) -> list[str]:
    """Columns padded to width: text columns left-aligned, figures right-aligned; a rule under the header.
    A last column of text wraps so that the table fits ``TABLE_WIDTH``."""
    if rows and len(header) - 1 in text_columns:
        rows = _wrap_last(rows, header, TABLE_WIDTH)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(  # noqa: E731
        str(c).ljust(w) if i in text_columns else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    ).rstrip()
    return [fmt(header), *(["  ".join("-" * w for w in widths)] if rule else []), *[fmt(r) for r in rows]]


def _grid(rows: list[list[str]], header: list[str]) -> list[str]:
    return _table(rows, header, rule=False)


def _wrapped(text: str, indent: str = "  ") -> list[str]:
    """A line of prose cut to ``TABLE_WIDTH`` columns, its continuations indented."""
    return textwrap.wrap(text, TABLE_WIDTH, subsequent_indent=indent, break_on_hyphens=False) or [""]


def plural(n: int, noun: str) -> str:
    """``1 sample``, ``2 samples``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _rtols(v: Validation) -> str:
    used = sorted({o.rtol for o in v.outputs if o.rtol is not None} or ({v.rtol} if v.rtol is not None else set()))
    return "/".join(f"{r:g}" for r in used) or "default"


def _cosine_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _search_lines(search: dict | None) -> list[str]:
    """A preset's trials (settings, Deep Compression bytes, accuracy, verdict) and the chosen one's stages."""
    if not search:
        return []

    def pct(x):
        return "-" if x is None else f"{x * 100:.2f}%"

    rows = [[", ".join(f"{k} {v:g}" for k, v in t["settings"].items()), _human(t["deep_compression_bytes"], "B"),
             _human(t["weight_gzip9"], "B"), pct(t["accuracy_after"]),
             {True: "meets", False: "misses", None: "not run"}[t["met"]]] for t in search.get("trials", [])]
    lines = ["", f"{search.get('preset', 'preset')}: settings by size (budget {search.get('max_drop', 0):g} points)"]
    lines += _table(rows, ["setting", "Deep Comp.", "weights gz", "accuracy", "budget"])
    stages = search.get("stages") or []
    if stages:
        lines += ["", "chosen, stage by stage:"]
        lines += _table([[s["stage"], _human(s.get("deep_compression_bytes"), "B"), _human(s.get("weight_gzip9"), "B"),
                          pct(s.get("accuracy"))] for s in stages], ["stage", "Deep Comp.", "weights gz", "accuracy"])
    return lines


def _sizes_line(sizes: dict | None) -> str | None:
    """``size: file X -> Y, gzip -9 X -> Y, weights gzip -9 X -> Y, Deep Compression X -> Y``."""
    if not sizes or not sizes.get("before") or not sizes.get("after"):
        return None
    b, a = sizes["before"], sizes["after"]
    level = a.get("gzip_level") or b.get("gzip_level") or 9
    parts = [f"{label} {_human(b.get(key), 'B')} -> {_human(a.get(key), 'B')}"
             for key, label in (("file_bytes", "file"), ("file_gzip", f"gzip -{level}"), ("weight_gzip9", "weights gzip -9"),
                                ("deep_compression_bytes", "Deep Compression")) if b.get(key) is not None and a.get(key) is not None]
    notes = sorted({n for s in (b, a) for n in s.get("notes", [])})
    return ("size: " + ", ".join(parts) + (f" ({'; '.join(notes)})" if notes else "")) if parts or notes else None


def render_table(report: Report) -> str:
    """The terminal view: passes, figures before/after, validation, latency; about 25 lines."""
    lines = [f"onnxopt: {report.model}" + (f" -> {report.output}" if report.output else "")]
    prev = report.before
    rows = []
    for rec in report.passes:
        after = rec.after or prev
        rows.append(
            [
                rec.name,
                "yes" if rec.modified else "no",
                f"{rec.seconds:.2f}",
                f"{after.nodes} ({after.nodes - prev.nodes:+d})",
                _human(after.params),
                _human(after.bytes, "B"),
                _human(after.macs),
                rec.summary,
            ]
        )
        prev = after
    if rows:
        lines += [""] + _table(rows, ["pass", "changed", "s", "nodes", "params", "bytes", "MACs", "summary"], text_columns=(0, 7))
    b, a = report.before, report.after
    stat_rows = [
        ["nodes", str(b.nodes), str(a.nodes), _change(b.nodes, a.nodes)],
        ["params", _human(b.params), _human(a.params), _change(b.params, a.params)],
        ["bytes", _human(b.bytes, "B"), _human(a.bytes, "B"), _change(b.bytes, a.bytes)],
        ["MACs", _human(b.macs), _human(a.macs), _change(b.macs, a.macs)],
    ]
    lines += [""] + _table(stat_rows, ["model", "before", "after", "change"])
    size_line = _sizes_line(report.sizes)
    if size_line:
        lines += _wrapped(size_line)
    lines += _search_lines(report.search)
    v = report.validation
    if v is not None:
        lines.append("")
        head = "PASS" if v.ok else "CHANGED (lossy by request: reported, not judged)" if report.lossy and not v.error else "FAIL"
        lines += _wrapped(
            f"validation {head} on {', '.join(p.replace('ExecutionProvider', '') for p in v.providers)}: "
            + (f"{plural(v.samples, 'synthetic sample')}" if v.synthetic else f"{plural(v.samples, 'sample')} from {v.data}")
            + (f"; judged by {v.criterion}" if v.criterion else f"; tolerance |err| <= {v.atol:g} + {_rtols(v)}*max|ref|")
        )
        if v.error:
            lines.append(f"  error: {v.error}")
        out_rows = [
            [
                o.name,
                f"{o.max_abs:.3g}",
                f"{o.max_rel:.3g}",
                _cosine_cell(o.cosine_mean),
                f"{o.cosine:.6f}",
                "-" if o.top1_agreement is None else f"{o.top1_agreement * 100:.1f}%",
                ("ok" if o.ok else "changed" if report.lossy and not v.error else "FAIL") if o.judged
                else "not judged" + ("" if o.ok else " (misses)"),
            ]
            for o in v.outputs[:8]
        ]
        if out_rows:
            lines += ["  " + r for r in _table(out_rows, ["output", "max abs", "max rel", "cos mean", "cos worst", "top-1",
                                                          "status"])]
        if len(v.outputs) > 8:
            lines.append(f"  … {len(v.outputs) - 8} more outputs (see --report)")
        if v.accuracy_before is not None:
            lines.append(f"  accuracy {v.accuracy_before * 100:.2f}% -> {v.accuracy_after * 100:.2f}%")
        lines += [w for n in v.notes for w in _wrapped(f"  note: {n}", indent="        ")]
    lat = report.latency
    if lat is not None:
        lines.append("")
        if math.isinf(lat.ratio_high):  # too few pairs for a sign-test interval (fewer than 6 at 95%)
            judged = f"(only {plural(lat.repetitions, 'interleaved pair')} in the budget: no interval, no verdict; raise --latency-budget)"
        else:
            judged = (f"[{lat.ratio_low:.3f}, {lat.ratio_high:.3f}] ({lat.confidence * 100:.0f}% CI, "
                      f"{lat.repetitions} interleaved pairs): {lat.verdict}")
        lines += _wrapped(f"latency: {lat.median_a_ms:.3f} ms -> {lat.median_b_ms:.3f} ms median, ratio {lat.ratio:.3f} {judged}")
    lines += [w for n in report.notes for w in _wrapped(f"note: {n}", indent="      ")]
    return "\n".join(lines)


# --- onnxopt bench ----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms" if value < 100 else f"{value:.1f} ms"


def _rate(value: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.1f}"


def _percent(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%" if math.isfinite(ratio) else "?"


def _settings_line(result: BenchResult) -> str:
    s = result.settings
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in s["providers"])
    threads = lambda n: "default" if not n else str(n)  # noqa: E731
    return (
        f"settings: {providers}{' (I/O binding)' if s['io_binding'] else ''}, threads {threads(s['threads'])} intra-op / "
        f"{threads(s['inter_threads'])} inter-op{', spinning' if s['spinning'] else ''}, optimization {s['optimization']}, "
        f"batch {s['batch']} ({s['data']} inputs)"
    )


def _machine_line(result: BenchResult) -> str:
    m = result.machine
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"machine: {m['cpu']}, {m['cores']} cores{gpu}; onnxruntime {m['onnxruntime']}, {m['system']}"


def render_bench(result: BenchResult) -> str:
    """The terminal view: figures side by side, the ratio with its interval, the verdict, settings."""
    c, b = result.candidate, result.baseline
    if b is None:
        interval = (
            f" ({result.confidence:.0%} interval {c.median_low_ms:.3f} to {c.median_high_ms:.3f} ms)"
            if c.median_low_ms is not None and c.median_high_ms is not None else ""
        )
        lines = [f"onnxopt bench: {c.model}", ""] + [f"{k:<12}{v}" for k, v in (
            ("median", _ms(c.median_ms) + interval),
            ("p90", _ms(c.p90_ms)),
            ("throughput", f"{_rate(c.throughput)} samples/s (batch {result.settings['batch']})"),
            ("runs", f"{c.runs} in {result.seconds:.1f} s"),
        )]
    else:
        lines = [f"onnxopt bench: {c.model} (candidate) vs {b.model} (baseline)", ""] + _grid([
            ["median", _ms(b.median_ms), _ms(c.median_ms), _percent(c.median_ms / b.median_ms)],
            ["p90", _ms(b.p90_ms), _ms(c.p90_ms), _percent(c.p90_ms / b.p90_ms)],
            ["samples/s", _rate(b.throughput), _rate(c.throughput), _percent(c.throughput / b.throughput)],
            ["runs", str(b.runs), str(c.runs), ""],
        ], ["", "baseline", "candidate", "change"])
        ratio, low, high = result.ratio, result.ratio_low, result.ratio_high
        lines += [
            "",
            f"ratio candidate/baseline {ratio:.3f}, {result.confidence:.0%} interval [{low:.3f}, {high:.3f}] "
            f"({_percent(ratio)}, from {_percent(low)} to {_percent(high)}); "
            f"{result.blocks} interleaved blocks in {result.seconds:.1f} s",
            f"verdict: {_verdict_text(result)}",
        ]
    lines += ["", _settings_line(result), _machine_line(result)]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _verdict_text(result: BenchResult) -> str:
    t = f"{result.max_slowdown:.1%}".replace(".0%", "%")
    change = abs(result.ratio - 1) * 100
    if result.verdict == "slower":
        return f"SLOWER: the candidate takes {change:.1f}% longer, beyond the {t} allowed"
    if result.verdict == "faster":
        return f"faster: the candidate takes {change:.1f}% less time"
    return f"no difference at {t} (the candidate is not slower)"
