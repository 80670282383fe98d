"""The training recipe: one loop for every method — task data in, best adapter and metrics.json out.

Flow (`train`): validate everything cheap (config, data, model) before touching the output directory; train in
a hidden staging directory next to it (readapt.recipe.run_directory); evaluate after every epoch and keep the
best adapter; write metrics.json; move the staging directory into place at the very end, so a failed or
interrupted run never leaves a half-written output directory.

`TrainRecipe` is one run in named phases: `setup_data` → `setup_optimization` → per epoch `train_epoch` (each
batch one `step`) and `end_epoch` (evaluate, keep the best, checkpoint) → `metrics`. The recipe asks the method
what it can do (readapt.methods.Method), never its name.

With --cache-features (READ, decoupled; readapt.read.cache) every split gets a feature-cache entry
(readapt.recipe.cache_jobs); afterwards every batch carries its examples' cached states and the model replays
them instead of running the backbone. Loaders, shuffling and padding are the same as without.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from readapt.errors import ConfigError
from readapt.io import atomic_write_json
from readapt.methods import count_parameters, get_method
from readapt.pretrained import load_backbone
from readapt.recipe.config import TrainingConfig
from readapt.recipe.data import load_task_data, set_seed
from readapt.recipe.guards import disk_guard
from readapt.recipe.run_directory import (
    METRICS_FILE,
    finished_run,
    output_transaction,
    run_fingerprint,
    worker_directory,
)
from readapt.recipe.steps import TrainRecipe

logger = logging.getLogger("readapt")


def train(config: TrainingConfig) -> dict[str, Any]:
    """Fine-tune with `config.method` on the task, evaluate on dev every epoch, keep the best adapter.
    Returns the content of metrics.json. Re-running an interrupted run continues from its newest checkpoint;
    re-running a finished one returns its metrics without training again (unless --overwrite)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

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
    if config.epochs is None:  # the method's budget for this many rows, recorded as the run's own setting
        config.epochs = method.default_epochs(len(train_examples))
    config.method_options = {**method.default_options(len(train_examples)), **config.method_options}
    fingerprint = run_fingerprint(config, train_examples, dev_examples, processes)
    finished = finished_run(Path(config.output_dir), fingerprint)
    if finished is not None and not config.overwrite:
        logger.info("%s already holds this finished run; nothing to do (pass --overwrite to train again)",
                    config.output_dir)
        return finished
    # Only the main process owns the output: the others read the data and checkpoints and write nothing.
    with output_transaction(config, fingerprint) if rank == 0 else worker_directory(config) as run:
        set_seed(config.seed)
        loaded = load_backbone(config.model, task.num_labels, task.is_regression, dtype=config.backbone_dtype,
                               device_map=config.device_map, max_memory=config.max_memory,
                               offload_folder=config.offload_folder, use_gpus=not config.cpu,
                               decoder_head=config.decoder_head, generation=task.is_generation)
        backbone_parameters = count_parameters(loaded.model)  # before the method adds any
        model = method.prepare(loaded.model, config.method_options)
        placement = log_placement(loaded.model)
        # A backbone placed only on CPU RAM / disk runs on the CPU: train there too.
        on_cpu = placement is not None and set(map(str, loaded.model.hf_device_map.values())) <= {"cpu", "disk"}
        # Several processes without a GPU: Accelerate's multi-CPU mode (gloo) needs cpu=True.
        cpu = config.cpu or on_cpu or (processes > 1 and not torch.cuda.is_available())
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu,
                                  dataloader_config=DataLoaderConfiguration(split_batches=True))
        recipe = TrainRecipe(config, method, task, train_examples, dev_examples, loaded, model, run, accelerator,
                             backbone_parameters)
        metrics = recipe.run()
        metrics["run_fingerprint"] = fingerprint
        metrics["backbone_device_map"] = placement  # --device-map: module -> device (None: not placed)
        if accelerator.is_main_process:
            with disk_guard("metrics.json", None, run):
                atomic_write_json(run.staging / METRICS_FILE, metrics)
        return metrics


def launched_processes() -> tuple[int, int]:
    """(this process's rank, number of processes) as torchrun / `accelerate launch` set them; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def log_placement(backbone) -> dict[str, Any] | None:
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


