"""The server's limits and batching settings (no heavy imports: the CLI reads the defaults for its --help)."""

from __future__ import annotations

from dataclasses import dataclass

from readapt.errors import ConfigError


@dataclass(frozen=True)
class ServeSettings:
    batch_window_ms: float = 5.0  # how long the oldest waiting request waits for others to share its pass
    max_batch_rows: int = 64  # rows in one model call
    max_request_rows: int = 64  # rows in one request (at most max_batch_rows)
    max_body_bytes: int = 1 << 20
    queue_limit: int = 256  # requests waiting for the model; one more gets a 503
    threads: int | None = None  # torch CPU threads of the model's worker thread (None: torch's default)

    def check(self) -> None:
        for name in ("max_batch_rows", "max_request_rows", "max_body_bytes", "queue_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range; it must be >= 1")
        if self.batch_window_ms < 0:
            raise ConfigError(f"--batch-window-ms={self.batch_window_ms} is out of range; it must be >= 0")
        if self.max_request_rows > self.max_batch_rows:
            raise ConfigError(f"--max-request-rows={self.max_request_rows} exceeds --max-batch-rows="
                              f"{self.max_batch_rows}; a request must fit in one batch")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads={self.threads} is out of range; it must be >= 1")
