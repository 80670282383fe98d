"""Errors readapt raises for bad input. The CLI prints them as one line and exits non-zero."""


class ReadaptError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in readapt."""


class ConfigError(ReadaptError, ValueError):
    """A configuration value is invalid (names the field and what is allowed)."""


class UnsupportedModelError(ReadaptError, ValueError):
    """The backbone is not one of the supported transformer families."""


class IncompatibleAdapterError(ReadaptError, ValueError):
    """A saved adapter does not fit the backbone it is being loaded into."""


class DataError(ReadaptError, ValueError):
    """Task data is missing, malformed or inconsistent with the task definition."""


class TrainingError(ReadaptError):
    """Training cannot go on (the loss became NaN, the disk is full); the last good checkpoint is kept."""


class TrainingInterrupted(ReadaptError):
    """SIGINT / SIGTERM: the run stopped at a step boundary after writing a checkpoint."""
