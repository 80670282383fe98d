"""The nine GLUE tasks and readers for the original GLUE TSV files (or the Hugging Face Hub).

Layout on disk, as written by GLUE's `download_glue_data.py`::

    <data_dir>/<glue_dir>/train.tsv          (or train.tsv.gz)
    <data_dir>/<glue_dir>/dev.tsv            (MNLI: dev_matched.tsv, dev_mismatched.tsv)

Rows are split on tabs with no quote handling: CoLA and SST-2 text contains bare `"`.
Text cells are kept exactly as in the file (SST-2 sentences end with a space, as in the Hub copy);
label cells are stripped of surrounding whitespace. Blank lines are skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from readapt.errors import DataError
from readapt.tasks.base import STSB_MAX_SCORE, STSB_MIN_SCORE, Example, Task
from readapt.tasks.files import delimiter_hint, quote_value, read_lines

GLUE_DIR_ENV = "GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"

_ENTAILMENT_2 = ("entailment", "not_entailment")

# Label names and their index order follow the Hugging Face `nyu-mll/glue` ClassLabels, which are
# also the class names T5 used as target words.
GLUE_TASKS: Mapping[str, Task] = MappingProxyType(
    {
        "cola": Task(
            name="cola",
            glue_dir="CoLA",
            text_fields=("sentence",),
            label_names=("unacceptable", "acceptable"),
            metric_names=("matthews_correlation",),
            prompt_prefix="cola",
            label_words=("unacceptable", "acceptable"),
        ),
        "sst2": Task(
            name="sst2",
            glue_dir="SST-2",
            text_fields=("sentence",),
            label_names=("negative", "positive"),
            prompt_prefix="sst2",
            label_words=("negative", "positive"),
        ),
        "mrpc": Task(
            name="mrpc",
            glue_dir="MRPC",
            text_fields=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
            metric_names=("accuracy", "f1"),
            prompt_prefix="mrpc",
            label_words=("not_equivalent", "equivalent"),
        ),
        "qqp": Task(
            name="qqp",
            glue_dir="QQP",
            text_fields=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            metric_names=("accuracy", "f1"),
            prompt_prefix="qqp",
            label_words=("not_duplicate", "duplicate"),
        ),
        "stsb": Task(
            name="stsb",
            glue_dir="STS-B",
            text_fields=("sentence1", "sentence2"),
            is_regression=True,
            metric_names=("pearson", "spearmanr"),
            prompt_prefix="stsb",
            target_range=(STSB_MIN_SCORE, STSB_MAX_SCORE),
        ),
        "mnli": Task(
            name="mnli",
            glue_dir="MNLI",
            text_fields=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
            dev_splits=("validation_matched", "validation_mismatched"),
            prompt_prefix="mnli",
            # T5 writes the fields in sorted order: "mnli hypothesis: ... premise: ...".
            prompt_fields=("hypothesis", "premise"),
            label_words=("entailment", "neutral", "contradiction"),
        ),
        "qnli": Task(
            name="qnli",
            glue_dir="QNLI",
            text_fields=("question", "sentence"),
            label_names=_ENTAILMENT_2,
            prompt_prefix="qnli",
            label_words=_ENTAILMENT_2,
        ),
        "rte": Task(
            name="rte",
            glue_dir="RTE",
            text_fields=("sentence1", "sentence2"),
            label_names=_ENTAILMENT_2,
            prompt_prefix="rte",
            label_words=_ENTAILMENT_2,
        ),
        "wnli": Task(
            name="wnli",
            glue_dir="WNLI",
            text_fields=("sentence1", "sentence2"),
            # WNLI's file says 1 for entailment, so index 0 is not_entailment (unlike RTE/QNLI).
            label_names=("not_entailment", "entailment"),
            prompt_prefix="wnli",
            label_words=("not_entailment", "entailment"),
        ),
    }
)


@dataclass(frozen=True)
class _TsvLayout:
    """Where a task's fields are in its GLUE TSV files."""

    text_columns: tuple[str, ...]  # in the order of Task.text_fields
    label_column: str
    label_values: tuple[str, ...] = ()  # raw label cells in label-index order; () for regression
    # Column names of a file without a header line (CoLA); None means line 1 is the header.
    headerless_columns: tuple[str, ...] | None = None


_BINARY_01 = ("0", "1")
_TSV_LAYOUTS: Mapping[str, _TsvLayout] = MappingProxyType(
    {
        "cola": _TsvLayout(
            text_columns=("sentence",),
            label_column="label",
            label_values=_BINARY_01,
            headerless_columns=("source", "label", "original_mark", "sentence"),
        ),
        "sst2": _TsvLayout(("sentence",), "label", _BINARY_01),
        "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality", _BINARY_01),
        "qqp": _TsvLayout(("question1", "question2"), "is_duplicate", _BINARY_01),
        "stsb": _TsvLayout(("sentence1", "sentence2"), "score"),
        "mnli": _TsvLayout(
            ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction")
        ),
        "qnli": _TsvLayout(("question", "sentence"), "label", _ENTAILMENT_2),
        "rte": _TsvLayout(("sentence1", "sentence2"), "label", _ENTAILMENT_2),
        "wnli": _TsvLayout(("sentence1", "sentence2"), "label", _BINARY_01),
    }
)

# Split name -> file stem. "dev"-style names are accepted as aliases of the Hub's split names.
_SPLIT_FILES = {
    "train": "train",
    "validation": "dev",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
}
_SPLIT_ALIASES = {
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def get_task(name: str | Task) -> Task:
    """The GLUE task for a name in any usual spelling ("SST-2", "sst_2", "STS-B", "MNLI"...)."""
    if isinstance(name, Task):
        return name
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {name!r}; expected one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def load_glue_split(
    task: str | Task, data_dir: str | os.PathLike[str], split: str, max_samples: int | None = None
) -> list[Example]:
    """Read one split of a GLUE task from the original TSV files under `data_dir`.

    `split` is "train", "validation" (MNLI: "validation_matched" / "validation_mismatched");
    "dev", "dev_matched" and "dev_mismatched" are accepted too. `max_samples` keeps the first N
    rows of the file (deterministic, no shuffling; rows after the N-th are not read or checked).
    """
    task = get_task(task)
    split = _check_split(task, split)
    _check_max_samples(max_samples)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"GLUE data directory not found: {root} (pass --data-dir or set {GLUE_DIR_ENV})")
    path = _find_split_file(root, task, split)
    examples = _read_glue_tsv(path, task, _TSV_LAYOUTS[task.name], max_samples)
    if not examples:
        raise DataError(f"{path}: no data rows; expected at least one example in the {split} split")
    return examples


def load_glue(
    task: str | Task,
    data_dir: str | os.PathLike[str] | None = None,
    splits: Iterable[str] | None = None,
    max_samples: int | None = None,
) -> dict[str, list[Example]]:
    """Load several splits (default: train and the task's dev splits) as {split: examples}.

    The data comes from `data_dir`, else from the directory in $GLUE_DIR, else from the Hugging
    Face Hub (`datasets.load_dataset("nyu-mll/glue", ...)`, needs `pip install readapt[hub]`).
    `max_samples` keeps the first N rows of every split.
    """
    task = get_task(task)
    wanted = [_check_split(task, split) for split in (splits if splits is not None else task.splits)]
    _check_max_samples(max_samples)
    if data_dir is None:
        data_dir = os.environ.get(GLUE_DIR_ENV) or None
    if data_dir is None:
        return _load_from_hub(task, wanted, max_samples)
    return {split: load_glue_split(task, data_dir, split, max_samples) for split in wanted}


def _check_split(task: Task, split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in task.splits:
        raise DataError(f"task {task.name} has no split {split!r}; expected one of {', '.join(task.splits)}")
    return split


def _check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be a positive number of rows, got {max_samples}")


def _find_split_file(root: Path, task: Task, split: str) -> Path:
    assert task.glue_dir is not None
    stem = _SPLIT_FILES[split]
    # The uncompressed file wins when both exist (it is the one a user would have edited).
    candidates = [root / task.glue_dir / f"{stem}.tsv", root / task.glue_dir / f"{stem}.tsv.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(candidate) for candidate in candidates)
    raise DataError(f"{task.glue_dir} {split} file not found: tried {tried}")


def _read_glue_tsv(path: Path, task: Task, layout: _TsvLayout, max_samples: int | None) -> list[Example]:
    lines = read_lines(path)
    if layout.headerless_columns is not None:
        columns = layout.headerless_columns
    else:
        header = next(((number, line) for number, line in lines if line.strip()), None)
        if header is None:
            raise DataError(f"{path}: the file is empty; expected a header line and data rows")
        columns = tuple(name.strip() for name in header[1].split("\t"))
    text_positions = [_column_position(path, columns, name) for name in layout.text_columns]
    label_position = _column_position(path, columns, layout.label_column)
    label_index = {value: index for index, value in enumerate(layout.label_values)}

    examples: list[Example] = []
    for line_number, line in lines:
        if max_samples is not None and len(examples) >= max_samples:
            break
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(columns):
            where = "as in the header" if layout.headerless_columns is None else f"for {task.glue_dir}"
            raise DataError(
                f"{path}, line {line_number}: expected {len(columns)} tab-separated columns ({where}), "
                f"found {len(cells)}"
            )
        raw_label = cells[label_position].strip()
        column = f"column {label_position + 1} ({columns[label_position]!r})"
        label: int | float
        if task.is_regression:
            label = _parse_target(raw_label, task, f"{path}, line {line_number}, {column}")
        elif raw_label in label_index:
            label = label_index[raw_label]
        else:
            allowed = ", ".join(repr(value) for value in layout.label_values)
            raise DataError(
                f"{path}, line {line_number}, {column}: label {quote_value(raw_label)} is not a "
                f"{task.name} label; expected one of {allowed}"
            )
        texts = tuple(cells[position] for position in text_positions)
        examples.append(Example(texts=texts, label=label, idx=len(examples)))
    return examples


def _column_position(path: Path, columns: tuple[str, ...], name: str) -> int:
    if name not in columns:
        found = ", ".join(repr(column) for column in columns)
        raise DataError(f"{path}, line 1 (header): no column {name!r}; the header has {found}"
                        + delimiter_hint(path, columns))
    return columns.index(name)


def _parse_target(raw: str, task: Task, where: str) -> float:
    """A regression target: a finite number inside the task's range."""
    low, high = task.target_range or (-math.inf, math.inf)
    expected = f"a number from {low:g} to {high:g}" if task.target_range else "a finite number"
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise DataError(f"{where}: expected {expected}, got {quote_value(raw)}")
    return value


def _load_from_hub(task: Task, splits: list[str], max_samples: int | None) -> dict[str, list[Example]]:
    try:
        import datasets  # optional dependency: readapt[hub]
    except ImportError:
        raise DataError(
            f"no GLUE data directory: pass --data-dir DIR (the GLUE TSV folder) or set {GLUE_DIR_ENV}, "
            "or install readapt[hub] to download GLUE from the Hugging Face Hub"
        ) from None
    try:
        dataset = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as error:  # network, auth and cache errors all mean the same to the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"could not load {HUB_DATASET} {task.name} from the Hugging Face Hub ({reason}); "
            "pass --data-dir DIR to use local GLUE TSV files"
        ) from None
    loaded: dict[str, list[Example]] = {}
    for split in splits:
        rows = dataset[split]
        if max_samples is not None:
            rows = rows.select(range(min(max_samples, len(rows))))
        loaded[split] = [
            Example(
                texts=tuple(row[field] for field in task.text_fields),
                label=float(row["label"]) if task.is_regression else int(row["label"]),
                idx=int(row["idx"]),
            )
            for row in rows
        ]
    return loaded
