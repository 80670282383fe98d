"""`readapt` command line: a thin face over readapt.training.

Bad input prints one line on stderr and exits with status 2 (no traceback unless --debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from readapt.errors import ReadaptError, TrainingInterrupted
from readapt.read.config import AGGREGATIONS, H0_MODES, RNN_TYPES, SEQUENCE_CONTEXTS, ReadConfig
from readapt.settings import BACKBONE_DTYPES, CACHE_DTYPES, DECODER_HEADS, GenerationSettings

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")
    parser.add_argument("--data-dir", help="GLUE folder in the original layout (default: $GLUE_DIR, else the Hub)")
    parser.add_argument("--train-file", help="custom task: training file (CSV, TSV or JSONL)")
    parser.add_argument("--validation-file", help="custom task: validation file")
    parser.add_argument("--text-columns", help="custom task: comma-separated text column(s), one or two")
    parser.add_argument("--label-column",
                        help="custom task: label column (default: label; completion for --task-type generation)")
    parser.add_argument("--task-type", choices=("auto", "classification", "regression", "generation"), default="auto",
                        help="custom task: generation = prompt/completion rows (JSONL fields or columns; change the "
                             "names with --text-columns and --label-column), scored by exact match and token F1")
    parser.add_argument("--max-eval-samples", type=_positive_int, help="score only the first N dev rows")
    parser.add_argument("--model", help="Hub id, local folder or .gguf file (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


METHOD_NAMES = ("read", "full", "lora", "adapter", "bitfit", "prompt", "lst")
# Named flags of the baselines' main options -> (method, option); anything else: --method-option KEY=VALUE.
METHOD_FLAGS = {
    "lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "adapter_bottleneck": ("adapter", "bottleneck"), "prompt_tokens": ("prompt", "num_virtual_tokens"),
    "lst_reduction_factor": ("lst", "reduction_factor"),
}


def _add_method_option_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("baseline options (used only with their --method)")
    group.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    group.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 8)")
    group.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0)")
    group.add_argument("--adapter-bottleneck", type=int, help="Houlsby adapter bottleneck size (default 64)")
    group.add_argument("--prompt-tokens", type=int, help="prompt tuning: number of virtual tokens (default 20)")
    group.add_argument("--lst-reduction-factor", type=int, help="LST side-network width = d / this (default 8)")
    group.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="any option of the chosen method (value parsed as JSON, else a string); repeatable")


def method_options_from_args(args) -> dict:
    """The chosen method's options from the command line; a flag of another method is an error."""
    from readapt.errors import ConfigError

    options = {}
    for flag, (method, option) in METHOD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if method != args.method:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --method {method}, not {args.method}")
        options[option] = value
    for item in args.method_option:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-option {item!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    return options


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), like every other readapt error."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="readapt", description="Fine-tune frozen transformers with READ.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune on a task and keep the best adapter")
    _add_data_arguments(train)
    train.add_argument("--method", default="read", help="fine-tuning method: " + ", ".join(METHOD_NAMES))
    train.add_argument("--output-dir", help="where the adapter, metrics.json and train.log go (default: runs/<task>-<method>)")
    train.add_argument("--overwrite", action="store_true", help="replace an output directory that holds files")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--eval-batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, help="peak learning rate (default: the method's, READ 1e-3, full 5e-5)")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-ratio", type=float, default=0.06)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--max-train-samples", type=_positive_int, help="train on a seeded random subset of N rows")
    train.add_argument("--selection-fraction", type=float, metavar="F",
                       help="hold out this share of the training rows (seeded) to pick the best epoch; the dev "
                            "split is then only reported (default: select on dev, as the paper did)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    train.add_argument("--num-processes", type=_positive_int, default=1,
                       help="data-parallel training in N processes on this machine, launched through Accelerate "
                            "(one per GPU; gloo on CPU); every batch is split over them. Multi-node: run "
                            "`accelerate launch [your config] -m readapt train ...` instead")
    resume = train.add_argument_group(
        "checkpoints and resume: a killed or stopped run continues from its newest checkpoint when the same "
        "command is run again (Ctrl-C / SIGTERM stop after the current step with a checkpoint)")
    resume.add_argument("--checkpoint-every", type=_positive_int, metavar="STEPS",
                        help="also write a checkpoint every STEPS optimizer steps (always: at every epoch end)")
    resume.add_argument("--checkpoint-minutes", type=float, default=15.0,
                        help="also write one every this many minutes of training (default 15; 0: never)")
    resume.add_argument("--keep-checkpoints", type=_positive_int, default=2,
                        help="keep the newest N checkpoints while the run lasts (default 2); removed when it ends")
    resume.add_argument("--no-checkpoints", dest="checkpoints", action="store_false",
                        help="write no checkpoints (a killed run then starts over; saves the time and the transient "
                             "memory of writing them)")
    resume.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="--resume: continue this run's newest checkpoint (an error if there is none); "
                             "--no-resume: start over. Default: continue if there is one")
    train.add_argument("--eval-before-training", action="store_true",
                       help="score the dev split before the first step too (metrics.json initial_dev)")
    lm = train.add_argument_group("language-model backbones (decoder-only, seq2seq)")
    lm.add_argument("--decoder-head", choices=DECODER_HEADS, default="label-words",
                    help="decoder-only backbone on a classification/regression task: its LM head ranks the label "
                         "words after a prompt (label-words, default) or a new classification head reads the last token")
    lm.add_argument("--max-new-tokens", type=_positive_int, default=GenerationSettings.max_new_tokens,
                    help=f"generation tasks: longest completion generated at evaluation (default {GenerationSettings.max_new_tokens})")
    lm.add_argument("--do-sample", action="store_true", help="generation tasks: sample instead of greedy decoding")
    lm.add_argument("--temperature", type=float, default=GenerationSettings.temperature, help="with --do-sample")
    lm.add_argument("--top-p", type=float, default=GenerationSettings.top_p, help="with --do-sample")
    lm.add_argument("--top-k", type=int, default=GenerationSettings.top_k, help="with --do-sample")
    lm.add_argument("--num-beams", type=_positive_int, default=GenerationSettings.num_beams, help="beam search width")

    read = train.add_argument_group("READ options (defaults: readapt.ReadConfig)")
    read.add_argument("--read-hidden-size", type=int, help=f"RNN hidden size r (default {ReadConfig().hidden_size})")
    read.add_argument("--rnn-type", choices=RNN_TYPES)
    read.add_argument("--read-num-layers", type=int, help=f"stacked RNN layers (default {ReadConfig().num_rnn_layers})")
    read.add_argument("--read-aggregation", choices=AGGREGATIONS)
    read.add_argument("--read-scaling", type=float)
    read.add_argument("--read-h0", choices=H0_MODES)
    read.add_argument("--read-dropout", type=float)
    read.add_argument("--read-sequence-context", choices=SEQUENCE_CONTEXTS,
                      help="what every token's correction also sees of its sequence: segments = every layer's mean "
                           "over the tokens and how the means of a pair's two texts compare, in the RNN's input; "
                           "pooled = the RNN's summary of every layer's mean over the tokens (both let a [CLS] head "
                           "and the feature cache work on [CLS] alone); mean = the mean of the tokens' RNN summaries; "
                           "none = its own states only; auto (default) = segments on encoders (pooled without a "
                           "separator token), none elsewhere")
    read.add_argument("--no-read-input-projection", dest="read_input_projection", action="store_false", default=None,
                      help="feed d-wide states to the RNN")
    read.add_argument("--couple-encoder", action="store_true", default=None, help="encoder-decoder ablation (see docs)")
    read.add_argument("--backbone-dtype", choices=BACKBONE_DTYPES, default="float32",
                      help="weights of the frozen backbone (READ only; side network and head stay float32). "
                           "On CPU bfloat16/float16 halve the weights' memory but run slower without AVX512-BF16/AMX")
    cache = train.add_argument_group("feature cache (READ, decoupled): the backbone runs once per example")
    cache.add_argument("--cache-features", action="store_true",
                       help="store every layer's hidden states of the train and dev examples in the first pass, "
                            "replay them in later epochs instead of running the backbone")
    cache.add_argument("--cache-dir", help="where entries go (default: $READAPT_CACHE_DIR, else ~/.cache/readapt/features)")
    cache.add_argument("--cache-dtype", choices=CACHE_DTYPES, help="stored values (default float16)")
    cache.add_argument("--cache-max-gb", type=float,
                       help="refuse to write a cache larger than this (GB = 1e9 bytes; default: free disk less 1 GiB)")

    big = train.add_argument_group(
        "big backbones (READ): the frozen backbone runs forward only, so it can be split over GPUs or offloaded "
        "to CPU RAM and disk like an inference-only model (Accelerate big-model loading)")
    big.add_argument("--device-map", metavar="auto|cpu|JSON",
                     help="auto: GPUs first, then CPU RAM, then disk; cpu: CPU RAM, then disk (trains on the CPU); "
                          "or a JSON {module: device} map. Side networks and task head stay on the device of the "
                          "final hidden state")
    big.add_argument("--max-memory", metavar="DEVICE=SIZE[,...]",
                     help="memory caps for the placement, e.g. 0=20GiB,1=20GiB,cpu=64GiB (devices not named: what "
                          "is free); what does not fit goes to disk")
    big.add_argument("--offload-folder", metavar="DIR",
                     help="where disk-offloaded weights are written when they cannot be read straight from the "
                          "checkpoint's safetensors files (other formats, converted weights)")

    _add_method_option_arguments(train)

    bench = commands.add_parser("bench", help="run the method comparison matrix (fresh process per run, resumable)")
    bench.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2", help="comma-separated GLUE tasks")
    bench.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods")
    bench.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    bench.add_argument("--baseline-seeds", type=_positive_int,
                       help="use only the first N seeds for methods other than read and full (default: all)")
    bench.add_argument("--model", help="backbone (default: the embedded all-MiniLM-L6-v2)")
    bench.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR)")
    bench.add_argument("--max-train-samples", type=_positive_int, help="seeded random training subset per task")
    bench.add_argument("--max-eval-samples", type=_positive_int, help="score only the first N dev rows")
    bench.add_argument("--epochs", type=_positive_int, default=3)
    bench.add_argument("--method-epochs", action="append", default=[], metavar="METHOD=N",
                       help="epochs for one method (repeatable; e.g. read=10), else --epochs")
    bench.add_argument("--selection-fraction", type=float,
                       help="hold this fraction of the training subset out to pick the best epoch; the dev set is "
                            "then only reported (default: dev-set selection, as in the READ paper)")
    bench.add_argument("--cache-features", action="store_true", help="READ cells use the feature cache")
    bench.add_argument("--cache-dir", help="feature cache folder for READ cells (default: $READAPT_CACHE_DIR)")
    bench.add_argument("--batch-size", type=_positive_int, default=32)
    bench.add_argument("--max-length", type=_positive_int, default=128)
    bench.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE",
                       help="learning rate of one method (default: the method's); repeatable")
    bench.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                       help="an option of one method, e.g. lora.r=16 (value parsed as JSON); repeatable")
    bench.add_argument("--memory-batch-sizes", default="",
                       help="also measure training peak memory per method at these batch sizes, e.g. 8,16,32")
    bench.add_argument("--jobs", type=_positive_int, default=1, help="runs at once (each in its own process)")
    bench.add_argument("--threads-per-job", type=_positive_int, help="torch threads per run (default: cores / jobs)")
    bench.add_argument("--output-dir", required=True, help="results.jsonl, table.md, results.csv, plots, runs/")
    bench.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--debug", action="store_true", help="show tracebacks")

    evaluate = commands.add_parser("eval", help="score a trained adapter on the task's dev split(s)")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--adapter", required=True, help="adapter directory written by `readapt train`")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--output", help="also write the metrics to this JSON file")

    predict = commands.add_parser("predict", help="predict with one or many READ adapters, one backbone pass per batch")
    predict.add_argument("--model", help="the backbone every adapter was trained on (default: the embedded all-MiniLM-L6-v2)")
    predict.add_argument("--adapter", action="append", required=True, metavar="DIR",
                         help="READ adapter directory written by `readapt train` (holds task.json); repeatable")
    predict.add_argument("--name", action="append", default=[], metavar="NAME",
                         help="prediction column of the adapter at the same position (default: the adapter folder's "
                              "name, or its run folder's for <run>/adapter); repeatable")
    predict.add_argument("--input", required=True, metavar="FILE",
                         help="rows to predict: CSV, TSV or JSONL (optionally .gz) with the columns the adapters' tasks read")
    predict.add_argument("--output", metavar="FILE", help="CSV or JSONL, by extension (default: JSONL on stdout)")
    predict.add_argument("--batch-size", type=_positive_int, default=64)
    predict.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _data_config(args):
    from readapt.training import DataConfig

    columns = [c.strip() for c in args.text_columns.split(",") if c.strip()] if args.text_columns else None
    return DataConfig(task=args.task, data_dir=args.data_dir, train_file=args.train_file,
                      validation_file=args.validation_file, text_columns=columns, label_column=args.label_column,
                      task_type=args.task_type, max_train_samples=getattr(args, "max_train_samples", None),
                      selection_fraction=getattr(args, "selection_fraction", None),
                      max_eval_samples=args.max_eval_samples)


def _train_config(args):
    from readapt.training import TrainingConfig

    name = args.task or "custom"
    given = {
        "hidden_size": args.read_hidden_size, "rnn_type": args.rnn_type, "num_rnn_layers": args.read_num_layers,
        "aggregation": args.read_aggregation, "scaling": args.read_scaling, "h0": args.read_h0,
        "dropout": args.read_dropout, "input_projection": args.read_input_projection,
        "couple_encoder": args.couple_encoder, "sequence_context": args.read_sequence_context,
    }
    read_options = {key: value for key, value in given.items() if value is not None}
    if read_options and args.method != "read":
        raise ReadaptError(f"READ options ({', '.join(sorted(read_options))}) apply to --method read, not {args.method}")
    options = {**read_options, **method_options_from_args(args)}
    cache_flags = {"--cache-dir": args.cache_dir, "--cache-dtype": args.cache_dtype, "--cache-max-gb": args.cache_max_gb}
    given_cache_flags = [flag for flag, value in cache_flags.items() if value is not None]
    if given_cache_flags and not args.cache_features:
        raise ReadaptError(f"{', '.join(given_cache_flags)} apply only with --cache-features")
    config = TrainingConfig(
        data=_data_config(args), model=args.model, method=args.method, method_options=options,
        output_dir=args.output_dir or os.path.join("runs", f"{name}-{args.method}"), overwrite=args.overwrite,
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        max_length=args.max_length, seed=args.seed, mixed_precision=args.mixed_precision, cpu=args.cpu,
        progress=not args.no_progress, backbone_dtype=args.backbone_dtype, cache_features=args.cache_features,
        cache_dir=args.cache_dir, cache_dtype=args.cache_dtype or "float16", cache_max_gb=args.cache_max_gb,
        device_map=args.device_map, max_memory=args.max_memory, offload_folder=args.offload_folder,
        checkpoints=args.checkpoints, checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, decoder_head=args.decoder_head,
        eval_before_training=args.eval_before_training,
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      num_beams=args.num_beams),
    )
    return config


def _run_train(args) -> None:
    from readapt.training import launched_processes, train

    config = _train_config(args)
    metrics = train(config)
    if launched_processes()[0] != 0:
        return  # one of several processes: the main one reports
    if metrics.get("resumed_at_steps"):
        print(f"\nreadapt train: resumed at step(s) {', '.join(map(str, metrics['resumed_at_steps']))}")
    best = metrics["best_dev"]
    print(f"\nreadapt train: {metrics['task']} with {metrics['method']} on {metrics['model']}")
    if metrics.get("initial_dev"):
        print("  before training: " + "; ".join(f"{split} " + ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items())
                                                for split, m in metrics["initial_dev"].items()))
    print(f"  best epoch {metrics['best_epoch']} of {len(metrics['epochs'])}: "
          + "; ".join(f"{split} " + ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items()) for split, m in best.items()))
    print(f"  train time {metrics['train_seconds']:.1f} s (wall {metrics['wall_seconds']:.1f} s with evaluation)")
    print(f"  peak memory {metrics['peak_memory_bytes'] / 2**20:.1f} MiB ({metrics['peak_memory_meter']})")
    print(f"  trainable parameters {metrics['trainable_parameters']:,d} "
          f"({metrics['trainable_percent']:.3f}% of the backbone's {metrics['backbone_parameters']:,d})")
    if metrics.get("backbone_device_map"):
        from readapt.offload import describe_device_map

        print(f"  backbone placement (device-map entries per device): {describe_device_map(metrics['backbone_device_map'])}")
    cache = metrics.get("feature_cache")
    if cache:
        print(f"  feature cache: {cache['bytes'] / 1e6:.1f} MB {cache['dtype']} in {cache['directory']} "
              f"({'reused' if cache['reused'] else 'built'} in {cache['build_seconds']:.1f} s)")
    print(f"  output: {config.output_dir}")


def _run_eval(args) -> None:
    from readapt.io import atomic_write_json
    from readapt.training import evaluate_adapter

    results = evaluate_adapter(_data_config(args), args.model, args.adapter, batch_size=args.batch_size,
                               max_length=args.max_length, progress=not args.no_progress, cpu=args.cpu)
    print(json.dumps(results, indent=2))
    if args.output:
        atomic_write_json(args.output, results)


def _run_predict(args) -> None:
    from readapt.inference import run_predict

    summary = run_predict(args.adapter, args.input, output=args.output, model=args.model, names=args.name or None,
                          batch_size=args.batch_size, cpu=args.cpu, progress=not args.no_progress)
    passes = len(summary["groups"])
    print(f"readapt predict: {summary['rows']} rows, {len(summary['adapters'])} adapter(s) "
          f"({', '.join(summary['adapters'])}), {passes} backbone pass(es) per batch, {summary['batches']} batch(es), "
          f"{summary['predict_seconds']:.1f} s on {summary['device']}" + (f"; wrote {summary['output']}" if summary["output"] else ""),
          file=sys.stderr)


def _comma_list(text: str, name: str, convert=str) -> list:
    try:
        return [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ReadaptError(f"--{name}={text!r}: expected a comma-separated list") from None


def _run_bench(args) -> None:
    from readapt.comparison.report import write_reports
    from readapt.comparison.runner import BenchConfig, run_bench

    learning_rates, method_options = {}, {}
    for item in args.lr:
        method, sep, value = item.partition("=")
        try:
            learning_rates[method.strip()] = float(value)
        except ValueError:
            raise ReadaptError(f"--lr {item!r}: expected METHOD=VALUE, e.g. read=1e-3") from None
        if not sep or not learning_rates[method.strip()] > 0:
            raise ReadaptError(f"--lr {item!r}: expected METHOD=VALUE with a positive value")
    for item in args.method_option:
        target, sep, value = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot:
            raise ReadaptError(f"--method-option {item!r}: expected METHOD.KEY=VALUE, e.g. lora.r=16")
        try:
            method_options.setdefault(method, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            method_options.setdefault(method, {})[key] = value
    method_epochs = {}
    for item in args.method_epochs:
        method, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ReadaptError(f"--method-epochs {item!r}: expected METHOD=N, e.g. read=10")
        method_epochs[method.strip()] = int(value)
    config = BenchConfig(
        output_dir=args.output_dir, method_epochs=method_epochs, selection_fraction=args.selection_fraction,
        cache_features=args.cache_features, cache_dir=args.cache_dir, tasks=_comma_list(args.tasks, "tasks"), methods=_comma_list(args.methods, "methods"),
        seeds=_comma_list(args.seeds, "seeds", int), baseline_seeds=args.baseline_seeds, model=args.model,
        data_dir=args.data_dir, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, learning_rates=learning_rates,
        method_options=method_options, memory_batch_sizes=_comma_list(args.memory_batch_sizes, "memory-batch-sizes", int),
        jobs=args.jobs, threads_per_job=args.threads_per_job, cpu=args.cpu,
    )
    for method in learning_rates:
        if method not in config.methods:
            raise ReadaptError(f"--lr names method {method!r}, which is not in --methods")
    records = run_bench(config, progress=not args.no_progress)
    written = write_reports(Path(args.output_dir))  # notes: stored in bench_config.json
    failed = [r for r in records if r.get("status") != "ok"]
    print(f"readapt bench: {len(records) - len(failed)} of {len(records)} measurements ok; "
          f"reports: {', '.join(str(p) for p in written.values())}")
    for record in failed:
        print(f"  failed: {record.get('task', 'memory')}/{record['method']}/{record.get('seed', record.get('batch_size'))}: "
              f"{record.get('error')}", file=sys.stderr)
    if failed:
        raise ReadaptError(f"{len(failed)} measurement(s) failed; re-run the same command to retry them")


def _launch_processes(args, argv: list[str]) -> int:
    """`readapt train --num-processes N`: the same command in N processes under Accelerate's launcher (torchrun
    underneath); each process then finds its rank in the environment. Returns the launcher's exit status."""
    import subprocess

    from readapt.training import load_task_data

    config = _train_config(args)  # bad settings or data: one line here, before any process starts
    config.validate()
    load_task_data(config.data, config.seed)
    rest, skip = [], False
    for item in argv:  # the command without --num-processes
        if skip:
            skip = False
        elif item == "--num-processes":
            skip = True
        elif not item.startswith("--num-processes="):
            rest.append(item)
    # --multi_gpu picks Accelerate's torchrun launcher; without a GPU (or with --cpu) each process runs
    # Accelerate's multi-CPU mode with the gloo backend.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.num_processes), "--num_machines", "1", "--mixed_precision", args.mixed_precision,
               "--dynamo_backend", "no", "-m", "readapt", *rest]
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # bad arguments (message already printed) or --help: a status, also in-process
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.debug:
        # transformers' own warnings (newly initialised heads etc.) go to the log, not the terminal
        logging.getLogger("transformers").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # e.g. "Loading weights"
    try:
        if args.command == "train" and args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
            return _launch_processes(args, argv)
        if args.command == "train":
            _run_train(args)
        elif args.command == "bench":
            _run_bench(args)
        elif args.command == "predict":
            _run_predict(args)
        else:
            _run_eval(args)
    except TrainingInterrupted as exc:
        print(f"readapt: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ReadaptError as exc:
        if args.debug:
            raise
        print(f"readapt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("readapt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
