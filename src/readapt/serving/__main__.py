"""`python -m readapt.serving --adapter DIR ...`: `readapt serve` without the CLI (same flags, same errors)."""

from __future__ import annotations

import argparse
import os
import sys

from readapt.errors import ReadaptError
from readapt.serving.command import add_serve_arguments, serve_command

EXIT_BAD_INPUT = 2  # as the readapt CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readapt.serving",
                                     description="serve READ adapters over HTTP, one backbone pass per batch")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return serve_command(args)
    except ReadaptError as exc:
        if args.debug:
            raise
        print(f"readapt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
