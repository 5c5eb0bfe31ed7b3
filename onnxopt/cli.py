"""The command line: a thin shell over ``onnxopt.optimize``; exit 0 validated, 1 validation failed, 2 bad input."""

from __future__ import annotations

__all__ = ["main", "build_parser"]

import argparse
import contextlib
import logging
import os
import sys
import time


from onnxopt import io
from onnxopt.errors import OnnxoptError, OptionError, OutputPathError
from onnxopt.calibrate import DEFAULT_PERCENTILE, METHODS
from onnxopt.passes import REGISTRY, QuantizeQDQ
from onnxopt.pipeline import DEFAULT_PASSES, optimize
from onnxopt.options import check_arguments
from onnxopt.report import failure_reason, render_table, stage_json_file, write_json
from onnxopt.target import TARGETS
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_RTOL, HALF_RTOL

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line and exits 2, like every other user error."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_BAD_INPUT, f"onnxopt: error: {message} (see --help)\n")


class Progress:
    """One self-overwriting status line on a terminal; silent when piped or quiet."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.stream = stream
        self.enabled = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._last = 0.0
        self._width = 0

    def clear(self) -> None:
        """Blank the status line, so that a message printed next starts on a clean line."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage != "done" and now - self._last < 0.1 and done < total:
            return
        self._last = now
        text = "" if stage == "done" else f"onnxopt: {stage} {done}/{total}" if total > 1 else f"onnxopt: {stage}"
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.write("\r" if stage == "done" else "")
        self.stream.flush()
        self._width = len(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="onnxopt",
        usage="%(prog)s MODEL [options]\n       %(prog)s bench MODEL [--vs BASELINE] [options]   (latency check: %(prog)s bench --help)",
        description="Optimize an ONNX model with graph passes and prove the result under onnxruntime.",
        epilog=f"passes: {', '.join(REGISTRY)}. Exit codes: 0 validated, 1 validation failed, 2 bad input. "
        "'onnxopt bench' times a model against a baseline and exits 1 when it is slower.",
    )
    parser.add_argument("model", help="input .onnx file (never modified unless --in-place)")
    parser.add_argument("-o", "--output", help="output path (default: MODEL.opt.onnx beside the input)")
    parser.add_argument(
        "--passes", default=",".join(DEFAULT_PASSES),
        help=f"comma-separated passes to run in order (default: {','.join(DEFAULT_PASSES)})",
    )
    parser.add_argument("--data", help="inputs for validation: .npz, folder of .npy, onnx test-data .pb, or 'synthetic'")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="size of a named dynamic dim (repeatable)")
    parser.add_argument("--fix-dim", action="append", default=[], metavar="NAME=N",
                        help="fix a named dynamic input dim in the output (repeatable; adds the 'fix-shapes' pass "
                             "first, so that simplify folds the shape arithmetic; the model then takes only that size)")
    parser.add_argument("--batch-size", type=int, help="samples per batch when cutting --data (default 32)")
    parser.add_argument("--max-samples", type=int, metavar="N",
                        help="read at most the first N samples of --data/--eval and --calibration (default: all)")
    parser.add_argument("--providers", default="cpu", help="execution providers: cpu (default), cuda, ...")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads for the latency comparison (default 1)")
    parser.add_argument(
        "--rtol", type=float, default=None,
        help=f"relative tolerance, of max|reference| (default {DEFAULT_RTOL:g}; {HALF_RTOL['float16']:g} for float16 outputs)",
    )
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    parser.add_argument("--report", metavar="JSON", help="write the report as JSON")
    parser.add_argument("--no-validate", dest="validate", action="store_false", help="skip validation under onnxruntime")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency comparison")
    parser.add_argument("--latency-budget", type=float, default=5.0, metavar="S", help="seconds for the latency comparison (default 5)")
    parser.add_argument("--in-place", action="store_true", help="allow the output to overwrite the input")
    parser.add_argument("--prune", type=float, metavar="RATIO", help="remove this fraction of channels by importance (lossy; 'prune' pass)")
    parser.add_argument("--importance", default="l1", choices=("l1", "l2", "bn", "activation", "apoz"),
                        help="pruning criterion (default l1; activation: mean |x|, apoz: non-zero fraction, both from --calibration)")
    parser.add_argument("--prune-scope", default="layer", choices=("layer", "global"), help="ratio per channel group (default) or over all groups")
    parser.add_argument("--round-to", type=int, default=1, metavar="N", help="keep pruned channel counts multiples of N")
    parser.add_argument("--prune-first", dest="protect_first", action="store_false", help="let pruning touch the first layer")
    parser.add_argument(
        "--calibration",
        help="calibration data for --quantize and --importance activation (.npz, folder of .npy, onnx test data, or 'synthetic')",
    )
    parser.add_argument("--quantize", choices=("int8",), help="static int8 QDQ quantization (adds the 'quantize' pass; needs --calibration)")
    parser.add_argument("--calibrate", default="minmax", choices=METHODS, help="range method for --quantize (default minmax)")
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE, help=f"for --calibrate percentile (default {DEFAULT_PERCENTILE})")
    parser.add_argument(
        "--activations", default="uint8", choices=("uint8", "int8", "auto"),
        help="uint8 asymmetric (default: fastest on onnxruntime CPU), int8 symmetric (TensorRT), or auto: "
             "whichever runs faster here, measured side by side",
    )
    parser.add_argument(
        "--target", default="auto", choices=TARGETS,
        help="machine the int8 model is for (default auto: this one): avx2/avx512 (no VNNI) get 7-bit weights, "
             "which their int8 kernels cannot saturate; vnni, arm64 8-bit; tensorrt symmetric int8 activations",
    )
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per output channel")
    parser.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                        help="keep the float biases (default: each Conv/Gemm bias absorbs its weight rounding's mean output error)")
    parser.add_argument("--no-speed-fallback", dest="speed_fallback", action="store_false",
                        help="keep every layer int8 (default: layers whose int8 kernels run slower here stay float, "
                             "when the model is then faster side by side; --no-latency skips this too)")
    parser.add_argument("--exclude", action="append", default=[], metavar="NODE", help="keep in float: node name, op type or pattern (repeatable, comma-separated)")
    parser.add_argument("--max-drop", type=float, metavar="POINTS", help="quantize: accuracy points the --eval labels may lose (default 1.0); layers fall back to float until met")
    parser.add_argument("--min-cosine", type=float, metavar="C", help="quantize: least output cosine to float without labels (default 0.99); layers fall back to float until met")
    parser.add_argument("--eval", help="labelled data for validation and accuracy (same as --data)")
    parser.add_argument("--explain", action="store_true", help="print the channel groups that 'prune' sees, and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log each rewrite (-v) and debug detail (-vv)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from onnxopt.bench import main as bench_main  # the latency subcommand

        return bench_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option (already printed in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    level = logging.ERROR if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    progress = Progress(enabled=not args.quiet)
    try:
        return _run(args, progress)
    except OnnxoptError as exc:
        progress.clear()
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        progress.clear()
        print("onnxopt: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        progress.clear()  # a traceback starts on its own line
        raise


def _check_options(args, passes: list, output: str) -> None:
    """Refuse option values that would only fail later, after work was done or files written: the
    arguments of ``optimize`` (by the very check it runs itself), and both destinations (-o and
    --report: an existing folder we can write in, a regular file or nothing at the path)."""
    check_arguments(dict(
        passes=passes, dims=args.dim, fix_dims=args.fix_dim, providers=args.providers, rtol=args.rtol, atol=args.atol,
        batch_size=args.batch_size, threads=args.threads, latency_budget=args.latency_budget, prune=args.prune,
        importance=args.importance, prune_scope=args.prune_scope, round_to=args.round_to, calibrate=args.calibrate,
        percentile=args.percentile, max_drop=args.max_drop, min_cosine=args.min_cosine, max_samples=args.max_samples,
    ))
    io.check_destination(output)
    if args.report:
        io.check_destination(args.report, "--report")


def _quantize_passes(args) -> list:
    """--passes, with the 'quantize' preset for --quantize and its options in a QuantizeQDQ object."""
    names = [n.strip() for n in args.passes.split(",") if n.strip()]
    if args.quantize and "quantize" not in names:
        names = ["simplify", "fold-bn", "share-init", "quantize"] if args.passes == ",".join(DEFAULT_PASSES) else [*names, "quantize"]
    exclude = [e.strip() for item in args.exclude for e in item.split(",") if e.strip()]
    if "quantize" not in names and (exclude or not args.bias_correction or not args.speed_fallback
                                    or args.activations != "uint8" or args.per_tensor or args.target != "auto"
                                    or args.calibrate != "minmax" or args.percentile != DEFAULT_PERCENTILE):
        raise OptionError("--activations, --target, --per-tensor, --exclude, --calibrate, --percentile, "
                          "--no-bias-correction and --no-speed-fallback apply to --quantize int8")
    return [
        QuantizeQDQ(activations=args.activations, per_channel=not args.per_tensor, exclude=exclude,
                    bias_correction=args.bias_correction) if n == "quantize" else n
        for n in names
    ]


def _check_paths(args, output: str) -> None:
    """Refuse an -o or --report path that would overwrite an input: the model (unless --in-place),
    its external data, the --calibration, --data or --eval file, or (for --report) the output."""
    def same(a: str, b: str) -> bool:
        return os.path.realpath(a) == os.path.realpath(b)

    inputs = [("the input model", args.model)] + [("the input model's external data", str(f))
                                                  for f in sorted(io.referenced_files(args.model))]
    for flag in ("calibration", "data"):
        value = getattr(args, flag)
        if value and value != "synthetic" and os.path.isfile(value):
            inputs.append((f"the --{'eval/--data' if flag == 'data' else flag} file", value))
    for what, path in inputs:
        if same(output, path) and not (args.in_place and path == args.model):
            raise OutputPathError(f"{output}: refusing to overwrite {what}; choose another -o path")
        if args.report and same(args.report, path):
            raise OptionError(f"--report {args.report}: refusing to overwrite {what}")
    if args.report and same(args.report, output):
        raise OptionError(f"--report {args.report}: is the output model's path; give the JSON report its own")


def _commit(result, output: str, report_path: str | None, in_place: bool) -> None:
    """Write the model and the JSON report, both or neither: the report is written first to a
    temporary file beside its path, the model saved, then the report moved into place. Where that
    last step fails, the new model is removed again (unless it replaced the input, --in-place)."""
    staged = None
    if report_path:
        result.report.output = output
        staged = stage_json_file(result.report.to_dict(), report_path)
    try:
        result.save(output, in_place=in_place)
    except BaseException:
        if staged:
            with contextlib.suppress(OSError):
                os.unlink(staged)
        raise
    if staged:
        try:
            os.replace(staged, report_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(staged)
                if not in_place:
                    os.unlink(output)
            raise OutputPathError(f"--report {report_path}: cannot write ({exc.strerror or exc}); "
                                  f"{output} {'was replaced' if in_place else 'not written'}") from None


def _run(args, progress: Progress) -> int:
    if args.explain:
        from onnxopt.pipeline import explain_channels

        print(explain_channels(args.model))
        return EXIT_OK
    if args.eval:
        if args.data and args.data != args.eval:
            raise OptionError("--eval and --data name different files; give one")
        args.data = args.eval
    output = args.output or (args.model if args.in_place else str(io.default_output_path(args.model)))
    if os.path.abspath(output) == os.path.abspath(args.model) and not args.in_place:
        raise OutputPathError(f"{output}: refusing to overwrite the input model; choose another -o path or pass --in-place")
    passes = _quantize_passes(args)
    _check_options(args, passes, output)
    _check_paths(args, output)
    result = optimize(
        args.model, passes, data=args.data, dims=args.dim, providers=args.providers,
        validate=args.validate, latency=args.latency, rtol=args.rtol, atol=args.atol,
        batch_size=args.batch_size, threads=args.threads, latency_budget=args.latency_budget,
        progress=progress, prune=args.prune, importance=args.importance, prune_scope=args.prune_scope,
        round_to=args.round_to, protect_first=args.protect_first, calibration=args.calibration,
        calibrate=args.calibrate, percentile=args.percentile, max_drop=args.max_drop, min_cosine=args.min_cosine,
        speed_fallback=None if args.speed_fallback else False, fix_dims=args.fix_dim, target=args.target, max_samples=args.max_samples,
    )
    report = result.report
    if result.ok:
        _commit(result, output, args.report, args.in_place)
    else:
        report.notes.append(f"validation failed: {output} not written")
        if args.report:
            write_json(report, args.report)
    progress.clear()
    if not args.quiet:
        print(render_table(report))
    if not result.ok:  # also under --quiet: a failed run says why, on stderr
        print(f"onnxopt: failed: {failure_reason(report)}; {output} not written", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED
