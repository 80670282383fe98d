"""`readapt serve`: the command's flags and its run (load the adapters, listen, serve until SIGTERM / SIGINT).

`add_serve_arguments(parser)` adds the flags to an argparse parser (the CLI's `serve` subcommand, or
`python -m readapt.serving`); `serve_command(args)` runs it and returns the exit status. Bad settings, adapters
or an address in use raise readapt's errors (one line, before the model loads where they can).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable

import uvicorn

from readapt.cli.flags import add_adapter_arguments
from readapt.errors import ConfigError
from readapt.serving.settings import ServeSettings

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (any free port) to 65535, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeSettings()
    add_adapter_arguments(parser, "a READ adapter folder with its task.json (e.g. runs/sst2/adapter); repeatable",
                          "answer key")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000; 0: any free port)")
    parser.add_argument("--batch-window-ms", type=_non_negative_float, default=defaults.batch_window_ms,
                        help="how long a request waits for others to share its backbone pass (default %(default)s)")
    parser.add_argument("--max-batch-rows", type=_positive_int, default=defaults.max_batch_rows,
                        help="rows in one backbone pass (default %(default)s)")
    parser.add_argument("--max-request-rows", type=_positive_int, default=defaults.max_request_rows,
                        help="rows in one request, at most --max-batch-rows (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=defaults.max_body_bytes,
                        help="longest request body; longer gets a 413 (default %(default)s)")
    parser.add_argument("--queue-limit", type=_positive_int, default=defaults.queue_limit,
                        help="requests waiting for the model; one more gets a 503 (default %(default)s)")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads for the model (default: torch's)")
    parser.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                        help="on SIGTERM / SIGINT, seconds to let in-flight requests finish (default %(default)s)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="uvicorn's log level; 'info' logs every request (default %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket for host:port (port 0: a free one), so that a busy address fails before the model loads."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r}: not an address this machine can listen on ({exc.strerror})") from None
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def serve_command(args: argparse.Namespace) -> int:
    """Run `readapt serve` with parsed flags; returns 0 after a graceful shutdown (SIGTERM / SIGINT)."""
    import torch

    from readapt.inference import Predictor
    from readapt.serving.app import create_app

    settings = ServeSettings(batch_window_ms=args.batch_window_ms, max_batch_rows=args.max_batch_rows,
                             max_request_rows=args.max_request_rows, max_body_bytes=args.max_body_bytes,
                             queue_limit=args.queue_limit, threads=args.threads)
    settings.check()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sock = listening_socket(args.host, args.port)
    try:
        if not args.debug:
            from transformers.utils import logging as transformers_logging

            logging.getLogger("transformers").setLevel(logging.ERROR)
            transformers_logging.disable_progress_bar()  # "Loading weights" bars do not belong in a server log
        predictor = Predictor(args.adapter, model=args.model, names=args.name or None, cpu=args.cpu)
        app = create_app(predictor, settings)
        host, port = sock.getsockname()[:2]
        address = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        announce = (f"readapt serve: {len(predictor.names)} adapter(s) ({', '.join(predictor.names)}) on "
                    f"{predictor.source}, {len(predictor.groups)} backbone pass(es) per batch, {predictor.device}; "
                    f"listening on {address}")
        config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("info", "debug"),
                                timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on")
        server = AnnouncingServer(config, lambda: print(announce, file=sys.stderr, flush=True))
        with _exit_quietly_after_signals():
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ConfigError("the server did not start (see the log above)")
    print("readapt serve: stopped", file=sys.stderr, flush=True)
    return 0


class AnnouncingServer(uvicorn.Server):
    """uvicorn.Server that calls `on_started` once it accepts connections (the address line a client waits for)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()


@contextlib.contextmanager
def _exit_quietly_after_signals():
    """uvicorn shuts down gracefully on SIGTERM / SIGINT, then re-raises the signal to the handler it found;
    the one installed here ignores that second delivery, so the command returns status 0 instead of dying by
    the signal."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
