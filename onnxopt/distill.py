"""Knowledge distillation: train a lossy student graph's weights to match its teacher's outputs.

The teacher is the original model, run by onnxruntime; the student is the model the lossy passes
left (pruned, quantized), run by ``onnxopt.student``'s torch interpreter; only its weight values
change, and they are written back into the same graph. Labels are optional (Hinton et al. 2015):

    logits (2-D, last axis = classes):  L_kd = tau^2 * KL(softmax(t / tau) || softmax(s / tau))
    probabilities (2-D rows of a softmax head): the same on log(p), logits up to a constant per row
    (an MSE on saturated probabilities has almost no gradient: it left a pruned PP-OCR classifier
    where it was)
    other outputs (features, probabilities, boxes):  L_kd = mean((s - t)^2) / (var(t) + 1e-12)
    with labels:  L = alpha * CE(s, labels) + (1 - alpha) * L_kd, else L = L_kd (summed over outputs)

Adam with cosine learning-rate decay on shuffled mini-batches, deterministic under ``seed``; CPU unless torch sees CUDA. Teacher
outputs are computed once per sample and kept. Early stopping watches held-out data (``eval``, or
``holdout`` of the training samples): top-1 agreement with the teacher on the first logits output,
ties broken by the distillation loss (the loss alone when no output is logits); the best weights
seen (the untrained ones included) are the ones written back.

torch is imported only when ``distill`` runs (``onnxopt[train]``).
"""

from __future__ import annotations

__all__ = ["DistillResult", "distill", "output_kinds"]

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.errors import DataError, OptionError

# Samples kept in memory for training (inputs and teacher outputs): past this, a clear error.
POOL_LIMIT_BYTES = 2 * 2**30
TEACHER_BATCH = 256


@dataclass
class DistillResult:
    """The student model with trained weights written back, and how training went.

    ``history``: one entry per evaluation (``step``, ``train_loss`` since the last one, held-out
    ``loss``, ``agreement`` with the teacher's top-1 when an output is logits, ``accuracy`` when
    the held-out data has labels, ``seconds``); ``initial`` and ``best`` are two of them."""

    model: ir.Model
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    best_step: int = 0
    stopped_early: bool = False
    initial: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"


def _pool(data, where: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """All batches of ``data`` (a Dataset, DataStream, list or iterable of feeds) concatenated by input."""
    if isinstance(data, Mapping):
        data = [data]
    parts: dict[str, list[np.ndarray]] = {}
    size = 0
    for feed in data:
        for name, array in feed.items():
            array = np.asarray(array)
            if array.ndim == 0:
                raise DataError(f"{where}: input '{name}' is a scalar (0-d); distillation needs a first axis of samples")
            parts.setdefault(name, []).append(array)
            size += array.nbytes
        if size > POOL_LIMIT_BYTES:
            raise DataError(f"{where}: more than {POOL_LIMIT_BYTES // 2**30} GiB of samples; distillation keeps them in memory")
    if not parts:
        raise DataError(f"{where}: no batches")
    pooled = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    counts = {len(a) for a in pooled.values()}
    if len(counts) != 1:
        raise DataError(f"{where}: inputs have different numbers of samples ({sorted(counts)})")
    labels = getattr(data, "labels", None)
    return pooled, None if labels is None else np.asarray(labels)


def _take(pool: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in pool.items()}


def _count(pool: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(pool.values())))


def _teacher_outputs(session, pool: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    from onnxopt.runtime import run_session

    n = _count(pool)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, TEACHER_BATCH):
        outs = run_session(session, _take(pool, np.arange(start, min(n, start + TEACHER_BATCH))))
        for name in names:
            chunks[name].append(outs[name])
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def output_kinds(teacher: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``logits`` for 2-D float outputs with more than one class that are not probabilities (rows
    in [0, 1] summing to 1), ``probabilities`` for those that are; ``features`` for every other output."""
    kinds = {}
    for name, t in teacher.items():
        kind = "features"
        if t.ndim == 2 and t.shape[1] > 1 and np.issubdtype(t.dtype, np.floating):
            probabilities = t.min() >= 0 and t.max() <= 1 and np.allclose(t.sum(axis=1), 1, atol=1e-3)
            kind = "probabilities" if probabilities else "logits"
        kinds[name] = kind
    return kinds


def _check_labels(labels: np.ndarray | None, n: int, where: str, logits: str | None) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise DataError(f"{where}: {len(labels)} labels for {n} samples")
    if logits is None:
        raise DataError(f"{where}: labels given, but no model output is logits (2-D, one column per class)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integer class indices, not {labels.dtype}")
    return labels.astype(np.int64)


def _console_progress(entry: dict) -> None:
    steps, step = entry["steps"], entry["step"]
    width = 24
    done = int(width * step / max(steps, 1))
    sys.stderr.write(f"\rdistill [{'#' * done}{'.' * (width - done)}] {step}/{steps} loss {entry['loss']:.4f}")
    if step >= steps:
        sys.stderr.write("\n")
    sys.stderr.flush()


def distill(
    student_model: ir.Model,
    teacher_model: ir.Model,
    train,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    lr: float = 1e-3,
    seed: int = 0,
    eval=None,
    labels: np.ndarray | None = None,
    progress: Callable[[dict], None] | bool | None = None,
    batch_size: int = 32,
    holdout: float = 0.1,
    eval_every: int | None = None,
    patience: int = 5,
    weight_decay: float = 0.0,
    cosine: bool = True,
    device: str | None = None,
    providers: str = "cpu",
    threads: int | None = None,
    cluster_aware: bool = True,
) -> DistillResult:
    """Train ``student_model``'s weights (in place) to match ``teacher_model`` on ``train``.

    ``train``: a ``Dataset``/``DataStream`` (its labels are used when present), a feed dict, or an
    iterable of feeds; ``labels``: per-sample class indices for ``train`` (mixes in the hard loss with
    weight ``alpha``). ``eval``: held-out feeds for early stopping (its labels only give ``accuracy``);
    without it, a ``holdout`` fraction of ``train`` is set aside. ``steps`` or ``epochs`` (default 10
    epochs) bounds training; evaluation runs every ``eval_every`` steps (default: once an epoch) and
    stops after ``patience`` evaluations without improvement. The learning rate decays from ``lr``
    to 0 on a cosine over the planned steps (``cosine=False``: constant). ``progress``: a callable given
    ``{step, steps, loss}`` after each step, or True for a bar on stderr. ``threads``: torch's CPU
    threads for this run (restored after); one is the fastest for small models on a busy machine
    (digits, AMD EPYC 2 cores shared: 8-9 s with one thread, 17-84 s with two under the same load).
    ``cluster_aware``: a clustered weight (``cluster``) trains as a latent float weight snapped to its
    centroids, so its codes change too (``onnxopt.cluster_training``); False: its codebook alone.
    """
    import torch

    if threads is not None and threads < 1:
        raise OptionError(f"threads must be >= 1, not {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _distill(student_model, teacher_model, train, steps=steps, epochs=epochs, temperature=temperature,
                        alpha=alpha, lr=lr, seed=seed, eval=eval, labels=labels, progress=progress,
                        batch_size=batch_size, holdout=holdout, eval_every=eval_every, patience=patience,
                        weight_decay=weight_decay, cosine=cosine, device=device, providers=providers,
                        cluster_aware=cluster_aware)
    finally:
        torch.set_num_threads(previous)


def _distill(student_model, teacher_model, train, *, steps, epochs, temperature, alpha, lr, seed, eval, labels,
             progress, batch_size, holdout, eval_every, patience, weight_decay, cosine, device, providers,
             cluster_aware) -> DistillResult:
    import torch
    import torch.nn.functional as F

    from onnxopt.runtime import create_session
    from onnxopt.student import QDQ_MISMATCH_FRACTION, build_student, check_matches, has_quantize_nodes, write_back

    start_time = time.perf_counter()
    if steps is not None and epochs is not None:
        raise OptionError("give steps or epochs, not both")
    if (steps is not None and steps < 0) or (epochs is not None and epochs < 0):
        raise OptionError("steps and epochs must be >= 0")
    if not 0 < temperature < math.inf:  # NaN too
        raise OptionError(f"temperature must be a finite number > 0, not {temperature}")
    if not 0 < lr < math.inf:
        raise OptionError(f"lr must be a finite number > 0, not {lr}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise OptionError(f"seed must be a whole number from 0 to 2**63 - 1, not {seed!r}")
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"alpha must be in [0, 1], not {alpha}")
    if batch_size < 1:
        raise OptionError(f"batch_size must be >= 1, not {batch_size}")
    if progress is True:
        progress = _console_progress

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    # The student first: an op the interpreter cannot run is said before any data is read or pooled.
    student = build_student(student_model, cluster_aware=cluster_aware)
    pool, pool_labels = _pool(train, "train data")
    if labels is not None:
        pool_labels = np.asarray(labels)
    missing = [v.name for v in student_model.graph.inputs if v.name not in pool and v.const_value is None]
    if missing:
        raise DataError(f"train data: no input '{missing[0]}' (the model's inputs: {', '.join(v.name for v in student_model.graph.inputs)})")
    output_names = [v.name for v in student_model.graph.outputs]
    teacher_session = create_session(teacher_model, providers=providers)
    teacher_names = {o.name for o in teacher_session.get_outputs()}
    if not set(output_names) <= teacher_names:
        raise DataError(f"the student's outputs {sorted(set(output_names) - teacher_names)} are not the teacher's")
    n = _count(pool)
    teacher = _teacher_outputs(teacher_session, pool, output_names)
    kinds = output_kinds(teacher)
    logits_name = next((name for name in output_names if kinds[name] in ("logits", "probabilities")), None)
    pool_labels = _check_labels(pool_labels, n, "train labels", logits_name)

    if eval is not None:
        eval_pool, eval_labels = _pool(eval, "eval data")
        eval_teacher = _teacher_outputs(teacher_session, eval_pool, output_names)
        eval_labels = _check_labels(eval_labels, _count(eval_pool), "eval labels", logits_name)
        train_index = rng.permutation(n)
    else:
        order = rng.permutation(n)
        held = int(round(n * holdout)) if n >= 10 else 0
        eval_index, train_index = order[:held], order[held:]
        if held == 0:
            eval_index = order
        eval_pool, eval_teacher = _take(pool, eval_index), _take(teacher, eval_index)
        eval_labels = None if pool_labels is None else pool_labels[eval_index]
    del teacher_session  # every teacher output is computed: free its threads and memory before training
    n_train = len(train_index)
    per_epoch = max(1, math.ceil(n_train / batch_size))
    total = steps if steps is not None else (10 if epochs is None else epochs) * per_epoch
    eval_every = eval_every or per_epoch

    check_feed = _take(pool, train_index[: min(64, n_train)])
    check_matches(student, student_model, check_feed,
                  mismatch_fraction=QDQ_MISMATCH_FRACTION if has_quantize_nodes(student_model) else 0.0)
    student.to(device)

    def tensors(feed):
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()}

    # A softmax head's input is the student's logits: log(p) of a saturated float32 softmax is log(0)
    # clamped, with no gradient (a pruned PP-OCR classifier stayed where it was).
    producers = {v.name: node for node in student_model.graph for v in node.outputs}
    pre_softmax = {name: producers[name].inputs[0].name for name in output_names
                   if kinds[name] == "probabilities" and name in producers and producers[name].op_type == "Softmax"
                   and producers[name].attributes.get("axis", ir.AttrInt64("axis", -1)).value in (-1, 1)}
    wanted = output_names + sorted(set(pre_softmax.values()) - set(output_names))

    def as_logits(name, y, outs=None):
        if kinds[name] != "probabilities":
            return y
        if outs is not None and name in pre_softmax:
            return outs[pre_softmax[name]]
        return torch.log(y.clamp_min(1e-12))

    def loss_of(outs, targets, hard):
        total_loss = 0.0
        for name in output_names:
            s, t = outs[name], targets[name]
            if kinds[name] in ("logits", "probabilities"):
                s, t = as_logits(name, s, outs), as_logits(name, t)
                total_loss = total_loss + F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                                                   reduction="batchmean", log_target=True) * temperature**2
            else:
                s, t = s.float(), t.float()
                total_loss = total_loss + F.mse_loss(s, t) / (t.var(unbiased=False).detach() + 1e-12)
        if hard is not None and alpha > 0:
            total_loss = alpha * F.cross_entropy(as_logits(logits_name, outs[logits_name], outs), hard) + (1 - alpha) * total_loss
        return total_loss

    def evaluate(step: int, train_loss: float | None) -> dict:
        student.eval()
        m = _count(eval_pool)
        loss_sum, agree, correct = 0.0, 0, 0
        with torch.no_grad():
            for begin in range(0, m, TEACHER_BATCH):
                index = np.arange(begin, min(m, begin + TEACHER_BATCH))
                outs = student(tensors(_take(eval_pool, index)), wanted)
                targets = tensors(_take(eval_teacher, index))
                loss_sum += float(loss_of(outs, targets, None)) * len(index)
                if logits_name is not None:
                    top = outs[logits_name].argmax(dim=1).cpu().numpy()
                    agree += int((top == eval_teacher[logits_name][index].argmax(axis=1)).sum())
                    if eval_labels is not None:
                        correct += int((top == eval_labels[index]).sum())
        entry = {"step": step, "train_loss": train_loss, "loss": loss_sum / m,
                 "seconds": round(time.perf_counter() - start_time, 3)}
        if logits_name is not None:
            entry["agreement"] = agree / m
            if eval_labels is not None:
                entry["accuracy"] = correct / m
        return entry

    def score(entry: dict) -> tuple:
        return (entry.get("agreement", 0.0), -entry["loss"])

    history = [evaluate(0, None)]
    best_entry, best_state = history[0], copy.deepcopy(student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    # Cosine decay to 0 over the planned steps: the last steps refine instead of oscillating.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / max(total, 1))) if cosine else 1.0)
    stale, step, running, counted, stopped = 0, 0, 0.0, 0, False
    order = np.empty(0, dtype=np.int64)
    cursor = 0
    while step < total:
        if cursor >= len(order):
            order, cursor = train_index[rng.permutation(n_train)], 0
        batch = order[cursor: cursor + batch_size]
        cursor += batch_size
        student.train()
        outs = student(tensors(_take(pool, batch)), wanted)
        hard = None if pool_labels is None else torch.from_numpy(pool_labels[batch]).to(device)
        loss = loss_of(outs, tensors(_take(teacher, batch)), hard)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DataError(f"distillation diverged at step {step} (loss {value}): lower the learning rate (lr={lr})")
        running, counted = running + value, counted + 1
        if progress:
            progress({"step": step, "steps": total, "loss": value})
        if step % eval_every == 0 or step == total:
            entry = evaluate(step, running / counted)
            history.append(entry)
            running, counted = 0.0, 0
            if score(entry) > score(best_entry):
                best_entry, best_state, stale = entry, copy.deepcopy(student.state_dict()), 0
            else:
                stale += 1
                if stale >= patience:
                    stopped = step < total
                    break

    student.load_state_dict(best_state)
    student.to("cpu")
    write_back(student_model, student)
    return DistillResult(
        model=student_model, history=history, seconds=time.perf_counter() - start_time, steps=step,
        best_step=best_entry["step"], stopped_early=stopped, initial=history[0], best=best_entry, kinds=kinds,
        device=str(device),
    )
