import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tenslora.train.metrics import (classification_metrics, compute_metrics, is_better, main_metric,
                                    majority_baseline, metric_names, regression_metrics)


def test_classification_matches_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    m = classification_metrics(p, y, 3)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    assert "f1" not in m


def test_known_values_and_binary_f1():
    y = [0, 0, 1, 1, 1, 0]
    p = [0, 1, 1, 1, 0, 0]
    m = classification_metrics(p, y, 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert m["mcc"] == pytest.approx(1 / 3)


def test_logits_argmax_and_regression():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    assert compute_metrics("classification", logits, [0, 1, 1], 2)["accuracy"] == pytest.approx(2 / 3)
    pred, y = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.0, 0.5, 0.3, 1.0])
    m = regression_metrics(pred, y)
    assert m["pearson"] == pytest.approx(pearsonr(pred, y)[0])
    assert m["spearman"] == pytest.approx(spearmanr(pred, y)[0])
    assert compute_metrics("regression", pred[:, None], y)["mse"] == pytest.approx(np.mean((pred - y) ** 2))
    assert regression_metrics([1.0, 1.0], [0.0, 1.0])["pearson"] == 0.0  # constant: defined, not NaN


def test_is_better_and_majority():
    assert is_better("accuracy", 0.5, None) and is_better("accuracy", 0.6, 0.5)
    assert not is_better("accuracy", 0.5, 0.5)  # ties keep the earlier checkpoint
    assert is_better("loss", 0.4, 0.5) and not is_better("mse", 0.6, 0.5)
    assert not is_better("mcc", math.nan, 0.1)
    m = majority_baseline([0, 1, 1, 2], [1, 1, 0, 2], 3)
    assert m["accuracy"] == 0.5 and m["mcc"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [])


def test_main_metric_follows_the_problem_type():
    assert main_metric("classification", 3) == "macro_f1" and main_metric("regression", 1) == "pearson"
    assert main_metric("classification", 2, "f1") == "f1" and main_metric("regression", 1, "pearson") == "pearson"
    assert main_metric("regression", 1, "macro_f1") == "pearson"  # --problem-type regression on a class task
    assert main_metric("classification", 3, "f1") == "macro_f1"  # f1 exists for 2 classes only
    assert main_metric("classification", 5, "pearson") == "macro_f1"
    for problem, k in (("classification", 2), ("classification", 4), ("regression", 1)):
        assert main_metric(problem, k) in metric_names(problem, k)
