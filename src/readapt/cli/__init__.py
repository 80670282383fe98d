"""`readapt` command line: a thin face over the API (parser: readapt.cli.parser, flags generated from the config
dataclasses by readapt.cli.flags; what each command does: readapt.cli.commands).

Bad input prints one line on stderr and exits with status 2 (no traceback unless --debug).
"""

from __future__ import annotations

import logging
import os
import sys

from readapt.cli.commands import (
    launch_processes,
    run_bench,
    run_eval,
    run_predict,
    run_train,
    train_config_from_args,
)
from readapt.cli.parser import EXIT_BAD_INPUT, METHOD_NAMES, build_parser
from readapt.errors import ReadaptError, TrainingInterrupted

EXIT_INTERRUPTED = 130
__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "METHOD_NAMES", "build_parser", "main", "train_config_from_args"]


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
    if not getattr(args, "progress", True):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # e.g. "Loading weights"
    try:
        if args.command == "train" and args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
            return launch_processes(args, argv)
        if args.command == "train":
            run_train(args)
        elif args.command == "bench":
            run_bench(args)
        elif args.command == "predict":
            run_predict(args)
        elif args.command == "serve":
            from readapt.serving.command import serve_command

            return serve_command(args)
        else:
            run_eval(args)
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
