"""The command line: a thin shell over ``onnxopt.optimize``; exit 0 validated, 1 validation failed, 2 bad input."""

from __future__ import annotations

__all__ = ["main", "build_parser"]

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path


from onnxopt import io
from onnxopt.errors import OptionError, OutputPathError
from onnxopt.calibrate import DEFAULT_PERCENTILE, METHODS
from onnxopt.passes import REGISTRY
from onnxopt.pipeline import optimize
from onnxopt.recipe import DEFAULT_PASSES, QUANTIZE_MODES, Recipe
from onnxopt.html_report import stage_html, write_html
from onnxopt.report import failure_reason, render_table, stage_json_file, write_json
from onnxopt.target import TARGETS
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_RTOL, HALF_RTOL

from onnxopt.terminal import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, ArgumentParser, Progress, guarded


def _or_auto(kind):
    """An argparse type: a number of ``kind``, or ``auto`` (chosen per layer by measured sensitivity)."""
    def parse(text: str):
        return "auto" if text == "auto" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its message: "invalid float value"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="onnxopt",
        usage="%(prog)s MODEL [options]\n       %(prog)s bench MODEL [--vs BASELINE] [options]   (latency check: %(prog)s bench --help)"
              "\n       %(prog)s sweep MODEL --grid GRID.toml [options]   (many recipes, a Pareto front: %(prog)s sweep --help)",
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
    parser.add_argument("--html", metavar="PATH", help="write the report as one self-contained HTML page, with per-layer charts")
    parser.add_argument("--no-validate", dest="validate", action="store_false", help="skip validation under onnxruntime")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency comparison")
    parser.add_argument("--latency-budget", type=float, default=5.0, metavar="S", help="seconds for the latency comparison (default 5; up to 3x that where "
                             "the 6 pairs of an interval need it)")
    parser.add_argument("--in-place", action="store_true", help="allow the output to overwrite the input")
    parser.add_argument("--prune", type=float, metavar="RATIO", help="remove this fraction of channels by importance (lossy; 'prune' pass)")
    parser.add_argument("--importance", default="l1", choices=("l1", "l2", "bn", "activation", "apoz", "entropy", "taylor", "fisher"),
                        help="pruning criterion (default l1; activation: mean |x|, apoz: non-zero fraction, entropy: of each "
                             "channel's histogram, low pruned first; all three from --calibration; taylor: |activation x gradient|, "
                             "fisher: squared gradients, from --calibration or --train-data, with torch)")
    parser.add_argument("--prune-scope", default="layer", choices=("layer", "global"), help="ratio per channel group (default) or over all groups")
    parser.add_argument("--round-to", type=int, default=1, metavar="N", help="keep pruned channel counts multiples of N")
    parser.add_argument("--prune-first", dest="protect_first", action="store_false", help="let pruning touch the first layer")
    parser.add_argument(
        "--calibration",
        help="calibration data for --quantize and --importance activation (.npz, folder of .npy, onnx test data, or 'synthetic')",
    )
    parser.add_argument("--quantize", choices=QUANTIZE_MODES,
                        help="int8: static QDQ with calibrated ranges (needs --calibration); int8-dynamic: int8 weights, "
                             "activations quantized at run time; int4: weight-only block int4 (MatMulNBits); "
                             "auto: static and dynamic int8 both built, the faster that meets the budget kept")
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
    parser.add_argument("--max-drop", type=float, metavar="POINTS", help="a lossy run's budget: accuracy points the --eval labels may lose (int8 default 1.0); layers are undone until it holds")
    parser.add_argument("--min-cosine", type=float, metavar="C", help="a lossy run's budget without labels: least cosine per sample to the original (int8 default 0.99)")
    parser.add_argument("--cluster-bits", type=_or_auto(int), metavar="B",
                        help="weight clustering: a 2^B-entry codebook per weight (1: binary, 2: ternary; adds the 'cluster' pass; "
                             "lossy); auto: bits per layer by measured sensitivity under the budget")
    parser.add_argument("--cluster-per-channel", action="store_true", help="one codebook per output channel")
    parser.add_argument("--sparsity", type=_or_auto(float), metavar="S",
                        help="zero this fraction of each weight by magnitude, stored sparse (adds the 'sparsify' pass; lossy); "
                             "auto: per layer by measured sensitivity under the budget (--max-drop / --min-cosine, on --eval)")
    parser.add_argument("--sparsity-pattern", choices=("2:4",), help="N:M sparsity: keep the 2 largest of every 4")
    parser.add_argument("--lowrank-energy", type=_or_auto(float), metavar="E",
                        help="factorize Gemm/MatMul/Conv weights keeping this fraction of spectral energy (adds 'lowrank'; lossy); "
                             "auto: per layer by measured sensitivity under the budget, where the pair is faster too")
    parser.add_argument("--lowrank-ratio", type=float, metavar="R", help="factorize to about this fraction of each layer's weights")
    parser.add_argument("--precision", choices=("fp16", "bf16"),
                        help="convert weights and compute to half precision, inputs/outputs kept float32; float32 islands "
                             "where the cosine per sample would miss --min-cosine (default 0.9999)")
    parser.add_argument("--outputs", metavar="NAME[,NAME]",
                        help="outputs the accuracy budget judges (default: all); the others are reported, not judged")
    parser.add_argument("--smooth-quant", metavar="ALPHA|auto",
                        help="--quantize int8: SmoothQuant (per-channel activation range moved into the projection weights "
                             "after each LayerNorm) before calibrating; int8-dynamic: into the weights of every "
                             "projection, one Mul per activation (needs --calibration); alpha in [0, 1] or auto (per layer)")
    parser.add_argument("--dynamic-activations", choices=("auto", "row", "tensor"), default="auto",
                        help="--quantize int8-dynamic: row: one scale per row (token) of each activation (outlier "
                             "tokens and padding do not set the others' step); tensor: one per tensor (onnxruntime's "
                             "fused DynamicQuantizeMatMul: faster, coarser); auto (default): with --min-cosine/"
                             "--max-drop tensor first and row for the layers the budget needs; without, tensor (row "
                             "with --smooth-quant)")
    parser.add_argument("--eval", help="labelled data for validation and accuracy (same as --data)")
    parser.add_argument("--distill", action="store_true",
                        help="after the lossy passes, train the weights to match the input model (the teacher) on --train-data; needs torch")
    parser.add_argument("--train-data", metavar="FILE", help="inputs to distill on (.npz, folder of .npy, ...); labels optional")
    parser.add_argument("--epochs", type=int, help="distillation epochs (default 10; stops early on a held-out 10%%)")
    parser.add_argument("--steps", type=int, help="distillation steps instead of epochs")
    parser.add_argument("--temperature", type=float, default=4.0, help="distillation softmax temperature for logits (default 4)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label loss when --train-data has labels (default 0.5)")
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distillation (default 0)")
    parser.add_argument("--distill-features", metavar="auto|NAME[,NAME]",
                        help="--distill: also match intermediate tensors to the teacher's, sliced to the channels the student "
                             "kept; auto: the channel groups' boundaries (the activations each pruned layer's consumer reads)")
    parser.add_argument("--feature-weight", type=float, default=1.0, metavar="W",
                        help="weight of the intermediate matching loss beside the output loss (default 1)")
    parser.add_argument("--int4-block-size", type=int, default=32, metavar="B", help="--quantize int4: weights per scale (default 32)")
    parser.add_argument("--int4-method", default="rtn", choices=("rtn", "hqq", "gptq"),
                        help="--quantize int4: round to nearest, HQQ, or GPTQ (needs --calibration or --data)")
    parser.add_argument("--int4-asymmetric", dest="int4_symmetric", action="store_false", help="--quantize int4: zero points per block")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), help="--quantize int4: MatMulNBits accuracy_level")
    parser.add_argument("--int4-fallback", default="int8", choices=("int8", "float"),
                        help="--quantize int4 with a budget (--min-cosine, --max-drop): a layer that misses goes to 8-bit "
                             "blocks first and to float only if it still harms (int8, default), or to float at once")
    parser.add_argument("--preset", choices=("deep-compression",),
                        help="deep-compression: prune, sparsify, distill, cluster, distill over a small grid of settings "
                             "(needs --train-data and labelled --eval); the smallest storage within --max-drop wins")
    parser.add_argument("--recipe", metavar="TOML", help="read the run's options from a recipe file (flags given here win)")
    parser.add_argument("--save-recipe", metavar="TOML", help="write this run's options as a recipe file, to replay it with --recipe")
    parser.add_argument("--explain", action="store_true", help="print the channel groups that 'prune' sees, and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log each rewrite (-v) and debug detail (-vv)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "sweep":
        from onnxopt.sweep_cli import main as sweep_main  # the sweep subcommand

        return sweep_main(argv[1:])
    if argv and argv[0] == "bench":
        from onnxopt.bench import main as bench_main  # the latency subcommand

        return bench_main(argv[1:])
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option (already printed in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    level = logging.ERROR if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    progress = Progress(enabled=not args.quiet)
    return guarded(lambda: _run(args, progress, parser), progress)


# Flags that are not options of a run (they say where its files go, how it talks), and the
# flags whose Recipe field has another name or sense.
_NOT_RECIPE = {"model", "output", "report", "html", "in_place", "explain", "quiet", "verbose", "recipe", "save_recipe", "eval",
               "preset"}
_RENAMED = {"dim": "dims", "fix_dim": "fix_dims"}


def _recipe(args, parser) -> Recipe:
    """The run's ``Recipe``: the --recipe file's, with every flag given on the command line (a value
    other than the flag's default) taking the place of the file's; checked as ``optimize`` checks it."""
    recipe = Recipe.from_toml(args.recipe) if args.recipe else Recipe()
    changes = {}
    for name, value in vars(args).items():
        if name in _NOT_RECIPE or value == parser.get_default(name):
            continue
        if name == "passes":
            value = [n.strip() for n in value.split(",") if n.strip()]
        elif name == "exclude":
            value = [e.strip() for item in value for e in item.split(",") if e.strip()]
        elif name == "outputs":
            value = [o.strip() for o in value.split(",") if o.strip()]
        elif name == "distill_features":
            value = "auto" if value.strip() == "auto" else [o.strip() for o in value.split(",") if o.strip()]
        elif name == "smooth_quant":
            try:
                value = value if value == "auto" else float(value)
            except ValueError:
                raise OptionError(f"--smooth-quant {value!r}: give alpha in [0, 1] or auto") from None
        elif name == "speed_fallback":
            value = False  # --no-speed-fallback; None (the default) is 'when latency is measured'
        changes[_RENAMED.get(name, name)] = value
    recipe = recipe.replace(**changes)
    if args.preset:  # said in the preset's words, not as the --distill it turns on
        from onnxopt.presets import check_preset_data

        check_preset_data(args.preset, recipe)
    recipe.check_options()
    return recipe


def _check_destinations(args, output: str) -> None:
    """-o, --report and --save-recipe: an existing folder we can write in, a regular file or nothing at the path."""
    io.check_destination(output)
    if args.report:
        io.check_destination(args.report, "--report")
    if args.save_recipe:
        io.check_destination(args.save_recipe, "--save-recipe")
    if args.html:
        io.check_destination(args.html, "--html")


def _check_paths(args, output: str) -> None:
    """Refuse an -o or --report path that would overwrite an input: the model (unless --in-place),
    its external data, the --calibration, --data or --eval file, or (for --report) the output."""
    def same(a: str, b: str) -> bool:
        return os.path.realpath(a) == os.path.realpath(b)

    inputs = [("the input model", args.model)] + [("the input model's external data", str(f))
                                                  for f in sorted(io.referenced_files(args.model))]
    for flag in ("calibration", "data", "recipe", "train_data"):
        value = getattr(args, flag)
        shown = f"--{'eval/--data' if flag == 'data' else flag.replace('_', '-')}"
        if value and value != "synthetic" and os.path.isfile(value):
            inputs.append((f"the {shown} file", value))
        elif value and value != "synthetic" and os.path.isdir(value):  # the files a data folder's reader reads
            inputs += [(f"a file of the {shown} folder", str(f)) for pattern in ("*.npy", "input_*.pb", "test_data_set*/*.pb")
                       for f in sorted(Path(value).glob(pattern))]
    for what, path in inputs:
        if same(output, path) and not (args.in_place and path == args.model):
            raise OutputPathError(f"{output}: refusing to overwrite {what}; choose another -o path")
        if args.report and same(args.report, path):
            raise OptionError(f"--report {args.report}: refusing to overwrite {what}")
        if args.save_recipe and same(args.save_recipe, path):
            raise OptionError(f"--save-recipe {args.save_recipe}: refusing to overwrite {what}")
        if args.html and same(args.html, path):
            raise OptionError(f"--html {args.html}: refusing to overwrite {what}")
    if args.report and same(args.report, output):
        raise OptionError(f"--report {args.report}: is the output model's path; give the JSON report its own")


def _commit(result, output: str, report_path: str | None, in_place: bool,
            recipe: tuple[str, str] | None = None, html_path: str | None = None) -> None:
    """Write the model, the JSON report, the recipe (``(path, text)``) and the HTML report, all or
    none: the reports and the recipe are written first to temporary files beside their paths, the model saved, then
    they are moved into place. Where that last step fails, the new model is removed again (unless
    it replaced the input, --in-place)."""
    staged: list[tuple[str, str, str]] = []  # (temporary file, destination, flag)
    try:
        if report_path:
            result.report.output = output
            staged.append((stage_json_file(result.report.to_dict(), report_path), report_path, "--report"))
        if recipe:
            staged.append((io.stage_text(recipe[1], recipe[0], "--save-recipe"), recipe[0], "--save-recipe"))
        if html_path:
            result.report.output = output
            staged.append((stage_html(result.report, html_path), html_path, "--html"))
        result.save(output, in_place=in_place)
    except BaseException:
        for tmp, _, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for i, (tmp, path, flag) in enumerate(staged):
        try:
            os.replace(tmp, path)
        except OSError as exc:
            for later, _, _ in staged[i:]:
                with contextlib.suppress(OSError):
                    os.unlink(later)
            for _, done, _ in staged[:i]:
                with contextlib.suppress(OSError):
                    os.unlink(done)
            with contextlib.suppress(OSError):
                if not in_place:
                    os.unlink(output)
            raise OutputPathError(f"{flag} {path}: cannot write ({exc.strerror or exc}); "
                                  f"{output} {'was replaced' if in_place else 'not written'}") from None


def _run(args, progress: Progress, parser) -> int:
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
    preset_drop = None
    if args.preset:  # the preset distills (--train-data belongs to it) and judges --max-drop itself
        args.distill, preset_drop, args.max_drop = True, args.max_drop, None
    recipe = _recipe(args, parser)
    if args.preset and preset_drop is not None:
        recipe = recipe.replace(max_drop=preset_drop)
    written = [(p, f) for p, f in ((args.report, "--report"), (args.save_recipe, "--save-recipe"), (args.html, "--html")) if p]
    for i, (path, flag) in enumerate(written):
        if os.path.realpath(path) == os.path.realpath(output):
            raise OptionError(f"{flag} {path}: is the output model's path; give it its own")
        for other, other_flag in written[:i]:
            if os.path.realpath(path) == os.path.realpath(other):
                raise OptionError(f"{flag} {path}: is the {other_flag} path; give each its own")
    args.calibration, args.data, args.train_data = recipe.calibration, recipe.data, recipe.train_data  # as a recipe file may give them
    _check_destinations(args, output)
    _check_paths(args, output)
    recipe_text = recipe.to_toml() if args.save_recipe else None  # a recipe it cannot hold fails now
    if args.preset:
        from onnxopt.presets import run_preset

        result = run_preset(args.preset, args.model, recipe, progress=progress)
    else:
        result = optimize(args.model, recipe, progress=progress)
    report = result.report
    if result.ok:
        _commit(result, output, args.report, args.in_place,
                (args.save_recipe, recipe_text) if args.save_recipe else None, args.html)
    else:
        report.notes.append(f"validation failed: {output} not written")
        if args.report:
            write_json(report, args.report)
        if args.html:
            write_html(report, args.html)
    progress.clear()
    if not args.quiet:
        print(render_table(report))
    if not result.ok:  # also under --quiet: a failed run says why, on stderr
        print(f"onnxopt: failed: {failure_reason(report)}; {output} not written", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED
