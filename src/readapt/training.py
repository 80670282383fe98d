"""The training recipe: one loop for every method — task data in, best adapter and metrics.json out.

Flow: validate everything cheap (config, data, model) before touching the output directory; train in a
hidden staging directory next to it; evaluate on dev after every epoch and keep the best adapter; write
metrics.json; move the staging directory into place at the very end, so a failed or interrupted run never
leaves a half-written output directory.

With --cache-features (READ, decoupled; readapt.cache) every split gets a feature-cache entry: planned while
the loaders are made, checked against the size budget before anything is written, built or reused at the
start of epoch 1 (counted in its time); afterwards every batch carries its examples' cached states and the
model replays them instead of running the backbone. Loaders, shuffling and padding are the same as without.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from readapt.cache import CACHED_FEATURES, CachedCollator, FeatureCache, indexed
from readapt.config import BACKBONE_DTYPES, CACHE_DTYPES, ReadConfig
from readapt.data import Candidates, Collator, candidates_for, encode
from readapt.errors import ConfigError, ReadaptError
from readapt.io import atomic_write_json
from readapt.measure import PeakMemoryMeter, Stopwatch, machine, versions
from readapt.methods import TrainableCount, count_parameters, count_trainable, get_method, method_of
from readapt.pretrained import load_backbone
from readapt.tasks import Example, Task, compute_metrics, get_task, load_custom_task, load_glue

logger = logging.getLogger("readapt")

ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"


class TrainingError(ReadaptError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass
class DataConfig:
    """Which task and where its data is: a GLUE task name, or custom train/validation files."""

    task: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str = "label"
    task_type: str = "auto"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def validate(self) -> None:
        custom = self.train_file is not None or self.validation_file is not None
        if custom and (self.train_file is None or self.validation_file is None or not self.text_columns):
            raise ConfigError("a custom task needs --train-file, --validation-file and --text-columns")
        if not custom and not self.task:
            raise ConfigError("name a GLUE task with --task, or give --train-file/--validation-file")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass
class TrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: str | None = None  # None: the embedded all-MiniLM-L6-v2
    method: str = "read"
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. ReadConfig fields for READ
    output_dir: str = "runs/latest"
    overwrite: bool = False
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float | None = None  # None: the method's default
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 42
    mixed_precision: str = "no"  # no | fp16 | bf16 (Accelerate)
    cpu: bool = False  # force CPU even where a GPU exists
    progress: bool = True
    backbone_dtype: str = "float32"  # weights of the frozen backbone (READ only); side network and head stay float32
    cache_features: bool = False  # READ (decoupled): compute the backbone's states once, replay them (readapt.cache)
    cache_dir: str | None = None  # None: $READAPT_CACHE_DIR, else ~/.cache/readapt/features
    cache_dtype: str = "float16"
    cache_max_gb: float | None = None  # None: only the free disk space bounds the cache

    def validate(self) -> None:
        self.data.validate()
        get_method(self.method).validate_options(self.method_options)
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "eval_batch_size": self.eval_batch_size >= 1,
            "max_length": self.max_length >= 8, "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "max_grad_norm": self.max_grad_norm > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr={self.lr} is out of range; it must be a positive number")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"--mixed-precision={self.mixed_precision!r}; allowed: no, fp16, bf16")
        if self.backbone_dtype not in BACKBONE_DTYPES:
            raise ConfigError(f"--backbone-dtype={self.backbone_dtype!r}; allowed: {', '.join(BACKBONE_DTYPES)}")
        if self.backbone_dtype != "float32" and self.method != "read":
            raise ConfigError(f"--backbone-dtype {self.backbone_dtype} needs --method read: {self.method} trains or "
                              "back-propagates through the backbone's own weights, which then stay float32")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"--cache-dtype={self.cache_dtype!r}; allowed: {', '.join(CACHE_DTYPES)}")
        if self.cache_max_gb is not None and not (self.cache_max_gb > 0 and math.isfinite(self.cache_max_gb)):
            raise ConfigError(f"--cache-max-gb={self.cache_max_gb} is out of range; it must be a positive number")
        if self.cache_features and self.method != "read":
            why = ("LST's backbone states could be cached, but LST does not replay them yet" if self.method == "lst"
                   else f"with {self.method} the backbone's hidden states change during training (its weights are "
                        "trained, or trained modules sit inside it), so they cannot be computed once")
            raise ConfigError(f"--cache-features needs --method read: {why}")
        if self.cache_features and ReadConfig.from_dict(self.method_options).couple_encoder:
            raise ConfigError("--cache-features needs decoupled READ: with --couple-encoder the backbone decoder "
                              "consumes the trained encoder correction, so its states change during training")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr


# ---------------------------------------------------------------------------------------------- data
def load_task_data(data: DataConfig, seed: int) -> tuple[Task, list[Example], dict[str, list[Example]]]:
    """(task, train examples, {dev split: examples}); a training subset is a seeded random sample."""
    if data.train_file is not None:
        task, splits = load_custom_task(data.train_file, data.validation_file, data.text_columns,
                                        data.label_column, task_type=data.task_type)
        train, dev = splits["train"], {"validation": splits["validation"]}
    else:
        task = get_task(data.task)
        splits = load_glue(task, data.data_dir)
        train, dev = splits["train"], {s: splits[s] for s in task.dev_splits}
    if data.max_train_samples is not None and data.max_train_samples < len(train):
        train = random.Random(seed).sample(train, data.max_train_samples)
    if data.max_eval_samples is not None:
        dev = {s: rows[: data.max_eval_samples] for s, rows in dev.items()}
    return task, train, dev


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, loader: DataLoader, task: Task, candidates: Candidates | None, progress: bool = False,
            description: str = "eval") -> list[int | float]:
    """Predictions for every example of `loader`: argmax / regression output of a head, or, for
    text-to-text models, rank classification over the candidate answers (highest total log-likelihood)."""
    model.eval()
    no_cache = _no_kv_cache(model)
    predictions: list[int | float] = []
    for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
        with _replaying(model, batch):
            if candidates is None:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache).logits
                predictions.extend(logits.squeeze(-1).float().tolist() if task.is_regression
                                   else logits.argmax(-1).tolist())
            else:
                scores = _candidate_scores(model, batch, candidates)
                predictions.extend(candidates.values[i] for i in scores.argmax(-1).tolist())
    return predictions


def _replaying(model, batch: dict):
    """Takes a batch's cached backbone states out of it (feature cache); within the block the model replays them."""
    cached = batch.pop(CACHED_FEATURES, None)
    return contextlib.nullcontext() if cached is None else model.replaying(cached)


def _no_kv_cache(model) -> dict[str, bool]:
    """Scoring and training never reuse a KV cache; building one (decoder-only, seq2seq) only costs memory."""
    forward = getattr(model, "backbone", model).forward
    return {"use_cache": False} if "use_cache" in inspect.signature(forward).parameters else {}


def _candidate_scores(model, batch: dict, candidates: Candidates) -> torch.Tensor:
    # The encoder runs once; its output (with READ's corrected states attached) serves every candidate.
    # Prompt tuning changes the encoder's input (virtual tokens), so there the whole model runs per candidate.
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    inputs = {"input_ids": batch["input_ids"]} if prompt_learning else {
        "encoder_outputs": model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])}
    size = batch["input_ids"].shape[0]
    scores = []
    for token_ids in candidates.token_ids:
        labels = torch.tensor(token_ids, device=batch["input_ids"].device).repeat(size, 1)
        logits = model(**inputs, attention_mask=batch["attention_mask"], labels=labels, use_cache=False).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        scores.append(log_probs.sum(-1))
    return torch.stack(scores, dim=-1)


@dataclass
class DevEvaluator:
    """The dev split(s) of a task, encoded once, and how to score a model on them."""

    task: Task
    loaders: dict[str, DataLoader]
    references: dict[str, list]
    candidates: Candidates | None  # text-to-text: the answers ranked at prediction time

    @classmethod
    def build(cls, task: Task, dev_examples: dict[str, list[Example]], loaded, max_length: int, batch_size: int,
              accelerator, feature_cache: _CacheJobs | None = None) -> DevEvaluator:
        collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, task.is_regression)
        candidates = candidates_for(task, loaded.tokenizer) if loaded.text_to_text else None
        loaders = {}
        for split, rows in dev_examples.items():
            features, split_collator = encode(task, rows, loaded.tokenizer, max_length, loaded.text_to_text), collator
            if feature_cache is not None:
                features, split_collator = feature_cache.attach(f"dev {split}", features, collator, candidates)
            loaders[split] = accelerator.prepare(_loader(features, batch_size, split_collator, shuffle=False, seed=0))
        references = {split: [e.label for e in rows] for split, rows in dev_examples.items()}
        return cls(task, loaders, references, candidates)

    def __call__(self, model, progress: bool) -> dict[str, dict[str, float]]:
        results = {}
        for split, loader in self.loaders.items():
            predictions = predict(model, loader, self.task, self.candidates, progress, description=f"eval {split}")
            results[split] = compute_metrics(self.task, predictions, self.references[split])
        return results


def main_score(task: Task, results: dict[str, dict[str, float]]) -> float:
    """Model selection: the task's main metric, averaged over its dev splits (MNLI: matched/mismatched)."""
    return float(np.mean([r[task.main_metric] for r in results.values()]))


# ---------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def _output_transaction(config: TrainingConfig):
    """Yield a fresh staging directory; on success it replaces the output directory, on any failure it
    is removed. A lock file keeps two runs from writing the same output directory at once."""
    output = Path(config.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not config.overwrite:
        raise ConfigError(f"output directory {output} already holds files; pass --overwrite to replace them")
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = open(output.parent / f".{output.name}.lock", "w")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"another readapt run is writing to {output}") from None
    try:
        staging = output.parent / f".{output.name}.partial"
        if staging.exists():
            shutil.rmtree(staging)  # left by a run that was killed
        staging.mkdir()
        handler = logging.FileHandler(staging / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            logger.removeHandler(handler)
            handler.close()
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        Path(lock.name).unlink(missing_ok=True)
        lock.close()


def _loader(features, batch_size, collator, *, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(features, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator)


def train(config: TrainingConfig) -> dict[str, Any]:
    """Fine-tune with `config.method` on the task, evaluate on dev every epoch, keep the best adapter.
    Returns the content of metrics.json."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    config.validate()
    method = get_method(config.method)
    task, train_examples, dev_examples = load_task_data(config.data, config.seed)
    set_seed(config.seed)
    loaded = load_backbone(config.model, task.num_labels, task.is_regression, dtype=config.backbone_dtype)
    backbone_parameters = count_parameters(loaded.model)  # before the method adds any
    model = method.prepare(loaded.model, config.method_options)
    with _output_transaction(config) as staging:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
        return _train(config, method, task, train_examples, dev_examples, loaded, model, staging, accelerator,
                      get_linear_schedule_with_warmup, backbone_parameters)


class _CacheJobs:
    """--cache-features in the training loop: one entry per split, planned while its loader is made (`attach`),
    all checked against the size budget before anything is written, then built or reused (`build`)."""

    def __init__(self, config: TrainingConfig, model, loaded):
        self.model = model
        self.text_to_text = loaded.text_to_text
        self.cache = FeatureCache(model, loaded.tokenizer, max_length=config.max_length,
                                  text_to_text=loaded.text_to_text, directory=config.cache_dir,
                                  dtype=config.cache_dtype, max_gb=config.cache_max_gb, autocast=config.mixed_precision)
        self.jobs: list[tuple[Any, list[dict], Collator, Candidates | None, bool]] = []

    def attach(self, label: str, features: list[dict], collator: Collator, candidates: Candidates | None,
               training: bool = False) -> tuple[list[dict], CachedCollator]:
        plan = self.cache.plan(label, self.stack_calls(features, candidates))
        self.jobs.append((plan, features, collator, candidates, training))
        return indexed(features), CachedCollator(collator, plan)

    def stack_calls(self, features: list[dict], candidates: Candidates | None) -> list[tuple[str, list[list[int]]]]:
        """The adapted stack calls of one forward pass (training step, or prediction when scoring candidates),
        in call order, with every example's tokens: what the cache stores for each."""
        stacks = [s.name for s in self.model.adapted_stacks]
        inputs = [f["input_ids"] for f in features]
        if not self.text_to_text:
            return [(stacks[0], inputs)]
        calls = [("encoder", inputs)] if "encoder" in stacks else []
        if "decoder" in stacks:
            if candidates is None:
                calls.append(("decoder", [f["labels"] for f in features]))
            else:
                calls.extend(("decoder", [list(ids)] * len(features)) for ids in candidates.token_ids)
        return calls

    def build(self, model, accelerator, batch_size: int, progress: bool) -> None:
        """Open or build every entry, running the model exactly as training and prediction call it."""
        unwrapped = accelerator.unwrap_model(model)  # what predict() gets
        no_cache = _no_kv_cache(unwrapped)
        for plan, features, collator, candidates, training in self.jobs:
            if training:
                def run(batch):
                    return model(**batch, **no_cache)
            elif candidates is None:
                def run(batch):
                    return unwrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache)
            else:
                def run(batch, candidates=candidates):
                    return _candidate_scores(unwrapped, batch, candidates)
            self.cache.open_or_build(plan, run, features, collator, batch_size, accelerator.device, progress=progress)

    def summary(self) -> dict[str, Any]:
        plans = [job[0] for job in self.jobs]
        return {
            "directory": str(self.cache.directory), "dtype": self.cache.dtype,
            "bytes": sum(p.entry.bytes for p in plans if p.entry is not None),
            "reused": all(p.reused for p in plans), "build_seconds": sum(p.build_seconds for p in plans),
            "fingerprint_seconds": self.cache.fingerprint_seconds,
            "entries": {p.label: p.summary() for p in plans},
        }


def _train(config, method, task, train_examples, dev_examples, loaded, model, staging, accelerator, make_scheduler,
           backbone_parameters):
    collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, task.is_regression)
    train_features = encode(task, train_examples, loaded.tokenizer, config.max_length, loaded.text_to_text)
    feature_cache = _CacheJobs(config, model, loaded) if config.cache_features else None
    train_collator = collator
    if feature_cache is not None:
        train_features, train_collator = feature_cache.attach("train", train_features, collator, None, training=True)
    train_loader = _loader(train_features, config.batch_size, train_collator, shuffle=True, seed=config.seed)
    evaluate = DevEvaluator.build(task, dev_examples, loaded, config.max_length, config.eval_batch_size, accelerator,
                                  feature_cache)
    if feature_cache is not None:
        feature_cache.cache.check_budget([job[0] for job in feature_cache.jobs])

    no_cache = _no_kv_cache(loaded.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    parameters = TrainableCount(count_trainable(model), backbone_parameters)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(train_loader)
    scheduler = make_scheduler(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    logger.info("task %s: %d train examples, dev %s; model %s; method %s; %d trainable parameters (%.3f%% of the "
                "backbone's %d)", task.name, len(train_examples), {s: len(r) for s, r in dev_examples.items()},
                loaded.source, config.method, parameters.trainable, parameters.percent, parameters.backbone)

    meter = PeakMemoryMeter(accelerator.device)
    meter.start()
    clock = Stopwatch()
    epochs, best, step, train_seconds, train_cpu_seconds = [], None, 0, 0.0, 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_clock, epoch_cpu = Stopwatch(), time.process_time()
        if epoch == 1 and feature_cache is not None:  # building the cache counts as epoch 1's time
            feature_cache.build(model, accelerator, config.eval_batch_size, config.progress)
            model.train()
        running, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress)
        for batch in bar:
            with _replaying(unwrapped, batch):
                loss = model(**batch, **no_cache).loss
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at step {step + 1} (epoch {epoch}); "
                                    "lower --lr or check the data")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()
            seen += 1
            bar.set_postfix(loss=f"{running / seen:.4f}")
        epoch_seconds = epoch_clock.seconds()
        train_seconds += epoch_seconds
        train_cpu_seconds += time.process_time() - epoch_cpu
        results = evaluate(accelerator.unwrap_model(model), config.progress)
        score = main_score(task, results)
        record = {"epoch": epoch, "train_loss": running / max(seen, 1), "dev": results, "score": score,
                  "elapsed_seconds": clock.seconds(), "train_seconds_so_far": train_seconds,
                  "epoch_train_seconds": epoch_seconds}
        epochs.append(record)
        logger.info("epoch %d: train loss %.4f, dev %s", epoch, record["train_loss"], json.dumps(results))
        if best is None or score > best["score"]:
            best = record
            method.save(accelerator.unwrap_model(model), staging / ADAPTER_DIR)
            logger.info("epoch %d is the best so far (%s %.4f); adapter saved", epoch, task.main_metric, score)

    peak = meter.peak_bytes()
    metrics = {
        "task": task.name, "method": config.method, "model": loaded.source,
        "protocol": "trained on the task's train split (a seeded random subset if max_train_samples); "
                    "evaluated on the GLUE dev set after every epoch; best epoch = highest dev main metric "
                    "(dev-set selection)" if config.data.task else
                    "trained on --train-file, evaluated on --validation-file after every epoch; best epoch kept",
        "main_metric": task.main_metric,
        "best_epoch": best["epoch"], "best_dev": best["dev"], "best_score": best["score"],
        "epochs": epochs,
        "train_seconds": train_seconds,  # training steps only
        # CPU time of this process over the training steps (all threads): unlike wall time, it does not grow
        # when other processes share the cores, so it compares methods fairly on a busy machine
        "train_cpu_seconds": train_cpu_seconds,
        "wall_seconds": clock.seconds(),  # training and per-epoch evaluation
        "peak_memory_bytes": peak, "peak_memory_meter": meter.name,
        "memory_at_training_start_bytes": meter.baseline_bytes,
        # every method counted the same way: tensors with requires_grad (head included) / backbone parameters
        "trainable_parameters": parameters.trainable, "backbone_parameters": parameters.backbone,
        "trainable_percent": parameters.percent,
        "train_examples": len(train_examples), "dev_examples": {s: len(r) for s, r in dev_examples.items()},
        "config": _config_dict(config), "versions": versions(), "machine": machine(),
        "device": str(accelerator.device), "mixed_precision": config.mixed_precision,
        "backbone_dtype": config.backbone_dtype,
        # --cache-features: where the entries are, their size on disk, whether this run reused them, build time
        "feature_cache": feature_cache.summary() if feature_cache is not None else None,
    }
    atomic_write_json(staging / METRICS_FILE, metrics)
    logger.info("done: best epoch %d, %s %.4f, %.1f s, peak memory %.1f MiB (%s)", best["epoch"], task.main_metric,
                best["score"], metrics["train_seconds"], peak / 2**20, meter.name)
    return metrics


def _config_dict(config: TrainingConfig) -> dict[str, Any]:
    out = asdict(config)
    out["learning_rate"] = config.learning_rate
    return out


def evaluate_adapter(data: DataConfig, model_name: str | None, adapter: str | Path, batch_size: int = 64,
                     max_length: int = 128, progress: bool = True, cpu: bool = False) -> dict[str, dict[str, float]]:
    """Load a backbone and a trained adapter (any method) and score the task's dev split(s)."""
    from accelerate import Accelerator

    data.validate()
    method = method_of(Path(adapter))
    task, _, dev_examples = load_task_data(data, seed=0)
    loaded = load_backbone(model_name, task.num_labels, task.is_regression)
    model = method.load(loaded.model, Path(adapter))
    accelerator = Accelerator(cpu=cpu)
    evaluate = DevEvaluator.build(task, dev_examples, loaded, max_length, batch_size, accelerator)
    return evaluate(accelerator.prepare(model), progress)
