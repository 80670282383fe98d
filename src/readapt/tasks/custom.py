"""User-supplied tasks from CSV, TSV or JSON Lines files.

The format is chosen by extension: `.csv` (comma-separated, standard CSV quoting), `.tsv`
(tab-separated with no quoting, like GLUE), `.jsonl` (one JSON object per line); each may be
gzip-compressed (`.csv.gz`, ...). CSV and TSV files need a header line naming the columns.

Task type with task_type="auto": regression when every training label is a number and at least
one is not a whole number (e.g. 3.8); classification otherwise. So integer-valued scores (1..5
ratings) are treated as classes unless task_type="regression" is passed.

Classification labels are the distinct training labels as strings, sorted numerically when all
are integers and alphabetically otherwise; a label's index is its position in that order.

task_type="generation": one text column, the prompt (default `prompt`), and the label column is the
completion (default `completion`) the model learns to write after it; scored by exact match and token F1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from readapt.errors import DataError
from readapt.tasks.base import Example, Task
from readapt.tasks.files import delimited_records, delimiter_hint, jsonl_records, quote_value

TaskType = Literal["auto", "classification", "regression", "generation"]
_TASK_TYPES = ("auto", "classification", "regression", "generation")
GENERATION_COLUMNS = ("prompt", "completion")  # a generation task's default (text column, label column)
_FORMATS = (".csv", ".tsv", ".jsonl")


class TaskData(NamedTuple):
    """A custom task and its examples by split ("train", and "validation" when given)."""

    task: Task
    splits: dict[str, list[Example]]


class _Row(NamedTuple):
    line_number: int
    texts: tuple[str, ...]
    label: object  # raw cell: str from CSV/TSV, any JSON scalar from JSONL


def load_custom_task(
    train_file: str | os.PathLike[str],
    validation_file: str | os.PathLike[str] | None,
    text_columns: Sequence[str],
    label_column: str,
    task_type: TaskType = "auto",
    name: str = "custom",
    max_samples: int | None = None,
) -> TaskData:
    """Read a custom task; returns the Task (label set inferred from the training file) and its
    examples. Every validation label must occur in the training file (classification).

    `max_samples` keeps the first N examples of each split; the files are still read and checked
    in full, and the label set still comes from the whole training file.
    """
    text_columns = tuple(text_columns)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be a positive number of rows, got {max_samples}")
    if task_type == "generation" and len(text_columns) != 1:
        raise DataError(f"a generation task has one text column, the prompt; got {len(text_columns)}")
    if not 1 <= len(text_columns) <= 2:
        raise DataError(
            f"text_columns must name 1 or 2 columns (a sentence or a pair), got {len(text_columns)}"
        )
    if task_type not in _TASK_TYPES:
        raise DataError(f"task_type must be one of {', '.join(_TASK_TYPES)}, got {task_type!r}")

    train_path = Path(train_file).expanduser()
    train_rows = _read_rows(train_path, text_columns, label_column)
    is_regression = task_type == "regression" or (task_type == "auto" and _looks_like_regression(train_rows))
    validation_path = Path(validation_file).expanduser() if validation_file is not None else None
    validation_rows = _read_rows(validation_path, text_columns, label_column) if validation_path else None

    if task_type == "generation":
        task = Task(name=name, text_fields=text_columns, is_generation=True,
                    metric_names=("exact_match", "token_f1"),
                    dev_splits=("validation",) if validation_rows is not None else ())
    elif is_regression:
        task = Task(
            name=name,
            text_fields=text_columns,
            is_regression=True,
            metric_names=("pearson", "spearmanr"),
            dev_splits=("validation",) if validation_rows is not None else (),
            prompt_prefix=name,
        )
    else:
        label_names = _sorted_labels({_label_string(row.label) for row in train_rows})
        task = Task(
            name=name,
            text_fields=text_columns,
            label_names=label_names,
            dev_splits=("validation",) if validation_rows is not None else (),
            prompt_prefix=name,
            label_words=label_names,
        )

    splits = {"train": _to_examples(train_rows, task, train_path, label_column)}
    if validation_rows is not None and validation_path is not None:
        splits["validation"] = _to_examples(validation_rows, task, validation_path, label_column)
    if max_samples is not None:
        splits = {split: examples[:max_samples] for split, examples in splits.items()}
    return TaskData(task=task, splits=splits)


def _file_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix not in _FORMATS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; expected .csv, .tsv or .jsonl (optionally .gz)"
        )
    return suffix


def _read_rows(path: Path, text_columns: tuple[str, ...], label_column: str) -> list[_Row]:
    if path.is_dir():  # before the extension check: a folder has none, and "unsupported file type" misleads
        raise DataError(f"{path}: is a directory, not a file; expected a .csv, .tsv or .jsonl file (optionally .gz)")
    file_format = _file_format(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if file_format == ".jsonl":
        rows = list(_read_jsonl(path, text_columns, label_column))
    else:
        rows = list(_read_delimited(path, text_columns, label_column, file_format))
    if not rows:
        raise DataError(f"{path}: no data rows; expected at least one example")
    for row in rows:  # an empty cell is a missing label, not a class named ""
        if _label_string(row.label) == "":
            raise DataError(
                f"{path}, line {row.line_number}, column {label_column!r}: the label is empty; "
                "expected a class name or a number"
            )
        for column, text in zip(text_columns, row.texts, strict=True):
            if not text.strip():  # the model would learn this label from [CLS] [SEP] alone
                raise DataError(
                    f"{path}, line {row.line_number}, column {column!r}: the text is empty; "
                    "fill it in or remove the row"
                )
    return rows


def _read_delimited(
    path: Path, text_columns: tuple[str, ...], label_column: str, file_format: str
) -> Iterator[_Row]:
    _, columns, records = delimited_records(path, file_format)
    positions = {name: _column_position(path, columns, name) for name in (*text_columns, label_column)}
    for line_number, cells in records:
        if len(cells) != len(columns):
            raise DataError(
                f"{path}, line {line_number}: expected {len(columns)} columns (as in the header), found {len(cells)}"
            )
        texts = tuple(cells[positions[name]] for name in text_columns)
        yield _Row(line_number, texts, cells[positions[label_column]])


def _column_position(path: Path, columns: tuple[str, ...], name: str) -> int:
    if name not in columns:
        found = ", ".join(repr(column) for column in columns)
        raise DataError(f"{path}, line 1 (header): no column {name!r}; the columns are {found}"
                        + delimiter_hint(path, columns))
    return columns.index(name)


def _read_jsonl(path: Path, text_columns: tuple[str, ...], label_column: str) -> Iterator[_Row]:
    for line_number, record in jsonl_records(path):
        for key in (*text_columns, label_column):
            if key not in record:
                found = ", ".join(repr(existing) for existing in record)
                raise DataError(f"{path}, line {line_number}: no field {key!r}; the fields are {found}")
        for key in text_columns:
            if not isinstance(record[key], str):
                raise DataError(
                    f"{path}, line {line_number}, field {key!r}: expected a string, got {quote_value(record[key])}"
                )
        label = record[label_column]
        if label is None or isinstance(label, (dict, list)):
            raise DataError(
                f"{path}, line {line_number}, field {label_column!r}: expected a label (string or number), "
                f"got {json.dumps(label)}"
            )
        yield _Row(line_number, tuple(record[key] for key in text_columns), label)


def _label_string(label: object) -> str:
    return label.strip() if isinstance(label, str) else str(label)


def _as_number(label: object) -> float | None:
    """The label as a finite float, or None (booleans are not numbers here)."""
    if isinstance(label, bool):
        return None
    try:
        value = float(label.strip() if isinstance(label, str) else label)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _looks_like_regression(rows: list[_Row]) -> bool:
    values = [_as_number(row.label) for row in rows]
    if any(value is None for value in values):
        return False
    return any(not float(value).is_integer() for value in values if value is not None)


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    def as_int(label: str) -> int | None:
        try:
            return int(label)
        except ValueError:
            return None

    if all(as_int(label) is not None for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def _to_examples(rows: list[_Row], task: Task, path: Path, label_column: str) -> list[Example]:
    label_index = {name: index for index, name in enumerate(task.label_names)}
    examples = []
    for row in rows:
        where = f"{path}, line {row.line_number}, column {label_column!r}"
        label: int | float | str
        if task.is_generation:
            if not isinstance(row.label, str):
                raise DataError(f"{where}: a completion must be text, got {quote_value(row.label)}")
            label = row.label
        elif task.is_regression:
            number = _as_number(row.label)
            if number is None:
                raise DataError(
                    f"{where}: expected a number for a regression task, got {quote_value(row.label)}"
                )
            label = number
        else:
            name = _label_string(row.label)
            if name not in label_index:  # only validation rows can get here
                known = ", ".join(repr(known_label) for known_label in task.label_names)
                raise DataError(
                    f"{where}: label {quote_value(name)} does not occur in the training file; "
                    f"expected one of {known}"
                )
            label = label_index[name]
        examples.append(Example(texts=row.texts, label=label, idx=len(examples)))
    return examples
