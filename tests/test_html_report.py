"""The HTML report: a well-formed, self-contained page with the run's sections, its per-layer plots and
a sweep's Pareto plot; every string from the report escaped; a screenshot in a real headless browser
(skipped where none is installed)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

import onnxopt
from onnxopt.errors import OutputPathError
from onnxopt.html_report import render_html, write_html

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits"
MODEL, TEST, CALIB = (str(DIGITS / f) for f in ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz"))
VOID = {"meta", "br", "hr", "img", "input", "link"}


class Page(HTMLParser):
    """Parses a page, checking that every tag is closed in order, and collects elements by id."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.elements: list[tuple[str, dict, list[str]]] = []  # (tag, attrs, ancestors' ids)
        self.ids: dict[str, str] = {}
        self.text: list[str] = []
        self._id_stack: list[str | None] = []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        self._element(tag, attrs)
        if tag in VOID:
            self.errors.append(f"<{tag}> not self-closed")
            return
        self.stack.append(tag)
        self._id_stack.append(dict(attrs).get("id"))

    def handle_startendtag(self, tag, attrs):
        self._element(tag, attrs)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        self._id_stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def _element(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            assert attrs["id"] not in self.ids, f"id {attrs['id']} twice"
            self.ids[attrs["id"]] = tag
        self.elements.append((tag, attrs, [i for i in self._id_stack if i]))

    def inside(self, element_id: str, tag: str) -> list[dict]:
        return [a for t, a, ids in self.elements if t == tag and element_id in ids]


def parse(text: str) -> Page:
    page = Page(text)
    assert not page.errors, page.errors[:5]
    return page


def assert_self_contained(text: str, page: Page) -> None:
    """No resource from a network: no http(s) anywhere, no src/href but in-page anchors, no <link>."""
    assert "http://" not in text and "https://" not in text
    for tag, attrs, _ in page.elements:
        assert tag not in ("link", "img", "iframe", "object", "embed")
        for name in ("src", "href", "xlink:href"):
            assert name not in attrs or attrs[name].startswith("#"), (tag, attrs)


@pytest.fixture(scope="module")
def plain():
    return onnxopt.optimize(MODEL, data=TEST, latency=False).report


@pytest.fixture(scope="module")
def quantized():
    return onnxopt.optimize(MODEL, "simplify,fold-bn,share-init,quantize", calibration=CALIB, data=TEST, latency=False).report


def sweep_results() -> dict:
    """Seven recipes measured (four on the front), one failed."""
    rows = [(0.0, "none", 0.994, 1.00, 86_000, False), (0.0, "int8", 0.994, 0.62, 41_000, True),
            (0.25, "none", 0.980, 0.80, 60_000, False), (0.25, "int8", 0.975, 0.50, 30_000, True),
            (0.5, "int8", 0.900, 0.40, 22_000, True), (0.5, "none", 0.910, 0.70, 45_000, False),
            (0.1, "int8", 0.996, 0.70, 45_000, True)]
    results = [{"recipe": {"prune": p, "quantize": q, "calibrate": "minmax"},
                "metrics": {"accuracy": a, "latency_ratio": lat, "file_bytes": b, "macs": 1_000_000},
                "model": f"sweep/{i}.onnx", "cached": i == 0, "pareto": front, "error": None}
               for i, (p, q, a, lat, b, front) in enumerate(rows)]
    results.append({"recipe": {"prune": 0.9, "quantize": "int8"}, "metrics": {}, "pareto": False,
                    "error": "worker died <signal 9> & \"gone\""})
    return {"results": results}


def test_a_run_renders_every_section_well_formed_and_self_contained(plain):
    text = render_html(plain)
    page = parse(text)
    assert {"summary", "passes", "figures", "validation", "latency", "notes", "pass-table", "output-table",
            "accuracy"} <= set(page.ids)
    assert "layers" not in page.ids and "sweep" not in page.ids  # nothing to plot for lossless passes
    assert len(page.inside("pass-table", "tr")) == len(plain.passes) + 1  # the header and a row per pass
    words = " ".join(page.text)
    assert "OK: validated" in words and plain.model in words
    assert all(rec.summary in words for rec in plain.passes)
    assert_self_contained(text, page)


def test_a_report_dict_read_back_from_json_renders_as_the_report(plain):
    assert render_html(json.loads(json.dumps(plain.to_dict()))) == render_html(plain)


def test_quantize_plots_the_sqnr_of_each_quantized_tensor(quantized):
    sqnr = next(r for r in quantized.passes if r.name == "quantize").details["sqnr_db"]
    text = render_html(quantized)
    page = parse(text)
    assert page.ids["sqnr"] == "svg" and "layers" in page.ids
    assert len(page.inside("sqnr", "g")) == len(sqnr)  # a row per tensor
    assert len(page.inside("sqnr", "rect")) == len(sqnr) + 1  # a bar each (all finite here) and the legend's
    assert_self_contained(text, page)


def test_speed_fallback_times_and_the_latency_interval_are_plotted(quantized):
    d = copy.deepcopy(quantized.to_dict())
    conv = "/features/features.0/features.0.0/Conv"
    d["passes"][-1]["details"]["speed"] = {
        "providers": ["CPUExecutionProvider"], "threads": 1, "batch": 32, "timed": [conv, "/head/head.2/Gemm"],
        "layers": {conv: [50.0, 10.0], "/head/head.2/Gemm": [3.0, 4.0]}, "slower_in_int8": {conv: [50.0, 10.0]},
        "kept_float": [conv], "tried": [], "ratio": 0.8}
    d["latency"] = {"median_a_ms": 0.5, "median_b_ms": 0.31, "p90_a_ms": 0.6, "p90_b_ms": 0.4, "ratio": 0.62,
                    "ratio_low": 0.6, "ratio_high": 0.65, "confidence": 0.95, "repetitions": 40,
                    "providers": ["CPUExecutionProvider"], "threads": 1, "verdict": "faster", "machine": "", "seconds": 5.0}
    page = parse(render_html(d))
    assert len(page.inside("speed", "g")) == 2 and len(page.inside("speed", "rect")) == 2 * 2 + 2  # int8, float; legend
    titles = " ".join(page.text)
    assert "int8 50 us, float 10 us (kept float)" in titles
    assert page.ids["latency-interval"] == "svg" and "[0.600, 0.650]" in titles
    d["passes"][-1]["details"]["speed"] = {"skipped": "per-layer times are CPU only, not CUDAExecutionProvider"}
    page = parse(render_html(d))
    assert "speed" not in page.ids and "CPU only" in " ".join(page.text)


def test_lossy_passes_plot_channels_kept_rank_and_bytes_per_layer():
    report = onnxopt.optimize(MODEL, "simplify,fold-bn,share-init", prune=0.25, lowrank_energy=0.9, cluster_bits=4,
                              sparsity=0.5, data=TEST, latency=False).report
    details = {r.name: r.details for r in report.passes}
    page = parse(render_html(report))
    prune = details["prune"]
    assert len(page.inside("prune-groups", "g")) == len(prune["sizes"])
    words = " ".join(page.text)
    for gid, size in prune["sizes"].items():
        assert f"{size - len(prune['removed'].get(gid, []))} of {size} kept" in words
    assert len(page.inside("lowrank", "g")) == len(details["lowrank"]["layers"])
    assert len(page.inside("cluster", "g")) == len(details["cluster"]["layers"])
    assert len(page.inside("sparsify", "g")) == len(details["sparsify"]["layers"])
    assert report.lossy and "CHANGED" in words  # the verdict of a lossy run, as the terminal says


def test_a_failed_run_says_failed_and_why(plain):
    d = copy.deepcopy(plain.to_dict())
    d["ok"] = False
    d["validation"]["ok"] = False
    d["validation"]["outputs"][0]["ok"] = False
    page = parse(render_html(d))
    words = " ".join(page.text)
    assert "FAILED: output(s) output outside the tolerance" in words
    assert len([a for t, a, _ in page.elements if t == "tr" and a.get("class") == "failed"]) == 1


def test_strings_from_the_report_are_escaped(plain):
    d = copy.deepcopy(plain.to_dict())
    note = '<script>alert("x")</script> & "quotes"'
    d["model"] = 'a<b>&"c".onnx'
    d["notes"] = [note]
    d["passes"][0]["summary"] = "<img src=x onerror=alert(1)>"
    text = render_html(d)
    page = parse(text)
    assert "<script>alert" not in text and "<img" not in text and 'a<b>' not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in text
    assert note in page.text and "<img src=x onerror=alert(1)>" in page.text  # shown as text
    assert len([t for t, _, _ in page.elements if t == "script"]) == 1  # the page's own sorting lines only


def test_a_sweep_plots_a_circle_per_result_and_joins_the_front():
    sweep = sweep_results()
    text = render_html(None, sweep=sweep)
    page = parse(text)
    measured = [r for r in sweep["results"] if not r["error"]]
    circles = page.inside("pareto", "circle")
    assert len(circles) == len(measured)  # the failed recipe is in the table, not the plot
    front = [c for c in circles if "front" in c["class"].split()]
    assert len(front) == sum(r["pareto"] for r in measured)
    points = page.inside("pareto", "polyline")
    assert len(points) == 1 and points[0]["id"] == "front"
    joined = [tuple(p.split(",")) for p in points[0]["points"].split()]
    assert sorted(joined) == sorted((c["cx"], c["cy"]) for c in front)
    assert [float(x) for x, _ in joined] == sorted(float(x) for x, _ in joined)  # along the latency axis
    # every circle's tooltip names its recipe
    for c in circles:
        recipe = sweep["results"][int(c["data-result"])]["recipe"]
        assert f"prune={recipe['prune']}, quantize={recipe['quantize']}" in " ".join(page.text)
    assert len(page.inside("pareto", "title")) == len(measured)
    assert len(page.inside("sweep-table", "tr")) == len(sweep["results"]) + 1
    assert 'worker died &lt;signal 9&gt; &amp; &quot;gone&quot;' in text
    assert "accuracy (%)" in page.text
    assert_self_contained(text, page)


def test_a_sweep_without_labels_plots_cosine(quantized):
    sweep = sweep_results()
    for r in sweep["results"]:
        if "accuracy" in r["metrics"]:
            r["metrics"]["cosine"] = r["metrics"].pop("accuracy")
    page = parse(render_html(quantized, sweep=sweep))
    assert "cosine to the original" in page.text and {"sweep", "pareto", "sqnr"} <= set(page.ids)


def test_write_html_is_atomic(plain, tmp_path):
    path = tmp_path / "report.html"
    write_html(plain, path)
    assert path.read_text(encoding="utf-8") == render_html(plain)
    assert os.listdir(tmp_path) == ["report.html"]  # no temporary file left
    with pytest.raises(OutputPathError, match="--html"):
        write_html(plain, tmp_path / "missing" / "report.html")


# --- a real browser ---------------------------------------------------------------------------------


def png_pixels(data: bytes) -> list[bytes]:
    """The pixels of an 8-bit RGB or RGBA PNG (what a browser's screenshot writes), unfiltered."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev, pixels = zlib.decompress(idat), width * channels, bytearray(width * channels), []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            paeth = a if pa <= pb and pa <= pc else b if pb <= pc else c
            line[i] = (line[i] + (0, a, b, (a + b) // 2, paeth)[kind]) & 0xFF
        pixels += [bytes(line[i:i + channels]) for i in range(0, stride, channels)]
        prev = line
    return pixels


def test_png_pixels_reads_what_it_is_given():
    def png(rows: list[bytes], kind: int = 0) -> bytes:
        def chunk(name, body):
            return struct.pack(">I", len(body)) + name + body + struct.pack(">I", zlib.crc32(name + body))
        raw = b"".join(bytes([kind]) + r for r in rows)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, len(rows), 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

    assert png_pixels(png([b"\x01\x02\x03\x04\x05\x06", b"\x07\x08\x09\x0a\x0b\x0c"])) == [
        b"\x01\x02\x03", b"\x04\x05\x06", b"\x07\x08\x09", b"\x0a\x0b\x0c"]
    # Sub filter: each byte adds the byte a pixel to its left
    assert png_pixels(png([b"\x01\x02\x03\x01\x01\x01"], kind=1)) == [b"\x01\x02\x03", b"\x02\x03\x04"]


def browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_a_headless_browser_draws_the_page(quantized, tmp_path):
    exe = browser()
    if exe is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH")
    page = tmp_path / "report.html"
    write_html(quantized, page, sweep=sweep_results())
    shot = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = png_pixels(shot.read_bytes())
    assert len(set(pixels)) > 20  # text, bars and the verdict's colour: not a blank page
    assert b"\x2e\x7d\x32" in {p[:3] for p in pixels}  # the green OK badge is drawn


# --- the command line's --html (wired by onnxopt/cli.py) ---------------------------------------------



def test_cli_html_is_written_with_the_model_and_the_report_all_or_none(tmp_path, capsys):
    from onnxopt.cli import main

    out, report, page = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "r.html"
    args = [MODEL, "-o", str(out), "--data", TEST, "--no-latency", "-q", "--report", str(report), "--html", str(page)]
    assert main(args) == 0
    parsed = parse(page.read_text(encoding="utf-8"))
    assert {"summary", "passes", "validation"} <= set(parsed.ids) and f"→ {out}" in " ".join(parsed.text)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "r.html", "r.json"]
    # an --html path that cannot be written: neither the model nor the JSON report is left behind
    for f in (out, report, page):
        f.unlink()
    assert main([*args[:-1], str(tmp_path / "missing" / "r.html")]) == 2
    assert os.listdir(tmp_path) == []
    assert main([*args[:-1], str(out)]) == 2  # the output model's own path
    assert "--html" in capsys.readouterr().err
