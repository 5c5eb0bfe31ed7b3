"""Channel importance from gradients: first-order Taylor and Fisher scores, with the torch student.

Each channel ``c`` of a tensor that a channel group's consumers read (the prune pass's probes) gets
a mask ``m_c`` (one per sample, all ones), so the tensor becomes ``x * m``. Removing the channel
sets ``m_c = 0``; the loss change is, to first order, ``-dL/dm_c``, and

    dL_n/dm_c = sum over the channel's positions of  x * dL_n/dx      (sample n)

    taylor:  sum over samples of |dL_n/dm_c|            (Molchanov et al. 2017, per-sample |a * g|)
    fisher:  sum over samples of (dL_n/dm_c)^2 / 2      (Theis et al. 2018; the seed's "sum of
                                                        squared gradients over the training set")

Where a probe has no batch axis apart from its channel axis (axis 0, or rank 1), the mask is one
per channel for the whole batch and the batch's gradient stands for its samples.

The loss ``L_n`` of one sample: the model must be judged against something other than itself,
since the distance of its outputs to its own outputs has zero gradient at the start. So:

- logits (2-D, as ``onnxopt.distill.output_kinds`` says), with labels in the data: cross-entropy
  to the labels; without labels, cross-entropy to the model's own top-1 ("pseudo-labels": the
  output's own negative log-likelihood at its argmax);
- probabilities (non-negative, summing to 1 along the last axis: a softmax head, a CTC
  recognizer's per-step distribution): ``-log p`` at the labels (2-D, with labels), else at the
  argmax of the last axis, summed over the other positions;
- other outputs (features, embeddings, boxes): the Gaussian negative log-likelihood of a target
  drawn once, under ``seed``, at the output plus noise of the output's standard deviation,
  ``0.5 * ||y - target||^2 / var``: its expected squared gradient is the Fisher information of
  that Gaussian (a sampled Fisher), and it has a non-zero gradient where the output's own does not.

Scores come back as the prune pass takes activation statistics: value name -> one float per index
of the channel axis (``PruneChannels(importance="taylor", activation=scores)``). The student is
checked equal to onnxruntime on the first batch before any gradient is taken.

torch is imported only when scores are computed (``onnxopt[train]``).
"""

from __future__ import annotations

__all__ = ["GRADIENT_CRITERIA", "gradient_importance"]

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.errors import DataError, OptionError

GRADIENT_CRITERIA = ("taylor", "fisher")


def _loss_kinds(outputs: Mapping[str, np.ndarray], has_labels: bool) -> dict[str, str]:
    from onnxopt.distill import output_kinds

    kinds = {}
    for name, kind in output_kinds(outputs).items():
        y = outputs[name]
        if kind == "embeddings":  # as before distillation told them apart: the argmax's cross-entropy
            kind = "logits"
        if kind == "features" and np.issubdtype(y.dtype, np.floating) and y.ndim >= 1 and y.shape[-1] > 1 and y.size:
            if y.min() >= 0 and y.max() <= 1 and np.allclose(y.sum(axis=-1), 1, atol=1e-3):
                kind = "probabilities"
        kinds[name] = kind if np.issubdtype(y.dtype, np.floating) else "none"
    if has_labels and not any(k == "logits" or (k == "probabilities" and outputs[n].ndim == 2) for n, k in kinds.items()):
        raise DataError("labels given, but no model output is logits or probabilities (2-D, one column per class)")
    return kinds


def _labels(labels, seen: int, n: int):
    import torch

    target = torch.from_numpy(np.asarray(labels).reshape(-1)[seen: seen + n].astype(np.int64))
    if len(target) != n:
        raise DataError(f"{len(np.asarray(labels).reshape(-1))} labels for more samples than that")
    return target


def gradient_importance(
    model: ir.Model,
    data: Iterable[Mapping[str, np.ndarray]],
    criterion: str,
    *,
    labels: np.ndarray | None = None,
    seed: int = 0,
    check: bool = True,
) -> dict[str, np.ndarray]:
    """Taylor or Fisher scores of every probed channel of ``model`` over ``data``.

    ``data``: a ``Dataset`` (batches and, when it has them, ``labels``), or an iterable of feeds;
    ``labels``: per-sample class indices in the order of the batches (overrides the data's).
    Returns value name -> float64 scores along that value's channel axis (non-negative, finite)."""
    import torch
    import torch.nn.functional as F

    from onnxopt.passes.channel_groups import analyze
    from onnxopt.student import QDQ_MISMATCH_FRACTION, build_student, check_matches, has_quantize_nodes

    if criterion not in GRADIENT_CRITERIA:
        raise OptionError(f"gradient importance '{criterion}': not one of {', '.join(GRADIENT_CRITERIA)}")
    axes: dict[str, int] = {}
    for group in analyze(model).groups:
        for probe in group.probes:
            axes[probe.value] = probe.axis
    if labels is None:
        labels = getattr(data, "labels", None)
    batches = getattr(data, "batches", data)
    student = build_student(model)
    student.eval()
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] | None = None
    logits_name = None
    seen = 0
    for feed in batches:
        feed = {k: np.asarray(v) for k, v in feed.items()}
        n = len(next(iter(feed.values())))
        if kinds is None:
            if check:
                check_matches(student, model, feed,
                              mismatch_fraction=QDQ_MISMATCH_FRACTION if has_quantize_nodes(model) else 0.0)
            with torch.no_grad():
                first = {k: v.numpy() for k, v in student({k: torch.from_numpy(v) for k, v in feed.items()}).items()}
            kinds = _loss_kinds(first, labels is not None)
            logits_name = next((k for k, kind in kinds.items() if kind == "logits" or (kind == "probabilities"
                                                                                       and first[k].ndim == 2)), None)
        masks: dict[str, torch.Tensor] = {}

        def tap(name: str):
            def apply(x: torch.Tensor) -> torch.Tensor:
                if not x.is_floating_point():
                    return x
                axis = axes[name] % x.ndim
                shape = [1] * x.ndim
                shape[axis] = x.shape[axis]
                per_sample = axis != 0 and x.ndim > 1 and x.shape[0] == n
                if per_sample:
                    shape[0] = n
                mask = torch.ones(shape, dtype=x.dtype, requires_grad=True)
                masks[name] = mask
                return x * mask

            return apply

        outs = student({k: torch.from_numpy(v) for k, v in feed.items()}, taps={name: tap(name) for name in axes})
        loss = torch.zeros((), dtype=torch.float64)
        for name, y in outs.items():
            kind = kinds[name]
            if kind == "logits":
                y = y.double()
                if labels is not None and name == logits_name:
                    target = _labels(labels, seen, n)
                else:
                    target = y.argmax(dim=1).detach()
                loss = loss + F.cross_entropy(y, target, reduction="sum")
            elif kind == "probabilities":
                log_p = torch.log(y.double().clamp_min(1e-12))
                if labels is not None and name == logits_name:
                    loss = loss + F.nll_loss(log_p, _labels(labels, seen, n), reduction="sum")
                else:
                    loss = loss - log_p.max(dim=-1).values.sum()
            elif kind == "features":
                y = y.double()
                std = y.detach().std() if y.numel() > 1 else torch.ones((), dtype=y.dtype)
                std = std if float(std) > 0 else torch.ones((), dtype=y.dtype)
                noise = torch.randn(y.shape, generator=generator, dtype=y.dtype)
                loss = loss + 0.5 * (((y - (y.detach() + noise * std)) / std) ** 2).sum()
        if not loss.requires_grad:
            raise DataError("no model output depends on the probed channels: no gradient importance")
        grads = torch.autograd.grad(loss, list(masks.values()), allow_unused=True)
        for (name, mask), grad in zip(masks.items(), grads):
            if grad is None:
                continue
            axis = axes[name] % mask.ndim
            g = grad.double().movedim(axis, -1).reshape(-1, mask.shape[axis])  # rows: samples (or one)
            score = g.abs().sum(0) if criterion == "taylor" else (g**2).sum(0) / 2
            sums[name] = sums[name] + score if name in sums else score
        seen += n
    if kinds is None:
        raise DataError("gradient importance: no batches in the data")
    if labels is not None and len(np.asarray(labels).reshape(-1)) != seen:
        raise DataError(f"{len(np.asarray(labels).reshape(-1))} labels for {seen} samples")
    return {name: s.detach().numpy() for name, s in sums.items()}
