"""What an adapter was trained to do, saved beside its weights as `task.json`, so that `readapt predict` can build
its inputs and name its predictions without the training data.

task.json (written atomically by `readapt train` each time it saves the best adapter):

    format           1
    task             the task definition (readapt.tasks.Task): name, text_fields (= the input columns
                     prediction needs, in order), label_names (label-index order; [] for regression),
                     is_regression, label_words, prompt_prefix, prompt_fields, target_range, metric_names
    source           "glue" (glue_task names the GLUE task) or "custom" (text_columns, label_column and
                     task_type as given to `readapt train`)
    max_length       inputs are truncated to this many tokens, as in training
    text_to_text     true for LMs answering in words (encoder-decoder, or decoder-only with label words): the input
                     is the task's prompt and prediction ranks the candidate answers (rank classification)
    causal_lm        true for a decoder-only LM answering in words (the prompt ends in an answer cue)
    candidates       text-to-text only: the ranked answers, as label values and as target texts
    generation       generation tasks only: the settings completions were generated with (GenerationSettings)
    readapt_version  the version that wrote it
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from readapt.adapter_files import TASK_FILE
from readapt.encoding import candidate_answers
from readapt.errors import IncompatibleAdapterError
from readapt.io import atomic_write_json
from readapt.tasks import Task
from readapt.version import __version__

FORMAT = 1
_TUPLE_FIELDS = ("text_fields", "label_names", "metric_names", "dev_splits", "prompt_fields", "label_words")


@dataclass(frozen=True)
class TaskSpec:
    """An adapter's task and how its inputs were built."""

    task: Task
    max_length: int
    text_to_text: bool
    source: str = "glue"  # "glue" or "custom"
    glue_task: str | None = None
    causal_lm: bool = False
    generation: dict[str, Any] | None = None  # generation tasks: GenerationSettings as a dict

    @property
    def input_columns(self) -> tuple[str, ...]:
        return self.task.text_fields

    def input_key(self) -> tuple:
        """Adapters with equal keys get the same token ids for a row, so one backbone pass serves them all."""
        key: tuple = (self.text_to_text, self.causal_lm, self.task.text_fields, self.max_length)
        if self.text_to_text:  # the prompt, and the candidate answers the decoder scores
            key += (self.task.prompt_prefix, self.task.prompt_fields or self.task.text_fields,
                    tuple(candidate_answers(self.task)[1]))
        return key

    def label_value(self, index_or_value: int | float) -> str | float:
        """A prediction as the task's label: its name (classification) or the number (regression)."""
        if self.task.is_regression:
            return float(index_or_value)
        return self.task.label_names[int(index_or_value)]

    def to_dict(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "format": FORMAT, "task": _task_dict(self.task), "source": self.source, "glue_task": self.glue_task,
            "max_length": self.max_length, "text_to_text": self.text_to_text, "causal_lm": self.causal_lm,
            "readapt_version": __version__,
        }
        if self.generation is not None:
            record["generation"] = self.generation
        elif self.text_to_text:
            values, texts = candidate_answers(self.task)
            record["candidates"] = {"values": list(values), "texts": texts}
        record.update(extra or {})
        return record


def _task_dict(task: Task) -> dict[str, Any]:
    record = dataclasses.asdict(task)
    for name, value in record.items():
        if isinstance(value, tuple):
            record[name] = list(value)
    return record


def write_task_file(directory: str | Path, task: Task, config, text_to_text: bool, causal_lm: bool = False) -> None:
    """Write `task.json` into a saved adapter's directory. `config` is the run's readapt.recipe.TrainingConfig."""
    data = config.data
    answers = {"causal_lm": causal_lm, "generation": config.generation.to_dict() if task.is_generation else None}
    if data.train_file is not None:
        spec = TaskSpec(task, config.max_length, text_to_text, source="custom", **answers)
        extra = {"custom": {"text_columns": list(data.text_columns or task.text_fields),
                            "label_column": data.label_column, "task_type": data.task_type}}
    else:
        spec = TaskSpec(task, config.max_length, text_to_text, source="glue", glue_task=task.name, **answers)
        extra = None
    atomic_write_json(Path(directory) / TASK_FILE, spec.to_dict(extra))


def read_task_file(directory: str | Path) -> TaskSpec:
    """The TaskSpec saved with an adapter; a missing or malformed task.json is an IncompatibleAdapterError."""
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise IncompatibleAdapterError(
            f"{path} is missing: the adapter does not say which task it predicts (adapters trained before "
            "task.json existed lack it); retrain it with `readapt train`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        fields = dict(record["task"])
        for name in _TUPLE_FIELDS:
            if name in fields:
                fields[name] = tuple(fields[name])
        if fields.get("target_range") is not None:
            fields["target_range"] = tuple(fields["target_range"])
        task = Task(**fields)
        max_length = record["max_length"]
        text_to_text = record["text_to_text"]
        if record.get("format") != FORMAT or not isinstance(max_length, int) or not isinstance(text_to_text, bool):
            raise ValueError("unknown format, or max_length / text_to_text of the wrong type")
        causal_lm, generation = record.get("causal_lm", False), record.get("generation")
        if not isinstance(causal_lm, bool) or not (generation is None or isinstance(generation, dict)):
            raise ValueError("causal_lm / generation of the wrong type")
        return TaskSpec(task, max_length, text_to_text, source=record.get("source", "glue"),
                        glue_task=record.get("glue_task"), causal_lm=causal_lm, generation=generation)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise IncompatibleAdapterError(f"{path} is not a valid readapt task file: {exc}") from None
