"""Knowledge distillation: train a lossy student graph's weights to match its teacher's outputs.

The teacher is the original model, run by onnxruntime; the student is the model the lossy passes
left (pruned, quantized), run by ``onnxopt.student``'s torch interpreter; only its weight values
change, and they are written back into the same graph. Labels are optional (Hinton et al. 2015):

    logits (2-D, last axis = classes):  L_kd = tau^2 * KL(softmax(t / tau) || softmax(s / tau))
    probabilities (2-D rows of a softmax head): the same on log(p), logits up to a constant per row
    (an MSE on saturated probabilities has almost no gradient: it left a pruned PP-OCR classifier
    where it was)
    embeddings (2-D rows of unit L2 norm: a sentence encoder's normalized output):  L_kd = mean(1 - cos(s, t))
    per row (a KL on softmaxed embeddings, what a 2-D output would otherwise get as logits, ignores
    their scale and is not what a user compares them by)
    other outputs (features, probabilities, boxes):  L_kd = mean((s - t)^2) / (var(t) + 1e-12)
    with labels:  L = alpha * CE(s, labels) + (1 - alpha) * L_kd, else L = L_kd (summed over outputs)
    intermediate matching (``features``):  L += w * mean over tensors f of mean((s_f - t_f[kept])^2) / var(t_f)
    (the teacher's activation cut to the channels pruning left the student; FitNets, Romero et al. 2015,
    without a regressor: the channels are the same ones)

Adam with cosine learning-rate decay on shuffled mini-batches, deterministic under ``seed``; CPU unless torch sees CUDA. The
training data is read a chunk at a time (``CHUNK_BYTES``): the teacher's outputs are computed once
per sample and kept when one chunk holds it all, else again each time a chunk is read. Early stopping watches held-out data (``eval``, or
``holdout`` of the training samples): top-1 agreement with the teacher on the first logits output,
ties broken by the distillation loss (the loss alone when no output is logits); the best weights
seen (the untrained ones included) are the ones written back.

torch is imported only when ``distill`` runs (``onnxopt[train]``).
"""

from __future__ import annotations

__all__ = ["DistillResult", "distill", "output_kinds", "feature_candidates", "CHUNK_BYTES"]

import copy
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.errors import DataError, OptionError

# The most bytes of one chunk of training samples, its inputs and the teacher's targets for them:
# training holds one chunk (and the held-out samples, at most a chunk's rows), whatever the data's size.
CHUNK_BYTES = 256 * 2**20
# Samples on which the interpreter is proven equal to onnxruntime before training (``check_matches``):
# enough that QDQ_MISMATCH_FRACTION (2%) allows the one rounding tie a QDQ graph may flip (32 allowed none).
CHECK_SAMPLES = 64
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
    features: list[str] = field(default_factory=list)
    features_skipped: dict[str, str] = field(default_factory=dict)
    chunks: int = 1


def _take(pool: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in pool.items()}


def _count(pool: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(pool.values())))


def _teacher_outputs(session, pool: Mapping[str, np.ndarray], names: list[str],
                     slices: Mapping[str, tuple[int, np.ndarray]]) -> dict[str, np.ndarray]:
    """The teacher's ``names`` on ``pool``, run by ``TEACHER_BATCH`` samples; an intermediate tensor
    in ``slices`` (name -> channel axis, positions the student kept) cut to those channels."""
    from onnxopt.runtime import run_session

    n = _count(pool)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, TEACHER_BATCH):
        outs = run_session(session, _take(pool, np.arange(start, min(n, start + TEACHER_BATCH))))
        for name in names:
            out = outs[name]
            if name in slices:
                axis, positions = slices[name]
                out = np.take(out, positions, axis=axis) if out.ndim > axis else out
            chunks[name].append(out)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _with_outputs(teacher: ir.Model, names: list[str]) -> ir.Model:
    """``teacher`` itself when ``names`` is empty, else a copy whose graph also outputs ``names``
    (the caller's model is never changed)."""
    if not names:
        return teacher
    copy_ = teacher.clone()
    values = {v.name: v for node in copy_.graph for v in node.outputs}
    for name in names:
        if not values[name].is_graph_output():
            copy_.graph.outputs.append(values[name])
    return copy_


def _signatures(model: ir.Model) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Per value a node computes: that node's op type and the op types that read the value."""
    return {v.name: (node.op_type, tuple(sorted(use.node.op_type for use in v.uses())))
            for node in model.graph for v in node.outputs}


def feature_candidates(student: ir.Model, teacher: ir.Model, features: str | Sequence[str],
                       boundaries: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The intermediate tensors to match, and those left out with why (``auto`` only).

    ``features``: ``"auto"`` (the channel groups' boundaries: ``boundaries`` from the pruning pass,
    else the values a Conv, Gemm or MatMul of the student reads by channel) or tensor names. A tensor
    matches where both graphs compute it by the same op and it is read by the same ops: a pass that
    kept a name but changed what it holds (fold-bn leaves a Conv's name on the normalized values) is
    refused. A named tensor that does not match is an ``OptionError``; ``auto`` leaves it out."""
    explicit = features != "auto"
    if explicit and (isinstance(features, str) or not all(isinstance(f, str) and f for f in features) or not features):
        raise OptionError(f"--distill-features: give auto or tensor names, not {features!r}")
    if explicit:
        names = list(features)
    elif boundaries is not None:
        names = list(boundaries)
    else:
        from onnxopt.passes.channel_groups import analyze

        probed = {p.value for g in analyze(student).groups for p in g.probes}
        names = [v.name for node in student.graph for v in node.outputs if v.name in probed]
    mine, theirs = _signatures(student), _signatures(teacher)
    outputs = {v.name for v in student.graph.outputs}
    inputs = {v.name for v in teacher.graph.inputs}
    chosen, skipped = [], {}
    for name in dict.fromkeys(names):
        why = None
        if name in outputs:
            why = "is a graph output (matched as one)"
        elif name in inputs:
            why = "is a graph input (the same in both models: nothing to match)"
        elif name not in theirs and name not in mine:
            why = "is computed by no node of the input model (give the name of a node's output)"
        elif name not in mine:
            why = "is not computed by the student (a pass removed or renamed it)"
        elif name not in theirs:
            why = "is not computed by the teacher"
        elif mine[name] != theirs[name]:
            why = (f"is computed by {mine[name][0]} and read by {', '.join(mine[name][1]) or 'nothing'} in the student, "
                   f"by {theirs[name][0]} and read by {', '.join(theirs[name][1]) or 'nothing'} in the teacher "
                   "(a pass changed what it holds)")
        if why is None:
            chosen.append(name)
        elif explicit:
            raise OptionError(f"--distill-features: '{name}' {why}")
        else:
            skipped[name] = why
    return chosen, skipped


def _check_feature_shapes(student, feed, targets, names, skipped, *, explicit: bool) -> tuple[list[str], dict]:
    """The ``names`` whose student tensor has the shape of the teacher's, sliced (a channel count the
    pruning pass left no record of is left out by ``auto``, an error for a named tensor)."""
    import torch

    if not names:
        return names, skipped
    with torch.no_grad():
        outs = student({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}, names)
    kept, skipped = [], dict(skipped)
    for name in names:
        mine, theirs = tuple(outs[name].shape), targets[name].shape
        if mine == theirs:
            kept.append(name)
            continue
        why = f"has shape {list(mine)} in the student, {list(theirs)} in the teacher (sliced to the kept channels)"
        if explicit:
            raise DataError(f"--distill-features: '{name}' {why}")
        skipped[name] = why
    return kept, skipped


def output_kinds(teacher: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``logits`` for 2-D float outputs with more than one class that are not probabilities (rows
    in [0, 1] summing to 1), ``probabilities`` for those that are, ``embeddings`` for those whose
    rows all have unit L2 norm (an encoder's normalized output: compared by cosine, not by class);
    ``features`` for every other output."""
    kinds = {}
    for name, t in teacher.items():
        kind = "features"
        if t.ndim == 2 and t.shape[1] > 1 and np.issubdtype(t.dtype, np.floating):
            probabilities = t.min() >= 0 and t.max() <= 1 and np.allclose(t.sum(axis=1), 1, atol=1e-3)
            unit = len(t) > 0 and np.allclose(np.linalg.norm(t.astype(np.float64), axis=1), 1, atol=1e-3)
            kind = "probabilities" if probabilities else "embeddings" if unit else "logits"
        kinds[name] = kind
    return kinds


def _check_labels(labels: np.ndarray | None, n: int, where: str, logits: str | None,
                  classes: int = 0) -> np.ndarray | None:
    """``labels`` as int64 class indices of ``logits`` (an output of ``classes`` columns), or a one-line ``DataError``."""
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise DataError(f"{where}: {len(labels)} labels for {n} samples")
    if logits is None:
        raise DataError(f"{where}: labels given, but no model output is logits (2-D, one column per class)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integer class indices, not {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        wrong = labels.min() if labels.min() < 0 else labels.max()
        raise DataError(f"{where}: label {wrong} is not a class of output '{logits}' (class indices 0..{classes - 1})")
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
    features: str | Sequence[str] | None = None,
    feature_weight: float = 1.0,
    kept_channels: Mapping[str, tuple[int, np.ndarray]] | None = None,
    boundaries: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
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

    ``train`` may also be a path (an ``.npz``, a folder of ``.npy``) or ``onnxopt.data.SampleRows``:
    such files are read a chunk of rows at a time (``CHUNK_BYTES`` of inputs and teacher targets),
    chunks in a shuffled order and samples shuffled within each, so memory does not grow with the
    training set; the held-out samples are then a ``holdout`` fraction of each chunk, at most a
    chunk's rows in all. Other sources are pooled in memory (``onnxopt.data.POOL_LIMIT``).

    ``features``: intermediate matching, ``"auto"`` or tensor names (see ``feature_candidates``):
    the student's tensor is pulled towards the teacher's at the same place, the teacher's cut to
    the channels the student kept (``kept_channels``: name -> (channel axis, kept positions), as
    ``PruneChannels.kept_channels`` records them; ``boundaries``: the candidates of ``auto``, as
    ``PruneChannels.boundaries``), by the normalized MSE of each, averaged and added to the
    output loss with weight ``feature_weight``.

    ``outputs``: the graph outputs the loss matches (default: all), as ``--outputs`` names the ones
    the budget judges: a sentence encoder is trained on its pooled ``sentence_embedding`` alone, not
    on ``last_hidden_state``, whose padding positions carry no meaning.
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
                        cluster_aware=cluster_aware, features=features, feature_weight=feature_weight,
                        kept_channels=kept_channels, boundaries=boundaries, outputs=outputs)
    finally:
        torch.set_num_threads(previous)


def _distill(student_model, teacher_model, train, *, steps, epochs, temperature, alpha, lr, seed, eval, labels,
             progress, batch_size, holdout, eval_every, patience, weight_decay, cosine, device, providers,
             cluster_aware, features, feature_weight, kept_channels, boundaries, outputs) -> DistillResult:
    import torch
    import torch.nn.functional as F

    from onnxopt.data import sample_rows
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
    if not 0 < feature_weight < math.inf:
        raise OptionError(f"feature_weight must be a finite number > 0, not {feature_weight}")
    if progress is True:
        progress = _console_progress

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    # The student first: an op the interpreter cannot run is said before any data is read.
    student = build_student(student_model, cluster_aware=cluster_aware)
    rows = sample_rows(train, student_model, where="train data")
    n = rows.num_samples
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise DataError(f"train labels: {len(labels)} labels for {n} samples")
    output_names = [v.name for v in student_model.graph.outputs]
    if outputs is not None:
        unknown = [name for name in outputs if name not in output_names]
        if unknown or not outputs:
            raise OptionError(f"distill outputs: {unknown or 'none given'} not among the model's outputs {output_names}")
        output_names = [name for name in output_names if name in set(outputs)]
    feature_names, skipped = ([], {}) if not features else feature_candidates(student_model, teacher_model, features,
                                                                              boundaries)
    teacher_session = create_session(_with_outputs(teacher_model, feature_names), providers=providers)
    teacher_names = {o.name for o in teacher_session.get_outputs()}
    if not set(output_names) <= teacher_names:
        raise DataError(f"the student's outputs {sorted(set(output_names) - teacher_names)} are not the teacher's")
    target_names = output_names + feature_names
    slices = {name: kept_channels[name] for name in feature_names if name in (kept_channels or {})}

    def load(data, begin: int, end: int, given_labels=None) -> tuple[dict, np.ndarray | None, dict]:
        """Samples [begin, end) of ``data``: inputs, labels, and the teacher's targets for them."""
        feed, chunk_labels = data.read(begin, end)
        if given_labels is not None:
            chunk_labels = given_labels[begin:end]
        return feed, chunk_labels, _teacher_outputs(teacher_session, feed, target_names, slices)

    # Chunks of samples whose inputs and teacher targets fit CHUNK_BYTES: one chunk is in memory at a
    # time (the only one is kept: the teacher runs once on a small training set).
    probe_feed, _, probe_targets = load(rows, 0, min(n, max(batch_size, CHECK_SAMPLES)))
    probe_rows = len(next(iter(probe_targets.values())))
    per_sample = rows.sample_bytes + sum(a.nbytes for a in probe_targets.values()) // max(probe_rows, 1)
    chunk_rows = max(batch_size, CHUNK_BYTES // max(per_sample, 1))
    spans = [(begin, min(n, begin + chunk_rows)) for begin in range(0, n, chunk_rows)]
    cache = {0: load(rows, *spans[0], labels)}
    single = len(spans) == 1
    kinds = output_kinds({name: cache[0][2][name] for name in output_names})
    logits_name = next((name for name in output_names if kinds[name] in ("logits", "probabilities")), None)
    classes = cache[0][2][logits_name].shape[1] if logits_name else 0

    def checked(loaded):
        feed, chunk_labels, targets = loaded
        return feed, _check_labels(chunk_labels, _count(feed), "train labels", logits_name, classes), targets

    cache[0] = checked(cache[0])

    def chunk(i: int):
        if i in cache:
            return cache[i] if single else cache.pop(i)
        return checked(load(rows, *spans[i], labels))

    feature_names, skipped = _check_feature_shapes(student, probe_feed, probe_targets, feature_names, skipped,
                                                  explicit=features != "auto")
    target_names = output_names + feature_names

    # Held-out samples: ``eval``, or a ``holdout`` fraction of each chunk (at most a chunk's rows in all).
    if eval is not None:
        eval_rows = sample_rows(eval, student_model, where="eval data")
        eval_pool, eval_labels, eval_teacher = load(eval_rows, 0, eval_rows.num_samples)
        eval_labels = _check_labels(eval_labels, _count(eval_pool), "eval labels", logits_name, classes)
        train_index = [rng.permutation(n)] if single else [np.arange(end - begin) for begin, end in spans]
    elif single:
        order = rng.permutation(n)
        held = int(round(n * holdout)) if n >= 10 else 0
        eval_index, train_index = order[:held], [order[held:]]
        if held == 0:
            eval_index = order
        pool, pool_labels, teacher = cache[0]
        eval_pool, eval_teacher = _take(pool, eval_index), _take(teacher, eval_index)
        eval_labels = None if pool_labels is None else pool_labels[eval_index]
    else:
        parts, train_index = [], []
        for i, (begin, end) in enumerate(spans):
            order = np.random.default_rng([seed, i]).permutation(end - begin)
            held = min(int(round((end - begin) * holdout)), max(1, chunk_rows // len(spans)))
            feed, chunk_labels, targets = chunk(i)
            parts.append((_take(feed, order[:held]), None if chunk_labels is None else chunk_labels[order[:held]],
                          _take(targets, order[:held])))
            train_index.append(order[held:])
            del feed, chunk_labels, targets
        eval_pool = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        eval_teacher = {k: np.concatenate([p[2][k] for p in parts]) for k in parts[0][2]}
        eval_labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
        del parts
    n_train = sum(len(index) for index in train_index)
    if n_train == 0:
        raise DataError("train data: no samples left to train on after the held-out ones")
    per_epoch = max(1, sum(math.ceil(len(index) / batch_size) for index in train_index))
    total = steps if steps is not None else (10 if epochs is None else epochs) * per_epoch
    eval_every = eval_every or per_epoch

    if single:
        teacher_session = None  # every teacher output is computed: free its threads and memory before training
    check_matches(student, student_model, probe_feed,
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
    wanted = output_names + sorted(set(pre_softmax.values()) - set(output_names)) + feature_names

    def as_logits(name, y, outs=None):
        if kinds[name] != "probabilities":
            return y
        if outs is not None and name in pre_softmax:
            return outs[pre_softmax[name]]
        return torch.log(y.clamp_min(1e-12))

    def normalized_mse(s, t):
        s, t = s.float(), t.float()
        return F.mse_loss(s, t) / (t.var(unbiased=False).detach() + 1e-12)

    def loss_of(outs, targets, hard):
        """The outputs' distillation loss (with the hard loss when labels are given), and the
        intermediate tensors' (the mean of their normalized MSEs; 0 without any)."""
        total_loss = 0.0
        for name in output_names:
            s, t = outs[name], targets[name]
            if kinds[name] in ("logits", "probabilities"):
                s, t = as_logits(name, s, outs), as_logits(name, t)
                total_loss = total_loss + F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                                                   reduction="batchmean", log_target=True) * temperature**2
            elif kinds[name] == "embeddings":
                total_loss = total_loss + (1 - F.cosine_similarity(s.float(), t.float(), dim=1, eps=1e-12)).mean()
            else:
                total_loss = total_loss + normalized_mse(s, t)
        if hard is not None and alpha > 0:
            total_loss = alpha * F.cross_entropy(as_logits(logits_name, outs[logits_name], outs), hard) + (1 - alpha) * total_loss
        feature_loss = sum(normalized_mse(outs[name], targets[name]) for name in feature_names) / max(len(feature_names), 1)
        return total_loss, feature_loss

    def evaluate(step: int, train_loss: float | None) -> dict:
        student.eval()
        m = _count(eval_pool)
        loss_sum, feature_sum, agree, correct = 0.0, 0.0, 0, 0
        with torch.no_grad():
            for begin in range(0, m, TEACHER_BATCH):
                index = np.arange(begin, min(m, begin + TEACHER_BATCH))
                outs = student(tensors(_take(eval_pool, index)), wanted)
                targets = tensors(_take(eval_teacher, index))
                output_loss, feature_loss = loss_of(outs, targets, None)
                loss_sum += float(output_loss) * len(index)
                feature_sum += float(feature_loss) * len(index)
                if logits_name is not None:
                    top = outs[logits_name].argmax(dim=1).cpu().numpy()
                    agree += int((top == eval_teacher[logits_name][index].argmax(axis=1)).sum())
                    if eval_labels is not None:
                        correct += int((top == eval_labels[index]).sum())
        entry = {"step": step, "train_loss": train_loss, "loss": loss_sum / m,
                 "seconds": round(time.perf_counter() - start_time, 3)}
        if feature_names:
            entry["feature_loss"] = feature_sum / m
        if logits_name is not None:
            entry["agreement"] = agree / m
            if eval_labels is not None:
                entry["accuracy"] = correct / m
        return entry

    def score(entry: dict) -> tuple:
        return (entry.get("agreement", 0.0), -entry["loss"])

    def batches():
        """Training batches without end: each epoch visits the chunks in a shuffled order and each
        chunk's samples in a shuffled order, under the seed; one chunk in memory at a time."""
        while True:
            for i in (rng.permutation(len(spans)) if not single else [0]):
                feed, chunk_labels, targets = chunk(int(i))
                order = train_index[i][rng.permutation(len(train_index[i]))]
                for begin in range(0, len(order), batch_size):
                    batch = order[begin: begin + batch_size]
                    yield (_take(feed, batch), None if chunk_labels is None else chunk_labels[batch],
                           _take(targets, batch))
                del feed, chunk_labels, targets

    history = [evaluate(0, None)]
    best_entry, best_state = history[0], copy.deepcopy(student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    # Cosine decay to 0 over the planned steps: the last steps refine instead of oscillating.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / max(total, 1))) if cosine else 1.0)
    stale, step, running, counted, stopped = 0, 0, 0.0, 0, False
    stream = batches()
    while step < total:
        feed, hard, targets = next(stream)
        student.train()
        outs = student(tensors(feed), wanted)
        hard = None if hard is None else torch.from_numpy(hard).to(device)
        output_loss, feature_loss = loss_of(outs, tensors(targets), hard)
        loss = output_loss + feature_weight * feature_loss if feature_names else output_loss
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
    stream.close()

    student.load_state_dict(best_state)
    student.to("cpu")
    write_back(student_model, student)
    return DistillResult(
        model=student_model, history=history, seconds=time.perf_counter() - start_time, steps=step,
        best_step=best_entry["step"], stopped_early=stopped, initial=history[0], best=best_entry, kinds=kinds,
        device=str(device), features=feature_names, features_skipped=skipped, chunks=len(spans),
    )
