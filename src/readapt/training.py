"""The training recipe: one loop for every method — task data in, best adapter and metrics.json out.

Flow: validate everything cheap (config, data, model) before touching the output directory; train in a
hidden staging directory next to it; evaluate on dev after every epoch and keep the best adapter; write
metrics.json; move the staging directory into place at the very end, so a failed or interrupted run never
leaves a half-written output directory.

With --cache-features (READ, decoupled; readapt.read.cache) every split gets a feature-cache entry: planned while
the loaders are made, checked against the size budget before anything is written, built or reused at the
start of epoch 1 (counted in its time); afterwards every batch carries its examples' cached states and the
model replays them instead of running the backbone. Loaders, shuffling and padding are the same as without.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from readapt.adapter_files import ADAPTER_DIR
from readapt.answers import candidate_scores, causal_lm_loss, generate_texts, no_kv_cache
from readapt.checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    current_rng_state,
    is_disk_full,
    list_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    restore_rng,
    restore_training_state,
    save_checkpoint,
)
from readapt.data import Candidates, Collator, candidates_for, encode
from readapt.errors import ConfigError, TrainingError, TrainingInterrupted
from readapt.io import atomic_write_json
from readapt.measure import PeakMemoryMeter, Stopwatch, machine, versions
from readapt.methods import TrainableCount, count_parameters, count_trainable, get_method, method_of
from readapt.pretrained import load_backbone
from readapt.read.cache import CACHED_FEATURES, CachedCollator, FeatureCache, indexed
from readapt.read.config import ReadConfig
from readapt.read.model import ReadModel
from readapt.read.side_network import second_text_start
from readapt.settings import BACKBONE_DTYPES, CACHE_DTYPES, DECODER_HEADS, GenerationSettings
from readapt.tasks import Example, Task, compute_metrics, get_task, load_custom_task, load_glue
from readapt.tasks.custom import GENERATION_COLUMNS

logger = logging.getLogger("readapt")

METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
RUN_FILE = "run.json"  # in the staging directory: which run its checkpoints belong to
SELECTION_SPLIT = "selection"  # rows held out of train that pick the best epoch (DataConfig.selection_fraction)


@dataclass
class DataConfig:
    """Which task and where its data is: a GLUE task name, or custom train/validation files."""

    task: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None  # None with task_type "generation": ["prompt"]
    label_column: str | None = None  # None: "label", or "completion" with task_type "generation"
    task_type: str = "auto"  # auto | classification | regression | generation
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Hold out this share of the training rows (seeded) as the "selection" split that picks the best epoch; the
    # dev split(s) are then only reported, never used to choose (an honest estimate; GLUE's test labels are hidden).
    selection_fraction: float | None = None

    def validate(self) -> None:
        if self.task_type == "generation":
            self.text_columns = self.text_columns or [GENERATION_COLUMNS[0]]
        self.label_column = self.label_column or (GENERATION_COLUMNS[1] if self.task_type == "generation" else "label")
        custom = self.train_file is not None or self.validation_file is not None
        if custom and (self.train_file is None or self.validation_file is None or not self.text_columns):
            raise ConfigError("a custom task needs --train-file, --validation-file and --text-columns")
        if not custom and not self.task:
            raise ConfigError("name a GLUE task with --task, or give --train-file/--validation-file")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {value}")
        if self.selection_fraction is not None and not 0 < self.selection_fraction < 1:
            raise ConfigError(f"--selection-fraction={self.selection_fraction} is out of range; it must be in (0, 1)")


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
    cache_features: bool = False  # READ (decoupled): compute the backbone's states once, replay them (readapt.read.cache)
    cache_dir: str | None = None  # None: $READAPT_CACHE_DIR, else ~/.cache/readapt/features
    cache_dtype: str = "float16"
    cache_max_gb: float | None = None  # None: only the free disk space bounds the cache
    # A frozen backbone bigger than one device (READ only; readapt.offload): placed by Accelerate's big-model
    # loading, split over GPUs and/or offloaded to CPU RAM and disk; side networks and head on one device.
    device_map: str | None = None  # auto | cpu | JSON {module: device}; None: all on the training device
    max_memory: str | None = None  # DEVICE=SIZE[,DEVICE=SIZE...], e.g. "0=20GiB,cpu=8GiB" (needs device_map)
    offload_folder: str | None = None  # disk-offloaded weights that cannot be read from the checkpoint itself
    # Checkpoints (readapt.checkpoint): every N optimizer steps, every M minutes of training and at every epoch
    # end; the newest `keep_checkpoints` are kept while the run lasts and removed once it has finished.
    checkpoints: bool = True  # False: none at all (a failed run then leaves nothing; `readapt bench` cells)
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 15.0  # 0: no time-based checkpoints
    keep_checkpoints: int = 2
    resume: bool | None = None  # None: continue this run's newest checkpoint if there is one; True: must; False: start over
    # Decoder-only backbones on classification/regression tasks: "label-words" (the LM head ranks the label words
    # after a prompt) or "classifier" (a new sequence-classification head). Other backbones ignore it.
    decoder_head: str = "label-words"
    # Score the dev split(s) once before training too (metrics.json "initial_dev"): the starting point, e.g. a
    # decoder-only LM's zero-shot label-word accuracy (READ's untrained correction is exactly zero).
    eval_before_training: bool = False
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # how generation tasks are scored

    def validate(self) -> None:
        self.data.validate()
        get_method(self.method).validate_options(self.method_options)
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "eval_batch_size": self.eval_batch_size >= 1,
            "max_length": self.max_length >= 8, "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "max_grad_norm": self.max_grad_norm > 0,
        }
        checks.update({"checkpoint_every": self.checkpoint_every is None or self.checkpoint_every >= 1,
                       "checkpoint_minutes": self.checkpoint_minutes >= 0 and math.isfinite(self.checkpoint_minutes),
                       "keep_checkpoints": self.keep_checkpoints >= 1})
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr={self.lr} is out of range; it must be a positive number")
        if self.decoder_head not in DECODER_HEADS:
            raise ConfigError(f"--decoder-head={self.decoder_head!r}; allowed: {', '.join(DECODER_HEADS)}")
        if isinstance(self.generation, dict):  # from a JSON config
            self.generation = GenerationSettings(**self.generation)
        self.generation.validate()
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
        if self.cache_features and self.eval_before_training:
            raise ConfigError("--eval-before-training cannot be combined with --cache-features (the cache is built "
                              "at the start of the first epoch)")
        if self.cache_features and self.method != "read":
            why = ("LST's backbone states could be cached, but LST does not replay them yet" if self.method == "lst"
                   else f"with {self.method} the backbone's hidden states change during training (its weights are "
                        "trained, or trained modules sit inside it), so they cannot be computed once")
            raise ConfigError(f"--cache-features needs --method read: {why}")
        if self.cache_features and ReadConfig.from_dict(self.method_options).couple_encoder:
            raise ConfigError("--cache-features needs decoupled READ: with --couple-encoder the backbone decoder "
                              "consumes the trained encoder correction, so its states change during training")
        self._validate_placement()

    def _validate_placement(self) -> None:
        from readapt.offload import normalize_max_memory, parse_device_map

        if self.device_map is None:
            given = [flag for flag, value in (("--max-memory", self.max_memory), ("--offload-folder", self.offload_folder))
                     if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} need(s) --device-map")
            return
        if self.method != "read":
            raise ConfigError(f"--device-map needs --method read: {self.method} back-propagates through or trains the "
                              "backbone, which a split or offloaded backbone (placed for forward passes only) cannot do")
        parse_device_map(self.device_map)
        normalize_max_memory(self.max_memory)

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
    if data.selection_fraction is not None:
        count = round(len(train) * data.selection_fraction)
        if not 1 <= count < len(train):
            raise ConfigError(f"--selection-fraction {data.selection_fraction} of {len(train)} training rows leaves "
                              f"{count} for selection and {len(train) - count} for training; both need at least one")
        held_out = {id(e) for e in random.Random(f"selection-{seed}").sample(train, count)}
        dev = {SELECTION_SPLIT: [e for e in train if id(e) in held_out], **dev}
        train = [e for e in train if id(e) not in held_out]
    return task, train, dev


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- evaluation
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
        with _replaying(model, batch):
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


def _replaying(model, batch: dict):
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
              accelerator, feature_cache: _CacheJobs | None = None,
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
            loaders[split] = accelerator.prepare(_loader(features, batch_size, split_collator))
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


# ---------------------------------------------------------------------------------------------- training
# Settings that change neither the numbers a run computes nor its data: a run may be resumed with other values.
RESUME_INDEPENDENT = ("output_dir", "overwrite", "progress", "checkpoints", "checkpoint_every", "checkpoint_minutes",
                      "keep_checkpoints", "resume", "cache_dir", "cache_max_gb",
                      "max_memory", "offload_folder")  # where backbone weights wait; the device map itself counts


def run_fingerprint(config: TrainingConfig, train_examples: list[Example], dev_examples: dict[str, list[Example]],
                    processes: int = 1) -> str:
    """What makes two runs the same run: every setting that affects the result, and the data itself (so that
    moved or edited data files are noticed), hashed. A run is resumed only under the same fingerprint."""
    settings = _config_dict(config)
    for name in RESUME_INDEPENDENT:
        settings.pop(name)
    for name in ("data_dir", "train_file", "validation_file"):  # where the data lives: its content is hashed below
        settings["data"].pop(name)
    if processes > 1:  # the same global batches, but each process has its own dropout generator
        settings["processes"] = processes
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for split, rows in [("train", train_examples), *sorted(dev_examples.items())]:
        digest.update(split.encode())
        for row in rows:
            digest.update(repr((row.texts, row.label, row.idx)).encode())
    return digest.hexdigest()


@dataclass
class _RunDirectory:
    staging: Path  # the hidden directory the run writes into; moved into place when the run has finished
    resume_from: Checkpoint | None

    @property
    def checkpoints(self) -> Path:
        return self.staging / CHECKPOINTS_DIR


def _resumable(staging: Path, fingerprint: str, config: TrainingConfig) -> Checkpoint | None:
    """The checkpoint to continue from, if the staging directory holds this run's; refuses to discard another
    unfinished run's checkpoints without --overwrite."""
    run = None
    if staging.is_dir() and config.resume is not False:
        with contextlib.suppress(OSError, ValueError):
            run = json.loads((staging / RUN_FILE).read_text(encoding="utf-8"))
    checkpoint = newest_valid_checkpoint(staging / CHECKPOINTS_DIR) if isinstance(run, dict) else None
    if checkpoint is not None and run.get("fingerprint") != fingerprint:
        if not config.overwrite:
            raise ConfigError(f"{staging} holds checkpoints of another unfinished run (different settings or data) "
                              "for this output directory; re-run that command to resume it, or pass --overwrite "
                              "to discard it")
        checkpoint = None
    if checkpoint is None and config.resume:
        raise ConfigError(f"--resume: no valid checkpoint of this run in {staging}")
    return checkpoint


@contextlib.contextmanager
def _output_transaction(config: TrainingConfig, fingerprint: str):
    """Yield the run's staging directory (fresh, or this run's own with its checkpoints); on success it
    replaces the output directory. On failure it is kept if it holds a valid checkpoint (re-running the same
    command resumes from it), else removed. A lock file keeps two runs from writing one output at once."""
    output = Path(config.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not config.overwrite:
        raise ConfigError(f"output directory {output} already holds files (another run); pass --overwrite to "
                          "replace them")
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = open(output.parent / f".{output.name}.lock", "w")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"another readapt run is writing to {output}") from None
    try:
        staging = output.parent / f".{output.name}.partial"
        resume_from = _resumable(staging, fingerprint, config)
        if resume_from is None:
            if staging.exists():
                shutil.rmtree(staging)  # left by a run killed before its first checkpoint, or --no-resume
            staging.mkdir()
            atomic_write_json(staging / RUN_FILE, {"fingerprint": fingerprint, "config": _config_dict(config)})
        handler = logging.FileHandler(staging / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield _RunDirectory(staging, resume_from)
        except BaseException:
            if newest_valid_checkpoint(staging / CHECKPOINTS_DIR) is None:
                shutil.rmtree(staging, ignore_errors=True)
            else:
                logger.info("run stopped; its checkpoints stay in %s for a resume", staging)
            raise
        finally:
            logger.removeHandler(handler)
            handler.close()
        shutil.rmtree(staging / CHECKPOINTS_DIR, ignore_errors=True)  # the run is complete: nothing to resume
        (staging / RUN_FILE).unlink(missing_ok=True)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        Path(lock.name).unlink(missing_ok=True)
        lock.close()


class EpochShuffle(torch.utils.data.Sampler):
    """A new random order of the training examples every epoch, fixed by (seed, epoch) alone, so that a resumed
    run sees exactly the order an uninterrupted one saw. (Not `set_epoch`: Accelerate would call that with its
    own count of iterations, which restarts at 0 in a resumed process.)"""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 1

    def shuffle_for(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def _loader(features, batch_size, collator, *, sampler=None) -> DataLoader:
    # Its own generator: starting an iterator then never draws from torch's global one (dropout's).
    return DataLoader(features, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collator,
                      generator=torch.Generator().manual_seed(0))


def train(config: TrainingConfig) -> dict[str, Any]:
    """Fine-tune with `config.method` on the task, evaluate on dev every epoch, keep the best adapter.
    Returns the content of metrics.json. Re-running an interrupted run continues from its newest checkpoint;
    re-running a finished one returns its metrics without training again (unless --overwrite)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from transformers import get_linear_schedule_with_warmup

    config.validate()
    rank, processes = launched_processes()
    if processes > 1 and (config.batch_size % processes or config.eval_batch_size % processes):
        raise ConfigError(f"--batch-size {config.batch_size} and --eval-batch-size {config.eval_batch_size} must be "
                          f"multiples of the number of processes ({processes}): every batch is split evenly over "
                          "the processes, so that N processes train on the same batches as one")
    if config.device_map is not None and processes > 1:
        raise ConfigError("--device-map spreads one copy of the backbone over this machine's devices; it cannot be "
                          "combined with several training processes (--num-processes, accelerate launch)")
    method = get_method(config.method)
    task, train_examples, dev_examples = load_task_data(config.data, config.seed)
    fingerprint = run_fingerprint(config, train_examples, dev_examples, processes)
    finished = _finished_run(Path(config.output_dir), fingerprint)
    if finished is not None and not config.overwrite:
        logger.info("%s already holds this finished run; nothing to do (pass --overwrite to train again)",
                    config.output_dir)
        return finished
    # Only the main process owns the output: the others read the data and checkpoints and write nothing.
    with _output_transaction(config, fingerprint) if rank == 0 else _worker_directory(config) as run:
        set_seed(config.seed)
        loaded = load_backbone(config.model, task.num_labels, task.is_regression, dtype=config.backbone_dtype,
                               device_map=config.device_map, max_memory=config.max_memory,
                               offload_folder=config.offload_folder, use_gpus=not config.cpu,
                               decoder_head=config.decoder_head, generation=task.is_generation)
        backbone_parameters = count_parameters(loaded.model)  # before the method adds any
        model = method.prepare(loaded.model, config.method_options)
        placement = _log_placement(loaded.model)
        # A backbone placed only on CPU RAM / disk runs on the CPU: train there too.
        on_cpu = placement is not None and set(map(str, loaded.model.hf_device_map.values())) <= {"cpu", "disk"}
        # Several processes without a GPU: Accelerate's multi-CPU mode (gloo) needs cpu=True.
        cpu = config.cpu or on_cpu or (processes > 1 and not torch.cuda.is_available())
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu,
                                  dataloader_config=DataLoaderConfiguration(split_batches=True))
        metrics = _train(config, method, task, train_examples, dev_examples, loaded, model, run, accelerator,
                         get_linear_schedule_with_warmup, backbone_parameters)
        metrics["run_fingerprint"] = fingerprint
        metrics["backbone_device_map"] = placement  # --device-map: module -> device (None: not placed)
        if accelerator.is_main_process:
            with _disk_guard("metrics.json", None, run):
                atomic_write_json(run.staging / METRICS_FILE, metrics)
        return metrics


def launched_processes() -> tuple[int, int]:
    """(this process's rank, number of processes) as torchrun / `accelerate launch` set them; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def _worker_directory(config: TrainingConfig):
    """What a non-main process of a multi-process run sees of the output: the staging path, nothing to write."""
    output = Path(config.output_dir)
    yield _RunDirectory(output.parent / f".{output.name}.partial", None)


def _log_placement(backbone) -> dict[str, Any] | None:
    """--device-map: log where the backbone went; returns its device map ({module: device}) or None."""
    from readapt.offload import describe_device_map, offloaded_parameters

    device_map = getattr(backbone, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return None
    offloaded = offloaded_parameters(backbone)
    logger.info("backbone placed by device map: %s entries per device; %d of %d parameter tensors offloaded "
                "(loaded as their module runs)", describe_device_map(device_map), len(offloaded),
                sum(1 for _ in backbone.parameters()))
    return {name: device if isinstance(device, (int, str)) else str(device) for name, device in device_map.items()}


def _finished_run(output: Path, fingerprint: str) -> dict[str, Any] | None:
    """metrics.json of `output` if it records a finished run with this fingerprint."""
    try:
        metrics = json.loads((output / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("run_fingerprint") == fingerprint else None


class _StopRequest:
    """The first SIGINT or SIGTERM asks the loop to stop at the next step boundary (it writes a checkpoint
    first); a second SIGINT interrupts at once."""

    def __init__(self):
        self.signal: str | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handle(number, frame):
            if self.signal is not None and number == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signal.Signals(number).name
            logger.warning("%s received: stopping after this step with a checkpoint (SIGINT again: stop now)",
                           self.signal)

        for number in previous:
            signal.signal(number, handle)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


@contextlib.contextmanager
def _disk_guard(what: str, step: int | None, run: _RunDirectory):
    """An OSError while writing `what` (disk full, quota, I/O error) becomes one clear TrainingError naming the
    newest checkpoint, which the atomic writes left intact."""
    try:
        yield
    except OSError as exc:
        newest = list_checkpoints(run.checkpoints)
        kept = (f"the last good checkpoint (step {newest[-1][0]}) is intact in {run.checkpoints}; free space and "
                "re-run the same command to resume") if newest else "no checkpoint had been written yet"
        why = "the disk is full" if is_disk_full(exc) else (exc.strerror or str(exc))
        at = f" at step {step}" if step is not None else ""
        raise TrainingError(f"could not write {what}{at}: {why}; {kept}") from None


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
        self.collators: list[CachedCollator] = []

    def attach(self, label: str, features: list[dict], collator: Collator, candidates: Candidates | None,
               training: bool = False) -> tuple[list[dict], CachedCollator]:
        plan = self.cache.plan(label, self.stack_calls(features, candidates))
        self.jobs.append((plan, features, collator, candidates, training))
        self.collators.append(CachedCollator(collator, plan))
        return indexed(features), self.collators[-1]

    def replay_first_token_only(self, read_config) -> None:
        """The model corrects [CLS] alone: every split replays that position (and the pooled means) only."""
        context = read_config.sequence_context
        for (_plan, features, *_), collator in zip(self.jobs, self.collators, strict=True):
            collator.first_token, collator.pooled = True, context in ("pooled", "segments")
            if context == "segments":  # where each example's second text starts, from its token ids
                collator.second_text_starts = np.array(
                    [second_text_start(f["input_ids"], read_config.separator_token_id) for f in features], dtype=np.int64)

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
        no_cache = no_kv_cache(unwrapped)
        for plan, features, collator, candidates, training in self.jobs:
            if training:  # the unwrapped model: a data-parallel wrapper would synchronise with idle processes
                def run(batch):
                    return unwrapped(**batch, **no_cache)
            elif candidates is None:
                def run(batch):
                    return unwrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache)
            else:
                def run(batch, candidates=candidates):
                    return candidate_scores(unwrapped, batch, candidates)
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


@dataclass
class _Progress:
    """The training loop's own state: what a checkpoint stores besides weights, optimizer, scheduler and RNG."""

    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # over the batches of the epoch in progress
    epoch_seconds: float = 0.0  # training time of the epoch in progress so far (wall, CPU)
    epoch_cpu_seconds: float = 0.0
    train_seconds: float = 0.0  # of finished epochs
    train_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0  # spent by earlier processes of a resumed run
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    resumed_at_steps: list[int] = field(default_factory=list)
    initial_dev: dict[str, Any] | None = None  # --eval-before-training: dev results before the first step


def _debug_step_delay() -> float:
    """READADAPT_DEBUG_STEP_DELAY seconds of sleep after each step: lets the kill/resume test stop a real run
    at an arbitrary point of a tiny model's training (which otherwise ends in a blink)."""
    try:
        return max(0.0, float(os.environ.get("READAPT_DEBUG_STEP_DELAY", "0")))
    except ValueError:
        return 0.0


FIRST_TOKEN = slice(0, 1)


def _corrects_first_token_only(model, features: list[dict], collator: Collator, loaded) -> bool:
    """Whether READ needs to correct only position 0: an encoder whose task head reads [CLS] and nothing else
    (checked on a few training rows: noise in every other position leaves the logits bit for bit the same),
    and no sequence context that needs every token's RNN summary. The logits are then those of the full
    correction to float rounding, and the side network (and the feature cache) works on one position."""
    if not isinstance(model, ReadModel) or loaded.text_to_text or loaded.causal_lm or len(model.adapted_stacks) != 1:
        return False
    if model.read_config.sequence_context == "mean" or model.read_config.couple_encoder:
        return False
    batch = collator(features[:4])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    device = next(p for p in model.parameters() if p.requires_grad).device
    was_training = model.training
    model.eval()  # the head's dropout would make the two probe passes differ
    try:
        return model.head_reads_only(FIRST_TOKEN, **{k: v.to(device) for k, v in inputs.items()})
    finally:
        model.train(was_training)


def _train(config, method, task, train_examples, dev_examples, loaded, model, run: _RunDirectory, accelerator,
           make_scheduler, backbone_parameters):
    causal = loaded.causal_lm
    if config.cache_features and task.is_generation:
        raise ConfigError("--cache-features does not support generation tasks: generating runs the backbone on "
                          "tokens that do not exist before the model writes them")
    if config.cache_features and causal:
        raise ConfigError("--cache-features does not support decoder-only LMs answering in words yet (their "
                          "prompt + answer sequences are not cached); use --decoder-head classifier, or no cache")
    collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, task.is_regression, causal=causal)
    train_features = encode(task, train_examples, loaded.tokenizer, config.max_length, loaded.text_to_text, causal)
    feature_cache = _CacheJobs(config, model, loaded) if config.cache_features else None
    train_collator = collator
    if feature_cache is not None:
        train_features, train_collator = feature_cache.attach("train", train_features, collator, None, training=True)
    order = EpochShuffle(len(train_features), config.seed)
    train_loader = _loader(train_features, config.batch_size, train_collator, sampler=order)
    evaluate = DevEvaluator.build(task, dev_examples, loaded, config.max_length, config.eval_batch_size, accelerator,
                                  feature_cache, config.generation)
    if feature_cache is not None:
        feature_cache.cache.check_budget([job[0] for job in feature_cache.jobs])
    first_token = _corrects_first_token_only(model, train_features, collator, loaded)
    if first_token and feature_cache is not None:
        feature_cache.replay_first_token_only(model.read_config)

    no_cache = no_kv_cache(loaded.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    parameters = TrainableCount(count_trainable(model), backbone_parameters)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(train_loader)
    scheduler = make_scheduler(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    steps_per_epoch = len(train_loader)
    is_main, rank, processes = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if processes > 1:  # the others continue from the checkpoint the main process chose (or from none)
        from accelerate.utils import broadcast_object_list

        chosen = broadcast_object_list([str(run.resume_from.path) if run.resume_from is not None else None])[0]
        if not is_main and chosen is not None:
            run.resume_from = load_checkpoint(Path(chosen))
        logger.info("%d processes (%s): each takes 1/%d of every batch of %d", processes,
                    accelerator.distributed_type, processes, config.batch_size)
    logger.info("task %s: %d train examples, dev %s; model %s; method %s; %d trainable parameters (%.3f%% of the "
                "backbone's %d)", task.name, len(train_examples), {s: len(r) for s, r in dev_examples.items()},
                loaded.source, config.method, parameters.trainable, parameters.percent, parameters.backbone)

    progress = _Progress()
    if run.resume_from is not None:
        restore_training_state(run.resume_from, unwrapped, optimizer, scheduler)
        progress = _Progress(**run.resume_from.state["progress"])
        progress.resumed_at_steps.append(progress.step)
        logger.info("resuming from %s: epoch %d, %d of %d batches done, step %d", run.resume_from.path.name,
                    progress.epoch, progress.batches_done, steps_per_epoch, progress.step)

    def write_checkpoint(epoch_clock: Stopwatch, epoch_cpu: float) -> None:
        if not config.checkpoints:
            return
        rng_states = [current_rng_state()]
        if processes > 1:  # every process's generators (dropout differs per process); the main one writes
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)
        if not is_main:
            return
        state = asdict(progress)
        if progress.batches_done:  # mid-epoch: the epoch's time so far
            state["epoch_seconds"] += epoch_clock.seconds()
            state["epoch_cpu_seconds"] += time.process_time() - epoch_cpu
        state["wall_seconds"] += clock.seconds()
        with _disk_guard("a checkpoint", progress.step, run):
            path = save_checkpoint(run.checkpoints, progress.step, unwrapped, optimizer, scheduler, state,
                                   config.keep_checkpoints, rng_states)
        logger.info("checkpoint %s written (epoch %d, batch %d of %d)", path.name, progress.epoch,
                    progress.batches_done, steps_per_epoch)

    def stop_now() -> None:
        if not config.checkpoints:
            raise TrainingInterrupted(f"stopped by {stop.signal} at step {progress.step}; no checkpoint "
                                      "(checkpoints are off), so a re-run starts over")
        raise TrainingInterrupted(f"stopped by {stop.signal} at step {progress.step} with a checkpoint in "
                                  f"{run.checkpoints}; re-run the same command to resume")

    if config.eval_before_training and progress.step == 0 and progress.initial_dev is None:
        progress.initial_dev = evaluate(unwrapped, config.progress)  # before the meters: not part of training
        logger.info("before training: dev %s", json.dumps(progress.initial_dev))
    meter = PeakMemoryMeter(accelerator.device)
    meter.start()
    clock = Stopwatch()
    delay = _debug_step_delay()
    every_seconds = 60 * config.checkpoint_minutes
    last_checkpoint_time = time.monotonic()
    restore_rng_first = run.resume_from
    stop = _StopRequest()
    with stop.installed(), unwrapped.correcting_positions(FIRST_TOKEN) if first_token else contextlib.nullcontext():
        for epoch in range(progress.epoch, config.epochs + 1):
            model.train()
            epoch_clock, epoch_cpu = Stopwatch(), time.process_time()
            if feature_cache is not None and (epoch == 1 or restore_rng_first is not None):
                # built (epoch 1; counted in its time) or reopened (a resumed run); several processes: the main
                # one builds, then the others open what it wrote
                with accelerator.main_process_first():
                    feature_cache.build(model, accelerator, config.eval_batch_size, config.progress and is_main)
                model.train()
            order.shuffle_for(epoch)
            skip = progress.batches_done
            batches = iter(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader)
            if restore_rng_first is not None:
                # The RNG states go back only once the first batch is out: making the data iterator may draw from
                # them (Accelerate's loaders start the underlying iterator lazily), and nothing must draw after.
                batches = itertools.chain([next(batches)], batches)
                restore_rng(restore_rng_first, rank)
                restore_rng_first = None
            bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", total=steps_per_epoch, initial=skip,
                       disable=not (config.progress and is_main))
            for batch in bar:
                with _replaying(unwrapped, batch):
                    loss = causal_lm_loss(model, batch) if causal else model(**batch, **no_cache).loss
                # What every process must agree on before the next collective: the loss (mean over processes),
                # a stop signal, a checkpoint falling due by the clock.
                time_due = every_seconds > 0 and time.monotonic() - last_checkpoint_time >= every_seconds
                shared = torch.stack([loss.detach().float(), loss.new_tensor(float(stop.signal is not None)),
                                      loss.new_tensor(float(time_due))])
                if processes > 1:
                    shared = accelerator.reduce(shared, reduction="sum")
                    shared[0] /= processes
                step_loss, stop_requested, time_due = shared[0].item(), shared[1].item() > 0, shared[2].item() > 0
                if stop_requested and stop.signal is None:
                    stop.signal = "a signal to another process"
                if not math.isfinite(step_loss):
                    newest = list_checkpoints(run.checkpoints)
                    kept = (f"the last good checkpoint (step {newest[-1][0]}) is kept in {run.checkpoints}"
                            if newest else "no checkpoint had been written yet")
                    raise TrainingError(f"the loss became {step_loss} at step {progress.step + 1} (epoch {epoch}); "
                                        f"training stopped and {kept}; lower --lr or check the data")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.batches_done += 1
                progress.loss_sum += step_loss
                bar.set_postfix(loss=f"{progress.loss_sum / progress.batches_done:.4f}")
                if delay:
                    time.sleep(delay)
                due = ((config.checkpoint_every is not None and progress.step % config.checkpoint_every == 0)
                       or time_due or stop_requested)
                if due and progress.batches_done < steps_per_epoch:  # the epoch's end writes its own
                    write_checkpoint(epoch_clock, epoch_cpu)
                    last_checkpoint_time = time.monotonic()
                    if stop.signal is not None:
                        stop_now()
            bar.close()

            epoch_seconds = progress.epoch_seconds + epoch_clock.seconds()
            progress.train_seconds += epoch_seconds
            epoch_cpu_seconds = progress.epoch_cpu_seconds + time.process_time() - epoch_cpu
            progress.train_cpu_seconds += epoch_cpu_seconds
            results = evaluate(unwrapped, config.progress)
            score = main_score(task, results)
            record = {"epoch": epoch, "train_loss": progress.loss_sum / max(progress.batches_done, 1), "dev": results,
                      "score": score, "elapsed_seconds": progress.wall_seconds + clock.seconds(),
                      "train_seconds_so_far": progress.train_seconds, "epoch_train_seconds": epoch_seconds,
                      "epoch_train_cpu_seconds": epoch_cpu_seconds}  # all threads; unlike wall time, not inflated by other processes
            progress.epochs.append(record)
            logger.info("epoch %d: train loss %.4f, dev %s", epoch, record["train_loss"], json.dumps(results))
            if progress.best is None or score > progress.best["score"]:
                progress.best = record
                if is_main:
                    from readapt.task_spec import write_task_file  # task.json: what `readapt predict` needs

                    with _disk_guard("the adapter", progress.step, run):
                        method.save(unwrapped, run.staging / ADAPTER_DIR)
                        write_task_file(run.staging / ADAPTER_DIR, task, config, loaded.text_to_text, causal)
                logger.info("epoch %d is the best so far (%s %.4f); adapter saved", epoch, task.main_metric, score)
            progress.epoch, progress.batches_done, progress.loss_sum = epoch + 1, 0, 0.0
            progress.epoch_seconds = progress.epoch_cpu_seconds = 0.0
            write_checkpoint(epoch_clock, epoch_cpu)
            last_checkpoint_time = time.monotonic()
            stopping = stop.signal is not None
            if processes > 1:  # a signal may have reached one process during the evaluation: agree first
                stopping = accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device), "sum").item() > 0
            if stopping and epoch < config.epochs:
                stop.signal = stop.signal or "a signal to another process"
                stop_now()

    peak = meter.peak_bytes()
    best = progress.best
    metrics = {
        "task": task.name, "method": config.method, "model": loaded.source,
        "protocol": _protocol(config.data),
        "main_metric": task.main_metric,
        "best_epoch": best["epoch"], "best_dev": best["dev"], "best_score": best["score"],
        "initial_dev": progress.initial_dev,  # --eval-before-training (else None)
        "epochs": progress.epochs,
        "train_seconds": progress.train_seconds,  # training steps only
        # CPU time of this process over the training steps (all threads): unlike wall time, it does not grow
        # when other processes share the cores, so it compares methods fairly on a busy machine
        "train_cpu_seconds": progress.train_cpu_seconds,
        "wall_seconds": progress.wall_seconds + clock.seconds(),  # training and per-epoch evaluation
        "peak_memory_bytes": peak, "peak_memory_meter": meter.name,
        "memory_at_training_start_bytes": meter.baseline_bytes,
        # a resumed run: the steps it continued from (its peak memory is this last process's)
        "resumed_at_steps": progress.resumed_at_steps,
        # every method counted the same way: tensors with requires_grad (head included) / backbone parameters
        "trainable_parameters": parameters.trainable, "backbone_parameters": parameters.backbone,
        "trainable_percent": parameters.percent,
        "train_examples": len(train_examples), "dev_examples": {s: len(r) for s, r in dev_examples.items()},
        "config": _config_dict(config), "versions": versions(), "machine": machine(),
        "device": str(accelerator.device), "mixed_precision": config.mixed_precision,
        "backbone_dtype": config.backbone_dtype,
        # READ: whether the side network corrected [CLS] alone (the head reads nothing else) or every token
        "read_corrected_positions": None if not isinstance(unwrapped, ReadModel) else
        "first token only (the head reads nothing else)" if first_token else "every token",
        # --cache-features: where the entries are, their size on disk, whether this run reused them, build time
        "feature_cache": feature_cache.summary() if feature_cache is not None else None,
    }
    logger.info("done: best epoch %d, %s %.4f, %.1f s, peak memory %.1f MiB (%s)", best["epoch"], task.main_metric,
                best["score"], metrics["train_seconds"], peak / 2**20, meter.name)
    return metrics


def _protocol(data: DataConfig) -> str:
    source = ("the task's train split (a seeded random subset if max_train_samples)" if data.task else "--train-file")
    dev = "the GLUE dev set" if data.task else "--validation-file"
    if data.selection_fraction is not None:
        return (f"trained on {source} less a seeded {data.selection_fraction:g} held out as the 'selection' split; "
                f"both it and {dev} evaluated after every epoch; best epoch = highest main metric on 'selection' "
                f"({dev} only reported)")
    return (f"trained on {source}; evaluated on {dev} after every epoch; best epoch = highest main metric there "
            "(dev-set selection)")


def _config_dict(config: TrainingConfig) -> dict[str, Any]:
    out = asdict(config)
    out["learning_rate"] = config.learning_rate
    return out


def evaluate_adapter(data: DataConfig, model_name: str | None, adapter: str | Path, batch_size: int = 64,
                     max_length: int = 128, progress: bool = True, cpu: bool = False) -> dict[str, dict[str, float]]:
    """Load a backbone and a trained adapter (any method) and score the task's dev split(s)."""
    from accelerate import Accelerator

    from readapt.task_spec import TASK_FILE, read_task_file

    data.validate()
    method = method_of(Path(adapter))
    task, _, dev_examples = load_task_data(data, seed=0)
    # how the adapter answers (label words or a head; generation settings) is what it was trained with
    spec = read_task_file(adapter) if (Path(adapter) / TASK_FILE).is_file() else None
    decoder_head = "label-words" if spec is None or spec.text_to_text else "classifier"
    generation = GenerationSettings(**spec.generation) if spec is not None and spec.generation else None
    loaded = load_backbone(model_name, task.num_labels, task.is_regression, decoder_head=decoder_head,
                           generation=task.is_generation)
    model = method.load(loaded.model, Path(adapter))
    accelerator = Accelerator(cpu=cpu)
    evaluate = DevEvaluator.build(task, dev_examples, loaded, max_length, batch_size, accelerator,
                                  generation=generation)
    return evaluate(accelerator.prepare(model), progress)
