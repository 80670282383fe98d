"""The recipe's data: the task's rows (a seeded training subset, a held-out selection split) and their loaders."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from readapt.errors import ConfigError
from readapt.recipe.config import DataConfig
from readapt.tasks import Example, Task, get_task, load_custom_task, load_glue

SELECTION_SPLIT = "selection"  # rows held out of train that pick the best epoch (DataConfig.selection_fraction)


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


def make_loader(features, batch_size, collator, *, sampler=None) -> DataLoader:
    # Its own generator: starting an iterator then never draws from torch's global one (dropout's).
    return DataLoader(features, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collator,
                      generator=torch.Generator().manual_seed(0))
