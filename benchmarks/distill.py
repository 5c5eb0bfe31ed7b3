"""Benchmark: recovering a pruned digits CNN by distillation from its ONNX teacher, with the
Torch-Pruning anchor beside it.

    .venv/bin/python -m pip install torch-pruning   # only for the anchor; skipped without it
    .venv/bin/python -m benchmarks.distill [--ratio 0.5] [--epochs 60] [--lr 3e-3] [--threads 1] [--int8] [--json out.json]
    .venv/bin/python -m benchmarks.distill --real [--real-ratios 0.3,0.5] [--criteria l1,taylor] [--steps 200] [--lr 1e-3]
    .venv/bin/python -m benchmarks.distill --features [--feature-ratios 0.5,0.7] [--feature-steps 30,60,150]
                                           [--feature-weights 0,0.1,1] [--seeds 0,1,2]

``--features``: intermediate matching (``features="auto"``: the activations at the channel groups'
boundaries, the teacher's sliced to the channels the student kept) against output-only distillation,
with few steps, per ratio, steps, seed and weight; test accuracy (docs/distillation.md has the figures).

``--real``: a trained model from a package instead, PP-OCR's text-direction classifier
(``ppocr-mobile-cls`` of ``models/corpus.py``, MobileNetV3, 0/180 degrees), pruned at each ratio by each
criterion and distilled from the unpruned model on text lines rendered here (``rendered_text``: the
system's TrueType fonts through Pillow, the ``bench`` extra; random strings, tints, rotation, noise, blur,
half turned upside down), without labels; agreement with the teacher's top-1 on other rendered lines,
pruned-only and distilled, and the orientation accuracy (the rendering knows which lines it turned).

1. onnxopt: ``models/digits/digits_cnn.onnx`` simplified, pruned (``PruneChannels(ratio, importance="l1")``,
   BN scales in the group L1 as in Torch-Pruning), BN folded; then ``onnxopt.distill.distill`` from the
   original model (onnxruntime teacher) on the *training split without its labels* (1077 images; 10 %
   of them held out for early stopping), KL with temperature 4, Adam, cosine decay, batch 32.
   Accuracy on the test split (``digits_test.npz``, 540 images, never seen in training or selection);
   seconds of the whole ``distill`` call (teacher outputs, equality check, training, write-back).
2. Anchor: the torch model of ``models/digits/train.py`` with the same weights, pruned by Torch-Pruning
   (``BasePruner``, ``GroupMagnitudeImportance(p=1)``, same ratio, first conv and classifier kept, as
   ``benchmarks/prune.py``), fine-tuned in torch with the same data, split, batches, steps, loss,
   optimizer and best-weights selection (BatchNorm in training mode, as Torch-Pruning's users do).

Both runs use the CPU with ``--threads`` torch threads (default 1: on the shared 2-core AMD EPYC,
two threads took 7.5 s when the machine was quiet and 17-84 s while other jobs ran; one took 7-9 s).

Measured (AMD EPYC, 2 cores shared, 1 thread, 60 epochs, lr 3e-3): float 99.44 %; pruned 27.22 %;
onnxopt distilled 99.26 % (seed 0; 99.07 % with seeds 1, 2, 3) in 6.9-9.2 s; Torch-Pruning anchor
99.07 % (99.26 % with 2 threads) in 9-13 s. Parameters: 7570 (BN folded) and 7658 (BN kept).
``--int8`` (same CPU, load ~3.9): int8 per-tensor with 7-bit weights 99.26 % -> 99.44 % in 4.0 s (10
epochs, lr 1e-4); pruned 0.5 then int8 per channel 27.59 % -> 99.07 % in 20.5 s (60 epochs).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.distill import distill
from onnxopt.passes import FoldBatchNorm, PruneChannels, Simplify
from onnxopt.passes._base import constant_array
from onnxopt.runtime import create_session, run_session
from onnxopt.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def _accuracy(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    logits = run_session(create_session(model), {"input": x})["output"]
    return float((logits.argmax(axis=1) == y).mean())


def onnxopt_run(train_x, test_x, test_y, *, ratio, epochs, lr, seed) -> dict:
    teacher = ir.load(DIGITS / "digits_cnn.onnx")
    student = ir.load(DIGITS / "digits_cnn.onnx")
    Simplify()(student)
    PruneChannels(ratio=ratio, importance="l1")(student)
    FoldBatchNorm()(student)
    pruned_accuracy = _accuracy(student, test_x, test_y)
    result = distill(student, teacher, {"input": train_x}, epochs=epochs, lr=lr, seed=seed, patience=10**9)
    return {
        "params": model_stats(student).params,
        "pruned_accuracy": pruned_accuracy,
        "accuracy": _accuracy(result.model, test_x, test_y),
        "seconds": result.seconds,
        "steps": result.steps,
        "best_step": result.best_step,
        "held_out_agreement": result.best.get("agreement"),
    }


def feature_runs(train_x, test_x, test_y, *, ratios, steps, seeds, weights, lr) -> list[dict]:
    """Intermediate matching against output-only distillation, with few steps: per ratio, number of
    steps, seed and feature weight (0: outputs only), the test accuracy of the distilled student.
    ``features="auto"``: the boundaries the pruning pass recorded, the teacher's sliced to the kept channels."""
    teacher = ir.load(DIGITS / "digits_cnn.onnx")
    rows = []
    for ratio in ratios:
        for n in steps:
            for seed in seeds:
                for weight in weights:
                    student = ir.load(DIGITS / "digits_cnn.onnx")
                    Simplify()(student)
                    pruner = PruneChannels(ratio=ratio, importance="l1")
                    pruner(student)
                    FoldBatchNorm()(student)
                    matching = {"features": "auto", "feature_weight": weight, "kept_channels": pruner.kept_channels,
                                "boundaries": pruner.boundaries} if weight else {}
                    result = distill(student, teacher, {"input": train_x}, steps=n, lr=lr, seed=seed,
                                     patience=10**9, eval_every=max(1, n // 5), **matching)
                    rows.append({"ratio": ratio, "steps": n, "seed": seed, "feature_weight": weight,
                                 "matched": len(result.features), "accuracy": _accuracy(result.model, test_x, test_y),
                                 "seconds": result.seconds})
    return rows


def print_features(rows: list[dict]) -> None:
    print(f"{'ratio':>6s}{'steps':>7s}{'weight':>8s}{'matched':>9s}  accuracy per seed (mean){'':8s}seconds (mean)")
    keys = dict.fromkeys((r["ratio"], r["steps"], r["feature_weight"]) for r in rows)
    for ratio, n, weight in keys:
        group = [r for r in rows if (r["ratio"], r["steps"], r["feature_weight"]) == (ratio, n, weight)]
        accuracies = [r["accuracy"] * 100 for r in group]
        print(f"{ratio:>6g}{n:>7d}{weight:>8g}{group[0]['matched']:>9d}  "
              f"{' '.join(f'{a:.2f}' for a in accuracies)} ({np.mean(accuracies):.2f})"
              f"{np.mean([r['seconds'] for r in group]):>10.1f}")


def int8_runs(train_x, test_x, test_y, *, ratio, epochs, lr, seed) -> dict:
    """QDQ students trained with fake quantization at their calibrated scales (int8 weights written back):
    the float model at per-tensor 7-bit weights, and the pruned model quantized per channel."""
    from onnxopt.calibrate import calibrate
    from onnxopt.passes import QuantizeQDQ

    calib = np.load(DIGITS / "digits_calib.npz")["input"]
    teacher = ir.load(DIGITS / "digits_cnn.onnx")
    rows = {}
    for name, prune, options, rate in (("int8 per-tensor w7", 0.0, {"per_channel": False, "weight_bits": 7}, 1e-4),
                                       (f"prune {ratio} + int8", ratio, {}, lr)):
        student = ir.load(DIGITS / "digits_cnn.onnx")
        Simplify()(student)
        if prune:
            PruneChannels(ratio=prune, importance="l1")(student)
        FoldBatchNorm()(student)
        quantize = QuantizeQDQ(**options)
        quantize.ranges = calibrate(student, quantize.plan(student).tensors, [{"input": calib}])
        quantize(student)
        before = _accuracy(student, test_x, test_y)
        result = distill(student, teacher, {"input": train_x}, epochs=epochs if prune else 10, lr=rate, seed=seed,
                         patience=10**9)
        rows[name] = {"params": model_stats(student).params, "pruned_accuracy": before,
                      "accuracy": _accuracy(student, test_x, test_y), "seconds": result.seconds, "steps": result.steps}
    return rows


def anchor_run(train_x, test_x, test_y, *, ratio, epochs, lr, seed, temperature=4.0, batch=32, holdout=0.1) -> dict:
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    from models.digits.train import DigitsCNN

    proto = onnx.load(str(DIGITS / "digits_cnn.onnx"))
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    simplified = ir.from_proto(proto)
    Simplify()(simplified)
    for node in simplified.graph:  # BN inputs by role: the exporter shares some (through Identity)
        if node.op_type == "BatchNormalization":
            prefix = node.inputs[1].name.rsplit(".", 1)[0]
            for role, value in zip(("weight", "bias", "running_mean", "running_var"), node.inputs[1:5]):
                arrays.setdefault(f"{prefix}.{role}", constant_array(value))
    net = DigitsCNN().eval()
    state = net.state_dict()
    net.load_state_dict({k: torch.from_numpy(arrays[k].copy()) if k in arrays else v for k, v in state.items()})
    example = torch.from_numpy(test_x[:1])
    tp.pruner.BasePruner(net, example, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio,
                         ignored_layers=[net.features[0][0], net.head[2]]).step()

    def accuracy() -> float:
        net.eval()
        with torch.no_grad():
            return float((net(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())

    pruned_accuracy = accuracy()
    start = time.perf_counter()
    # The same teacher outputs, split, batch order and selection as onnxopt.distill.
    teacher = run_session(create_session(ir.from_proto(proto)), {"input": train_x})["output"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(train_x)
    order = rng.permutation(n)
    held = int(round(n * holdout))
    eval_index, train_index = order[:held], order[held:]
    per_epoch = math.ceil(len(train_index) / batch)
    total = epochs * per_epoch
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    x_all, t_all = torch.from_numpy(train_x), torch.from_numpy(teacher)

    def kd(s, t):
        return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), reduction="batchmean",
                        log_target=True) * temperature**2

    def evaluate():
        net.eval()
        with torch.no_grad():
            s = net(x_all[eval_index])
            t = t_all[eval_index]
            return float((s.argmax(1) == t.argmax(1)).float().mean()), -float(kd(s, t))

    best, best_state = evaluate(), copy.deepcopy(net.state_dict())
    step, cursor, epoch_order = 0, 0, np.empty(0, dtype=np.int64)
    while step < total:
        if cursor >= len(epoch_order):
            epoch_order, cursor = train_index[rng.permutation(len(train_index))], 0
        index = epoch_order[cursor: cursor + batch]
        cursor += batch
        net.train()
        loss = kd(net(x_all[index]), t_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step % per_epoch == 0 or step == total:
            score = evaluate()
            if score > best:
                best, best_state = score, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    return {"params": sum(p.numel() for p in net.parameters()), "pruned_accuracy": pruned_accuracy,
            "accuracy": accuracy(), "seconds": seconds, "steps": step}


# --- --real: a trained OCR model from a package, on text rendered here ---------------------------

REAL_MODEL = "ppocr-mobile-cls"  # PP-OCR text-direction classifier (MobileNetV3), rapidocr-onnxruntime 1.4.4
REAL_SHAPE = (3, 48, 192)  # PaddleOCR's cls_image_shape
_CHARS = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz"
          "0123456789.,:;-()/%$&#'!?")


def _fonts() -> list[str]:
    fonts = []
    for folder in (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path("/Library/Fonts")):
        if folder.is_dir():
            fonts += sorted(str(p) for p in folder.rglob("*.ttf"))
    return fonts


def rendered_text(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` text-line crops as PaddleOCR's direction classifier takes them, and their orientation.

    Each: a random string (1-4 words of 1-9 characters) in a random TrueType font of the system
    (Pillow), size 18-44 px, dark ink on light paper of random tints, a small rotation (±3°), sensor
    noise and, for a quarter of them, a blur; then half of them turned upside down (label 1: the
    classifier's "180" class). Preprocessing as PaddleOCR's ``resize_norm_img``: height 48, width
    ``min(192, ceil(48 * w / h))``, (x / 255 - 0.5) / 0.5, zero padding on the right to 192.
    Without Pillow or fonts, ``benchmarks.quantize.text_images`` crops (labels: all 0)."""
    from benchmarks.quantize import text_images

    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    fonts = _fonts()
    try:
        from PIL import Image, ImageDraw, ImageFilter, ImageFont
    except ImportError:
        fonts = []
    if not fonts:
        return text_images((n, *REAL_SHAPE), seed), np.zeros(n, np.int64)
    c, h, w = REAL_SHAPE
    out = np.zeros((n, c, h, w), np.float32)
    for i in range(n):
        words = [''.join(rng.choice(list(_CHARS), rng.integers(1, 10))) for _ in range(rng.integers(1, 5))]
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(18, 45)))
        text = " ".join(words)
        left, top, right, bottom = font.getbbox(text)
        pad = int(rng.integers(2, 10))
        paper = tuple(int(v) for v in rng.integers(170, 256, 3))
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
        ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=ink)
        img = img.rotate(float(rng.uniform(-3, 3)), resample=Image.BILINEAR, expand=True, fillcolor=paper)
        if rng.random() < 0.25:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.2))))
        if labels[i]:
            img = img.rotate(180)
        width = min(w, int(math.ceil(h * img.width / img.height)))
        array = np.asarray(img.resize((width, h), Image.BILINEAR), dtype=np.float32)
        array = np.clip(array + rng.normal(0, 4, array.shape), 0, 255)
        out[i, :, :, :width] = ((array / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    return out, labels


def _top1(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = create_session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([next(iter(run_session(session, {name: x[i: i + 256]}).values())).argmax(axis=1)
                           for i in range(0, len(x), 256)])


def real_runs(ratios: list[float], criteria: list[str], *, train: int, test: int, steps: int, lr: float,
              seed: int) -> dict:
    """Prune the real model at each ratio by each criterion, then distill it from the unpruned model on
    rendered text; agreement with the teacher's top-1 on held-out rendered text, pruned-only and distilled."""
    from models.corpus import cache_dir

    from onnxopt.gradients import gradient_importance

    path = cache_dir() / f"{REAL_MODEL}.onnx"
    if not path.exists():
        path = Path("/work/corpus-cache/corpus") / f"{REAL_MODEL}.onnx"
    if not path.exists():
        raise SystemExit(f"{REAL_MODEL}.onnx not found: python -m models.corpus {REAL_MODEL} (or set ONNXOPT_CORPUS_DIR)")
    teacher = ir.load(path)
    name = teacher.graph.inputs[0].name
    train_x, _ = rendered_text(train, seed + 1)  # orientation labels deliberately unused
    test_x, test_y = rendered_text(test, seed + 2)
    reference = _top1(teacher, test_x)
    rows = {"teacher": {"ratio": 0.0, "criterion": "-", "params": model_stats(teacher).params,
                        "orientation_accuracy": float((reference == test_y).mean())}}
    for ratio in ratios:
        for criterion in criteria:
            start = time.perf_counter()
            student = ir.load(path)
            Simplify()(student)
            scores = (gradient_importance(student, [{name: train_x[i: i + 64]} for i in range(0, len(train_x), 64)],
                                          criterion, seed=seed) if criterion in ("taylor", "fisher") else None)
            PruneChannels(ratio=ratio, importance=criterion, activation=scores)(student)
            FoldBatchNorm()(student)
            pruned = _top1(student, test_x)
            prune_seconds = time.perf_counter() - start
            result = distill(student, teacher, {name: train_x}, steps=steps, lr=lr, seed=seed, patience=10**9)
            distilled = _top1(result.model, test_x)
            rows[f"prune {ratio:g} {criterion}"] = {
                "ratio": ratio, "criterion": criterion, "params": model_stats(student).params,
                "agreement_pruned": float((pruned == reference).mean()),
                "agreement_distilled": float((distilled == reference).mean()),
                "orientation_accuracy": float((distilled == test_y).mean()),
                "prune_seconds": prune_seconds, "distill_seconds": result.seconds, "steps": result.steps}
            print(f"  {json.dumps({'row': f'prune {ratio:g} {criterion}', **rows[f'prune {ratio:g} {criterion}']})}",
                  file=sys.stderr, flush=True)
    return {"model": REAL_MODEL, "train": len(train_x), "test": len(test_x), "rows": rows}


def print_real(result: dict, args) -> None:
    rows = result["rows"]
    print(f"{result['model']} (PP-OCR text direction, MobileNetV3, from rapidocr-onnxruntime 1.4.4): pruned, then distilled "
          f"from the unpruned model on {result['train']} rendered text lines without labels, {args.steps} steps, "
          f"lr {args.lr}, seed {args.seed}; agreement with the teacher's top-1 on {result['test']} other rendered lines; "
          f"{_cpu()}, {args.threads} torch threads")
    print(f"teacher: {rows['teacher']['params']} params, orientation accuracy {rows['teacher']['orientation_accuracy'] * 100:.2f}%")
    print(f"{'ratio':>6s} {'criterion':>10s}{'params':>9s}{'pruned':>9s}{'distilled':>11s}{'orient.':>9s}{'seconds':>9s}")
    for key, r in rows.items():
        if key == "teacher":
            continue
        print(f"{r['ratio']:>6g} {r['criterion']:>10s}{r['params']:>9d}{r['agreement_pruned'] * 100:>8.2f}%"
              f"{r['agreement_distilled'] * 100:>10.2f}%{r['orientation_accuracy'] * 100:>8.2f}%"
              f"{r['prune_seconds'] + r['distill_seconds']:>9.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also QDQ students trained with fake quantization")
    parser.add_argument("--real", action="store_true",
                        help=f"instead: {REAL_MODEL} from the corpus, pruned and distilled on rendered text")
    parser.add_argument("--real-ratios", default="0.3,0.5")
    parser.add_argument("--criteria", default="l1,taylor")
    parser.add_argument("--train", type=int, default=1024, help="--real: rendered training lines")
    parser.add_argument("--test", type=int, default=512, help="--real: rendered test lines")
    parser.add_argument("--steps", type=int, default=120, help="--real: distillation steps (batch 32)")
    parser.add_argument("--features", action="store_true",
                        help="instead: intermediate matching (features='auto') against outputs only, with few steps")
    parser.add_argument("--feature-ratios", default="0.5,0.7")
    parser.add_argument("--feature-steps", default="30,60,150")
    parser.add_argument("--feature-weights", default="0,0.1,1", help="0: outputs only")
    parser.add_argument("--seeds", default="0,1,2", help="--features: seeds")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    if args.real:
        torch.set_num_threads(args.threads)
        lr = args.lr
        result = real_runs([float(r) for r in args.real_ratios.split(",")], args.criteria.split(","), train=args.train,
                           test=args.test, steps=args.steps, lr=lr, seed=args.seed)
        print_real(result, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": _cpu(), **vars(args), **result}, indent=2))
        return 0

    from models.digits.train import load_splits

    torch.set_num_threads(args.threads)
    splits = load_splits()
    train_x = splits["train"][0]  # labels deliberately unused
    test = np.load(DIGITS / "digits_test.npz")
    test_x, test_y = test["input"], test["labels"]
    if args.features:
        feature_rows = feature_runs(train_x, test_x, test_y, ratios=[float(r) for r in args.feature_ratios.split(",")],
                                    steps=[int(n) for n in args.feature_steps.split(",")],
                                    seeds=[int(x) for x in args.seeds.split(",")],
                                    weights=[float(w) for w in args.feature_weights.split(",")], lr=args.lr)
        print(f"digits CNN, prune (l1) + distillation on the unlabeled training split ({len(train_x)} images), lr {args.lr}, "
              f"batch 32; test split ({len(test_y)} images); {_cpu()}, {args.threads} torch threads")
        print_features(feature_rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": _cpu(), **vars(args), "rows": feature_rows}, indent=2))
        return 0
    options = dict(ratio=args.ratio, epochs=args.epochs, lr=args.lr, seed=args.seed)
    float_accuracy = _accuracy(ir.load(DIGITS / "digits_cnn.onnx"), test_x, test_y)
    rows = {"onnxopt": onnxopt_run(train_x, test_x, test_y, **options)}
    if not args.no_anchor:
        try:
            rows["torch-pruning"] = anchor_run(train_x, test_x, test_y, **options)
        except ImportError as exc:
            print(f"anchor skipped: {exc}", file=sys.stderr)

    if args.int8:
        rows.update(int8_runs(train_x, test_x, test_y, **options))

    print(f"digits CNN, prune {args.ratio} (l1) + distillation on the unlabeled training split ({len(train_x)} images), "
          f"{args.epochs} epochs, lr {args.lr}; {_cpu()}, {args.threads} torch threads")
    print(f"float model: {float_accuracy * 100:.2f}% on the test split ({len(test_y)} images)")
    print(f"{'':22s}{'params':>8s}{'before':>9s}{'distilled':>11s}{'seconds':>9s}{'steps':>7s}")
    for name, r in rows.items():
        print(f"{name:22s}{r['params']:>8d}{r['pruned_accuracy'] * 100:>8.2f}%{r['accuracy'] * 100:>10.2f}%"
              f"{r['seconds']:>9.1f}{r['steps']:>7d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": _cpu(), "threads": args.threads, "float_accuracy": float_accuracy,
                                               **vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
