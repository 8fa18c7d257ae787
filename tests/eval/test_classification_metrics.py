"""Classification metrics against sklearn.metrics on random labels and scores (several seeds, binary and
multiclass, a class that is never predicted, tied scores), plus hand cases and input errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from llmlab.eval import (
    accuracy, auc, average_precision, classification_report, confusion_matrix, matthews_corrcoef, pr_curve,
    precision_recall_f1, roc_auc, roc_curve,
)

SEEDS = range(3)


def data(seed: int, n_classes: int, n: int = 60):
    """Labels 0..K-1 (the last class is never predicted), rounded scores (many ties), probabilities."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, n)
    y_true[:n_classes] = np.arange(n_classes)          # every class occurs in y_true
    y_pred = rng.integers(0, n_classes - 1, n)
    probs = rng.random((n, n_classes)).round(1) + 1e-3
    probs /= probs.sum(axis=1, keepdims=True)
    return y_true, y_pred, probs


@pytest.fixture(autouse=True)
def quiet_sklearn():
    with warnings.catch_warnings():   # sklearn warns where a ratio is undefined; we compare the values
        warnings.simplefilter("ignore")
        yield


def same(a, b):
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_label_metrics_match_sklearn(seed, n_classes):
    y_true, y_pred, _ = data(seed, n_classes)
    assert np.array_equal(confusion_matrix(y_true, y_pred), skm.confusion_matrix(y_true, y_pred))
    assert accuracy(y_true, y_pred) == skm.accuracy_score(y_true, y_pred)
    assert matthews_corrcoef(y_true, y_pred) == skm.matthews_corrcoef(y_true, y_pred)
    averages = [None, "micro", "macro", "weighted"] + (["binary"] if n_classes == 2 else [])
    for average in averages:
        for zero_division in (0.0, 1.0, np.nan):
            ours = precision_recall_f1(y_true, y_pred, average=average, zero_division=zero_division)
            p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, average=average,
                                                             zero_division=zero_division)
            assert same(ours.precision, p) and same(ours.recall, r) and same(ours.f1, f), (average, zero_division)
            if average is None:
                assert np.array_equal(ours.support, s)
    assert classification_report(y_true, y_pred) == skm.classification_report(
        y_true, y_pred, output_dict=True, zero_division=0.0)


def test_labels_argument_matches_sklearn():
    y_true, y_pred, _ = data(0, 4)
    for labels in ([2, 0], [0, 1, 2, 3, 7], [3]):
        assert np.array_equal(confusion_matrix(y_true, y_pred, labels=labels),
                              skm.confusion_matrix(y_true, y_pred, labels=labels))
        for average in (None, "micro", "macro", "weighted"):
            ours = precision_recall_f1(y_true, y_pred, labels=labels, average=average)
            p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average,
                                                             zero_division=0.0)
            assert same(ours.precision, p) and same(ours.recall, r) and same(ours.f1, f)
        assert classification_report(y_true, y_pred, labels=labels) == skm.classification_report(
            y_true, y_pred, labels=labels, output_dict=True, zero_division=0.0)   # "micro avg" for a subset
    names = ["cat", "dog", "eel", "fox"]
    assert classification_report(y_true, y_pred, target_names=names) == skm.classification_report(
        y_true, y_pred, target_names=names, output_dict=True, zero_division=0.0)


def test_string_labels_match_sklearn():
    rng = np.random.default_rng(7)
    y_true = rng.choice(["neg", "neu", "pos"], 40)
    y_pred = rng.choice(["neg", "pos"], 40)
    assert np.array_equal(confusion_matrix(y_true, y_pred), skm.confusion_matrix(y_true, y_pred))
    assert matthews_corrcoef(y_true, y_pred) == skm.matthews_corrcoef(y_true, y_pred)
    assert classification_report(y_true, y_pred) == skm.classification_report(
        y_true, y_pred, output_dict=True, zero_division=0.0)
    yb, score = rng.choice(["ham", "spam"], 40), rng.random(40).round(1)
    for ours, theirs in zip(roc_curve(yb, score, pos_label="spam"), skm.roc_curve(yb, score, pos_label="spam")):
        assert np.array_equal(ours, theirs)
    assert roc_auc(yb, score) == skm.roc_auc_score(yb, score)
    assert average_precision(yb, score, pos_label="spam") == skm.average_precision_score(
        yb, score, pos_label="spam")


@pytest.mark.parametrize("seed", SEEDS)
def test_curves_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    for score in (rng.random(80), rng.random(80).round(1), np.r_[np.ones(40), np.zeros(40)]):
        for drop in (True, False):
            for ours, theirs in zip(roc_curve(y, score, drop_intermediate=drop),
                                    skm.roc_curve(y, score, drop_intermediate=drop)):
                assert np.array_equal(ours, theirs)
            for ours, theirs in zip(pr_curve(y, score, drop_intermediate=drop),
                                    skm.precision_recall_curve(y, score, drop_intermediate=drop)):
                assert np.array_equal(ours, theirs)
        assert roc_auc(y, score) == skm.roc_auc_score(y, score)
        assert average_precision(y, score) == skm.average_precision_score(y, score)
        fpr, tpr, _ = roc_curve(y, score)
        assert auc(fpr, tpr) == skm.auc(fpr, tpr)
    pm = 2 * y - 1   # {-1, 1} labels also imply the positive class 1
    assert np.array_equal(roc_curve(pm, score)[1], skm.roc_curve(pm, score)[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_classes", [3, 5])
def test_one_vs_rest_matches_sklearn(seed, n_classes):
    y_true, _, probs = data(seed, n_classes)
    for average in ("macro", "weighted", "micro", None):
        assert same(roc_auc(y_true, probs, average=average),
                    skm.roc_auc_score(y_true, probs, multi_class="ovr", average=average))
        assert np.allclose(average_precision(y_true, probs, average=average),
                           skm.average_precision_score(y_true, probs, average=average), rtol=0, atol=1e-15)


def test_hand_cases():
    # Perfect ranking, a reversed one, and all-tied scores.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # AP: ranking 1, 0, 1 -> precision 1 at recall 1/2, 2/3 at recall 1: AP = 0.5 * 1 + 0.5 * 2/3.
    assert average_precision([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(5 / 6)
    # MCC: perfect +1, inverted -1, constant prediction 0 (undefined).
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == 1.0
    assert matthews_corrcoef([0, 1, 1, 0], [1, 0, 0, 1]) == -1.0
    assert matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0
    # Binary P/R/F1: tp = 2, fp = 1, fn = 1.
    prf = precision_recall_f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0], average="binary")
    assert (prf.precision, prf.recall, prf.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))


def test_input_errors():
    with pytest.raises(ValueError, match="y_true has 3 items but y_pred has 2"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        confusion_matrix([], [])
    with pytest.raises(ValueError, match="one-dimensional"):
        confusion_matrix([0, 1], [[0], [1]])
    with pytest.raises(ValueError, match="average='binary' needs at most two classes"):
        precision_recall_f1([0, 1, 2], [0, 1, 2], average="binary")
    with pytest.raises(ValueError, match="unknown average"):
        precision_recall_f1([0, 1], [0, 1], average="samples")
    with pytest.raises(ValueError, match="both a positive and a negative"):
        roc_curve([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="exactly two classes"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="pass pos_label"):
        roc_curve(["a", "b"], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_curve([0, 1], [0.1, np.nan])
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="labels out of range"):
        roc_auc([0, 1, 2, 5], probs, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="3 columns but there are 2 classes"):
        roc_auc([0, 1, 0, 1], probs)
    with pytest.raises(ValueError, match="never occur in y_true"):
        roc_auc([0, 1, 0, 1], probs, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="none of the given labels"):
        confusion_matrix([0, 1], [0, 1], labels=[5])
