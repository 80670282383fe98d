"""`readapt predict`: predictions of many READ adapters on one frozen backbone, one backbone pass per batch.

Every READ adapter reads the same frozen hidden states, so the backbone's stacks run once per batch and each
adapter's side networks and head replay them (`ReadModel.run_adapters`); each adapter's predictions are
exactly what it gives alone. What each adapter needs comes from its directory: the weights and READ config
(`adapter_config.json`, `adapter_model.safetensors`) and its task (`task.json`, written by `readapt train`:
label names or regression, input columns, max length, text-to-text prompt and answers).

Sharing needs the same token ids: adapters whose tasks build the same input from a row (same text columns, same
max length; text-to-text: also the same prompt and candidate answers) form one group, and each group costs one
backbone pass per batch. Adapters of GLUE tasks with the same columns (SST-2 and CoLA: `sentence`; MRPC, RTE,
STS-B, WNLI: `sentence1, sentence2`) share; a QNLI adapter (`question, sentence`) needs its own pass.
Text-to-text adapters of different tasks never share (the task name is part of the T5 prompt).

Heads that read one position: a BERT-style classifier reads [CLS] only, and the side network works per token,
so where every adapter's head reads only the first token (checked when the adapters are loaded: noise written
into every other position of the stack's output must leave the logits bit for bit unchanged) the side
networks run on [CLS] alone (`ReadModel.correcting_positions`; with the "pooled" sequence context, on [CLS] and
the pooled sequence; not with the "mean" context). The logits are those of the full correction to
float rounding, and an adapter then costs a few percent of a backbone pass instead of a fifth to a third
(all-MiniLM-L6-v2, r = 256; benchmarks/predict.py). Decoder-only heads (last real token) and text-to-text models get the full correction.

Only READ adapters are served: the other methods change what the backbone computes (LoRA, adapters, BitFit,
prompts change its weights or inputs; LST reads other states), so they cannot share its pass; they are refused
with that reason (score them one at a time with `readapt eval`).

Input: CSV (header line, standard quoting), TSV (header line, tab-separated, no quoting) or JSONL (one object
per line), optionally gzip-compressed; the columns every adapter's task reads must be there. Output (by
extension): CSV or JSONL, or JSONL on stdout; every input column, then one column per adapter holding its
prediction: the label name (classification), the number (regression) or the generated text (generation: each
adapter generates on its own, as generation cannot share a pass).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from readapt.adapter_files import ADAPTER_DIR, read_adapter_metadata, recorded_backbone_dtype
from readapt.answers import candidate_scores, generate_texts, no_kv_cache
from readapt.encoding import Candidates, Collator, candidates_for, encode
from readapt.errors import ConfigError, DataError, IncompatibleAdapterError
from readapt.io import atomic_write_text
from readapt.read.model import ReadModel
from readapt.read.sources import portable_source
from readapt.settings import GenerationSettings
from readapt.task_overrides import TaskOverrides, adapter_task
from readapt.task_spec import TaskSpec
from readapt.tasks import Example
from readapt.tasks.files import delimited_records, jsonl_records, quote_value

INPUT_FORMATS = (".csv", ".tsv", ".jsonl")
OUTPUT_FORMATS = (".csv", ".jsonl")


# ---------------------------------------------------------------------------------------------- adapters
@dataclass
class AdapterEntry:
    name: str  # its prediction column
    directory: Path
    spec: TaskSpec
    columns: tuple[str, ...] = ()  # the input columns read for the task's text fields, in their order

    def __post_init__(self) -> None:
        self.columns = tuple(self.columns) or self.spec.input_columns


@dataclass
class AdapterGroup:
    """Adapters that get the same token ids from a row: one backbone pass per batch serves them all."""

    spec: TaskSpec  # the first adapter's (they share the input)
    names: list[str] = field(default_factory=list)
    candidates: Candidates | None = None  # text-to-text: the answers ranked for every adapter of the group
    columns: tuple[str, ...] = ()  # the input columns the group reads (default: the task's text fields)

    def __post_init__(self) -> None:
        self.columns = tuple(self.columns) or self.spec.input_columns


def default_name(directory: str | Path) -> str:
    """The folder's name, or its parent's for `readapt train`'s `<run>/adapter` (e.g. runs/sst2-read/adapter: sst2-read)."""
    path = Path(directory).resolve()
    return path.parent.name if path.name == ADAPTER_DIR and path.parent.name else path.name


def adapter_entries(directories: Sequence[str | Path], names: Sequence[str] | None = None,
                    overrides: TaskOverrides | None = None) -> list[AdapterEntry]:
    """Name and check every adapter before anything is loaded: READ only, with a task (its task.json, `overrides`
    applied), distinct names."""
    if not directories:
        raise ConfigError("name at least one adapter with --adapter DIR")
    if names and len(names) != len(directories):
        raise ConfigError(f"--name was given {len(names)} time(s) for {len(directories)} --adapter(s); give one "
                          "name per adapter, in the same order, or none")
    entries = []
    for position, directory in enumerate(directories):
        directory = Path(directory)
        metadata = read_adapter_metadata(directory)
        if metadata["method"] != "read":
            raise IncompatibleAdapterError(
                f"adapter {directory} was made by method {metadata['method']!r}: readapt predict serves READ adapters "
                f"only, which leave the backbone untouched and so can share its pass; a {metadata['method']} adapter "
                "changes what the backbone computes (score it alone with `readapt eval`)")
        name = names[position] if names else default_name(directory)
        spec, columns = adapter_task(directory, metadata, overrides)
        entries.append(AdapterEntry(name, directory, spec, columns))
    seen: dict[str, Path] = {}
    for entry in entries:
        if entry.name in seen:
            raise ConfigError(f"adapters {seen[entry.name]} and {entry.directory} would both be named {entry.name!r}; "
                              "give each its prediction column with --name")
        seen[entry.name] = entry.directory
    return entries


def _answer_kind(spec: TaskSpec) -> str:
    if spec.causal_lm:
        return "with a decoder-only LM's words"
    return "with an encoder-decoder LM's words" if spec.text_to_text else "with a classification head"


def _device(cpu: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


PROBE = ["a probe", "a longer probe sentence, with a few more tokens in it"]


class Predictor:
    """Loads the backbone once and every adapter onto it; `predict(rows)` gives each adapter's predictions.

    `head_only` (default): where every adapter's head reads the first token only (BERT-style classifiers read
    [CLS]; checked at load by `ReadModel.head_reads_only` on a probe input, per adapter), the side networks run
    on that position only (`ReadModel.correcting_positions`); elsewhere (decoder-only heads, text-to-text)
    they correct every token as in training."""

    def __init__(self, adapters: Sequence[str | Path], model: str | None = None, names: Sequence[str] | None = None,
                 cpu: bool = False, head_only: bool = True, overrides: TaskOverrides | None = None):
        from readapt.pretrained import load_backbone

        self.entries = adapter_entries(adapters, names, overrides)
        first = self.entries[0]
        if model is None:  # the backbone the first adapter records (AutoReadModel's rule), else the embedded one
            model = portable_source(read_adapter_metadata(first.directory).get("base_model_name_or_path") or "") or None
        # the dtype the first adapter was trained in (its int8 / bfloat16 backbone), as AutoReadModel loads it
        loaded = load_backbone(model, first.spec.task.num_labels, first.spec.task.is_regression,
                               dtype=recorded_backbone_dtype(first.directory),
                               decoder_head="label-words" if first.spec.text_to_text else "classifier",
                               generation=first.spec.task.is_generation)
        for entry in self.entries:
            if (entry.spec.text_to_text, entry.spec.causal_lm) != (loaded.text_to_text, loaded.causal_lm):
                raise IncompatibleAdapterError(f"adapter {entry.directory} answers {_answer_kind(entry.spec)}, but on "
                                               f"{loaded.source} the first adapter {first.name!r} answers "
                                               f"{_answer_kind(first.spec)}; predict them in separate runs")
        self.source = loaded.source
        self.tokenizer = loaded.tokenizer
        self.text_to_text = loaded.text_to_text
        self.causal = loaded.causal_lm
        self.model = ReadModel.from_pretrained(loaded.model, first.directory, adapter_name=first.name)
        for entry in self.entries[1:]:
            self.model.load_adapter(entry.directory, entry.name)
        self.device = _device(cpu)
        self.model.to(self.device).eval()
        self.model.set_adapter(first.name)

        groups: dict[tuple, AdapterGroup] = {}
        for entry in self.entries:
            key = (*entry.spec.input_key(), entry.columns)
            if entry.spec.task.is_generation:  # each adapter writes its own tokens: nothing to share
                key += (entry.name,)
            if key not in groups:
                candidates = (candidates_for(entry.spec.task, self.tokenizer, causal=self.causal)
                              if self.text_to_text and not entry.spec.task.is_generation else None)
                groups[key] = AdapterGroup(entry.spec, candidates=candidates, columns=entry.columns)
            groups[key].names.append(entry.name)
        self.groups = list(groups.values())
        self.specs = {entry.name: entry.spec for entry in self.entries}
        self._no_cache = no_kv_cache(self.model)
        self.positions = slice(0, 1) if head_only and self._heads_read_first_token() else None

    def _heads_read_first_token(self) -> bool:
        if self.text_to_text or len(self.model.adapted_stacks) != 1:
            return False
        if any(config.mixes_tokens for config in self.model.adapter_configs.values()):
            return False  # [CLS]'s correction then depends on every token's RNN summary (mean context, token mixer)
        probe = self.tokenizer(PROBE, padding=True, return_tensors="pt")
        inputs = {key: probe[key].to(self.device) for key in ("input_ids", "attention_mask")}
        for name in self.names:
            with self.model.using_adapter(name):
                if not self.model.head_reads_only(slice(0, 1), **inputs, **self._no_cache):
                    return False
        return True

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    @property
    def input_columns(self) -> list[str]:
        """Every column some adapter reads, in order of first use."""
        columns: list[str] = []
        for entry in self.entries:
            columns.extend(c for c in entry.columns if c not in columns)
        return columns

    def needs(self, column: str) -> str:
        """Which adapters read a column (for error messages)."""
        users = [f"{e.name!r} ({e.spec.task.name}: {', '.join(e.columns)})"
                 for e in self.entries if column in e.columns]
        return ", ".join(users)

    def predict_batch(self, rows: Sequence[dict[str, str]], shared: bool = True) -> dict[str, list]:
        """{adapter name: predictions} for a batch of rows (each a {column: text} dict). `shared=False` runs
        every adapter on its own backbone pass (for comparison: the predictions are the same)."""
        return self.predict_with_scores(rows, shared=shared)[0]

    @torch.no_grad()
    def predict_with_scores(self, rows: Sequence[dict[str, str]], names: Collection[str] | None = None,
                            shared: bool = True) -> tuple[dict[str, list], dict[str, list[dict[str, float]]]]:
        """(predictions, scores) of the adapters in `names` (default: all; groups none of them belongs to do not
        run). Predictions as `predict_batch`; scores: per classification adapter, each row's class probabilities
        {label: p} (the softmax of its logits, or over its candidate answers' log-likelihoods for text-to-text);
        regression and generation adapters have none."""
        predictions: dict[str, list] = {}
        scores: dict[str, list[dict[str, float]]] = {}
        for group in self.groups:
            wanted = [name for name in group.names if names is None or name in names]
            if not wanted:
                continue
            batch = self._batch(group.spec, rows, group.columns)
            if group.spec.task.is_generation:
                settings = GenerationSettings(**(group.spec.generation or {}))
                for name in wanted:
                    with self.model.using_adapter(name):
                        predictions[name] = generate_texts(self.model, batch, self.tokenizer, settings, self.causal)
                continue
            if group.candidates is None:
                def run(batch=batch):
                    return self.model(**batch, **self._no_cache).logits
            else:
                def run(batch=batch, candidates=group.candidates):
                    return candidate_scores(self.model, batch, candidates, self.causal)
            with self.model.correcting_positions(self.positions) if self.positions else contextlib.nullcontext():
                if shared:
                    outputs = self.model.run_adapters(run, wanted)
                else:
                    outputs = {name: self.model.run_adapters(run, [name])[name] for name in wanted}
            for name in wanted:
                predictions[name] = self._labels(self.specs[name], outputs[name], group.candidates)
                if not self.specs[name].task.is_regression:
                    scores[name] = self._probabilities(self.specs[name], outputs[name], group.candidates)
        return predictions, scores

    def predict(self, rows: Sequence[dict[str, str]], batch_size: int = 64, progress: bool = False,
                shared: bool = True) -> dict[str, list]:
        predictions: dict[str, list] = {name: [] for name in self.names}
        starts = range(0, len(rows), batch_size)
        for start in tqdm(starts, desc="predict", disable=not progress, leave=False):
            for name, values in self.predict_batch(rows[start: start + batch_size], shared).items():
                predictions[name].extend(values)
        return predictions

    def _batch(self, spec: TaskSpec, rows: Sequence[dict[str, str]], columns: Sequence[str] | None = None
               ) -> dict[str, torch.Tensor]:
        # Placeholder labels: encode builds the same token ids as in training and evaluation.
        label = "" if spec.task.is_generation else 0.0 if spec.task.is_regression else 0
        columns = columns or spec.input_columns
        examples = [Example(tuple(row[c] for c in columns), label, i) for i, row in enumerate(rows)]
        features = encode(spec.task, examples, self.tokenizer, spec.max_length, spec.text_to_text, spec.causal_lm)
        batch = Collator(self.tokenizer.pad_token_id, spec.text_to_text, spec.task.is_regression,
                         causal=spec.causal_lm, with_answers=False)(features)
        return {key: value.to(self.device) for key, value in batch.items() if key != "labels"}

    @staticmethod
    def _labels(spec: TaskSpec, output: torch.Tensor, candidates: Candidates | None) -> list:
        if candidates is not None:
            return [spec.label_value(candidates.values[i]) for i in output.argmax(-1).tolist()]
        if spec.task.is_regression:
            return [float(v) for v in output.squeeze(-1).float().tolist()]
        return [spec.label_value(i) for i in output.argmax(-1).tolist()]

    @staticmethod
    def _probabilities(spec: TaskSpec, output: torch.Tensor, candidates: Candidates | None) -> list[dict[str, float]]:
        labels = [spec.label_value(v) for v in (candidates.values if candidates is not None
                                                else range(output.shape[-1]))]
        return [dict(zip(labels, row, strict=True)) for row in torch.softmax(output.float(), -1).tolist()]


# ---------------------------------------------------------------------------------------------- files
def _file_format(path: Path, allowed: tuple[str, ...], what: str) -> str:
    name = path.name.lower().removesuffix(".gz") if what == "input" else path.name.lower()
    suffix = Path(name).suffix
    if suffix not in allowed:
        gz = " (optionally .gz)" if what == "input" else ""
        raise ConfigError(f"{what} file {path}: unsupported type {suffix or '(none)'!r}; expected "
                          f"{', '.join(allowed)}{gz}")
    return suffix


def read_rows(path: str | Path, needed: Sequence[str], needed_by=None) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of an input file; a column some adapter needs and the file lacks is a one-line DataError.
    `needed_by(column)` says which adapters read it."""
    path = Path(path).expanduser()
    file_format = _file_format(path, INPUT_FORMATS, "input")
    if not path.is_file():
        raise DataError(f"{path}: file not found")

    def missing(column: str, columns: Sequence[str], where: str) -> DataError:
        who = f", needed by adapter {needed_by(column)}" if needed_by else ""
        found = ", ".join(repr(c) for c in columns) or "none"
        return DataError(f"{where}: no column {column!r}{who}; the columns are {found}")

    if file_format == ".jsonl":
        columns: list[str] = []
        rows = []
        for number, record in jsonl_records(path):
            for column in needed:
                if column not in record:
                    raise missing(column, list(record), f"{path}, line {number}")
                if not isinstance(record[column], str):
                    raise DataError(f"{path}, line {number}, field {column!r}: expected a string, got "
                                    f"{quote_value(json.dumps(record[column]))}")
            columns.extend(key for key in record if key not in columns)
            rows.append(record)
    else:
        header_line, header, records = delimited_records(path, file_format)
        columns = list(header)
        for column in needed:
            if column not in columns:
                raise missing(column, columns, f"{path}, line {header_line} (header)")
        rows = []
        for number, cells in records:
            if len(cells) != len(columns):
                raise DataError(f"{path}, line {number}: expected {len(columns)} columns (as in the header), "
                                f"found {len(cells)}")
            rows.append(dict(zip(columns, cells, strict=True)))
    if not rows:
        raise DataError(f"{path}: no data rows; expected at least one row to predict")
    return columns, rows


def check_output_path(output: str | Path | None) -> None:
    if output is not None:
        _file_format(Path(output), OUTPUT_FORMATS, "output")


def render(columns: Sequence[str], rows: Sequence[dict[str, Any]], predictions: dict[str, list],
           file_format: str) -> str:
    """The output text: every input column, then one prediction column per adapter."""
    names = list(predictions)
    if file_format == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*columns, *names])
        for index, row in enumerate(rows):
            cells = [_cell(row.get(c, "")) for c in columns]
            writer.writerow([*cells, *(predictions[name][index] for name in names)])
        return buffer.getvalue()
    lines = []
    for index, row in enumerate(rows):
        record = {**row, **{name: predictions[name][index] for name in names}}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- the command
def run_predict(adapters: Sequence[str | Path], input_file: str | Path, output: str | Path | None = None,
                model: str | None = None, names: Sequence[str] | None = None, batch_size: int = 64,
                cpu: bool = False, progress: bool = True, task: str | None = None,
                text_columns: Sequence[str] | None = None, max_length: int | None = None) -> dict[str, Any]:
    """`readapt predict`: read the input, predict with every adapter, write the output (atomically) or stdout.
    Each adapter's task, input columns, labels, prompt and max length come from its task.json; `task`,
    `text_columns` and `max_length` override them for every adapter (TaskOverrides).
    Returns a summary (rows, adapters, groups = backbone passes per batch, batches, seconds)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} is out of range; it must be >= 1")
    check_output_path(output)
    overrides = TaskOverrides(task, None if text_columns is None else tuple(text_columns), max_length)
    entries = adapter_entries(adapters, names, overrides)  # cheap checks before the input or the model is read
    needed = []
    for entry in entries:
        needed.extend(c for c in entry.columns if c not in needed)

    def needed_by(column: str) -> str:
        return ", ".join(repr(e.name) for e in entries if column in e.columns)

    columns, rows = read_rows(input_file, needed, needed_by)
    clashes = [entry.name for entry in entries if entry.name in columns]
    if clashes:
        raise ConfigError(f"prediction column(s) {', '.join(repr(c) for c in clashes)} would overwrite input "
                          "column(s) of the same name; name the adapters with --name")
    started = time.perf_counter()
    predictor = Predictor(adapters, model=model, names=names, cpu=cpu, overrides=overrides)
    loaded = time.perf_counter()
    predictions = predictor.predict(rows, batch_size=batch_size, progress=progress)
    finished = time.perf_counter()
    text = render(columns, rows, predictions, _file_format(Path(output), OUTPUT_FORMATS, "output")
                  if output is not None else ".jsonl")
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(output, text)
    return {"rows": len(rows), "adapters": predictor.names, "model": predictor.source,
            "groups": [group.names for group in predictor.groups],
            "batches": -(-len(rows) // batch_size), "load_seconds": loaded - started,
            "predict_seconds": finished - loaded, "device": str(predictor.device), "output": str(output) if output else None}
