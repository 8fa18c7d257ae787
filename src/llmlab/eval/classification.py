"""Classification metrics: confusion matrix, precision/recall/F1, accuracy, MCC, ROC and PR curves.

Numbers equal scikit-learn's (tests compare against sklearn.metrics); the code is ours, in numpy.
Where sklearn warns and returns nan for an undefined curve (a class missing from y_true) we raise a
ValueError instead. Labels may be any sortable values (ints, strings); "binary" means at most two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PRF", "confusion_matrix", "accuracy", "precision_recall_f1", "matthews_corrcoef", "roc_curve",
    "pr_curve", "average_precision", "roc_auc", "auc", "classification_report",
]


def _as_1d(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty")
    return y


def _pair(y_true, y_pred, pred_name: str = "y_pred") -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _as_1d(y_true, "y_true"), np.asarray(y_pred)
    if pred_name == "y_pred" and y_pred.ndim != 1:
        raise ValueError(f"y_pred must be one-dimensional (one label per item), got shape {y_pred.shape}")
    if len(y_pred) != len(y_true):
        raise ValueError(f"y_true has {len(y_true)} items but {pred_name} has {len(y_pred)}")
    return y_true, y_pred


def _index_of(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Position of each value in labels (any order), -1 where it is not one of them."""
    order = np.argsort(labels, kind="stable")
    pos = np.clip(np.searchsorted(labels[order], values), 0, len(labels) - 1)
    return np.where(labels[order][pos] == values, order[pos], -1)


def _labels(y_true, y_pred, labels) -> np.ndarray:
    if labels is None:
        return np.unique(np.concatenate([y_true, y_pred]))
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or len(np.unique(labels)) != len(labels):
        raise ValueError("labels must be a non-empty list of distinct values")
    return labels


def confusion_matrix(y_true, y_pred, *, labels=None) -> np.ndarray:
    """C[i, j] = number of items of true class labels[i] predicted as labels[j] (items whose true or
    predicted label is not in ``labels`` are left out). Labels default to the sorted union."""
    y_true, y_pred = _pair(y_true, y_pred)
    labels = _labels(y_true, y_pred, labels)
    t, p = _index_of(y_true, labels), _index_of(y_pred, labels)
    if not (t >= 0).any():
        raise ValueError("none of the given labels occurs in y_true")
    keep = (t >= 0) & (p >= 0)
    k = len(labels)
    return np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k)


def accuracy(y_true, y_pred) -> float:
    """Fraction of items predicted exactly right."""
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


@dataclass(frozen=True)
class PRF:
    """Per-class arrays (average=None) or averaged floats; support counts true items of the labels."""

    precision: np.ndarray | float
    recall: np.ndarray | float
    f1: np.ndarray | float
    support: np.ndarray | int


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(num.shape, float(zero_division))
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nan_average(x: np.ndarray, weights=None) -> float:
    keep = ~np.isnan(x)
    if not keep.any():
        return float("nan")
    if weights is None or np.sum(weights[keep]) == 0:
        return float(np.mean(x[keep]))
    return float(np.average(x[keep], weights=weights[keep]))


def precision_recall_f1(y_true, y_pred, *, average: str | None = None, labels=None, pos_label=1,
                        zero_division: float = 0.0) -> PRF:
    """Precision tp/(tp+fp), recall tp/(tp+fn) and F1 2tp/(2tp+fp+fn) per class, or averaged.

    ``average``: None (per class, in label order), "binary" (the ``pos_label`` class of a binary
    problem), "micro" (pooled counts), "macro" (unweighted mean over classes) or "weighted" (mean
    weighted by support). A ratio with a zero denominator is ``zero_division`` (0.0 as sklearn's
    default "warn", or 1.0, or nan to leave the class out of averages).
    """
    if average not in (None, "binary", "micro", "macro", "weighted"):
        raise ValueError(f"unknown average={average!r}: use None, 'binary', 'micro', 'macro' or 'weighted'")
    y_true, y_pred = _pair(y_true, y_pred)
    present = np.unique(np.concatenate([y_true, y_pred]))
    if average == "binary":
        if len(present) > 2:
            raise ValueError(f"average='binary' needs at most two classes, found {len(present)}: "
                             "use 'micro', 'macro' or 'weighted'")
        if pos_label not in present and len(present) == 2:
            raise ValueError(f"pos_label={pos_label!r} is not one of the labels {present.tolist()}")
        labels = [pos_label]
    labels = _labels(y_true, y_pred, labels)
    t, p = _index_of(y_true, labels), _index_of(y_pred, labels)
    k = len(labels)
    tp = np.bincount(t[(t == p) & (t >= 0)], minlength=k)
    pred = np.bincount(p[p >= 0], minlength=k)
    true = np.bincount(t[t >= 0], minlength=k)
    if average == "micro":
        tp, pred, true = tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
    precision = _divide(tp.astype(float), pred, zero_division)
    recall = _divide(tp.astype(float), true, zero_division)
    f1 = _divide(2.0 * tp, true + pred.astype(float), zero_division)   # F_1 = 2tp / (2tp + fp + fn)
    if average is None:
        return PRF(precision, recall, f1, true)
    weights = true if average == "weighted" else None
    return PRF(_nan_average(precision, weights), _nan_average(recall, weights), _nan_average(f1, weights),
               int(true.sum()))


def matthews_corrcoef(y_true, y_pred) -> float:
    """MCC, in Gorodkin's (2004) multiclass form R_K = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), with
    c correct items, s items, t and p the true and predicted class counts; 0 when undefined."""
    y_true, y_pred = _pair(y_true, y_pred)
    cm = confusion_matrix(y_true, y_pred)
    t, p = cm.sum(axis=1, dtype=np.float64), cm.sum(axis=0, dtype=np.float64)
    c, s = np.trace(cm, dtype=np.float64), p.sum()
    cov_tp = c * s - np.dot(t, p)
    cov_pp_tt = (s ** 2 - np.dot(p, p)) * (s ** 2 - np.dot(t, t))
    return 0.0 if cov_pp_tt == 0 else float(cov_tp / np.sqrt(cov_pp_tt))


# ---------------------------------------------------------------------------------- threshold curves
def _binary_target(y_true, y_score, pos_label) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_score = _pair(y_true, y_score, "y_score")
    y_score = y_score.astype(np.float64)
    if y_score.ndim != 1 or not np.all(np.isfinite(y_score)):
        raise ValueError("y_score must be a one-dimensional array of finite numbers")
    classes = np.unique(y_true)
    if pos_label is None:
        if classes.dtype.kind in "OUS" or not any(
                np.array_equal(classes, c) for c in ([0, 1], [-1, 1], [0], [-1], [1])):
            raise ValueError(f"y_true takes values {classes.tolist()}: pass pos_label (only {{0, 1}} and "
                             "{-1, 1} labels imply the positive class 1)")
        pos_label = 1
    elif len(classes) == 2 and pos_label not in classes:
        raise ValueError(f"pos_label={pos_label!r} is not one of the labels {classes.tolist()}")
    return (y_true == pos_label).astype(np.float64), y_score


def _counts_at_thresholds(y: np.ndarray, score: np.ndarray):
    """Cumulative true/false positives when predicting positive for score >= each distinct score."""
    order = np.argsort(-score, kind="stable")
    score, y = score[order], y[order]
    last = np.r_[np.nonzero(np.diff(score))[0], len(y) - 1]     # the last item of each tie group
    tps = np.cumsum(y)[last]
    fps = 1 + last - tps
    return fps, tps, score[last]


def _need_both_classes(tps, fps, what: str) -> None:
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError(f"{what} is undefined: y_true needs both a positive and a negative item "
                         f"(found {int(tps[-1])} positive, {int(fps[-1])} negative)")


def roc_curve(y_true, y_score, *, pos_label=None, drop_intermediate: bool = True):
    """(fpr, tpr, thresholds) as sklearn.metrics.roc_curve: one point per distinct score, from
    threshold +inf (0, 0) down; drop_intermediate removes points collinear with their neighbours."""
    y, score = _binary_target(y_true, y_score, pos_label)
    fps, tps, thresholds = _counts_at_thresholds(y, score)
    if drop_intermediate and len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    _need_both_classes(tps, fps, "the ROC curve")
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def pr_curve(y_true, y_score, *, pos_label=None, drop_intermediate: bool = False):
    """(precision, recall, thresholds) as sklearn.metrics.precision_recall_curve: thresholds ascending,
    and a final point precision 1, recall 0 without a threshold."""
    y, score = _binary_target(y_true, y_score, pos_label)
    fps, tps, thresholds = _counts_at_thresholds(y, score)
    if drop_intermediate and len(fps) > 2:   # keep only the points where recall changes
        keep = np.r_[True, np.logical_or(np.diff(tps[:-1]), np.diff(tps[1:])), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    if tps[-1] == 0:
        raise ValueError("the precision-recall curve is undefined: y_true has no positive item")
    precision = _divide(tps, tps + fps, 0.0)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def auc(x, y) -> float:
    """Area under a curve by the trapezoidal rule (x monotonic)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("x and y must be one-dimensional, of equal length, with at least 2 points")
    dx = np.diff(x)
    if not (np.all(dx >= 0) or np.all(dx <= 0)):
        raise ValueError("x is neither increasing nor decreasing")
    area = (dx * (y[1:] + y[:-1]) / 2.0).sum()
    return float(area if np.all(dx >= 0) else -area)


def _binary_ap(y: np.ndarray, score: np.ndarray) -> float:
    # AP = sum_n (R_n - R_{n-1}) P_n: precision at each threshold, weighted by the recall gained.
    precision, recall, _ = pr_curve(y, score, pos_label=1)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(y, score, pos_label=1)
    return auc(fpr, tpr)


def _one_vs_rest(metric, y_true, y_score, average, labels) -> float | np.ndarray:
    """Mean of a binary metric over the columns of a (n_items, n_classes) score matrix."""
    if average not in (None, "micro", "macro", "weighted"):
        raise ValueError(f"unknown average={average!r}: use 'macro', 'weighted', 'micro' or None")
    y_true, y_score = _pair(y_true, y_score, "y_score")
    classes = np.unique(y_true) if labels is None else np.asarray(labels)
    if len(classes) != y_score.shape[1]:
        raise ValueError(f"y_score has {y_score.shape[1]} columns but there are {len(classes)} classes "
                         f"{classes.tolist()} (pass labels= to name one per column)")
    idx = _index_of(y_true, classes)
    if (idx < 0).any():
        raise ValueError(f"y_true holds labels out of range: {np.unique(y_true[idx < 0]).tolist()} are "
                         f"not among {classes.tolist()}")
    onehot = (idx[:, None] == np.arange(len(classes))).astype(np.float64)
    if not onehot.any(axis=0).all():
        raise ValueError(f"classes {classes[~onehot.any(axis=0)].tolist()} never occur in y_true: their "
                         "one-vs-rest curves are undefined")
    if average == "micro":
        return metric(onehot.ravel(), y_score.ravel())
    scores = np.array([metric(onehot[:, k], y_score[:, k]) for k in range(len(classes))])
    if average is None:
        return scores
    return float(np.average(scores, weights=onehot.sum(axis=0) if average == "weighted" else None))


def average_precision(y_true, y_score, *, average: str | None = "macro", pos_label=1, labels=None):
    """Average precision (area under the step PR curve) as sklearn.metrics.average_precision_score.

    1-D ``y_score``: binary, positive class ``pos_label``. 2-D (n_items, n_classes): one-vs-rest per
    column, columns in sorted-class order (or ``labels``), then averaged.
    """
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_score.ndim == 2:
        return _one_vs_rest(_binary_ap, y_true, y_score, average, labels)
    y, score = _binary_target(y_true, y_score, pos_label)
    return _binary_ap(y, score)


def roc_auc(y_true, y_score, *, average: str | None = "macro", labels=None):
    """Area under the ROC curve as sklearn.metrics.roc_auc_score.

    1-D ``y_score``: binary, the score of the greater label. 2-D: one-vs-rest (multi_class="ovr")
    per column, then "macro", "weighted" (by class prevalence), "micro" or None (per class).
    """
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_score.ndim == 2:
        return _one_vs_rest(_binary_auc, y_true, y_score, average, labels)
    y_true, y_score = _pair(y_true, y_score, "y_score")
    classes = np.unique(y_true)
    if len(classes) != 2:
        raise ValueError(f"binary ROC AUC needs exactly two classes in y_true, found {classes.tolist()}")
    return _binary_auc((y_true == classes[1]).astype(np.float64), y_score)


def classification_report(y_true, y_pred, *, labels=None, target_names: Sequence[str] | None = None,
                          zero_division: float = 0.0) -> dict:
    """sklearn's classification_report(output_dict=True): one entry per class (precision, recall,
    f1-score, support), then "accuracy" (or "micro avg" when labels leave some classes out),
    "macro avg" and "weighted avg"."""
    y_true, y_pred = _pair(y_true, y_pred)
    present = np.unique(np.concatenate([y_true, y_pred]))
    labels_given = labels is not None
    labels = _labels(y_true, y_pred, labels)
    names = [str(label) for label in labels] if target_names is None else list(target_names)
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} target_names for {len(labels)} labels")
    keys = ("precision", "recall", "f1-score", "support")
    per = precision_recall_f1(y_true, y_pred, labels=labels, zero_division=zero_division)
    report = {name: dict(zip(keys, map(float, row)))
              for name, *row in zip(names, per.precision, per.recall, per.f1, per.support)}
    micro_is_accuracy = not labels_given or set(labels.tolist()) >= set(present.tolist())
    for average in ("micro", "macro", "weighted"):
        avg = precision_recall_f1(y_true, y_pred, labels=labels, average=average, zero_division=zero_division)
        row = dict(zip(keys, (avg.precision, avg.recall, avg.f1, float(per.support.sum()))))
        if average == "micro" and micro_is_accuracy:
            report["accuracy"] = row["precision"]
        else:
            report[f"{average} avg"] = row
    return report
