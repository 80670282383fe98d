"""Scoring a model on a task's dev split(s): predictions for every method (heads, label words, generation), the
metrics, and the score that picks the best epoch."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from readapt.adapter_files import recorded_backbone_dtype
from readapt.answers import candidate_scores, generate_texts, no_kv_cache
from readapt.encoding import Candidates, Collator, candidates_for, encode
from readapt.errors import ConfigError, DataError
from readapt.methods import method_of
from readapt.pretrained import load_backbone
from readapt.read.cache import CACHED_FEATURES
from readapt.recipe.cache_jobs import CacheJobs
from readapt.recipe.config import DataConfig
from readapt.recipe.data import SELECTION_SPLIT, load_task_data, make_loader
from readapt.settings import GenerationSettings
from readapt.tasks import Example, Task, compute_metrics, load_custom_task


@torch.no_grad()
def predict(model, loader: DataLoader, task: Task, candidates: Candidates | None, progress: bool = False,
            description: str = "eval", gather=None, *, causal: bool = False,
            generation: tuple[Any, GenerationSettings] | None = None) -> list[int | float | str]:
    """Predictions for every example of `loader`: argmax / regression output of a head; for LMs (T5, or a
    decoder-only LM: `causal`) rank classification over the candidate answers (highest total log-likelihood);
    for generation tasks (`generation` = (tokenizer, settings)) the generated completions.
    Several processes (each scoring its shard of every batch): `gather` = Accelerate's gather_for_metrics,
    which puts the shards back in order and drops the examples repeated to even out the last batch."""
    model.eval()
    no_cache = no_kv_cache(model)
    predictions: list[int | float | str] = []
    for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
        if generation is not None:
            texts = generate_texts(model, batch, *generation, causal=causal)
            predictions.extend(gather(texts) if gather is not None else texts)
            continue
        with replaying_batch(model, batch):
            if candidates is None:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache).logits
                batch_predictions = logits.squeeze(-1).float() if task.is_regression else logits.argmax(-1)
            else:
                batch_predictions = candidate_scores(model, batch, candidates, causal).argmax(-1)
        if gather is not None:
            batch_predictions = gather(batch_predictions)
        values = batch_predictions.tolist()
        predictions.extend(values if candidates is None else [candidates.values[i] for i in values])
    return predictions


def replaying_batch(model, batch: dict):
    """Takes a batch's cached backbone states out of it (feature cache); within the block the model replays them."""
    cached = batch.pop(CACHED_FEATURES, None)
    return contextlib.nullcontext() if cached is None else model.replaying(cached)


@dataclass
class DevEvaluator:
    """The dev split(s) of a task, encoded once, and how to score a model on them."""

    task: Task
    loaders: dict[str, DataLoader]
    references: dict[str, list]
    candidates: Candidates | None  # T5 / decoder-only LM on a classification task: the answers ranked
    gather: Any = None  # several processes: Accelerate's gather_for_metrics
    causal: bool = False  # a decoder-only LM (left-padded prompts)
    generation: tuple[Any, GenerationSettings] | None = None  # generation task: (tokenizer, settings)

    @classmethod
    def build(cls, task: Task, dev_examples: dict[str, list[Example]], loaded, max_length: int, batch_size: int,
              accelerator, feature_cache: CacheJobs | None = None,
              generation: GenerationSettings | None = None) -> DevEvaluator:
        # a decoder-only LM is scored on the prompts alone: the candidates (or the generation) follow them
        collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, task.is_regression,
                            causal=loaded.causal_lm, with_answers=False)
        candidates = (candidates_for(task, loaded.tokenizer, causal=loaded.causal_lm)
                      if loaded.text_to_text and not task.is_generation else None)
        loaders = {}
        for split, rows in dev_examples.items():
            features = encode(task, rows, loaded.tokenizer, max_length, loaded.text_to_text, causal=loaded.causal_lm)
            split_collator = collator
            if feature_cache is not None:
                features, split_collator = feature_cache.attach(f"dev {split}", features, collator, candidates)
            loaders[split] = accelerator.prepare(make_loader(features, batch_size, split_collator))
        references = {split: [e.label for e in rows] for split, rows in dev_examples.items()}
        gather = accelerator.gather_for_metrics if getattr(accelerator, "num_processes", 1) > 1 else None
        generate = (loaded.tokenizer, generation or GenerationSettings()) if task.is_generation else None
        return cls(task, loaders, references, candidates, gather, loaded.causal_lm, generate)

    def __call__(self, model, progress: bool) -> dict[str, dict[str, float]]:
        results = {}
        for split, loader in self.loaders.items():
            predictions = predict(model, loader, self.task, self.candidates, progress, description=f"eval {split}",
                                  gather=self.gather, causal=self.causal, generation=self.generation)
            if len(predictions) != len(self.references[split]):  # every dev example scored exactly once
                raise RuntimeError(f"{len(predictions)} predictions for {len(self.references[split])} {split} examples")
            results[split] = compute_metrics(self.task, predictions, self.references[split])
        return results


def main_score(task: Task, results: dict[str, dict[str, float]]) -> float:
    """Model selection: the task's main metric on the selection split held out of train (--selection-fraction),
    else averaged over its dev splits (MNLI: matched/mismatched)."""
    if SELECTION_SPLIT in results:
        return float(results[SELECTION_SPLIT][task.main_metric])
    return float(np.mean([r[task.main_metric] for r in results.values()]))


def evaluate_adapter(data: DataConfig, model_name: str | None, adapter: str | Path, batch_size: int = 64,
                     max_length: int | None = None, progress: bool = True,
                     cpu: bool = False, dtype: str | None = None) -> dict[str, dict[str, float]]:
    """Load a backbone and a trained adapter (any method) and score the task's dev split(s). The task, its columns
    and max length come from the adapter's task.json where it has one (`readapt train` writes it): `data` then
    needs no task (a GLUE task's dev set is found as in training; a custom task's rows come from
    `data.validation_file`), and what `data` does name overrides it. `dtype`: the backbone's weights (None: the
    dtype the adapter records it was trained in, e.g. int8)."""
    from accelerate import Accelerator

    from readapt.task_spec import TASK_FILE, read_task_file

    adapter = Path(adapter)
    method = method_of(adapter)
    # how the adapter answers (label words or a head; generation settings) is what it was trained with
    spec = read_task_file(adapter) if (adapter / TASK_FILE).is_file() else None
    task, dev_examples = _evaluation_data(data, spec, adapter)
    decoder_head = "label-words" if spec is None or spec.text_to_text else "classifier"
    generation = GenerationSettings(**spec.generation) if spec is not None and spec.generation else None
    max_length = max_length or (spec.max_length if spec is not None else 128)
    loaded = load_backbone(model_name, task.num_labels, task.is_regression,
                           dtype=dtype or recorded_backbone_dtype(adapter), decoder_head=decoder_head,
                           generation=task.is_generation)
    model = method.load(loaded.model, adapter)
    accelerator = Accelerator(cpu=cpu)
    evaluate = DevEvaluator.build(task, dev_examples, loaded, max_length, batch_size, accelerator,
                                  generation=generation)
    return evaluate(accelerator.prepare(model), progress)


def _evaluation_data(data: DataConfig, spec, adapter: Path) -> tuple[Task, dict[str, list[Example]]]:
    """(task, dev splits) for `evaluate_adapter`: from `data` where it names a task or a training file, else from the
    adapter's task.json (GLUE: its task; custom: the rows of --validation-file read with the saved columns and
    label set)."""
    if data.task or data.train_file:
        data.validate()
        task, _, dev = load_task_data(data, seed=0)
        return task, dev
    if spec is None:
        raise ConfigError(f"adapter {adapter} has no task.json, so it does not say which task it predicts: name a "
                          "GLUE task with --task, or give --train-file/--validation-file")
    if spec.source == "glue":
        data.task = spec.glue_task
        return _evaluation_data(data, None, adapter)
    if data.validation_file is None:
        raise ConfigError(f"adapter {adapter} was trained on a custom task ({', '.join(spec.task.text_fields)} -> "
                          "labels): give the rows to score with --validation-file")
    custom = _custom_settings(adapter)
    columns = data.text_columns or custom.get("text_columns") or list(spec.task.text_fields)
    label_column = data.label_column or custom.get("label_column") or "label"
    task_type = custom.get("task_type") or data.task_type
    file_task, splits = load_custom_task(data.validation_file, data.validation_file, columns, label_column,
                                         task_type=task_type)
    rows = splits["validation"][: data.max_eval_samples] if data.max_eval_samples else splits["validation"]
    task = dataclasses.replace(spec.task, dev_splits=("validation",))
    if not task.is_regression and not task.is_generation:  # the file's own label order -> the adapter's
        index = {name: i for i, name in enumerate(task.label_names)}
        unknown = sorted(set(file_task.label_names) - set(index))
        if unknown:
            raise DataError(f"{data.validation_file}: label(s) {', '.join(unknown)} are not among the adapter's "
                            f"labels ({', '.join(task.label_names)})")
        rows = [dataclasses.replace(e, label=index[file_task.label_names[e.label]]) for e in rows]
    return task, {"validation": rows}


def _custom_settings(adapter: Path) -> dict[str, Any]:
    """The "custom" part of task.json (text columns, label column, task type), {} where it has none."""
    from readapt.adapter_files import TASK_FILE

    try:
        record = json.loads((adapter / TASK_FILE).read_text(encoding="utf-8")).get("custom")
    except (OSError, ValueError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}
