"""Corpus files as lazy streams of texts: txt paragraphs, JSON lines, CSV and Parquet.

Each reader yields one text per record and never holds the file whole (Parquet is read
one row group at a time). Bytes that are not UTF-8 are kept as surrogate escapes, so
the profile skips that one text as "not UTF-8" instead of failing the file. A record whose text field is missing or not a string yields
None, which attnjax.profile skips and reports by its index, so a bad line costs that
line only. ``CorpusError`` is the one error for input the command cannot use at all
(missing file, unknown format, no such column, unreadable file).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterator, Optional

FORMATS = ("txt", "jsonl", "csv", "parquet")
SUFFIXES = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class CorpusError(ValueError):
    """The corpus file cannot be read as asked; the message says what to do."""


def corpus_format(path: Path, format: Optional[str]) -> str:
    if format is not None:
        if format not in FORMATS:
            raise CorpusError(f"--format {format} is not one of {', '.join(FORMATS)}.")
        return format
    return SUFFIXES.get(path.suffix.lower(), "txt")


def check_corpus(path: Path, format: str, column: str) -> Optional[int]:
    """Fail before any model work if the file cannot be read; returns the number of
    records when it is cheap to know (Parquet metadata), else None."""
    if not path.exists():
        raise CorpusError(f"{path}: no such file.")
    if path.is_dir():
        raise CorpusError(f"{path} is a directory; give a corpus file.")
    if format == "parquet":
        parquet = _pyarrow_parquet()
        try:
            handle = parquet.ParquetFile(path)
        except Exception as error:  # pyarrow raises its own ArrowInvalid for non-Parquet bytes
            raise CorpusError(f"{path} cannot be read as Parquet ({error}).") from None
        if column not in handle.schema_arrow.names:
            raise CorpusError(f"{path} has no column {column!r} (columns: {', '.join(handle.schema_arrow.names)}); "
                              "pass --column NAME.")
        return handle.metadata.num_rows
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is not UTF-8 text.") from None
    if format == "csv":
        header = next(csv.reader([first]), [])
        if column not in header:
            raise CorpusError(f"{path} has no column {column!r} in its header ({', '.join(header) or 'empty'}); "
                              "pass --column NAME.")
    elif format == "jsonl" and first.strip():
        try:
            record = json.loads(first)
        except json.JSONDecodeError as error:
            raise CorpusError(f"{path} line 1 is not JSON ({error.msg}); give one JSON object per line.") from None
        if not isinstance(record, dict) or column not in record:
            raise CorpusError(f"{path} line 1 has no field {column!r}; pass --column NAME.")
    return None


def read_corpus(path: Path, format: str, column: str = "text") -> Iterator[Optional[str]]:
    """The texts of ``path``, one per record (None for a record without a usable text)."""
    if format == "txt":
        return _paragraphs(path)
    if format == "jsonl":
        return _json_lines(path, column)
    if format == "csv":
        return _csv_rows(path, column)
    return _parquet_rows(path, column)


def _paragraphs(path: Path) -> Iterator[str]:
    """Blank-line separated paragraphs with their lines joined (a paragraph's number in
    the file is its index + 1)."""
    current = []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            if line.strip():
                current.append(line.strip())
            elif current:
                yield " ".join(current)
                current = []
    if current:
        yield " ".join(current)


def _json_lines(path: Path, column: str) -> Iterator[Optional[str]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield None
                continue
            yield record.get(column) if isinstance(record, dict) else None


def _csv_rows(path: Path, column: str) -> Iterator[Optional[str]]:
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # long documents in one cell
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        for row in csv.DictReader(handle):
            yield row.get(column)


def _parquet_rows(path: Path, column: str) -> Iterator[Optional[str]]:
    parquet = _pyarrow_parquet()
    handle = parquet.ParquetFile(path)
    for group in range(handle.num_row_groups):
        for value in handle.read_row_group(group, columns=[column]).column(0).to_pylist():
            yield value


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise CorpusError("Parquet needs pyarrow, which attnjax does not install: pip install pyarrow") from None
    return parquet


def write_table(frame, path: Path) -> None:
    """heads.csv or heads.parquet (by suffix)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        _pyarrow_parquet()
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
