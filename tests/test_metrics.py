"""GLUE metrics checked against values computed by hand from their formulas."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score

from readapt.errors import DataError
from readapt.tasks import GLUE_TASKS, Task, compute_metrics

# A binary confusion matrix used below, positive class = 1:
#   references  1 1 1 1 0 0 0 0 0 0
#   predictions 1 1 1 0 1 1 0 0 0 0
#   TP = 3, FN = 1, FP = 2, TN = 4
REFERENCES = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PREDICTIONS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
# accuracy = (TP + TN) / n = 7 / 10
ACCURACY = 0.7
# F1 = 2 TP / (2 TP + FP + FN) = 6 / 9   (precision 3/5, recall 3/4)
F1 = 2 / 3
# MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*4*6*5) = 10 / sqrt(600)
MCC = 10 / math.sqrt(600)


def test_cola_matthews_correlation_by_hand():
    result = compute_metrics("cola", PREDICTIONS, REFERENCES)
    assert result == {"matthews_correlation": pytest.approx(MCC)}
    assert result["matthews_correlation"] == pytest.approx(0.408248, abs=1e-6)


@pytest.mark.parametrize("name", ["mrpc", "qqp", "MRPC"])
def test_mrpc_qqp_accuracy_f1_and_combined_by_hand(name):
    result = compute_metrics(name, PREDICTIONS, REFERENCES)
    assert result == {
        "accuracy": pytest.approx(ACCURACY),
        "f1": pytest.approx(F1),
        "combined": pytest.approx((0.7 + 2 / 3) / 2),  # 0.68333...
    }


def test_f1_positive_class_is_label_one():
    # With the classes swapped (the former TN are now TP): TP = 4, FP = 1, FN = 2, so F1 changes.
    swapped_refs = [1 - label for label in REFERENCES]
    swapped_preds = [1 - label for label in PREDICTIONS]
    # F1 = 2 TP / (2 TP + FP + FN) = 8 / 11
    assert compute_metrics("mrpc", swapped_preds, swapped_refs)["f1"] == pytest.approx(8 / 11)


def test_f1_matches_sklearn_binary_f1_on_random_labels():
    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, size=200)
    predictions = rng.integers(0, 2, size=200)
    expected = f1_score(references, predictions, average="binary", pos_label=1)
    assert compute_metrics("qqp", predictions, references)["f1"] == pytest.approx(expected)


def test_unknown_generated_word_counts_as_wrong():
    # Task.text_to_label gives -1 for a word that is no label: refs 1 1 0 0, preds 1 -1 0 -1
    # accuracy = 2/4; TP = 1, FN = 1, FP = 0 -> F1 = 2 / (2 + 0 + 1)
    result = compute_metrics("mrpc", [1, -1, 0, -1], [1, 1, 0, 0])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(2 / 3)


def test_f1_without_any_positive_is_zero():
    result = compute_metrics("mrpc", [0, 0, 0], [0, 0, 0])
    assert result == {"accuracy": 1.0, "f1": 0.0, "combined": 0.5}


def test_accuracy_three_classes():
    # 3 of 4 right
    assert compute_metrics("mnli", np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == {"accuracy": 0.75}


@pytest.mark.parametrize("name", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(name):
    assert compute_metrics(name, PREDICTIONS, REFERENCES) == {"accuracy": pytest.approx(0.7)}


def test_stsb_monotone_but_not_linear():
    # predictions x = 1 2 3 4, references y = x^2 = 1 4 9 16
    # mean x = 2.5, mean y = 7.5; dx = -1.5 -0.5 0.5 1.5; dy = -6.5 -3.5 1.5 8.5
    # sum dx*dy = 9.75 + 1.75 + 0.75 + 12.75 = 25; sum dx^2 = 5; sum dy^2 = 42.25 + 12.25 + 2.25 + 72.25 = 129
    # pearson = 25 / sqrt(5 * 129) = 25 / sqrt(645) = 0.98437...; same order -> spearman = 1
    pearson = 25 / math.sqrt(645)
    result = compute_metrics("STS-B", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0])
    assert result == {
        "pearson": pytest.approx(pearson),
        "spearmanr": pytest.approx(1.0),
        "combined": pytest.approx((pearson + 1.0) / 2),
    }
    assert result["pearson"] == pytest.approx(0.984374, abs=1e-6)


def test_stsb_rank_reversal():
    # x = 1 2 3, y = 3 1 2 (already ranks): d = x - y = -2 1 1, sum d^2 = 6
    # spearman = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 36 / 24 = -0.5
    # pearson: dx = -1 0 1, dy = 1 -1 0 -> sum dx*dy = -1, sum dx^2 = sum dy^2 = 2 -> -1 / 2
    result = compute_metrics("stsb", [1, 2, 3], [3, 1, 2])
    assert result["spearmanr"] == pytest.approx(-0.5)
    assert result["pearson"] == pytest.approx(-0.5)
    assert result["combined"] == pytest.approx(-0.5)


def test_constant_predictions_give_zero_not_nan_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 3.0, 5.0]) == {
            "pearson": 0.0,
            "spearmanr": 0.0,
            "combined": 0.0,
        }
        assert compute_metrics("stsb", [1.0, 3.0, 5.0], [4.0, 4.0, 4.0])["pearson"] == 0.0
        assert compute_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0]) == {"matthews_correlation": 0.0}
        assert compute_metrics("cola", [1, 1], [1, 1]) == {"matthews_correlation": 0.0}


def test_single_example_correlation_is_zero():
    assert compute_metrics("stsb", [3.0], [4.0])["combined"] == 0.0


def test_nan_regression_predictions_stay_visible():
    result = compute_metrics("stsb", [1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])
    assert math.isnan(result["pearson"])


def test_main_metric_key_always_present_and_values_are_fractions():
    rng = np.random.default_rng(1)
    for task in GLUE_TASKS.values():
        references = rng.uniform(0, 5, 50) if task.is_regression else rng.integers(0, task.num_labels, 50)
        predictions = rng.uniform(0, 5, 50) if task.is_regression else rng.integers(0, task.num_labels, 50)
        result = compute_metrics(task, predictions, references)
        assert task.main_metric in result
        assert set(result) == set(task.metric_names) | ({"combined"} if len(task.metric_names) > 1 else set())
        assert all(-1.0 <= value <= 1.0 for value in result.values())
        assert all(isinstance(value, float) for value in result.values())


def test_custom_task_metrics():
    task = Task(name="topics", text_fields=("text",), label_names=("a", "b", "c"))
    assert compute_metrics(task, [0, 2, 2], [0, 1, 2]) == {"accuracy": pytest.approx(2 / 3)}


def test_float_class_indices_are_accepted_when_whole():
    assert compute_metrics("rte", np.array([0.0, 1.0]), [0, 1]) == {"accuracy": 1.0}


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([1, 0], [1, 0, 1], "got 2 predictions for 3 references; expected one prediction per reference"),
        ([], [], "no predictions to score; expected at least one example"),
        (
            [[0.1, 0.9], [0.8, 0.2]],
            [1, 0],
            r"predictions must be one value per example \(1-D\), got shape \(2, 2\)",
        ),
        ([0.5, 1.0], [1, 0], "predictions of a classification task must be whole class indices"),
        ([0, 1], [float("nan"), 1], "references of a classification task must be whole class indices"),
        (["yes", "no"], [1, 0], r"predictions must be numbers \(class indices or scores\)"),
    ],
)
def test_bad_input(predictions, references, message):
    with pytest.raises(DataError, match=message):
        compute_metrics("rte", predictions, references)


def test_unknown_task_name():
    with pytest.raises(DataError, match="unknown GLUE task 'imdb'"):
        compute_metrics("imdb", [1], [1])
