"""Task definitions, data loading (GLUE TSV, Hugging Face Hub, custom files) and metrics."""

from readapt.tasks.base import (
    COMBINED_METRIC,
    STSB_FALLBACK_SCORE,
    Example,
    Task,
    stsb_to_text,
    text_to_stsb,
)
from readapt.tasks.custom import TaskData, load_custom_task
from readapt.tasks.glue import GLUE_DIR_ENV, GLUE_TASKS, get_task, load_glue, load_glue_split
from readapt.tasks.metrics import compute_metrics

__all__ = [
    "COMBINED_METRIC",
    "GLUE_DIR_ENV",
    "GLUE_TASKS",
    "STSB_FALLBACK_SCORE",
    "Example",
    "Task",
    "TaskData",
    "compute_metrics",
    "get_task",
    "load_custom_task",
    "load_glue",
    "load_glue_split",
    "stsb_to_text",
    "text_to_stsb",
]
