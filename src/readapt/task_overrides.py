"""What `readapt predict` predicts for an adapter: the task its task.json records (written by `readapt train`: task,
input columns, labels, prompt, max length), with what the command line overrides (`--task`, `--text-columns`,
`--max-length`), or, for an adapter without task.json (saved by save_pretrained or transformers' Trainer), the task
those flags and its adapter_config.json describe. Anything that does not fit is one line (a ReadaptError)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from readapt.adapter_files import TASK_FILE
from readapt.backbone import DECODER_ONLY
from readapt.errors import ConfigError, IncompatibleAdapterError
from readapt.task_spec import TaskSpec, read_task_file
from readapt.tasks import Task, get_task


@dataclass(frozen=True)
class TaskOverrides:
    """What `readapt predict`'s flags change in the task an adapter's task.json records (for every adapter):
    `task` a GLUE task instead (its text fields, labels and prompt), `text_columns` the input file's columns read
    for the task's text fields, in their order (the prompt keeps the task's field names), `max_length` the
    truncation. An adapter without task.json (saved by save_pretrained or transformers' Trainer) needs `task`,
    or `text_columns` and the label set its adapter_config.json records."""

    task: str | None = None
    text_columns: tuple[str, ...] | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.text_columns is not None:
            object.__setattr__(self, "text_columns", tuple(self.text_columns))
            if not self.text_columns:
                raise ConfigError("--text-columns names no column; give the input column(s) the task reads, "
                                  "comma-separated")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"--max-length={self.max_length} is out of range; it must be >= 1")


DEFAULT_MAX_LENGTH = 128  # an adapter without task.json, as `readapt eval` and training default to


def adapter_task(directory: Path, metadata: dict, overrides: TaskOverrides | None = None
                 ) -> tuple[TaskSpec, tuple[str, ...]]:
    """(task spec, input columns) of one READ adapter: its task.json, with `overrides` applied."""
    overrides = overrides or TaskOverrides()
    has_file = (directory / TASK_FILE).is_file()
    spec = read_task_file(directory) if has_file else None
    if overrides.task is not None:
        spec = _glue_spec(directory, metadata, spec, overrides.task)
    elif spec is None and overrides.text_columns is not None:
        spec = _custom_spec(directory, metadata, overrides.text_columns)
    elif spec is None:
        raise IncompatibleAdapterError(
            f"{directory / TASK_FILE} is missing: the adapter does not say which task it predicts (adapters saved by "
            "save_pretrained or transformers' Trainer have none, `readapt train` writes it); name its GLUE task with "
            "--task, or the input column(s) it reads with --text-columns")
    columns = spec.input_columns
    if overrides.text_columns is not None:
        if len(overrides.text_columns) != len(spec.input_columns):
            raise ConfigError(f"--text-columns names {len(overrides.text_columns)} column(s) "
                              f"({', '.join(overrides.text_columns)}), but adapter {directory}'s task "
                              f"{spec.task.name!r} reads {len(spec.input_columns)} ({', '.join(spec.input_columns)})")
        columns = overrides.text_columns
    if overrides.max_length is not None:
        spec = dataclasses.replace(spec, max_length=overrides.max_length)
    return spec, columns


def _answers_in_words(metadata: dict) -> tuple[bool, bool]:
    """(text_to_text, causal_lm) of an adapter without task.json: an LM answering in words trains no head."""
    causal = metadata["backbone"].get("family") == DECODER_ONLY
    text_to_text = not metadata.get("head_modules")
    return text_to_text, causal and text_to_text


def _glue_spec(directory: Path, metadata: dict, spec: TaskSpec | None, name: str) -> TaskSpec:
    from readapt.read.auto import adapter_labels

    task = get_task(name)
    if spec is not None:
        text_to_text, causal = spec.text_to_text, spec.causal_lm
    else:
        text_to_text, causal = _answers_in_words(metadata)
    if not text_to_text:  # a head: its size must be the task's label count
        trained, regression, _ = adapter_labels(directory, metadata)
        if (trained, regression) != (task.num_labels, task.is_regression):
            kind = "a regression output" if regression else f"{trained} labels"
            wanted = "a regression output" if task.is_regression else f"{task.num_labels} labels"
            raise IncompatibleAdapterError(f"--task {name}: adapter {directory}'s head has {kind}, GLUE task "
                                           f"{task.name} needs {wanted}")
    return TaskSpec(task, spec.max_length if spec is not None else DEFAULT_MAX_LENGTH, text_to_text, source="glue",
                    glue_task=task.name, causal_lm=causal)


def _custom_spec(directory: Path, metadata: dict, columns: tuple[str, ...]) -> TaskSpec:
    from readapt.read.auto import adapter_labels

    text_to_text, causal = _answers_in_words(metadata)
    if text_to_text:
        raise IncompatibleAdapterError(
            f"adapter {directory} has no task.json and answers with a language model's words: its prompt and answer "
            "words are recorded in task.json only; name its GLUE task with --task, or retrain it with `readapt train`")
    if len(columns) > 2:
        raise ConfigError(f"--text-columns names {len(columns)} columns ({', '.join(columns)}); a task reads one "
                          "or two")
    count, regression, labels = adapter_labels(directory, metadata)
    names: tuple[str, ...] = ()
    if not regression:
        id2label = labels.get("id2label") or {}
        names = tuple(str(id2label.get(i, i)) for i in range(count))
    task = Task(name="custom", text_fields=columns, label_names=names, is_regression=regression,
                metric_names=("pearson", "spearmanr") if regression else ("accuracy",))
    return TaskSpec(task, DEFAULT_MAX_LENGTH, False, source="custom", causal_lm=causal)
