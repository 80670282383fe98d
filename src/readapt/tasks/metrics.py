"""GLUE metrics with scikit-learn and scipy; exact match and token F1 for generation tasks.

All values are fractions (accuracy 0.85, not 85); the CLI may print them x100.
Undefined correlations are reported as 0.0 instead of NaN, so model selection never compares
against NaN: Pearson/Spearman when either side is constant or there are fewer than 2 examples
(scipy would return NaN with a warning), and Matthews when a side is constant (scikit-learn's own
convention). NaN in regression predictions still gives NaN (a diverged model should show).
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from readapt.errors import DataError
from readapt.tasks.base import COMBINED_METRIC, Task
from readapt.tasks.glue import get_task

# Positive class of F1 on MRPC/QQP: label 1 = "equivalent" / "duplicate", as in GLUE.
F1_POSITIVE_LABEL = 1


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(accuracy_score(references, predictions))


def binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of class 1. Restricting sklearn to labels=[1] gives the binary F1 and also accepts the
    -1 that `Task.text_to_label` returns for an unknown generated word (counted as wrong)."""
    return float(
        f1_score(references, predictions, labels=[F1_POSITIVE_LABEL], average="micro", zero_division=0.0)
    )


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    with warnings.catch_warnings():
        # sklearn warns about a single class on a side and then (correctly for us) returns 0.0.
        warnings.simplefilter("ignore", UserWarning)
        return float(matthews_corrcoef(references, predictions))


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    if _correlation_undefined(predictions, references):
        return 0.0
    return float(stats.pearsonr(predictions, references).statistic)


def spearman(predictions: np.ndarray, references: np.ndarray) -> float:
    if _correlation_undefined(predictions, references):
        return 0.0
    return float(stats.spearmanr(predictions, references).statistic)


def _correlation_undefined(predictions: np.ndarray, references: np.ndarray) -> bool:
    # np.ptp is NaN for NaN input, and NaN == 0 is False: NaN predictions go on to give NaN.
    return len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(references) == 0


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


# --- generation: SQuAD's answer normalisation (lower case, no punctuation, no articles, single spaces)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalize_answer`."""
    return float(np.mean([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]))


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over examples of the F1 between the bags of normalised tokens (SQuAD); two empty answers agree."""
    scores = []
    for prediction, reference in zip(predictions, references, strict=True):
        predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
        if not predicted or not wanted:
            scores.append(float(predicted == wanted))
            continue
        common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(predicted), common / len(wanted)
        scores.append(2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
}


def compute_metrics(
    task: str | Task, predictions: Sequence[float] | np.ndarray, references: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Score predictions against references with the task's metrics.

    Classification: `predictions` are class indices (take the argmax of the logits first).
    Regression: predicted values. The result has one key per `task.metric_names`, plus
    "combined" (their mean) when there are several, so `result[task.main_metric]` always exists.
    """
    task = get_task(task)
    if task.is_generation:
        return _generation_metrics(task, predictions, references)
    prediction_array = _as_vector(predictions, "predictions")
    reference_array = _as_vector(references, "references")
    if len(prediction_array) != len(reference_array):
        raise DataError(
            f"got {len(prediction_array)} predictions for {len(reference_array)} references; "
            "expected one prediction per reference"
        )
    if len(reference_array) == 0:
        raise DataError("no predictions to score; expected at least one example")
    if not task.is_regression:
        prediction_array = _as_class_indices(prediction_array, "predictions")
        reference_array = _as_class_indices(reference_array, "references")

    results: dict[str, float] = {}
    for metric_name in task.metric_names:
        if metric_name not in METRICS:
            raise DataError(
                f"task {task.name}: unknown metric {metric_name!r}; expected one of {', '.join(METRICS)}"
            )
        results[metric_name] = METRICS[metric_name](prediction_array, reference_array)
    if len(task.metric_names) > 1:
        results[COMBINED_METRIC] = float(np.mean([results[name] for name in task.metric_names]))
    return results


def _generation_metrics(task: Task, predictions: Sequence, references: Sequence) -> dict[str, float]:
    if len(predictions) != len(references):
        raise DataError(f"got {len(predictions)} generations for {len(references)} references")
    if not references:
        raise DataError("no generations to score; expected at least one example")
    if not all(isinstance(t, str) for t in (*predictions, *references)):
        raise DataError(f"task {task.name}: generations and references must be texts")
    results = {name: GENERATION_METRICS[name](predictions, references) for name in task.metric_names}
    if len(task.metric_names) > 1:
        results[COMBINED_METRIC] = float(np.mean([results[name] for name in task.metric_names]))
    return results


def _as_vector(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be numbers (class indices or scores)") from None
    if array.ndim != 1:
        raise DataError(
            f"{what} must be one value per example (1-D), got shape {array.shape}; "
            "for logits take the argmax over the last axis first"
        )
    return array


def _as_class_indices(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise DataError(f"{what} of a classification task must be whole class indices")
    return values.astype(np.int64)
