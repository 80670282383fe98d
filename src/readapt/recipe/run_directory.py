"""A run's output directory: the run's identity (fingerprint), the hidden staging directory it writes into, what
a resume continues from, and the move into place when it has finished (a failed run never leaves a torn output).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from readapt.errors import ConfigError
from readapt.io import atomic_write_json
from readapt.recipe.checkpoint import CHECKPOINTS_DIR, Checkpoint, newest_valid_checkpoint
from readapt.recipe.config import DataConfig, TrainingConfig
from readapt.tasks import Example

logger = logging.getLogger("readapt")

METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
RUN_FILE = "run.json"  # in the staging directory: which run its checkpoints belong to


# Settings that change neither the numbers a run computes nor its data: a run may be resumed with other values.
RESUME_INDEPENDENT = ("output_dir", "overwrite", "progress", "checkpoints", "checkpoint_every", "checkpoint_minutes",
                      "keep_checkpoints", "resume", "cache_dir", "cache_max_gb",
                      "max_memory", "offload_folder")  # where backbone weights wait; the device map itself counts


def run_fingerprint(config: TrainingConfig, train_examples: list[Example], dev_examples: dict[str, list[Example]],
                    processes: int = 1) -> str:
    """What makes two runs the same run: every setting that affects the result, and the data itself (so that
    moved or edited data files are noticed), hashed. A run is resumed only under the same fingerprint."""
    settings = config_dict(config)
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
class RunDirectory:
    staging: Path  # the hidden directory the run writes into; moved into place when the run has finished
    resume_from: Checkpoint | None

    @property
    def checkpoints(self) -> Path:
        return self.staging / CHECKPOINTS_DIR


def resumable(staging: Path, fingerprint: str, config: TrainingConfig) -> Checkpoint | None:
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
def output_transaction(config: TrainingConfig, fingerprint: str):
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
        resume_from = resumable(staging, fingerprint, config)
        if resume_from is None:
            if staging.exists():
                shutil.rmtree(staging)  # left by a run killed before its first checkpoint, or --no-resume
            staging.mkdir()
            atomic_write_json(staging / RUN_FILE, {"fingerprint": fingerprint, "config": config_dict(config)})
        handler = logging.FileHandler(staging / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield RunDirectory(staging, resume_from)
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


@contextlib.contextmanager
def worker_directory(config: TrainingConfig):
    """What a non-main process of a multi-process run sees of the output: the staging path, nothing to write."""
    output = Path(config.output_dir)
    yield RunDirectory(output.parent / f".{output.name}.partial", None)


def finished_run(output: Path, fingerprint: str) -> dict[str, Any] | None:
    """metrics.json of `output` if it records a finished run with this fingerprint."""
    try:
        metrics = json.loads((output / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("run_fingerprint") == fingerprint else None


def protocol_description(data: DataConfig) -> str:
    source = ("the task's train split (a seeded random subset if max_train_samples)" if data.task else "--train-file")
    dev = "the GLUE dev set" if data.task else "--validation-file"
    if data.selection_fraction is not None:
        return (f"trained on {source} less a seeded {data.selection_fraction:g} held out as the 'selection' split; "
                f"both it and {dev} evaluated after every epoch; best epoch = highest main metric on 'selection' "
                f"({dev} only reported)")
    return (f"trained on {source}; evaluated on {dev} after every epoch; best epoch = highest main metric there "
            "(dev-set selection)")


def config_dict(config: TrainingConfig) -> dict[str, Any]:
    out = asdict(config)
    out["learning_rate"] = config.learning_rate
    return out
