"""Reading dataset rows one at a time: JSON arrays (parsed incrementally), JSONL, parquet in row batches.

LLaVA's mix665k is a 1 GB JSON array; `json.load` would hold all of it as Python objects (several GB)
before the first sample is written, so top-level arrays are decoded element by element instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

CHUNK_CHARS = 1 << 20  # characters read per refill of the JSON array buffer
_WHITESPACE = " \t\n\r"
_NUMBER_CHARS = "0123456789.eE+-"


class BadLine(str):
    """A JSONL line that did not parse; `stream_records` skips it as a malformed record."""


def read_json_rows(path: Path) -> Iterator[Any]:
    """Rows of a JSON array file (streamed) or of a JSONL file (`.jsonl`, or a `.json` holding one object per line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
        return
    with path.open(encoding="utf-8-sig") as f:
        first = _first_char(f)
        f.seek(0)
        if first == "[":
            yield from iter_json_array(f, name=str(path))
            return
    if first == "{" and _first_line_is_object(path):
        yield from _read_jsonl(path)  # JSONL saved under a .json name
        return
    if first == "{":
        raise ValueError(f"{path}: holds one JSON object, expected an array of records or JSONL")
    raise ValueError(f"{path}: expected a JSON array of records or JSONL, file starts with {first!r}")


def _first_line_is_object(path: Path) -> bool:
    with path.open(encoding="utf-8-sig") as f:
        line = next((line for line in f if line.strip()), "")
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _first_char(f: IO[str]) -> str:
    while True:
        char = f.read(1)
        if char == "" or char not in _WHITESPACE + "\ufeff":
            return char


def iter_json_array(f: IO[str], name: str = "<json>", chunk_chars: int = CHUNK_CHARS) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array without decoding the whole file at once."""
    return iter(_ArrayReader(f, name, chunk_chars))


class _ArrayReader:
    """A refillable text buffer over `f`; `raw_decode` takes one element at a time from it."""

    def __init__(self, f: IO[str], name: str, chunk_chars: int) -> None:
        self.f, self.name, self.chunk_chars = f, name, chunk_chars
        self.buffer, self.position, self.eof = "", 0, False
        self.decoder = json.JSONDecoder()

    def refill(self) -> bool:
        """Drop what was consumed, append the next chunk; False at end of file."""
        if self.eof:
            return False
        chunk = self.f.read(self.chunk_chars)
        self.buffer, self.position, self.eof = self.buffer[self.position:] + chunk, 0, chunk == ""
        return not self.eof

    def peek(self) -> str:
        """The next non-whitespace character ("" at end of file), without consuming it."""
        while True:
            while self.position < len(self.buffer) and self.buffer[self.position] in _WHITESPACE + "\ufeff":
                self.position += 1
            if self.position < len(self.buffer):
                return self.buffer[self.position]
            if not self.refill():
                return ""

    def value(self) -> Any:
        self.peek()  # raw_decode does not skip leading whitespace
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.position)
            except json.JSONDecodeError as err:
                if self.refill():
                    continue  # the element is cut off by the buffer end
                raise ValueError(f"{self.name}: invalid JSON ({err.msg})") from err
            if self._maybe_cut(value, end) and self.refill():
                continue  # a number at the buffer end ("1", "1.", "1e-") may go on: decode again
            self.position = end
            return value

    def _maybe_cut(self, value: Any, end: int) -> bool:
        if end == len(self.buffer):
            return True
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return is_number and not self.buffer[end:].strip(_NUMBER_CHARS)

    def __iter__(self) -> Iterator[Any]:
        if self.peek() != "[":
            raise ValueError(f"{self.name}: expected a JSON array")
        self.position += 1
        if self.peek() == "]":
            return
        while True:
            yield self.value()
            separator = self.peek()
            if separator == "]":
                return
            if separator != ",":
                found = repr(separator) if separator else "end of file (truncated?)"
                raise ValueError(f"{self.name}: expected ',' or ']' after an array element, found {found}")
            self.position += 1


def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                yield BadLine(f"{path.name} line {line_number}: invalid JSON ({err.msg})")


def parquet_files(path: Path) -> list[Path]:
    """The parquet file itself, or the sorted `*.parquet` files of a folder (datasets ship shards)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet files under {path}")
        return files
    return [path]


def read_parquet_rows(path: Path, batch_size: int = 64) -> Iterator[dict]:
    """Rows of one or more parquet files as dicts, read in small batches (image bytes stay on disk)."""
    import pyarrow.parquet as pq  # deferred: only parquet inputs need it

    for file in parquet_files(path):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


def read_rows(path: Path) -> Iterator[Any]:
    """Parquet (file or folder), JSONL or JSON rows, chosen by suffix."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return read_parquet_rows(path)
    return read_json_rows(path)
