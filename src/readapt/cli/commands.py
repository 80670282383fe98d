"""What each `readapt` command does with its parsed arguments: a thin face over the API (readapt.recipe,
readapt.inference, readapt.comparison, readapt.serving)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from readapt.cli.flags import given_values
from readapt.cli.parser import METHOD_FLAGS
from readapt.errors import ConfigError, ReadaptError
from readapt.recipe.config import DataConfig, TrainingConfig
from readapt.settings import GenerationSettings


def method_options_from_args(args) -> dict:
    """The chosen method's options from the command line; a flag of another method is an error."""
    options = {}
    for flag, (method, option, _help) in METHOD_FLAGS.items():
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


def data_config_from_args(args) -> DataConfig:
    flags = getattr(args, "train_flags", None)
    return DataConfig(**given_values(args, flags.data if flags is not None else args.data_flags))


def train_config_from_args(args) -> TrainingConfig:
    """The TrainingConfig of `readapt train ...`: every generated flag's value, the method's options, and the
    output directory named after the task and method unless given."""
    flags = args.train_flags
    read_options = given_values(args, flags.read)
    if read_options and args.method != "read":
        raise ReadaptError(f"READ options ({', '.join(sorted(read_options))}) apply to --method read, not {args.method}")
    cache_flags = {"--cache-dir": args.cache_dir, "--cache-dtype": args.cache_dtype, "--cache-max-gb": args.cache_max_gb}
    given_cache_flags = [flag for flag, value in cache_flags.items() if value is not None]
    if given_cache_flags and args.cache_features is False:
        raise ReadaptError(f"{', '.join(given_cache_flags)} apply only with the feature cache (not --no-cache-features)")
    values = given_values(args, flags.training)
    values.setdefault("output_dir", os.path.join("runs", f"{args.task or 'custom'}-{args.method}"))
    return TrainingConfig(data=data_config_from_args(args), method_options={**read_options, **method_options_from_args(args)},
                          generation=GenerationSettings(**given_values(args, flags.generation)), **values)


def run_train(args) -> None:
    from readapt.recipe import launched_processes, train

    config = train_config_from_args(args)
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


def run_eval(args) -> None:
    from readapt.io import atomic_write_json
    from readapt.recipe import evaluate_adapter

    results = evaluate_adapter(data_config_from_args(args), args.model, args.adapter, batch_size=args.batch_size,
                               max_length=args.max_length, progress=args.progress, cpu=args.cpu)
    print(json.dumps(results, indent=2))
    if args.output:
        atomic_write_json(args.output, results)


def run_predict(args) -> None:
    from readapt.inference import run_predict

    summary = run_predict(args.adapter, args.input, output=args.output, model=args.model, names=args.name or None,
                          batch_size=args.batch_size, cpu=args.cpu, progress=args.progress, task=args.task,
                          text_columns=args.text_columns, max_length=args.max_length)
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


def run_bench(args) -> None:
    from readapt.comparison.report import write_reports
    from readapt.comparison.runner import BenchConfig
    from readapt.comparison.runner import run_bench as run_matrix

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
        decoder_head=args.decoder_head,
        data_dir=args.data_dir, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, learning_rates=learning_rates,
        method_options=method_options, memory_batch_sizes=_comma_list(args.memory_batch_sizes, "memory-batch-sizes", int),
        jobs=args.jobs, threads_per_job=args.threads_per_job, cpu=args.cpu,
    )
    for method in learning_rates:
        if method not in config.methods:
            raise ReadaptError(f"--lr names method {method!r}, which is not in --methods")
    records = run_matrix(config, progress=args.progress)
    written = write_reports(Path(args.output_dir))  # notes: stored in bench_config.json
    failed = [r for r in records if r.get("status") != "ok"]
    print(f"readapt bench: {len(records) - len(failed)} of {len(records)} measurements ok; "
          f"reports: {', '.join(str(p) for p in written.values())}")
    for record in failed:
        print(f"  failed: {record.get('task', 'memory')}/{record['method']}/{record.get('seed', record.get('batch_size'))}: "
              f"{record.get('error')}", file=sys.stderr)
    if failed:
        raise ReadaptError(f"{len(failed)} measurement(s) failed; re-run the same command to retry them")


def launch_processes(args, argv: list[str]) -> int:
    """`readapt train --num-processes N`: the same command in N processes under Accelerate's launcher (torchrun
    underneath); each process then finds its rank in the environment. Returns the launcher's exit status."""
    import subprocess

    from readapt.recipe import load_task_data

    config = train_config_from_args(args)  # bad settings or data: one line here, before any process starts
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
