"""Task and Example: what every task (GLUE or custom) looks like to the rest of readapt.

A Task only *describes* a task (its text fields, labels, metrics and how to phrase it for a
text-to-text model); reading files is done by `readapt.tasks.glue` and `readapt.tasks.custom`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# STS-B scores run from 0 (unrelated) to 5 (same meaning).
STSB_MIN_SCORE = 0.0
STSB_MAX_SCORE = 5.0
# What `text_to_stsb` returns for text that is not a number. T5 used -1, which lies outside the
# score range; the midpoint keeps a bad generation from dominating Pearson/Spearman.
STSB_FALLBACK_SCORE = 2.5

# The key of the average of a task's metrics when it has more than one (GLUE's convention).
COMBINED_METRIC = "combined"


@dataclass(frozen=True)
class Example:
    """One labelled row: `texts` in the order of `Task.text_fields`; `label` is a class index
    (classification), a float target (regression) or the completion text (generation); `idx` is the
    0-based data row in its file."""

    texts: tuple[str, ...]
    label: int | float | str
    idx: int


@dataclass(frozen=True)
class Task:
    """Definition of a sentence (pair) classification or regression task.

    `label_names` are in label-index order (for GLUE: the Hugging Face `nyu-mll/glue` order);
    regression tasks have none. `label_words` are the target words of a text-to-text model,
    also in label-index order. `prompt_fields` is the order in which `format_text_to_text`
    writes the text fields (empty means the order of `text_fields`).

    A generation task (`is_generation`) has one text field, the prompt, and its labels are the
    completions; a model answers by generating, scored by exact match and token F1.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] = ()
    is_regression: bool = False
    metric_names: tuple[str, ...] = ("accuracy",)
    dev_splits: tuple[str, ...] = ("validation",)
    glue_dir: str | None = None
    prompt_prefix: str = ""
    prompt_fields: tuple[str, ...] = ()
    label_words: tuple[str, ...] = ()
    # Allowed (min, max) of a regression target; None means any finite number.
    target_range: tuple[float, float] | None = None
    is_generation: bool = False

    def __post_init__(self) -> None:
        if not self.text_fields:
            raise ValueError(f"task {self.name!r}: text_fields must name at least one field")
        if self.is_generation:
            if self.is_regression or self.label_names or len(self.text_fields) != 1:
                raise ValueError(f"task {self.name!r}: a generation task has one text field (the prompt) and no labels")
            return
        if self.is_regression and self.label_names:
            raise ValueError(f"task {self.name!r}: a regression task has no label_names")
        if not self.is_regression and not self.label_names:
            raise ValueError(f"task {self.name!r}: a classification task needs label_names")
        if self.label_words and len(self.label_words) != len(self.label_names):
            raise ValueError(f"task {self.name!r}: label_words and label_names differ in length")
        if set(self.prompt_fields) - set(self.text_fields):
            raise ValueError(f"task {self.name!r}: prompt_fields must be among text_fields")

    @property
    def main_metric(self) -> str:
        """The metric used for model selection: the average ("combined") when there are several."""
        return COMBINED_METRIC if len(self.metric_names) > 1 else self.metric_names[0]

    @property
    def num_labels(self) -> int:
        """Size of the model's output: 1 for regression (and generation, which has no head), else the number
        of classes."""
        return 1 if self.is_regression or self.is_generation else len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits)

    # --- text-to-text (T5 style) --------------------------------------------------------------

    def format_text_to_text(self, example: Example) -> str:
        """The T5 input, e.g. "rte sentence1: <text> sentence2: <text>"."""
        if len(example.texts) != len(self.text_fields):
            raise ValueError(
                f"task {self.name!r} has {len(self.text_fields)} text fields but the example has "
                f"{len(example.texts)} texts"
            )
        text_by_field = dict(zip(self.text_fields, example.texts, strict=True))
        parts = [self.prompt_prefix] if self.prompt_prefix else []
        for field in self.prompt_fields or self.text_fields:
            parts.append(f"{field}: {text_by_field[field]}")
        return " ".join(parts)

    def format_causal_prompt(self, example: Example) -> str:
        """What a decoder-only LM reads before it answers: the prompt itself for a generation task; for a
        classification or regression task the text-to-text input and an answer cue, the label word to follow
        after a space ("rte sentence1: ... sentence2: ...\nAnswer:" + " entailment")."""
        if self.is_generation:
            return example.texts[0]
        return self.format_text_to_text(example) + "\nAnswer:"

    def label_to_text(self, label: int | float) -> str:
        """The target text for a label: its label word, the formatted score for regression, the completion
        itself for generation."""
        if self.is_generation:
            return str(label)
        if self.is_regression:
            if self.target_range == (STSB_MIN_SCORE, STSB_MAX_SCORE):
                return stsb_to_text(float(label))
            return f"{float(label):g}"
        words = self.label_words or self.label_names
        return words[int(label)]

    def text_to_label(self, text: str) -> int | float:
        """Inverse of `label_to_text` for generated text. An unknown word gives -1, which every
        metric counts as wrong (as in T5). Unparsable regression text gives the middle of
        `target_range` (2.5 for STS-B; 0.0 for a task without a range)."""
        if self.is_regression:
            if self.target_range == (STSB_MIN_SCORE, STSB_MAX_SCORE):
                return text_to_stsb(text)
            low, high = self.target_range or (0.0, 0.0)
            return _parse_float(text, default=(low + high) / 2)
        words = self.label_words or self.label_names
        cleaned = text.strip()
        return words.index(cleaned) if cleaned in words else -1


def stsb_to_text(score: float) -> str:
    """An STS-B score as T5's target text: clamped to [0, 5], rounded to the nearest 0.2 and
    written with one decimal (3.83 -> "3.8", 3.9 -> "4.0").

    The rounding is `round(score * 5) / 5`, i.e. exact ties (odd tenths such as 0.1 or 0.7) go to
    the even multiple of 0.2 (0.1 -> "0.0", 0.7 -> "0.8"), like the `tf.round` used by T5.
    """
    clamped = min(max(float(score), STSB_MIN_SCORE), STSB_MAX_SCORE)
    return f"{round(clamped * 5) / 5 + 0.0:.1f}"  # + 0.0 turns a -0.0 into 0.0


def text_to_stsb(text: str, default: float = STSB_FALLBACK_SCORE) -> float:
    """Parse a generated STS-B score, clamped to [0, 5]; text that is not a finite number gives
    `default` (2.5, the middle of the scale, unless given)."""
    value = _parse_float(text, default=default)
    return min(max(value, STSB_MIN_SCORE), STSB_MAX_SCORE)


def _parse_float(text: str, default: float) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        return default
    return value if math.isfinite(value) else default
