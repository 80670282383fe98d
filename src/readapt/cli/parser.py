"""`readapt`'s argument parser. `train`'s flags are generated from the config dataclasses (readapt.cli.flags):
TrainingConfig and DataConfig (readapt.recipe.config), GenerationSettings (readapt.settings) and ReadConfig
(readapt.read.config); the baselines' named flags take their defaults from the methods themselves."""

from __future__ import annotations

import argparse

from readapt.cli.flags import Flag, add_adapter_arguments, add_config_arguments, comma_list, positive_int
from readapt.methods import get_method
from readapt.read.config import ReadConfig
from readapt.recipe.config import LANGUAGE_MODELS, DataConfig, TrainingConfig
from readapt.settings import DECODER_HEADS, GenerationSettings

EXIT_BAD_INPUT = 2
METHOD_NAMES = ("read", "full", "lora", "adapter", "bitfit", "prompt", "lst")
# Named flags of the baselines' main options -> (method, option, help); anything else: --method-option KEY=VALUE.
METHOD_FLAGS = {
    "lora_r": ("lora", "r", "LoRA rank"), "lora_alpha": ("lora", "alpha", "LoRA alpha"),
    "lora_dropout": ("lora", "dropout", "LoRA dropout"),
    "adapter_bottleneck": ("adapter", "bottleneck", "Houlsby adapter bottleneck size"),
    "prompt_tokens": ("prompt", "num_virtual_tokens", "prompt tuning: number of virtual tokens"),
    "lst_reduction_factor": ("lst", "reduction_factor", "LST side-network width = d / this"),
}
# READ's flags are --read-<field>, except these (their names predate the rule).
READ_FLAG_NAMES = {"rnn_type": "--rnn-type", "num_rnn_layers": "--read-num-layers", "couple_encoder": "--couple-encoder"}
DATA_FOR_EVAL = ("task", "data_dir", "train_file", "validation_file", "text_columns", "label_column", "task_type",
                 "max_eval_samples")
RUN_FOR_EVAL = ("model", "cpu", "progress")


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), like every other readapt error."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


class TrainFlags:
    """Which generated flags fill which config (kept on the parser, read back by readapt.cli.commands)."""

    data: list[Flag]
    training: list[Flag]
    generation: list[Flag]
    read: list[Flag]


def _add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="fine-tune on a task and keep the best adapter")
    flags = TrainFlags()
    groups: dict = {}
    flags.data = add_config_arguments(train, DataConfig)
    flags.training = add_config_arguments(train, TrainingConfig, groups=groups)
    flags.generation = add_config_arguments(groups.setdefault(LANGUAGE_MODELS, train.add_argument_group(LANGUAGE_MODELS)),
                                            GenerationSettings)
    read = train.add_argument_group("READ options (defaults: readapt.ReadConfig)")
    flags.read = add_config_arguments(read, ReadConfig, prefix="read-", flag_names=READ_FLAG_NAMES,
                                      unset_defaults=True)
    train.add_argument("--num-processes", type=positive_int, default=1,
                       help="data-parallel training in N processes on this machine, launched through Accelerate "
                            "(one per GPU; gloo on CPU); every batch is split over them. Multi-node: run "
                            "`accelerate launch [your config] -m readapt train ...` instead")
    _add_method_option_arguments(train)
    _add_debug(train)
    train.set_defaults(train_flags=flags)


def _add_method_option_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("baseline options (used only with their --method)")
    for flag, (method, option, text) in METHOD_FLAGS.items():
        default = get_method(method).defaults[option]
        group.add_argument("--" + flag.replace("_", "-"), type=type(default), help=f"{text} (default {default})")
    group.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="any option of the chosen method (value parsed as JSON, else a string); repeatable")


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="run the method comparison matrix (fresh process per run, resumable)")
    bench.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2", help="comma-separated GLUE tasks")
    bench.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods")
    bench.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    bench.add_argument("--baseline-seeds", type=positive_int,
                       help="use only the first N seeds for methods other than read and full (default: all)")
    bench.add_argument("--model", help="backbone (default: the embedded all-MiniLM-L6-v2)")
    bench.add_argument("--decoder-head", choices=DECODER_HEADS,
                       help="a decoder-only --model: rank label words (label-words) or train a classification head "
                            "on the last token (classifier); default: readapt train's")
    bench.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR)")
    bench.add_argument("--max-train-samples", type=positive_int, help="seeded random training subset per task")
    bench.add_argument("--max-eval-samples", type=positive_int, help="score only the first N dev rows")
    bench.add_argument("--epochs", type=positive_int, default=3)
    bench.add_argument("--method-epochs", action="append", default=[], metavar="METHOD=N",
                       help="epochs for one method (repeatable; e.g. read=10), else --epochs")
    bench.add_argument("--selection-fraction", type=float,
                       help="hold this fraction of the training subset out to pick the best epoch; the dev set is "
                            "then only reported (default: dev-set selection, as in the READ paper)")
    bench.add_argument("--cache-features", action="store_true", help="READ cells use the feature cache")
    bench.add_argument("--cache-dir", help="feature cache folder for READ cells (default: $READAPT_CACHE_DIR)")
    bench.add_argument("--batch-size", type=positive_int, default=32)
    bench.add_argument("--max-length", type=positive_int, default=128)
    bench.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE",
                       help="learning rate of one method (default: the method's); repeatable")
    bench.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                       help="an option of one method, e.g. lora.r=16 (value parsed as JSON); repeatable")
    bench.add_argument("--memory-batch-sizes", default="",
                       help="also measure training peak memory per method at these batch sizes, e.g. 8,16,32")
    bench.add_argument("--jobs", type=positive_int, default=1, help="runs at once (each in its own process)")
    bench.add_argument("--threads-per-job", type=positive_int, help="torch threads per run (default: cores / jobs)")
    bench.add_argument("--output-dir", required=True, help="results.jsonl, table.md, results.csv, plots, runs/")
    bench.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    bench.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    bench.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="score a trained adapter on the task's dev split(s)")
    data = add_config_arguments(evaluate, DataConfig, only=DATA_FOR_EVAL)
    add_config_arguments(evaluate, TrainingConfig, only=RUN_FOR_EVAL)
    evaluate.add_argument("--adapter", required=True,
                          help="adapter directory written by `readapt train`: its task.json names the task, columns "
                               "and max length (the flags above override them)")
    evaluate.add_argument("--max-length", type=int, help="truncate inputs (default: the adapter's, else 128)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--output", help="also write the metrics to this JSON file")
    _add_debug(evaluate)
    evaluate.set_defaults(data_flags=data)


def _add_predict_parser(commands) -> None:
    predict = commands.add_parser("predict", help="predict with one or many READ adapters, one backbone pass per batch")
    add_adapter_arguments(predict, "READ adapter directory written by `readapt train` (holds task.json); repeatable",
                          "prediction column")
    predict.add_argument("--input", required=True, metavar="FILE",
                         help="rows to predict: CSV, TSV or JSONL (optionally .gz) with the columns the adapters' tasks read")
    predict.add_argument("--output", metavar="FILE", help="CSV or JSONL, by extension (default: JSONL on stdout)")
    task = predict.add_argument_group(
        "the task (default: each adapter's task.json, written by `readapt train`: task, input columns, labels, "
        "prompt, max length; these flags override it for every adapter)")
    task.add_argument("--task", help="predict as this GLUE task (its input columns, labels and prompt); an adapter "
                                     "without task.json (saved by save_pretrained or Trainer) needs it or "
                                     "--text-columns")
    task.add_argument("--text-columns", type=comma_list, metavar="A[,B]",
                      help="the input file's column(s) to read for the task's text field(s), in their order (the "
                           "prompt keeps the task's field names); without task.json: a classifier or regression "
                           "adapter whose labels adapter_config.json records")
    task.add_argument("--max-length", type=positive_int, help="truncate inputs (default: the adapter's, else 128)")
    predict.add_argument("--batch-size", type=positive_int, default=64)
    predict.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    predict.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    predict.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_serve_parser(commands) -> None:
    from readapt.serving.command import add_serve_arguments

    serve = commands.add_parser("serve", help="serve many READ adapters over HTTP, one backbone pass per batch")
    add_serve_arguments(serve)
    if not any(action.dest == "debug" for action in serve._actions):
        _add_debug(serve)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="readapt", description="Fine-tune frozen transformers with READ.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train_parser, _add_bench_parser, _add_eval_parser, _add_predict_parser, _add_serve_parser):
        add(commands)
    return parser
