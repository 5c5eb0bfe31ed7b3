"""A run's report (and a sweep's Pareto front) as one self-contained HTML page, charts drawn as inline SVG.

The page loads nothing: no network, no script or stylesheet from elsewhere, no plotting library; it
opens from a CI artifact or a mail as it does on the machine that wrote it, and reads without
JavaScript (a few inline lines only make the tables sortable). It renders the JSON form of a
``Report`` (``Report.to_dict()``, or a ``--report`` file read back), so that a report can be drawn
again later, and a sweep's ``sweep.json``. Every string that comes from them (model names, notes,
layer names, recipes) is escaped. Figures are formatted by ``onnxopt.report``'s helpers, as the
terminal table formats them.
"""

from __future__ import annotations

__all__ = ["render_html", "write_html", "stage_html"]

import html
import math
import os
from typing import Any, Iterable

from onnxopt.report import Report, _change, _human

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#222}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#555;margin:0 0 12px;word-break:break-all}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;font-weight:600;color:#fff;margin-left:8px;font-size:15px}
.verdict.ok{background:#2e7d32}.verdict.changed{background:#ef6c00}.verdict.failed{background:#c62828}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right;vertical-align:top}
th{background:#f5f5f5;cursor:default}th.sort{cursor:pointer}td.t,th.t{text-align:left}td.wrap{max-width:520px;word-break:break-word}
tr.dominated td{color:#999}tr.failed td{color:#c62828}.bad{color:#c62828;font-weight:600}.good{color:#2e7d32}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:12px;color:#666;font-weight:500}.card span{font-size:17px}.card i{font-style:normal;color:#555;font-size:12px}
ul.notes li{margin:2px 0;word-break:break-word}svg{display:block;margin:6px 0 14px;max-width:100%;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#333}.muted{color:#777}
"""

# Click a header to sort its table (numbers by value); the page reads the same without it.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th, i){th.classList.add("sort");
th.addEventListener("click", function(){var body=th.closest("table").tBodies[0], rows=Array.from(body.rows),
idx=th.cellIndex, asc=th.dataset.dir!=="asc"; th.dataset.dir=asc?"asc":"desc";
var key=function(r){var c=r.cells[idx]; var v=c.dataset.v!==undefined?c.dataset.v:c.textContent; var n=parseFloat(v);
return isNaN(n)?v:n;};
rows.sort(function(a,b){var x=key(a),y=key(b); return (x<y?-1:x>y?1:0)*(asc?1:-1);});
rows.forEach(function(r){body.appendChild(r);});});});
"""

_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2")
_MAX_ROWS = 300  # a chart or table lists at most this many layers; the JSON report has them all


def _e(value: Any) -> str:
    """``value`` as text safe in HTML content and in quoted attributes."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite float, or None (JSON writes NaN and infinity as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _f(value: Any, spec: str = ".3g", suffix: str = "") -> str:
    v = _num(value)
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _class(name: str) -> str:
    """`` class="name"``, or nothing for no name."""
    return f' class="{_e(name)}"' if name else ""


def _table(header: list[str], rows: list[list[Any]], *, text_columns: Iterable[int] = (0,), sortable: bool = True,
           row_classes: list[str] | None = None, wrap_columns: Iterable[int] = (), table_id: str | None = None) -> str:
    """A table; cells are escaped here. A cell given as ``(text, sort_value)`` sorts by that value."""
    text_columns, wrap_columns = set(text_columns), set(wrap_columns)
    attrs = (f' id="{_e(table_id)}"' if table_id else "") + (' class="sortable"' if sortable else "")
    head = "".join(f"<th{_class('t' if i in text_columns else '')}>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for n, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            cls = " ".join(c for c, on in (("t", i in text_columns), ("wrap", i in wrap_columns)) if on)
            sort = ""
            if isinstance(cell, tuple):
                cell, key = cell
                sort = f' data-v="{_e(key)}"'
            cells.append(f"<td{_class(cls)}{sort}>{_e(cell)}</td>")
        cls = row_classes[n] if row_classes and row_classes[n] else ""
        body.append(f"<tr{_class(cls)}>{''.join(cells)}</tr>")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --- charts -----------------------------------------------------------------------------------------


def _short(name: str, width: int = 42) -> str:
    """A layer name cut to ``width`` characters, keeping its end (where layer names differ)."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _bars(chart_id: str, rows: list[tuple[str, list[float | None], str]], series: list[str], *,
          stacked: bool = False, caption: str = "") -> str:
    """Horizontal bars, a row per layer: one bar per series side by side, or (``stacked``) one bar of
    consecutive segments. ``rows`` are ``(name, values, end text)``: the name is cut to fit and
    whole in the row's tooltip; a value None draws no bar. Scaled to the largest value (or sum)."""
    rows = rows[:_MAX_ROWS]
    label_w, plot_w, text_w, bar_h, gap = 300, 440, 150, 11, 7
    per_row = bar_h if stacked else bar_h * len(series)
    legend_h = 22
    height = legend_h + len(rows) * (per_row + gap) + 6
    width = label_w + plot_w + text_w
    totals = [sum(v for v in values if _num(v) is not None) if stacked else max((v for v in values if _num(v) is not None),
              default=0.0) for _, values, _ in rows]
    top = max(totals, default=0.0) or 1.0
    out = [f'<svg id="{_e(chart_id)}" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(caption)}">']
    for i, name in enumerate(series):
        x = label_w + i * 150
        out.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{_COLORS[i % len(_COLORS)]}"/>'
                   f'<text x="{x + 14}" y="13">{_e(name)}</text>')
    out.append(f'<line x1="{label_w}" y1="{legend_h - 2}" x2="{label_w}" y2="{height - 2}" stroke="#999"/>')
    for r, (name, values, end) in enumerate(rows):
        y = legend_h + r * (per_row + gap)
        tip = f"{name}: {end}"
        out.append(f'<g class="row"><title>{_e(tip)}</title>'
                   f'<text x="{label_w - 6}" y="{y + per_row / 2 + 4:.1f}" text-anchor="end">{_e(_short(name))}</text>')
        x = float(label_w)
        for i, value in enumerate(values):
            v = _num(value)
            if v is None:
                continue
            w = max(v / top * plot_w, 0.5) if v > 0 else 0.0  # a negative value (SQNR below 0 dB) draws no bar
            by = y if stacked else y + i * bar_h
            out.append(f'<rect x="{x:.1f}" y="{by}" width="{w:.1f}" height="{bar_h - 1}" fill="{_COLORS[i % len(_COLORS)]}"/>')
            if stacked:
                x += w
        end_x = label_w + (max(totals[r], 0.0) / top * plot_w) + 6
        out.append(f'<text x="{end_x:.1f}" y="{y + per_row / 2 + 4:.1f}">{_e(end)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def _beside(x: float, middle: float, y: float, text: str) -> str:
    """A label beside a vertical line at ``x``: on its right in the left half, on its left in the right half."""
    if x < middle:
        return f'<text x="{x + 4:.1f}" y="{y}">{_e(text)}</text>'
    return f'<text x="{x - 4:.1f}" y="{y}" text-anchor="end">{_e(text)}</text>'


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values from ``lo`` to ``hi``: steps of 1, 2 or 5 times a power of ten."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]


def _interval(lat: dict) -> str:
    """The latency ratio on a line, with its confidence interval and the mark at 1 (no change)."""
    ratio, low, high = _num(lat.get("ratio")), _num(lat.get("ratio_low")), _num(lat.get("ratio_high"))
    if ratio is None:
        return ""
    values = [ratio, 1.0] + [v for v in (low, high) if v is not None]
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.15, 0.02)
    lo, hi = lo - pad, hi + pad
    width, left, right = 560, 20, 20
    sx = lambda v: left + (v - lo) / (hi - lo) * (width - left - right)  # noqa: E731
    out = [f'<svg id="latency-interval" width="{width}" height="64" viewBox="0 0 {width} 64" '
           f'role="img" aria-label="latency ratio and its interval">',
           f'<line x1="{left}" y1="40" x2="{width - right}" y2="40" stroke="#999"/>']
    for t in _ticks(lo, hi, 6):
        out.append(f'<line x1="{sx(t):.1f}" y1="40" x2="{sx(t):.1f}" y2="44" stroke="#999"/>'
                   f'<text x="{sx(t):.1f}" y="56" text-anchor="middle">{t:g}</text>')
    out.append(f'<line x1="{sx(1.0):.1f}" y1="8" x2="{sx(1.0):.1f}" y2="40" stroke="#777" stroke-dasharray="3,3"/>'
               + _beside(sx(1.0), width / 2, 14, "1 = no change"))
    if low is not None and high is not None:
        out.append(f'<line x1="{sx(low):.1f}" y1="28" x2="{sx(high):.1f}" y2="28" stroke="{_COLORS[0]}" stroke-width="3"/>'
                   f'<line x1="{sx(low):.1f}" y1="22" x2="{sx(low):.1f}" y2="34" stroke="{_COLORS[0]}" stroke-width="2"/>'
                   f'<line x1="{sx(high):.1f}" y1="22" x2="{sx(high):.1f}" y2="34" stroke="{_COLORS[0]}" stroke-width="2"/>')
    out.append(f'<circle cx="{sx(ratio):.1f}" cy="28" r="5" fill="{_COLORS[1]}"><title>ratio {ratio:.3f}'
               + (f", interval [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")
               + "</title></circle></svg>")
    return "".join(out)


# --- the run's report -------------------------------------------------------------------------------


def _verdict(d: dict) -> tuple[str, str, str]:
    """``(css class, badge, words)``: failed, changed (a lossy pass, reported not judged) or ok."""
    v = d.get("validation") or {}
    if not d.get("ok", True):
        reason = v.get("error") or next((n for n in d.get("notes", []) if "FAILED" in str(n)), None)
        if not reason:
            outside = [o.get("name") for o in v.get("outputs", []) if not o.get("ok", True)]
            reason = f"output(s) {', '.join(map(str, outside))} outside {v.get('criterion') or 'the tolerance'}" if outside \
                else "validation failed"
        return "failed", "FAILED", f"FAILED: {reason}"
    if d.get("lossy"):
        return "changed", "CHANGED", "CHANGED: lossy by request, the outputs are reported, not judged"
    if not v:
        return "ok", "OK", "OK: not validated"
    return "ok", "OK", "OK: validated" + (f", judged by {v['criterion']}" if v.get("criterion") else "")


def _ratio(before: Any, after: Any) -> str:
    b, a = _num(before), _num(after)
    if b is None or a is None or b == 0:
        return "-"
    return f"{a / b:.3g}x"


def _figures(d: dict) -> str:
    before, after = d.get("before") or {}, d.get("after") or {}
    cards, rows = [], []
    for key, label, unit in (("nodes", "nodes", ""), ("params", "parameters", ""), ("bytes", "weight bytes", "B"),
                             ("macs", "MACs", "")):
        b, a = before.get(key), after.get(key)
        cards.append(f'<div class="card"><b>{_e(label)}</b><span>{_e(_human(a, unit))}</span> '
                     f'<i>from {_e(_human(b, unit))} ({_e(_ratio(b, a))})</i></div>')
        rows.append([label, _human(b, unit), _human(a, unit), _change(b, a), _ratio(b, a)])
    return (f'<section id="figures"><h2>Before and after</h2><div class="cards">{"".join(cards)}</div>'
            + _table(["figure", "before", "after", "change", "ratio"], rows, sortable=False) + "</section>")


def _passes(d: dict) -> str:
    prev = d.get("before") or {}
    rows, left = [], []
    for rec in d.get("passes", []):
        after = rec.get("after") or prev
        nodes = after.get("nodes")
        delta = nodes - prev["nodes"] if isinstance(nodes, int) and isinstance(prev.get("nodes"), int) else None
        rows.append([rec.get("name", "?"), "yes" if rec.get("modified") else "no", (_f(rec.get("seconds"), ".2f"), rec.get("seconds")),
                     (f"{nodes}" + (f" ({delta:+d})" if delta is not None else ""), nodes),
                     (_human(after.get("params")), after.get("params")), (_human(after.get("bytes"), "B"), after.get("bytes")),
                     (_human(after.get("macs")), after.get("macs")), rec.get("summary", "")])
        prev = after
        details = rec.get("details") or {}
        for what, why in (details.get("left") or {}).items() if isinstance(details.get("left"), dict) else ():
            left.append([rec.get("name", "?"), what, why])
    out = ['<section id="passes"><h2>Passes</h2>']
    out.append(_table(["pass", "changed", "seconds", "nodes", "params", "bytes", "MACs", "summary"], rows,
                      text_columns=(0, 1, 7), wrap_columns=(7,), table_id="pass-table") if rows else "<p>No pass ran.</p>")
    if left:
        out.append(f"<details><summary>Left alone ({len(left)})</summary>"
                   + _table(["pass", "what", "why"], left[:_MAX_ROWS], text_columns=(0, 1, 2), wrap_columns=(2,)) + "</details>")
    return "".join(out) + "</section>"


def _validation(d: dict) -> str:
    v = d.get("validation")
    if not v:
        return '<section id="validation"><h2>Validation</h2><p>Not validated.</p></section>'
    lossy = d.get("lossy") and not v.get("error")
    providers = ", ".join(str(p).replace("ExecutionProvider", "") for p in v.get("providers", []))
    source = f"{v.get('samples')} synthetic samples" if v.get("synthetic") else f"{v.get('samples')} samples from {v.get('data')}"
    rtols = sorted({o["rtol"] for o in v.get("outputs", []) if _num(o.get("rtol")) is not None})
    rule = (f"judged by {v['criterion']}" if v.get("criterion") else
            f"tolerance |err| <= {_f(v.get('atol'), 'g')} + {'/'.join(f'{r:g}' for r in rtols) or 'default'}*max|ref|")
    out = ['<section id="validation"><h2>Validation</h2>', f"<p>On {_e(providers)}: {_e(source)}; {_e(rule)}.</p>"]
    if v.get("error"):
        out.append(f'<p class="bad">Error: {_e(v["error"])}</p>')
    if v.get("accuracy_before") is not None and v.get("accuracy_after") is not None:
        drop = (v["accuracy_before"] - v["accuracy_after"]) * 100
        out.append(f'<p id="accuracy">Accuracy {_f(v["accuracy_before"] * 100, ".2f", "%")} &#8594; '
                   f'{_f(v["accuracy_after"] * 100, ".2f", "%")} ({-drop:+.2f} points)</p>')
    rows, classes = [], []
    for o in v.get("outputs", [])[:_MAX_ROWS]:
        status = "ok" if o.get("ok") else "changed" if lossy else "FAIL"
        top1 = o.get("top1_agreement")
        rows.append([o.get("name", "?"), (_f(o.get("max_abs")), o.get("max_abs")), (_f(o.get("max_rel")), o.get("max_rel")),
                     (_f(o.get("cosine"), ".6f"), o.get("cosine")), ("-" if top1 is None else _f(top1 * 100, ".1f", "%"), top1),
                     "-" if o.get("runtime_floor") is None else _f(o.get("runtime_floor")), status])
        classes.append("" if o.get("ok") else "failed" if not lossy else "")
    if rows:
        out.append(_table(["output", "max abs", "max rel", "cosine", "top-1 agreement", "runtime floor", "status"], rows,
                          text_columns=(0, 6), row_classes=classes, table_id="output-table"))
    if v.get("notes"):
        out.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in v["notes"]) + "</ul>")
    return "".join(out) + "</section>"


def _latency(d: dict) -> str:
    lat = d.get("latency")
    if not lat:
        return '<section id="latency"><h2>Latency</h2><p>Not measured.</p></section>'
    low, high = _num(lat.get("ratio_low")), _num(lat.get("ratio_high"))
    if low is None or high is None:
        judged = f"only {lat.get('repetitions')} interleaved pairs in the budget: no interval, no verdict"
    else:
        judged = (f"{_f((lat.get('confidence') or 0) * 100, '.0f')}% interval [{low:.3f}, {high:.3f}], "
                  f"{lat.get('repetitions')} interleaved pairs: {lat.get('verdict')}")
    rows = [["median", _f(lat.get("median_a_ms"), ".3f", " ms"), _f(lat.get("median_b_ms"), ".3f", " ms")],
            ["p90", _f(lat.get("p90_a_ms"), ".3f", " ms"), _f(lat.get("p90_b_ms"), ".3f", " ms")]]
    providers = ", ".join(str(p).replace("ExecutionProvider", "") for p in lat.get("providers", []))
    return ('<section id="latency"><h2>Latency</h2>'
            f'<p>Ratio optimized / original <b>{_f(lat.get("ratio"), ".3f")}</b>, {_e(judged)}.</p>'
            + _interval(lat) + _table(["", "original", "optimized"], rows, sortable=False)
            + f'<p class="muted">{_e(providers)}, threads {_e(lat.get("threads") or "default")}'
            + (f"; {_e(lat['machine'])}" if lat.get("machine") else "") + "</p></section>")


def _layer_charts(d: dict) -> list[str]:
    """Per-layer plots from the passes' details: SQNR and float/int8 kernel times (quantize), channels
    kept per group (prune), rank per layer (lowrank), bytes per weight (cluster, sparsify)."""
    charts: list[str] = []
    used: dict[str, int] = {}

    def chart_id(base: str) -> str:
        used[base] = used.get(base, 0) + 1
        return base if used[base] == 1 else f"{base}-{used[base]}"

    def add(base: str, heading: str, draw, note: str = "") -> None:
        """A heading, a note and ``draw(id)``'s chart, under an id unique in the page."""
        cid = chart_id(base)
        charts.append(f'<div class="layer-plot" id="{_e(cid)}-plot"><h3>{_e(heading)}</h3>'
                      + (f'<p class="muted">{_e(note)}</p>' if note else "") + draw(cid) + "</div>")

    for rec in d.get("passes", []):
        name, det = rec.get("name"), rec.get("details") or {}
        if name == "quantize":
            sqnr = det.get("sqnr_db")
            if isinstance(sqnr, dict) and sqnr:
                rows = [(t, [db], "exact" if _num(db) is None else f"{db:.1f} dB") for t, db in sqnr.items()]
                add("sqnr", "SQNR of each quantized tensor (dB, higher is better)",
                    lambda cid: _bars(cid, rows, ["SQNR dB"], caption="SQNR per tensor"),
                    "Signal to quantization noise of each tensor against the float model, worst first; "
                    "'exact': no error measured." + _more(len(rows)))
            speed = det.get("speed")
            if isinstance(speed, dict):
                rows, note = _speed_rows(speed)
                add("speed", "Kernel time of each layer: int8 vs float (microseconds)",
                    lambda cid: _bars(cid, rows, ["int8", "float"], caption="kernel time per layer") if rows else "", note)
        elif name == "prune" and isinstance(det.get("removed"), dict) and det["removed"]:  # something removed
            sizes = {str(k): v for k, v in (det.get("sizes") or {}).items()}
            removed = {str(k): len(v) for k, v in det["removed"].items()}
            rows = []
            for gid in sorted(set(sizes) | set(removed), key=lambda g: int(g) if g.isdigit() else 0):
                size, gone = sizes.get(gid), removed.get(gid, 0)
                if size is None:
                    rows.append((f"group {gid}", [None, gone], f"{gone} removed"))
                else:
                    rows.append((f"group {gid}", [size - gone, gone], f"{size - gone} of {size} kept"))
            if rows:
                add("prune-groups", "Channels kept per group",
                    lambda cid: _bars(cid, rows, ["kept", "removed"], stacked=True, caption="channels kept per group"),
                    f"{det.get('channels_removed', sum(removed.values()))} of {det.get('prunable_channels', '?')} prunable "
                    f"channels removed ({det.get('mode', '')})." + _more(len(rows)))
        elif name == "lowrank" and det.get("layers"):
            rows = [(k, [r.get("rank"), r.get("full_rank")],
                     f"rank {r.get('rank')} of {r.get('full_rank')}, {_f(r.get('energy_kept', 0) * 100, '.1f')}% energy, "
                     f"{r.get('params_before')} -> {r.get('params_after')} params") for k, r in det["layers"].items()]
            add("lowrank", "Rank chosen per layer",
                lambda cid: _bars(cid, rows, ["rank kept", "full rank"], caption="rank per layer"),
                _more(len(rows)))
        elif name in ("cluster", "sparsify") and det.get("layers"):
            rows = []
            for k, r in det["layers"].items():
                end = f"{_human(r.get('bytes_before'), 'B')} -> {_human(r.get('bytes_after'), 'B')}"
                if name == "cluster":
                    end += f", {r.get('clusters')} values, rel. error {_f(r.get('relative_error'))}"
                else:
                    end += f", density {_f(r.get('density'), '.2f')}, {r.get('form')}"
                rows.append((k, [r.get("bytes_after"), r.get("bytes_before")], end))
            heading = (f"Bytes per weight, clustered to {det.get('bits')} bits" if name == "cluster"
                       else "Bytes per weight, sparsified")
            add(name, heading, lambda cid: _bars(cid, rows, ["after", "before"], caption=heading), _more(len(rows)))
    return charts


def _more(n: int) -> str:
    return f" The first {_MAX_ROWS} of {n} are drawn; the JSON report has them all." if n > _MAX_ROWS else ""


def _speed_rows(speed: dict) -> tuple[list, str]:
    """The speed fallback's per-layer kernel times: every timed layer (``layers``), else the layers that
    ran slower in int8 (``slower_in_int8``); ``[int8, float]`` microseconds each. Returns (rows, note)."""
    if "skipped" in speed:
        return [], f"Not measured: {speed['skipped']}"
    layers = speed.get("layers") or speed.get("slower_in_int8") or {}
    kept = set(speed.get("kept_float") or [])
    rows = [(n, [t[0], t[1]], f"int8 {_f(t[0], '.0f')} us, float {_f(t[1], '.0f')} us"
             + (" (kept float)" if n in kept else "")) for n, t in layers.items() if isinstance(t, (list, tuple)) and len(t) == 2]
    where = f"{', '.join(map(str, speed.get('providers', [])))}, batch {speed.get('batch')}, {speed.get('threads')} thread(s)"
    note = f"Profiled kernel times ({where})" + ("" if speed.get("layers") else ", layers slower in int8 only") + "."
    if speed.get("error"):
        note += f" Stopped: {speed['error']}"
    return rows, note + (_more(len(rows)) if rows else " No layer timed.")


def _report_body(d: dict) -> list[str]:
    cls, badge, words = _verdict(d)
    output = f" &#8594; {_e(d['output'])}" if d.get("output") else ""
    parts = [f'<header id="summary"><h1>onnxopt report<span class="verdict {cls}">{_e(badge)}'
             f'</span></h1><p class="sub">{_e(d.get("model", "?"))}{output}</p><p id="verdict" class="{"bad" if cls == "failed" else ""}">'
             f"{_e(words)}</p></header>",
             _passes(d), _figures(d), _validation(d), _latency(d)]
    charts = _layer_charts(d)
    if charts:
        parts.append('<section id="layers"><h2>Per layer</h2>' + "".join(charts) + "</section>")
    notes = d.get("notes") or []
    parts.append('<section id="notes"><h2>Notes</h2>'
                 + ('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else "<p>None.</p>")
                 + "</section>")
    return parts


# --- a sweep ----------------------------------------------------------------------------------------


def _recipe_text(recipe: Any) -> str:
    if not isinstance(recipe, dict):
        return str(recipe)
    def value(v):
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return ", ".join(f"{k}={value(v)}" for k, v in recipe.items() if v not in (None, "", [], {}))


def _sweep_metric(results: list[dict]) -> str:
    """``accuracy`` where any result has it (labelled data), else ``cosine``."""
    has = any(_num((r.get("metrics") or {}).get("accuracy")) is not None for r in results)
    return "accuracy" if has else "cosine"


def _scatter(points: list[dict], metric: str) -> str:
    """Accuracy (or cosine) against latency ratio: a circle per result, its area by file bytes, the
    front filled and joined by a line, the recipe in each circle's tooltip."""
    width, height, ml, mr, mt, mb = 680, 420, 64, 24, 24, 56
    scale = 100.0 if metric == "accuracy" else 1.0
    xs = [p["x"] for p in points] + [1.0]
    ys = [p["y"] * scale for p in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_pad = max((x_hi - x_lo) * 0.08, 0.02)
    y_pad = max((y_hi - y_lo) * 0.08, 0.5 if metric == "accuracy" else 0.001)
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + x_pad, y_lo - y_pad, y_hi + y_pad
    if metric == "accuracy":
        y_hi = min(y_hi, 100.0 + y_pad / 4)
    sx = lambda v: ml + (v - x_lo) / (x_hi - x_lo) * (width - ml - mr)  # noqa: E731
    sy = lambda v: height - mb - (v - y_lo) / (y_hi - y_lo) * (height - mt - mb)  # noqa: E731
    sizes = [p["bytes"] for p in points if p["bytes"] is not None]
    b_lo, b_hi = (min(sizes), max(sizes)) if sizes else (0.0, 0.0)

    def radius(b):
        if b is None or b_hi <= b_lo:
            return 6.0
        return 4.0 + 8.0 * math.sqrt((b - b_lo) / (b_hi - b_lo))

    out = [f'<svg id="pareto" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{_e(metric)} against latency ratio">',
           f'<rect x="{ml}" y="{mt}" width="{width - ml - mr}" height="{height - mt - mb}" fill="none" stroke="#bbb"/>']
    for t in _ticks(x_lo, x_hi, 7):
        out.append(f'<line x1="{sx(t):.1f}" y1="{height - mb}" x2="{sx(t):.1f}" y2="{height - mb + 4}" stroke="#999"/>'
                   f'<text x="{sx(t):.1f}" y="{height - mb + 16}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y_lo, y_hi, 6):
        out.append(f'<line x1="{ml - 4}" y1="{sy(t):.1f}" x2="{ml}" y2="{sy(t):.1f}" stroke="#999"/>'
                   f'<line x1="{ml}" y1="{sy(t):.1f}" x2="{width - mr}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<line x1="{sx(1.0):.1f}" y1="{mt}" x2="{sx(1.0):.1f}" y2="{height - mb}" stroke="#888" stroke-dasharray="4,3"/>'
               + _beside(sx(1.0), width / 2, mt + 12, "original speed"))
    out.append(f'<text x="{(ml + width - mr) / 2:.0f}" y="{height - 14}" text-anchor="middle">latency ratio, optimized / original '
               f'(left is faster)</text>')
    y_label = "accuracy (%)" if metric == "accuracy" else "cosine to the original"
    out.append(f'<text transform="translate(16 {(mt + height - mb) / 2:.0f}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    coords = [(f"{sx(p['x']):.1f}", f"{sy(p['y'] * scale):.1f}") for p in points]
    front = sorted((i for i, p in enumerate(points) if p["front"]), key=lambda i: (points[i]["x"], -points[i]["y"]))
    if front:
        out.append(f'<polyline id="front" points="{" ".join(f"{coords[i][0]},{coords[i][1]}" for i in front)}" fill="none" '
                   f'stroke="#d62728" stroke-width="1.5"/>')
    order = [i for i, p in enumerate(points) if not p["front"]] + front  # the front drawn on top
    for i in order:
        p = points[i]
        fill, stroke, opacity = ("#d62728", "#7f0000", "0.9") if p["front"] else ("#9e9e9e", "#616161", "0.55")
        tip = (f"{p['recipe']}\n{metric} {p['y'] * scale:.4g}{'%' if metric == 'accuracy' else ''}, latency ratio {p['x']:.3f}"
               f", file {_human(p['bytes'], 'B')}" + (" (Pareto front)" if p["front"] else ""))
        out.append(f'<circle class="point{" front" if p["front"] else ""}" data-result="{p["index"]}" cx="{coords[i][0]}" '
                   f'cy="{coords[i][1]}" r="{radius(p["bytes"]):.1f}" fill="{fill}" fill-opacity="{opacity}" stroke="{stroke}">'
                   f"<title>{_e(tip)}</title></circle>")
    out.append("</svg>")
    legend = (f"Circle area by file size ({_human(b_lo, 'B')} to {_human(b_hi, 'B')}); red: on the Pareto front "
              f"(joined), grey: dominated. Hover a circle for its recipe.") if sizes else \
        "Red: on the Pareto front (joined), grey: dominated. Hover a circle for its recipe."
    return "".join(out) + f'<p class="muted">{_e(legend)}</p>'


def _sweep_section(sweep: dict) -> str:
    results = [r for r in (sweep.get("results") or []) if isinstance(r, dict)]
    metric = _sweep_metric(results)
    points, rows, classes = [], [], []
    for i, r in enumerate(results):
        m = r.get("metrics") or {}
        x, y = _num(m.get("latency_ratio")), _num(m.get(metric))
        if not r.get("error") and x is not None and y is not None:
            points.append({"index": i, "x": x, "y": y, "bytes": _num(m.get("file_bytes")), "front": bool(r.get("pareto")),
                           "recipe": _recipe_text(r.get("recipe"))})
    failed = sum(bool(r.get("error")) for r in results)
    front_n = sum(bool(r.get("pareto")) and not r.get("error") for r in results)

    def order(i):
        r, m = results[i], results[i].get("metrics") or {}
        x = _num(m.get("latency_ratio"))
        return (2 if r.get("error") else 0 if r.get("pareto") else 1, x if x is not None else math.inf)

    for i in sorted(range(len(results)), key=order):
        r, m = results[i], results[i].get("metrics") or {}
        y = _num(m.get(metric))
        shown = "-" if y is None else f"{y * 100:.2f}%" if metric == "accuracy" else f"{y:.6f}"
        rows.append(["front" if r.get("pareto") and not r.get("error") else "", _recipe_text(r.get("recipe")), (shown, y),
                     (_f(m.get("latency_ratio"), ".3f"), m.get("latency_ratio")),
                     (_human(m.get("file_bytes"), "B"), m.get("file_bytes")), (_human(m.get("macs")), m.get("macs")),
                     "yes" if r.get("cached") else "", r.get("error") or ""])
        classes.append("failed" if r.get("error") else "" if r.get("pareto") else "dominated")
    out = ['<section id="sweep"><h2>Sweep</h2>',
           f"<p>{len(results)} recipes: {front_n} on the Pareto front ({_e(metric)} vs latency ratio vs file size), "
           f"{failed} failed, {sum(bool(r.get('cached')) for r in results)} taken from an earlier run.</p>"]
    out.append(_scatter(points, metric) if points else "<p>No result has both a latency ratio and an accuracy or cosine to plot.</p>")
    out.append(_table(["front", "recipe", metric, "latency ratio", "file", "MACs", "cached", "error"], rows,
                      text_columns=(0, 1, 6, 7), wrap_columns=(1, 7), row_classes=classes, table_id="sweep-table"))
    return "".join(out) + "</section>"


# --- the page ---------------------------------------------------------------------------------------


def render_html(report: Report | dict | None, *, sweep: dict | None = None) -> str:
    """The page for ``report`` (a ``Report`` or its JSON dict) and, given, a sweep's ``sweep.json``
    dict (``{"results": [...]}``); ``report`` may be None for a sweep's page alone."""
    if report is None and sweep is None:
        raise ValueError("render_html: give a report, a sweep or both")
    d = report.to_dict() if isinstance(report, Report) else report
    parts = _report_body(d) if d is not None else [
        f'<header id="summary"><h1>onnxopt sweep</h1><p class="sub">{_e(sweep.get("model", ""))}</p></header>']
    if sweep is not None:
        parts.append(_sweep_section(sweep))
    title = f"onnxopt: {d.get('model', '?')} ({_verdict(d)[0]})" if d is not None else f"onnxopt sweep {sweep.get('model', '')}"
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8"/><meta name="viewport" content="width=device-width, initial-scale=1"/>'
            f"<title>{_e(title.strip())}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts)
            + f'<footer class="muted"><p>Written by onnxopt; self-contained: it loads nothing.</p></footer><script>{_JS}</script>'
            "</body></html>\n")


def stage_html(report: Report | dict | None, path: str | os.PathLike, *, sweep: dict | None = None,
               flag: str = "--html") -> str:
    """The page in a new temporary file beside ``path``; the caller commits it with ``os.replace``
    or removes it (as ``--report`` and ``--save-recipe`` are written with the model, all or none)."""
    from onnxopt.io import stage_text

    return stage_text(render_html(report, sweep=sweep), path, flag)


def write_html(report: Report | dict | None, path: str | os.PathLike, *, sweep: dict | None = None) -> None:
    """Write the page atomically: a temporary file beside ``path``, then moved into place."""
    os.replace(stage_html(report, path, sweep=sweep), path)
