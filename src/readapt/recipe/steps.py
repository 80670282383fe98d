"""TrainRecipe: one training run in named phases (torchtune-style), over any method.

    setup_data          encode the rows, plan the feature cache, make the loaders and the evaluator
    setup_optimization  optimizer, schedule, Accelerate, and the state of a resumed run
    run                 per epoch: train_epoch (each batch one `step`), then end_epoch
    end_epoch           evaluate, keep the best adapter, write the epoch's checkpoint
    metrics             what metrics.json records
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from readapt.adapter_files import ADAPTER_DIR
from readapt.answers import causal_lm_loss, no_kv_cache
from readapt.encoding import Collator, encode
from readapt.errors import ConfigError, TrainingError, TrainingInterrupted
from readapt.measure import PeakMemoryMeter, Stopwatch, machine, versions
from readapt.methods import TrainableCount, count_trainable
from readapt.recipe.cache_jobs import CacheJobs
from readapt.recipe.checkpoint import (
    current_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    restore_training_state,
    save_checkpoint,
)
from readapt.recipe.data import EpochShuffle, make_loader
from readapt.recipe.evaluation import DevEvaluator, main_score, replaying_batch
from readapt.recipe.guards import StopRequest, debug_step_delay, disk_guard
from readapt.recipe.run_directory import config_dict, protocol_description
from readapt.task_spec import write_task_file

logger = logging.getLogger("readapt")

FIRST_TOKEN = slice(0, 1)


@dataclass
class Progress:
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


class TrainRecipe:
    def __init__(self, config, method, task, train_examples, dev_examples, loaded, model, run, accelerator,
                 backbone_parameters: int):
        self.config, self.method, self.task, self.loaded, self.run_dir = config, method, task, loaded, run
        self.train_examples, self.dev_examples = train_examples, dev_examples
        self.model, self.accelerator = model, accelerator
        self.backbone_parameters = backbone_parameters
        self.causal = loaded.causal_lm
        self.progress = Progress()
        self.stop = StopRequest()

    # ---------------------------------------------------------------- setup
    def setup_data(self) -> None:
        config, task, loaded = self.config, self.task, self.loaded
        cache = config.wants_feature_cache(self.method, task, self.causal)
        if cache and task.is_generation:
            raise ConfigError("--cache-features does not support generation tasks: generating runs the backbone on "
                              "tokens that do not exist before the model writes them")
        if cache and self.causal:
            raise ConfigError("--cache-features does not support decoder-only LMs answering in words yet (their "
                              "prompt + answer sequences are not cached); use --decoder-head classifier, or no cache")
        collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, task.is_regression, causal=self.causal)
        features = encode(task, self.train_examples, loaded.tokenizer, config.max_length, loaded.text_to_text,
                          self.causal)
        self.feature_cache = CacheJobs(config, self.model, loaded) if cache else None
        train_collator = collator
        if self.feature_cache is not None:
            features, train_collator = self.feature_cache.attach("train", features, collator, None, training=True)
        self.order = EpochShuffle(len(features), config.seed)
        self.train_loader = make_loader(features, config.batch_size, train_collator, sampler=self.order)
        # By default only the training split is cached: the scores a run reports are then those of the live
        # model, exactly what `readapt eval` gives for the saved adapter (a float16 cache rounds the states).
        # --cache-features caches the dev and selection splits too.
        dev_cache = self.feature_cache if config.cache_features else None
        self.evaluate = DevEvaluator.build(task, self.dev_examples, loaded, config.max_length, config.eval_batch_size,
                                           self.accelerator, dev_cache, config.generation)
        if self.feature_cache is not None:
            self.feature_cache.cache.check_budget([job[0] for job in self.feature_cache.jobs])
        self.first_token = self._corrects_first_token_only(features, collator)
        if self.first_token and self.feature_cache is not None:
            self.feature_cache.replay_first_token_only(self.model.read_config)

    def _corrects_first_token_only(self, features: list[dict], collator: Collator) -> bool:
        """Asked of the method on a few training rows (text-to-text and decoder-only LMs answer in words)."""
        if not self.method.corrects_positions or self.loaded.text_to_text or self.causal:
            return False
        batch = collator(features[:4])
        probe = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.method.corrects_first_token_only(self.model, probe)

    def setup_optimization(self) -> None:
        from transformers import get_linear_schedule_with_warmup

        config, accelerator = self.config, self.accelerator
        self.no_cache = no_kv_cache(self.loaded.model)  # the forward arguments that keep no KV cache, once
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.parameters = TrainableCount(count_trainable(self.model), self.backbone_parameters)
        # One multi-tensor update over every trainable tensor (foreach) instead of a kernel chain per tensor.
        optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                      foreach=True)
        total_steps = config.epochs * len(self.train_loader)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
        self.model, self.optimizer, self.train_loader, self.scheduler = accelerator.prepare(
            self.model, optimizer, self.train_loader, scheduler)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.steps_per_epoch = len(self.train_loader)
        self.is_main, self.rank = accelerator.is_main_process, accelerator.process_index
        self.processes = accelerator.num_processes
        run = self.run_dir
        if self.processes > 1:  # the others continue from the checkpoint the main process chose (or from none)
            from accelerate.utils import broadcast_object_list

            chosen = broadcast_object_list([str(run.resume_from.path) if run.resume_from is not None else None])[0]
            if not self.is_main and chosen is not None:
                run.resume_from = load_checkpoint(Path(chosen))
            logger.info("%d processes (%s): each takes 1/%d of every batch of %d", self.processes,
                        accelerator.distributed_type, self.processes, config.batch_size)
        logger.info("task %s: %d train examples, dev %s; model %s; method %s; %d trainable parameters (%.3f%% of the "
                    "backbone's %d)", self.task.name, len(self.train_examples),
                    {s: len(r) for s, r in self.dev_examples.items()}, self.loaded.source, config.method,
                    self.parameters.trainable, self.parameters.percent, self.parameters.backbone)
        if run.resume_from is not None:
            restore_training_state(run.resume_from, self.unwrapped, self.optimizer, self.scheduler)
            self.progress = Progress(**run.resume_from.state["progress"])
            self.progress.resumed_at_steps.append(self.progress.step)
            logger.info("resuming from %s: epoch %d, %d of %d batches done, step %d", run.resume_from.path.name,
                        self.progress.epoch, self.progress.batches_done, self.steps_per_epoch, self.progress.step)

    # ---------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        self.setup_data()
        self.setup_optimization()
        config, progress = self.config, self.progress
        if config.eval_before_training and progress.step == 0 and progress.initial_dev is None:
            progress.initial_dev = self.evaluate(self.unwrapped, config.progress)  # before the meters
            logger.info("before training: dev %s", json.dumps(progress.initial_dev))
        self.meter = PeakMemoryMeter(self.accelerator.device)
        self.meter.start()
        self.clock = Stopwatch()
        self.delay = debug_step_delay()
        self.last_checkpoint_time = time.monotonic()
        self.restore_rng_first = self.run_dir.resume_from
        positions = self.unwrapped.correcting_positions(FIRST_TOKEN) if self.first_token else contextlib.nullcontext()
        with self.stop.installed(), positions:
            for epoch in range(progress.epoch, config.epochs + 1):
                epoch_clock, epoch_cpu = Stopwatch(), time.process_time()
                self.train_epoch(epoch, epoch_clock, epoch_cpu)
                self.end_epoch(epoch, epoch_clock, epoch_cpu)
        return self.metrics()

    def train_epoch(self, epoch: int, epoch_clock: Stopwatch, epoch_cpu: float) -> None:
        config, progress, accelerator = self.config, self.progress, self.accelerator
        self.model.train()
        if self.feature_cache is not None and (epoch == 1 or self.restore_rng_first is not None):
            # built (epoch 1; counted in its time) or reopened (a resumed run); several processes: the main one
            # builds, then the others open what it wrote
            with accelerator.main_process_first():
                self.feature_cache.build(self.model, accelerator, config.eval_batch_size, config.progress and self.is_main)
            self.model.train()
        self.order.shuffle_for(epoch)
        skip = progress.batches_done
        batches = iter(accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader)
        if self.restore_rng_first is not None:
            # The RNG states go back only once the first batch is out: making the data iterator may draw from
            # them (Accelerate's loaders start the underlying iterator lazily), and nothing must draw after.
            batches = itertools.chain([next(batches)], batches)
            restore_rng(self.restore_rng_first, self.rank)
            self.restore_rng_first = None
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", total=self.steps_per_epoch, initial=skip,
                   disable=not (config.progress and self.is_main))
        every_seconds = 60 * config.checkpoint_minutes
        for batch in bar:
            time_due = every_seconds > 0 and time.monotonic() - self.last_checkpoint_time >= every_seconds
            stop_requested, time_due = self.step(batch, epoch, time_due)
            bar.set_postfix(loss=f"{progress.loss_sum / progress.batches_done:.4f}")
            if self.delay:
                time.sleep(self.delay)
            due = ((config.checkpoint_every is not None and progress.step % config.checkpoint_every == 0)
                   or time_due or stop_requested)
            if due and progress.batches_done < self.steps_per_epoch:  # the epoch's end writes its own
                self.write_checkpoint(epoch_clock, epoch_cpu)
                self.last_checkpoint_time = time.monotonic()
                if self.stop.signal is not None:
                    self.stop_now()
        bar.close()

    def step(self, batch: dict, epoch: int, time_due: bool) -> tuple[bool, bool]:
        """One optimizer step; returns (stop requested, checkpoint due by the clock) as every process agrees."""
        progress, accelerator = self.progress, self.accelerator
        with replaying_batch(self.unwrapped, batch):
            if self.causal:
                loss = causal_lm_loss(self.model, batch)
            else:
                loss = self.model(**batch, **self.no_cache).loss
        # What every process must agree on before the next collective: the loss (mean over processes), a stop
        # signal, a checkpoint falling due by the clock.
        shared = torch.stack([loss.detach().float(), loss.new_tensor(float(self.stop.signal is not None)),
                              loss.new_tensor(float(time_due))])
        if self.processes > 1:
            shared = accelerator.reduce(shared, reduction="sum")
            shared[0] /= self.processes
        step_loss, stop_requested, time_due = shared[0].item(), shared[1].item() > 0, shared[2].item() > 0
        if stop_requested and self.stop.signal is None:
            self.stop.signal = "a signal to another process"
        if not math.isfinite(step_loss):
            newest = list_checkpoints(self.run_dir.checkpoints)
            kept = (f"the last good checkpoint (step {newest[-1][0]}) is kept in {self.run_dir.checkpoints}"
                    if newest else "no checkpoint had been written yet")
            raise TrainingError(f"the loss became {step_loss} at step {progress.step + 1} (epoch {epoch}); "
                                f"training stopped and {kept}; lower --lr or check the data")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.batches_done += 1
        progress.loss_sum += step_loss
        return stop_requested, time_due

    def end_epoch(self, epoch: int, epoch_clock: Stopwatch, epoch_cpu: float) -> None:
        """Evaluate, keep the best adapter, write the epoch's checkpoint; stop here if a signal asked to."""
        config, progress = self.config, self.progress
        epoch_seconds = progress.epoch_seconds + epoch_clock.seconds()
        progress.train_seconds += epoch_seconds
        epoch_cpu_seconds = progress.epoch_cpu_seconds + time.process_time() - epoch_cpu
        progress.train_cpu_seconds += epoch_cpu_seconds
        results = self.evaluate(self.unwrapped, config.progress)
        score = main_score(self.task, results)
        record = {"epoch": epoch, "train_loss": progress.loss_sum / max(progress.batches_done, 1), "dev": results,
                  "score": score, "elapsed_seconds": progress.wall_seconds + self.clock.seconds(),
                  "train_seconds_so_far": progress.train_seconds, "epoch_train_seconds": epoch_seconds,
                  "epoch_train_cpu_seconds": epoch_cpu_seconds}  # all threads; unlike wall time, not inflated by other processes
        progress.epochs.append(record)
        logger.info("epoch %d: train loss %.4f, dev %s", epoch, record["train_loss"], json.dumps(results))
        if config.progress and self.is_main:  # the console sees every epoch's scores, not only the final best
            tqdm.write(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}; "
                       + "; ".join(f"{split} " + ", ".join(f"{name} {100 * value:.2f}" for name, value in metrics.items())
                                   for split, metrics in results.items()))
        if progress.best is None or score > progress.best["score"]:
            progress.best = record
            if self.is_main:
                with disk_guard("the adapter", progress.step, self.run_dir):
                    self.method.save(self.unwrapped, self.run_dir.staging / ADAPTER_DIR)
                    # task.json: what `readapt predict` needs
                    write_task_file(self.run_dir.staging / ADAPTER_DIR, self.task, config, self.loaded.text_to_text,
                                    self.causal)
            logger.info("epoch %d is the best so far (%s %.4f); adapter saved", epoch, self.task.main_metric, score)
        progress.epoch, progress.batches_done, progress.loss_sum = epoch + 1, 0, 0.0
        progress.epoch_seconds = progress.epoch_cpu_seconds = 0.0
        self.write_checkpoint(epoch_clock, epoch_cpu)
        self.last_checkpoint_time = time.monotonic()
        stopping = self.stop.signal is not None
        if self.processes > 1:  # a signal may have reached one process during the evaluation: agree first
            device = self.accelerator.device
            stopping = self.accelerator.reduce(torch.tensor(float(stopping), device=device), "sum").item() > 0
        if stopping and epoch < config.epochs:
            self.stop.signal = self.stop.signal or "a signal to another process"
            self.stop_now()

    # ---------------------------------------------------------------- checkpoints and stopping
    def write_checkpoint(self, epoch_clock: Stopwatch, epoch_cpu: float) -> None:
        if not self.config.checkpoints:
            return
        rng_states = [current_rng_state()]
        if self.processes > 1:  # every process's generators (dropout differs per process); the main one writes
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)
        if not self.is_main:
            return
        progress = self.progress
        state = asdict(progress)
        if progress.batches_done:  # mid-epoch: the epoch's time so far
            state["epoch_seconds"] += epoch_clock.seconds()
            state["epoch_cpu_seconds"] += time.process_time() - epoch_cpu
        state["wall_seconds"] += self.clock.seconds()
        with disk_guard("a checkpoint", progress.step, self.run_dir):
            path = save_checkpoint(self.run_dir.checkpoints, progress.step, self.unwrapped, self.optimizer,
                                   self.scheduler, state, self.config.keep_checkpoints, rng_states)
        logger.info("checkpoint %s written (epoch %d, batch %d of %d)", path.name, progress.epoch,
                    progress.batches_done, self.steps_per_epoch)

    def stop_now(self) -> None:
        if not self.config.checkpoints:
            raise TrainingInterrupted(f"stopped by {self.stop.signal} at step {self.progress.step}; no checkpoint "
                                      "(checkpoints are off), so a re-run starts over")
        raise TrainingInterrupted(f"stopped by {self.stop.signal} at step {self.progress.step} with a checkpoint in "
                                  f"{self.run_dir.checkpoints}; re-run the same command to resume")

    # ---------------------------------------------------------------- results
    def metrics(self) -> dict[str, Any]:
        config, progress, parameters = self.config, self.progress, self.parameters
        peak = self.meter.peak_bytes()
        best = progress.best
        metrics = {
            "task": self.task.name, "method": config.method, "model": self.loaded.source,
            "protocol": protocol_description(config.data),
            "main_metric": self.task.main_metric,
            "best_epoch": best["epoch"], "best_dev": best["dev"], "best_score": best["score"],
            "initial_dev": progress.initial_dev,  # --eval-before-training (else None)
            "epochs": progress.epochs,
            "train_seconds": progress.train_seconds,  # training steps only
            # CPU time of this process over the training steps (all threads): unlike wall time, it does not grow
            # when other processes share the cores, so it compares methods fairly on a busy machine
            "train_cpu_seconds": progress.train_cpu_seconds,
            "wall_seconds": progress.wall_seconds + self.clock.seconds(),  # training and per-epoch evaluation
            "peak_memory_bytes": peak, "peak_memory_meter": self.meter.name,
            "memory_at_training_start_bytes": self.meter.baseline_bytes,
            # a resumed run: the steps it continued from (its peak memory is this last process's)
            "resumed_at_steps": progress.resumed_at_steps,
            # every method counted the same way: tensors with requires_grad (head included) / backbone parameters
            "trainable_parameters": parameters.trainable, "backbone_parameters": parameters.backbone,
            "trainable_percent": parameters.percent,
            "train_examples": len(self.train_examples),
            "dev_examples": {s: len(r) for s, r in self.dev_examples.items()},
            "config": config_dict(config), "versions": versions(), "machine": machine(),
            "device": str(self.accelerator.device), "mixed_precision": config.mixed_precision,
            "backbone_dtype": config.backbone_dtype,
            # READ: whether the side network corrected [CLS] alone (the head reads nothing else) or every token
            "read_corrected_positions": None if not self.method.corrects_positions else
            "first token only (the head reads nothing else)" if self.first_token else "every token",
            # READ: whether its side network kept its activations or recomputed them in backward (and in chunks of
            # how many tokens), decided from the free memory unless set (ReadConfig.recompute)
            "read_recompute": (self.unwrapped.recompute_summary() if hasattr(self.unwrapped, "recompute_summary")
                               else None),
            # --cache-features: where the entries are, their size on disk, whether this run reused them, build time
            "feature_cache": self.feature_cache.summary() if self.feature_cache is not None else None,
        }
        logger.info("done: best epoch %d, %s %.4f, %.1f s, peak memory %.1f MiB (%s)", best["epoch"],
                    self.task.main_metric, best["score"], metrics["train_seconds"], peak / 2**20, self.meter.name)
        return metrics
