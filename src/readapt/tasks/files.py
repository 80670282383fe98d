"""Shared helpers for reading task files: plain or gzip, strict UTF-8, one-line error messages."""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from readapt.errors import DataError

_UTF8_BOM = b"\xef\xbb\xbf"
# Longest cell value quoted in an error message, so that the message stays one readable line.
_MAX_QUOTED_CHARS = 60


def quote_value(value: object) -> str:
    """repr() of a cell value for an error message: escapes tabs/newlines, shortens long text."""
    text = str(value)
    if len(text) > _MAX_QUOTED_CHARS:
        text = text[: _MAX_QUOTED_CHARS - 3] + "..."
    return repr(text)


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) with the line ending removed.

    The file is read as bytes and split on "\\n" only, so a stray "\\r" inside a text cell does not
    split a row; a "\\r\\n" ending is removed. A leading UTF-8 BOM (MRPC has one) is dropped.
    Gzip is used when the name ends in ".gz". Invalid UTF-8 raises a DataError naming the line.
    """
    for line_number, line in read_raw_lines(path):
        yield line_number, line.removesuffix("\n").removesuffix("\r")


def read_raw_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Like `read_lines` but keeps the line ending (the csv module needs it for quoted newlines)."""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as stream:
            for line_number, raw_line in enumerate(stream, start=1):
                if line_number == 1 and raw_line.startswith(_UTF8_BOM):
                    raw_line = raw_line[len(_UTF8_BOM) :]
                yield line_number, _decode(raw_line, path, line_number)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a valid gzip file ({error})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from None


def _decode(raw_line: bytes, path: Path, line_number: int) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_byte = raw_line[error.start]
        raise DataError(
            f"{path}, line {line_number}: byte 0x{bad_byte:02x} at byte {error.start + 1} of the line "
            f"is not valid UTF-8; expected a UTF-8 text file"
        ) from None


def delimiter_hint(path: Path, columns: tuple[str, ...]) -> str:
    """A header read as one column that holds another delimiter: say which delimiter the file needs."""
    if len(columns) != 1:
        return ""
    for mark, name in ((";", "';'"), ("\t", "tabs"), (",", "commas"), ("|", "'|'")):
        if mark in columns[0]:
            wanted = "tabs" if ".tsv" in path.name else "commas"
            return f" (the header looks delimited by {name}; a {path.name} file here must use {wanted})"
    return ""


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file; invalid JSON or a non-object is a
    one-line DataError naming the line."""
    for line_number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {line_number}, character {error.colno}: invalid JSON ({error.msg}); "
                            "expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
        yield line_number, record


def delimited_records(path: Path, file_format: str) -> tuple[int, tuple[str, ...], Iterator[tuple[int, list[str]]]]:
    """A CSV (standard quoting) or TSV (tabs, no quoting) file with a header line: (header line number, column
    names, iterator of (line number, cells) for each non-blank record)."""
    if file_format == ".csv":
        # csv needs the line endings to keep quoted newlines; `line_num` counts physical lines.
        reader = csv.reader((line for _, line in read_raw_lines(path)), strict=True)
        records = _csv_records(reader, path)
    else:
        records = ((number, line.split("\t")) for number, line in read_lines(path) if line.strip())
    header = next(records, None)
    if header is None:
        raise DataError(f"{path}: the file is empty; expected a header line naming the columns")
    return header[0], tuple(name.strip() for name in header[1]), records


def _csv_records(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line of the record, cells) for each non-blank CSV record."""
    lines_read = 0
    try:
        for cells in reader:
            first_line, lines_read = lines_read + 1, reader.line_num
            if any(cell.strip() for cell in cells):
                yield first_line, cells
    except csv.Error as error:
        raise DataError(f"{path}, line {lines_read + 1}: malformed CSV ({error})") from None
