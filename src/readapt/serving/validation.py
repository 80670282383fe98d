"""A `POST /predict` body, checked before it joins a batch: a bad request gets its own 4xx and never reaches the
model, so it cannot disturb the requests it would have shared a backbone pass with.

Body: {"inputs": [{<column>: <text>, ...}, ...], "adapters": [<name>, ...], "scores": true}; `adapters`
(default: every loaded adapter) and `scores` (default false) are optional.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FIELDS = ("inputs", "adapters", "scores")


class RequestError(Exception):
    """A request the server refuses: HTTP status and the one-line message of its {"error": ...} body."""

    def __init__(self, status_code: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class PredictRequest:
    """A checked request: every row holds (as strings) the columns its adapters read, and only those."""

    rows: list[dict[str, str]]
    adapters: tuple[str, ...]  # in the order the answer lists them
    scores: bool = False


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({json.dumps(value)})"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def parse_predict_request(body: bytes, columns: Mapping[str, Sequence[str]], max_rows: int) -> PredictRequest:
    """Check a body against the loaded adapters (`columns`: adapter name -> the input columns it reads, in
    load order); raises RequestError (400, or 413 for too many rows) naming the first problem."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc}); expected "
                                '{"inputs": [{"<column>": "<text>", ...}, ...]}') from None
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON (nested too deeply)") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f'the body must be a JSON object {{"inputs": [...]}}, got {_kind(payload)}')
    unknown = [key for key in payload if key not in FIELDS]
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(repr(k) for k in unknown)}; "
                                f"the fields are {', '.join(FIELDS)}")
    if "inputs" not in payload:
        raise RequestError(400, 'missing "inputs": a list of rows, each an object {"<column>": "<text>", ...}')
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise RequestError(400, f'"inputs" must be a list of rows, got {_kind(inputs)}')
    if not inputs:
        raise RequestError(400, '"inputs" is empty; send at least one row')
    if len(inputs) > max_rows:
        raise RequestError(413, f'"inputs" has {len(inputs)} rows; this server takes at most {max_rows} per request '
                                "(split them over several requests)")
    adapters = _adapters(payload.get("adapters"), columns)
    scores = payload.get("scores", False)
    if not isinstance(scores, bool):
        raise RequestError(400, f'"scores" must be true or false, got {_kind(scores)}')

    needed: dict[str, str] = {}  # column -> the first requested adapter that reads it
    for name in adapters:
        for column in columns[name]:
            needed.setdefault(column, name)
    rows = []
    for index, row in enumerate(inputs):
        if not isinstance(row, dict):
            raise RequestError(400, f'inputs[{index}] must be an object {{"<column>": "<text>", ...}}, '
                                    f"got {_kind(row)}")
        for column, name in needed.items():
            if column not in row:
                found = ", ".join(repr(c) for c in row) or "none"
                raise RequestError(400, f"inputs[{index}]: no column {column!r}, needed by adapter {name!r} "
                                        f"(reads {', '.join(columns[name])}); the row's columns are {found}")
            if not isinstance(row[column], str):
                raise RequestError(400, f"inputs[{index}][{column!r}] must be a string, got {_kind(row[column])}")
        rows.append({column: row[column] for column in needed})
    return PredictRequest(rows, adapters, scores)


def _adapters(requested: Any, columns: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    if requested is None:
        return tuple(columns)
    if not isinstance(requested, list):
        raise RequestError(400, f'"adapters" must be a list of adapter names (or left out for all), got {_kind(requested)}')
    if not requested:
        raise RequestError(400, '"adapters" is empty; name at least one adapter, or leave it out for all')
    for index, name in enumerate(requested):
        if not isinstance(name, str):
            raise RequestError(400, f'adapters[{index}] must be an adapter name (a string), got {_kind(name)}')
    unknown = [name for name in requested if name not in columns]
    if unknown:
        raise RequestError(400, f"unknown adapter(s) {', '.join(repr(n) for n in unknown)}; "
                                f"this server has {', '.join(repr(n) for n in columns)}")
    return tuple(dict.fromkeys(requested))  # a name given twice is answered once
