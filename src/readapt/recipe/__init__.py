"""The training recipe (torchtune-style: the recipe apart from the components it uses, which know nothing of it).

    config.py         DataConfig, TrainingConfig: every setting with its default and help (the CLI's flags)
    data.py           the task's rows, the held-out selection split, the loaders
    evaluation.py     predictions and metrics on the dev split(s); `evaluate_adapter`
    run_directory.py  the run's fingerprint, staging directory, resume and move into place
    checkpoint.py     exact-resume checkpoints (safetensors + JSON)
    guards.py         stop signals, disk-full errors
    cache_jobs.py     --cache-features: one feature-cache entry per split
    steps.py          TrainRecipe: one run in named phases
    loop.py           `train(config)`: validate, place the backbone, run the recipe, write metrics.json
"""

from readapt.recipe.config import DataConfig, TrainingConfig
from readapt.recipe.data import SELECTION_SPLIT, EpochShuffle, load_task_data, make_loader, set_seed
from readapt.recipe.evaluation import DevEvaluator, evaluate_adapter, main_score, predict, replaying_batch
from readapt.recipe.loop import launched_processes, train

__all__ = [
    "SELECTION_SPLIT", "DataConfig", "DevEvaluator", "EpochShuffle", "TrainingConfig", "evaluate_adapter",
    "launched_processes", "load_task_data", "main_score", "make_loader", "predict", "replaying_batch", "set_seed",
    "train",
]
