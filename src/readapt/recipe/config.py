"""The training recipe's settings: DataConfig (which task, which rows) and TrainingConfig (everything else).

Every field carries its help text and, where the command line needs it, how its flag parses (metadata
"flag", "type", "choices", "group", "cli"): `readapt train`'s flags are generated from these dataclasses
(readapt.cli.flags), so each default and each help text is written once, here.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from typing import Any

from readapt.errors import ConfigError
from readapt.methods import get_method
from readapt.settings import (
    BACKBONE_DTYPES,
    CACHE_DTYPES,
    DECODER_HEADS,
    QUANTIZED_BACKBONE_DTYPES,
    GenerationSettings,
)
from readapt.tasks.custom import GENERATION_COLUMNS

TASK_TYPES = ("auto", "classification", "regression", "generation")
MIXED_PRECISION = ("no", "fp16", "bf16")


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, **cli: Any):
    """A config field with its help text; `cli` says how its flag parses (flag, type, choices, group, metavar,
    cli=False for none). `type="positive_int"` refuses values below 1 at parse time."""
    metadata = {"help": help, **cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Which task and where its data is: a GLUE task name, or custom train/validation files."""

    task: str | None = option(None, help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")
    data_dir: str | None = option(None, help="GLUE folder in the original layout (default: $GLUE_DIR, else the Hub)")
    train_file: str | None = option(None, help="custom task: training file (CSV, TSV or JSONL)")
    validation_file: str | None = option(None, help="custom task: validation file")
    text_columns: list[str] | None = option(
        None, help="custom task: comma-separated text column(s), one or two (generation: default prompt)",
        type="comma_list")
    label_column: str | None = option(
        None, help="custom task: label column (default: label; completion for --task-type generation)")
    task_type: str = option("auto", choices=TASK_TYPES,
                            help="custom task: generation = prompt/completion rows (JSONL fields or columns; change "
                                 "the names with --text-columns and --label-column), scored by exact match and token F1")
    max_train_samples: int | None = option(None, type="positive_int",
                                           help="train on a seeded random subset of N rows")
    max_eval_samples: int | None = option(None, type="positive_int", help="score only the first N dev rows")
    # Held-out selection: the dev split(s) are then only reported, never used to choose (an honest estimate;
    # GLUE's test labels are hidden).
    selection_fraction: float | None = option(
        None, metavar="F", help="hold out this share of the training rows (seeded) to pick the best epoch; the dev "
                                "split is then only reported (default: select on dev, as the paper did)")

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


CHECKPOINTS = ("checkpoints and resume: a killed or stopped run continues from its newest checkpoint when the same "
               "command is run again (Ctrl-C / SIGTERM stop after the current step with a checkpoint)")
LANGUAGE_MODELS = "language-model backbones (decoder-only, seq2seq)"
FEATURE_CACHE = "feature cache (READ, decoupled): the backbone runs once per example"
BIG_BACKBONES = ("big backbones (READ): the frozen backbone runs forward only, so it can be split over GPUs or "
                 "offloaded to CPU RAM and disk like an inference-only model (Accelerate big-model loading)")


@dataclass
class TrainingConfig:
    data: DataConfig = option(default_factory=DataConfig, help="the task and its rows", cli=False)
    model: str | None = option(None, help="Hub id, local folder or .gguf file (default: the embedded all-MiniLM-L6-v2)")
    method: str = option("read", help="fine-tuning method: read, full, lora, adapter, bitfit, prompt, lst")
    method_options: dict[str, Any] = option(default_factory=dict, cli=False,
                                            help="the method's options, e.g. ReadConfig fields for READ")
    output_dir: str = option("runs/latest", cli_default=None,
                             help="where the adapter, metrics.json and train.log go (CLI default: runs/<task>-<method>)")
    overwrite: bool = option(False, help="replace an output directory that holds files")
    epochs: int | None = option(None, help="training epochs (default: the method's budget for the data size; READ: "
                                           "10 up to 2,000 training rows, 5 up to 10,000, then 3; others 3)")
    batch_size: int = option(32, help="training batch size")
    eval_batch_size: int = option(64, help="evaluation batch size")
    lr: float | None = option(None, help="peak learning rate (default: the method's, READ 1e-3, full 5e-5)")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    warmup_ratio: float = option(0.06, help="share of the steps with a linear learning-rate warm-up")
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    max_length: int = option(128, help="truncate inputs to this many tokens")
    seed: int = option(42, help="seed of the subset, the selection split, the order and the initialisation")
    mixed_precision: str = option("no", choices=MIXED_PRECISION, help="Accelerate's mixed precision")
    cpu: bool = option(False, help="run on the CPU even if a GPU is present")
    progress: bool = option(True, help="progress bars")
    backbone_dtype: str = option(
        "float32", choices=BACKBONE_DTYPES,
        help="weights of the frozen backbone (READ only; side network and head stay float32). On CPU "
             "bfloat16/float16 halve the weights' memory but run slower without AVX512-BF16/AMX; int8/int4 quantize "
             "its linear weights through transformers' torchao or bitsandbytes integration (pip install "
             "'readapt[quant]'; docs/big-backbones.md)")
    cache_features: bool | None = option(
        None, group=FEATURE_CACHE,
        help="store every layer's hidden states of the train and dev examples in the first pass, replay them in later "
             "epochs instead of running the backbone. Default: the training split only (dev and selection scores "
             "from the live model), wherever the method can replay it — READ, decoupled, not a generation task nor "
             "a decoder-only LM answering in words, no --device-map, no --eval-before-training; "
             "--no-cache-features: off")
    cache_dir: str | None = option(None, group=FEATURE_CACHE,
                                   help="where entries go (default: $READAPT_CACHE_DIR, else ~/.cache/readapt/features)")
    cache_dtype: str = option("float16", choices=CACHE_DTYPES, group=FEATURE_CACHE, cli_default=None,
                              help="stored values (default float16)")
    cache_max_gb: float | None = option(None, group=FEATURE_CACHE,
                                        help="refuse to write a cache larger than this (GB = 1e9 bytes; default: free "
                                             "disk less 1 GiB)")
    device_map: str | None = option(
        None, group=BIG_BACKBONES, metavar="auto|cpu|JSON",
        help="auto: GPUs first, then CPU RAM, then disk; cpu: CPU RAM, then disk (trains on the CPU); or a JSON "
             "{module: device} map. Side networks and task head stay on the device of the final hidden state")
    max_memory: str | None = option(
        None, group=BIG_BACKBONES, metavar="DEVICE=SIZE[,...]",
        help="memory caps for the placement, e.g. 0=20GiB,1=20GiB,cpu=64GiB (devices not named: what is free); "
             "what does not fit goes to disk")
    offload_folder: str | None = option(
        None, group=BIG_BACKBONES, metavar="DIR",
        help="where disk-offloaded weights are written when they cannot be read straight from the checkpoint's "
             "safetensors files (other formats, converted weights)")
    # Checkpoints (readapt.recipe.checkpoint): every N optimizer steps, every M minutes and at every epoch end; the
    # newest `keep_checkpoints` are kept while the run lasts and removed once it has finished.
    checkpoints: bool = option(True, group=CHECKPOINTS,
                               help="write checkpoints (without, a killed run starts over; saves the time and the "
                                    "transient memory of writing them; `readapt bench` cells run without)")
    checkpoint_every: int | None = option(None, group=CHECKPOINTS, type="positive_int", metavar="STEPS",
                                          help="also write a checkpoint every STEPS optimizer steps (always: at every "
                                               "epoch end)")
    checkpoint_minutes: float = option(15.0, group=CHECKPOINTS,
                                       help="also write one every this many minutes of training (0: never)")
    keep_checkpoints: int = option(2, group=CHECKPOINTS, type="positive_int",
                                   help="keep the newest N checkpoints while the run lasts; removed when it ends")
    resume: bool | None = option(None, group=CHECKPOINTS,
                                 help="--resume: continue this run's newest checkpoint (an error if there is none); "
                                      "--no-resume: start over. Default: continue if there is one")
    decoder_head: str = option(
        "label-words", choices=DECODER_HEADS, group=LANGUAGE_MODELS,
        help="decoder-only backbone on a classification/regression task: its LM head ranks the label words after "
             "a prompt (label-words) or a new classification head reads the last token")
    eval_before_training: bool = option(
        False, help="score the dev split before the first step too (metrics.json initial_dev; e.g. a decoder-only "
                    "LM's zero-shot label-word accuracy: READ's untrained correction is exactly zero)")
    generation: GenerationSettings = option(default_factory=GenerationSettings, cli=False,
                                            help="how generation tasks are scored (readapt.settings)")

    def validate(self) -> None:
        self.data.validate()
        method = get_method(self.method)
        method.validate_options(self.method_options)
        checks = {
            "epochs": self.epochs is None or self.epochs >= 1, "batch_size": self.batch_size >= 1, "eval_batch_size": self.eval_batch_size >= 1,
            "max_length": self.max_length >= 8, "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "max_grad_norm": self.max_grad_norm > 0,
            "checkpoint_every": self.checkpoint_every is None or self.checkpoint_every >= 1,
            "checkpoint_minutes": self.checkpoint_minutes >= 0 and math.isfinite(self.checkpoint_minutes),
            "keep_checkpoints": self.keep_checkpoints >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr={self.lr} is out of range; it must be a positive number")
        _check_choice("--decoder-head", self.decoder_head, DECODER_HEADS)
        if isinstance(self.generation, dict):  # from a JSON config
            self.generation = GenerationSettings(**self.generation)
        self.generation.validate()
        _check_choice("--mixed-precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("--backbone-dtype", self.backbone_dtype, BACKBONE_DTYPES)
        if self.backbone_dtype != "float32" and not method.supports_backbone_placement:
            why = ("quantized weights can neither be trained nor back-propagated through"
                   if self.backbone_dtype in QUANTIZED_BACKBONE_DTYPES else "which then stay float32")
            raise ConfigError(f"--backbone-dtype {self.backbone_dtype} needs --method read: {self.method} trains or "
                              f"back-propagates through the backbone's own weights, {why}")
        _check_choice("--cache-dtype", self.cache_dtype, CACHE_DTYPES)
        if self.cache_max_gb is not None and not (self.cache_max_gb > 0 and math.isfinite(self.cache_max_gb)):
            raise ConfigError(f"--cache-max-gb={self.cache_max_gb} is out of range; it must be a positive number")
        if self.cache_features and self.eval_before_training:
            raise ConfigError("--eval-before-training cannot be combined with --cache-features (the cache is built "
                              "at the start of the first epoch)")
        problem = method.feature_cache_problem(self.method_options) if self.cache_features else None
        if problem:
            raise ConfigError(f"--cache-features needs {problem}")
        self._validate_placement(method)

    def _validate_placement(self, method) -> None:
        from readapt.offload import normalize_max_memory, parse_device_map

        if self.device_map is None:
            given = [flag for flag, value in (("--max-memory", self.max_memory), ("--offload-folder", self.offload_folder))
                     if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} need(s) --device-map")
            return
        if not method.supports_backbone_placement:
            raise ConfigError(f"--device-map needs --method read: {self.method} back-propagates through or trains the "
                              "backbone, which a split or offloaded backbone (placed for forward passes only) cannot do")
        parse_device_map(self.device_map)
        normalize_max_memory(self.max_memory)

    def wants_feature_cache(self, method, task, causal_lm: bool) -> bool:
        """--cache-features as given, or, by default, wherever it is valid (see the field's help)."""
        if self.cache_features is not None:
            return self.cache_features
        return (method.feature_cache_problem(self.method_options) is None and not task.is_generation
                and not causal_lm and self.device_map is None and not self.eval_before_training)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr


def _check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag}={value!r}; allowed: {', '.join(allowed)}")
