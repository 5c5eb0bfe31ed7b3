"""``onnxopt sweep``: build a grid of recipes, time each result, and print the Pareto front.

    python -m onnxopt sweep model.onnx --grid grid.toml [--eval test.npz] [--calibration calib.npz]
                            [--workers N | --ray auto|ADDRESS] [--out DIR] [--latency-budget S] [-q]

Exit codes: 0 the sweep ran (failed recipes are listed in the table and in sweep.json), 1 every
recipe failed, 2 bad input. The work is ``onnxopt.sweep.run_sweep``.
"""

from __future__ import annotations

__all__ = ["build_parser", "main", "render_sweep"]

import argparse
import logging
import os
import sys

from onnxopt import io
from onnxopt.errors import OptionError
from onnxopt.sweep import SweepResult, front_order, load_grid, run_sweep
from onnxopt.terminal import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, ArgumentParser, Progress, guarded

_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="onnxopt sweep",
        description="Optimize a model with every recipe of a grid (in parallel, cached), time each result against "
                    "the original (one at a time), and show the Pareto front of quality, latency and size.",
        epilog="Exit codes: 0 the sweep ran, 1 every recipe failed, 2 bad input. See docs/sweeps.md.",
    )
    parser.add_argument("model", help="the .onnx model to optimize")
    parser.add_argument("--grid", required=True, metavar="TOML", help="the grid: recipe fields with lists of values, "
                        "[base] for fields all share, [[recipe]] tables for recipes one by one")
    parser.add_argument("--eval", metavar="FILE", help="labelled data for validation and accuracy (each recipe's data)")
    parser.add_argument("--calibration", metavar="FILE", help="calibration data for quantize and activation importance")
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument("--workers", type=int, metavar="N", help="worker processes (default: one per core)")
    engine.add_argument("--ray", metavar="auto|ADDRESS", help="build as Ray tasks: 'auto' starts a local cluster, "
                        "else the address of one (needs pip install 'onnxopt[ray]')")
    parser.add_argument("--out", metavar="DIR", help="where models, sweep.json and front-<n>.toml go "
                        "(default: MODEL's name + .sweep in the current folder); a rerun reuses what it holds")
    parser.add_argument("--latency-budget", type=float, default=2.0, metavar="S",
                        help="seconds of paired timing per result (default 2; 0: no timing)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (sweep.json still tells)")
    return parser


def _changed(result: SweepResult) -> tuple[dict, list[dict]]:
    """The fields every recipe shares (data paths aside), and each recipe's other fields."""
    fields = [{k: v for k, v in e.recipe_fields().items() if k not in ("data", "calibration")} for e in result.entries]
    common = {k: v for k, v in fields[0].items() if all(f.get(k, object()) == v for f in fields)} if fields else {}
    return common, [{k: v for k, v in f.items() if k not in common} for f in fields]


def _value(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def render_sweep(result: SweepResult, original_bytes: int | None = None, color: bool = False) -> str:
    """The terminal view: one row per recipe along the front (front points first, marked *), then
    the dominated (greyed on a terminal) and the failed; the recipe's fields that vary."""
    common, changed = _changed(result)
    by_entry = {id(e): c for e, c in zip(result.entries, changed)}
    quality = result.quality
    header = ["", "accuracy" if quality == "accuracy" else "cosine", "latency ×", "interval", "bytes", "size ×",
              "MACs", "recipe"]
    rows, dim = [], []
    for e in front_order(result.entries, quality):
        m = e.metrics
        fields = " ".join(f"{k}={_value(v)}" for k, v in by_entry[id(e)].items()) or "(the common fields)"
        if e.error:
            rows.append(["x", "-", "-", "-", "-", "-", "-", f"{fields}: FAILED: {e.error}"])
            dim.append(False)
            continue
        q = m.get(quality) if quality else None
        shown_q = "-" if q is None else f"{q:.2%}" if quality == "accuracy" else f"{q:.4f}"
        ratio = m.get("latency_ratio")
        low, high = m.get("latency_low"), m.get("latency_high")
        size = m.get("file_bytes")
        rows.append([
            "*" if e.pareto else "",
            shown_q,
            "-" if ratio is None else f"{ratio:.3f}",
            "-" if low is None or high is None else f"{low:.3f}-{high:.3f}",
            "-" if size is None else f"{size:,}",
            "-" if size is None or not original_bytes else f"{size / original_bytes:.2f}",
            "-" if m.get("macs") is None else f"{m['macs']:,}",
            fields + (" (cached)" if e.cached else ""),
        ])
        dim.append(not e.pareto)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    def line(row):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:])]
        return "  ".join(cells + [row[-1]]).rstrip()
    lines = [f"onnxopt sweep: {len(result.entries)} recipes -> {result.out_dir}"]
    if common:
        lines.append("every recipe: " + " ".join(f"{k}={_value(v)}" for k, v in common.items()))
    lines += [line(header), "  ".join("-" * w for w in widths) + "  ------"]
    for row, grey in zip(rows, dim):
        text = line(row)
        lines.append(f"{_DIM}{text}{_RESET}" if grey and color else text)
    built = sum(1 for e in result.entries if not e.cached and not e.error)
    cached = sum(1 for e in result.entries if e.cached)
    failed = len(result.failed)
    lines.append(f"* on the Pareto front ({quality or 'no quality figure'} higher, latency × and bytes lower; "
                 f"latency × is against the original, paired). {built} built, {cached} cached, {failed} failed; "
                 f"build {result.build_seconds:.1f} s on {result.engine}, timing {result.timing_seconds:.1f} s")
    if result.fronts:
        lines.append(f"front recipes: {os.path.dirname(result.fronts[0])}/front-1..{len(result.fronts)}.toml "
                     f"(replay: python -m onnxopt MODEL --recipe FILE)")
    lines.append(f"all results: {result.out_dir}/sweep.json; the plot: {result.out_dir}/sweep.html")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # --help, or a bad option (already printed in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    progress = Progress(enabled=not args.quiet)
    return guarded(lambda: _run(args, progress), progress)


def _run(args, progress: Progress) -> int:
    io.check_model_path(args.model)
    recipes = load_grid(args.grid)
    out = args.out or os.path.splitext(os.path.basename(args.model))[0] + ".sweep"
    if os.path.exists(out) and not os.path.isdir(out):
        raise OptionError(f"--out {out}: exists and is not a folder; give a folder's path")
    result = run_sweep(args.model, recipes, eval=args.eval, calibration=args.calibration, out_dir=out,
                       workers=args.workers, ray=args.ray, latency_budget=args.latency_budget, progress=progress)
    progress.clear()
    if not args.quiet:
        print(render_sweep(result, os.path.getsize(args.model), color=sys.stdout.isatty()))
    if len(result.failed) == len(result.entries):
        print(f"onnxopt: failed: every recipe failed (first: {result.entries[0].error})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":  # python -m onnxopt.sweep_cli, as python -m onnxopt sweep
    sys.exit(main())
