"""Evaluation metrics (numpy; scipy for regression): classification and regression, plus which is "better"."""
from __future__ import annotations

import math

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman", "mse")
GENERATION_METRICS = ("perplexity",)  # plus accuracy and macro_f1 of greedy generations when responses are labels
LOWER_IS_BETTER = {"loss", "mse", "perplexity"}
MAIN_METRIC = {"classification": "macro_f1", "regression": "pearson"}  # when the task names none that fits (else loss)


def confusion(preds, labels) -> np.ndarray:
    """Confusion matrix ``(k, k)`` (rows: true class, columns: predicted) over the ``k`` classes that occur
    in ``labels`` or ``preds``, sorted."""
    classes, index = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k, n = len(classes), len(labels)
    return np.bincount(index[:n] * k + index[n:], minlength=k * k).reshape(k, k)


def classification_metrics(preds, labels, num_labels: int | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 over the classes present, Matthews correlation; binary tasks add ``f1``
    (F1 of class 1, GLUE's MRPC metric). The same formulas and float64 arithmetic as scikit-learn's
    ``accuracy_score``, ``f1_score(average="macro", zero_division=0)`` and ``matthews_corrcoef``,
    from a confusion matrix (numpy only: importing sklearn costs ~100 MB of resident memory)."""
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    c = confusion(preds, labels)
    tp, true_sum, pred_sum = np.diag(c).astype(np.float64), c.sum(1, dtype=np.float64), c.sum(0, dtype=np.float64)
    f1 = np.divide(2 * tp, true_sum + pred_sum, out=np.zeros_like(tp), where=true_sum + pred_sum > 0)
    n = pred_sum.sum()
    cov_tp = tp.sum() * n - np.dot(true_sum, pred_sum)
    cov_pp_tt = (n**2 - np.dot(pred_sum, pred_sum)) * (n**2 - np.dot(true_sum, true_sum))
    out = {"accuracy": float(np.mean(preds == labels)),
           "macro_f1": float(np.mean(f1)),
           "mcc": 0.0 if cov_pp_tt == 0 else float(cov_tp / np.sqrt(cov_pp_tt))}
    if num_labels == 2:
        tp1, true1, pred1 = (float(np.sum((preds == 1) & (labels == 1))), float(np.sum(labels == 1)),
                             float(np.sum(preds == 1)))
        out["f1"] = 2 * tp1 / (true1 + pred1) if true1 + pred1 > 0 else 0.0
    return out


def regression_metrics(preds, labels) -> dict[str, float]:
    """Pearson and Spearman correlations (GLUE STS-B) and mean squared error."""
    from scipy.stats import pearsonr, spearmanr
    preds, labels = np.asarray(preds, dtype=float), np.asarray(labels, dtype=float)
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    constant = np.ptp(preds) == 0 or np.ptp(labels) == 0
    pearson = 0.0 if constant else float(pearsonr(preds, labels)[0])
    spearman = 0.0 if constant else float(spearmanr(preds, labels)[0])
    return {"pearson": pearson, "spearman": spearman, "mse": float(np.mean((preds - labels) ** 2))}


def compute_metrics(problem_type: str, outputs, labels, num_labels: int | None = None) -> dict[str, float]:
    """``outputs``: logits ``(n, k)`` for classification, predictions ``(n,)`` or ``(n, 1)`` for regression."""
    outputs = np.asarray(outputs)
    if problem_type == "regression":
        return regression_metrics(outputs.reshape(-1), labels)
    return classification_metrics(outputs.argmax(-1), labels, num_labels)


def metric_names(problem_type: str, num_labels: int | None = None) -> tuple[str, ...]:
    """What :func:`compute_metrics` (plus the evaluation loss) reports for a task."""
    if problem_type == "generation":
        return (*GENERATION_METRICS, *(("accuracy", "macro_f1") if num_labels else ()), "loss")
    if problem_type == "regression":
        return (*REGRESSION_METRICS, "loss")
    return (*CLASSIFICATION_METRICS, *(("f1",) if num_labels == 2 else ()), "loss")


def main_metric(problem_type: str, num_labels: int | None = None, preferred: str | None = None) -> str:
    """The default ``--select-metric``: the task's ``preferred`` one when the problem type reports it
    (``--problem-type regression`` on a classification task falls back), else the problem type's."""
    if preferred in metric_names(problem_type, num_labels):
        return preferred
    return MAIN_METRIC.get(problem_type, "loss")


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Strictly better (ties keep the earlier checkpoint); NaN is never better."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def majority_baseline(train_labels, test_labels, num_labels: int | None = None) -> dict[str, float]:
    """Metrics of always predicting the most frequent training class."""
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    majority = values[counts.argmax()]
    return classification_metrics(np.full(len(test_labels), majority), test_labels, num_labels)
