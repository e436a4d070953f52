"""Read uploaded files (JSONL, JSON, CSV, Parquet) into numbered rows, as a stream with bounded memory.

Rows are numbered for error messages: JSONL by line, the others by record (1-based). Every reader holds
at most one row at a time and enforces ``Limits`` while it reads, so neither the file's size nor its row
count decides how much memory parsing it takes:

- rows: more than ``max_rows`` is refused (Parquet from its footer, before any data is read; JSONL by a
  quick line count, before any row is parsed);
- bytes per row: a JSONL line, a JSON array element or a CSV record longer than ``max_row_bytes`` is
  refused before it is parsed (lines are read with a length limit, so a file without newlines is never
  read whole; a JSON element is read only while it is incomplete); a Parquet row is measured in Arrow
  before it becomes Python objects;
- bytes per cell: a string value longer than ``max_cell_bytes`` (UTF-8) is refused, naming its field;
- nesting: a JSONL line deeper than ``max_json_depth`` is refused before it is parsed (counted without
  recursion); a JSON element once parsed (Python's own ``RecursionError`` is caught for deeper ones); a
  Parquet schema from the footer.

Parquet is decoded in a child process with a memory cap (see ``_parquet``), since its decoded size is not
bounded by the file's.

Every problem is a ``DatasetInvalid`` naming the row, and the field where there is one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

FileKind = Literal["jsonl", "json", "csv", "parquet"]
EXTENSIONS: dict[str, FileKind] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
NumberedRow = tuple[int, dict[str, Any]]

SAFE_PARSE_DEPTH = 200  # text no deeper than this is parsed to name the field that is too deep
CHUNK = 1 << 16  # bytes (JSON: characters) read at a time where a reader is not reading by line
PARQUET_BATCH_BYTES = 32 << 20  # aim for record batches of about this much page data (from the footer)
PARQUET_BATCH_ROWS = (1, 4096)  # ...and between this few and this many rows
PARQUET_SLICE_BYTES = 8 << 20  # estimated JSON bytes turned into Python objects at a time


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based; for JSONL files, the line number
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row}: field '{self.field}': {self.message}"


class DatasetInvalid(ValueError):
    """Rows that cannot be stored, each named (``app.datasets.formats`` re-exports it). Defined here, not
    with the formats, so that the Parquet child process imports neither the models nor SQLAlchemy."""

    def __init__(self, errors: list[RowError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@dataclass(frozen=True)
class Limits:
    """What one upload may hold; the API fills it from ``ApiSettings`` (same names, same defaults)."""

    max_rows: int = 500_000
    max_row_bytes: int = 1 << 20
    max_cell_bytes: int = 256 << 10
    max_json_depth: int = 32
    max_dataset_bytes: int = 1 << 30
    parquet_memory_bytes: int = 512 << 20

    def too_many_rows(self, number: int, found: str = "") -> DatasetInvalid:
        where = f"the file has {found} rows, " if found else ""
        return _invalid(number, "*", f"{where}more than the {self.max_rows}-row limit (api.max_dataset_rows)")

    def row_too_large(self, number: int, size: str = "") -> DatasetInvalid:
        got = f" ({size} bytes)" if size else ""
        return _invalid(number, "*", f"larger than the {self.max_row_bytes}-byte row limit{got} (api.max_row_bytes)")

    def cell_too_large(self, number: int, field: str, size: int) -> DatasetInvalid:
        return _invalid(
            number, field, f"{size} bytes, more than the {self.max_cell_bytes}-byte cell limit (api.max_cell_bytes)"
        )

    def parquet_too_large(self, number: int) -> DatasetInvalid:
        return _invalid(
            number,
            "*",
            f"decoding this Parquet file takes more than {self.parquet_memory_bytes} bytes of memory "
            "(api.parquet_memory_bytes)",
        )

    def too_deep(self, number: int, field: str = "*") -> DatasetInvalid:
        return _invalid(number, field, f"nested deeper than {self.max_json_depth} levels (api.max_json_depth)")


def _invalid(number: int, field: str, message: str) -> DatasetInvalid:
    return DatasetInvalid([RowError(number, field, message)])


def sniff_kind(filename: str | None, head: bytes) -> FileKind:
    """File kind from the extension, else from the first bytes."""
    suffix = Path(filename or "").suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.lstrip()
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    return "csv"


def read_rows(path: Path, kind: FileKind, limits: Limits | None = None) -> Iterator[NumberedRow]:
    limits = limits or Limits()
    readers = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}
    for count, (number, row) in enumerate(readers[kind](path, limits), start=1):
        if count > limits.max_rows:
            raise limits.too_many_rows(number)
        yield number, row


def check_rows(rows: Iterable[Any], limits: Limits | None = None) -> Iterator[NumberedRow]:
    """Number rows that are already Python objects (an inline request body) and hold them to ``limits``."""
    limits = limits or Limits()
    for number, row in enumerate(rows, start=1):
        if number > limits.max_rows:
            raise limits.too_many_rows(number)
        _check_value(row, number, limits)
        yield number, row


# --- JSON text: depth without recursion, cells by walking --------------------------------------------

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_STRING_BYTES = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_INNERMOST = re.compile(r"\[\]|\{\}")
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_NOT_BRACKETS_BYTES = re.compile(rb"[^\[\]{}]+")


def _brackets(text: str | bytes) -> int:
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def json_depth(text: str | bytes, stop_above: int) -> int:
    """How deeply JSON text nests (``{}`` is 1), counted without recursion; stops once above ``stop_above``.

    Strings are blanked out first, so brackets inside them do not count. Each pass removes the innermost
    ``[]``/``{}`` pairs, so the passes needed to empty the brackets are the depth. Brackets that never pair
    up (the text is not valid JSON) count as that many levels, which is at least as deep as a parser
    would have to go before it finds the error.
    """
    if isinstance(text, bytes):
        only = _NOT_BRACKETS_BYTES.sub(b"", _JSON_STRING_BYTES.sub(b"", text)).decode("ascii")
    else:
        only = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    depth = 0
    while only and depth <= stop_above:
        shorter = _INNERMOST.sub("", only)  # one level per pass: the pairs innermost now, not those this makes
        if shorter == only:
            return min(depth + len(only), stop_above + 1)
        only, depth = shorter, depth + 1
    return depth if not only else stop_above + 1


def _check_depth(text: str | bytes, number: int, limits: Limits) -> None:
    """Before parsing: refuse text nested past the limit. Where it is shallow enough to parse safely,
    parse it anyway, to name the field that goes too deep."""
    if _brackets(text) <= limits.max_json_depth:
        return
    depth = json_depth(text, max(limits.max_json_depth, SAFE_PARSE_DEPTH))
    if depth <= limits.max_json_depth:
        return
    if depth <= SAFE_PARSE_DEPTH:
        try:
            value = json.loads(text)
        except (RecursionError, ValueError):
            raise limits.too_deep(number) from None
        _check_value(value, number, limits)  # raises, naming the field
    raise limits.too_deep(number)


def _check_value(value: Any, number: int, limits: Limits) -> None:
    """Walk a parsed row (no recursion): nesting within the depth limit, every string within the cell limit."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    quarter = limits.max_cell_bytes // 4  # a string of fewer characters cannot exceed the limit in UTF-8
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > quarter and len(item.encode("utf-8", "surrogatepass")) > limits.max_cell_bytes:
                raise limits.cell_too_large(number, where or "*", len(item.encode("utf-8", "surrogatepass")))
            _check_text(item, number, where)
        elif isinstance(item, dict | list):
            if depth > limits.max_json_depth:
                raise limits.too_deep(number, where.split(".")[0].split("[")[0] or "*")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str):
                    _check_text(key, number, f"{where}.{key!r}" if where else repr(key))
                if isinstance(child, str | dict | list):
                    path = f"{where}[{key}]" if isinstance(item, list) else (f"{where}.{key}" if where else str(key))
                    stack.append((child, path, depth + 1))


# Half of a surrogate pair (only a JSON "\\ud800" escape makes one; CSV and Parquet text is decoded UTF-8) has
# no UTF-8 form, so no tokenizer, response or database column can carry it.
_LONE_SURROGATE = re.compile("[\\ud800-\\udfff]")


def _check_text(text: str, number: int, where: str) -> None:
    found = _LONE_SURROGATE.search(text)
    if found:
        half = f"U+{ord(found.group()):04X}"
        raise _invalid(number, where or "*", f"must be valid Unicode text (holds {half}, half of a surrogate pair)")


def _parse_json(text: str | bytes, number: int, limits: Limits) -> Any:
    _check_depth(text, number, limits)
    try:
        value = json.loads(text)
    except RecursionError:  # unpaired brackets the count above let through; never a 500
        raise limits.too_deep(number) from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer of more than 4300 digits
        raise _invalid(number, "*", f"invalid JSON: {exc}") from None
    if len(text) > limits.max_cell_bytes // 4 or _brackets(text) > limits.max_json_depth or _escapes_unstorable(text):
        _check_value(value, number, limits)
    return value


# In JSON text a surrogate can only be written as a \u escape (raw ones are invalid UTF-8).
_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def _escapes_unstorable(text: str | bytes) -> bool:
    return bool(_ESCAPE_BYTES.search(text) if isinstance(text, bytes) else _ESCAPE.search(text))


# --- JSONL ---------------------------------------------------------------------------------------------


def _jsonl(path: Path, limits: Limits) -> Iterator[NumberedRow]:
    _refuse_too_many_lines(path, limits)
    with path.open("rb") as f:
        number = 0
        while raw := f.readline(limits.max_row_bytes + 2):
            number += 1
            line = raw.rstrip(b"\r\n")
            if len(line) > limits.max_row_bytes:
                raise limits.row_too_large(number)
            if line.strip():
                yield number, _parse_json(line, number, limits)


def _refuse_too_many_lines(path: Path, limits: Limits) -> None:
    """Refuse a JSONL file with too many rows before parsing any: counting newlines is cheap."""
    newlines = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            newlines += chunk.count(b"\n")
    if newlines < limits.max_rows:
        return
    rows = 0  # blank lines are not rows: count exactly, still without parsing
    with path.open("rb") as f:
        number = 0
        while raw := f.readline(limits.max_row_bytes + 2):
            number += 1
            if raw.strip():
                rows += 1
                if rows > limits.max_rows:
                    raise limits.too_many_rows(number)


# --- JSON (one array of rows, or {"data": [...]}) ------------------------------------------------------

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_TO_JSON = json.JSONEncoder(ensure_ascii=False).encode  # (json.dumps with options builds an encoder per call)


class _JsonStream:
    """A JSON document read a piece at a time; values are parsed one at a time with ``raw_decode``."""

    def __init__(self, f: io.TextIOBase, limits: Limits) -> None:
        self.f, self.limits = f, limits
        self.buf, self.pos, self.eof = "", 0, False

    def _fill(self, at_least: int = CHUNK) -> None:
        try:
            more = self.f.read(max(CHUNK, at_least))
        except UnicodeDecodeError as exc:
            raise _invalid(0, "*", f"JSON must be UTF-8: {exc}") from None
        self.buf = self.buf[self.pos :] + more
        self.pos = 0
        self.eof = not more

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            blank = _WHITESPACE.match(self.buf, self.pos)  # (always matches, perhaps nothing)
            self.pos = blank.end() if blank else self.pos
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self._fill()

    def expect(self, chars: str, number: int, what: str) -> str:
        found = self.peek()
        if not found or found not in chars:
            shown = repr(found) if found else "the end of the file"
            raise _invalid(number, "*", f"invalid JSON: expected {what}, found {shown}")
        self.pos += 1
        return found

    def value(self, number: int) -> Any:
        """Parse the next value, reading more of the file until it is complete or too large."""
        self.peek()
        while True:
            pending = len(self.buf) - self.pos
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number or literal may go on in the next piece
                    break
                error = "truncated"
            except RecursionError:
                raise self.limits.too_deep(number) from None
            except json.JSONDecodeError as exc:
                if exc.pos < len(self.buf) - 8 and not exc.msg.startswith("Unterminated string"):
                    raise _invalid(number, "*", f"invalid JSON: {exc.msg}") from None  # not for want of more text
                error = exc.msg  # (positions are within the piece read, not the file: left out)
            except ValueError as exc:  # an integer of more than 4300 digits
                raise _invalid(number, "*", f"invalid JSON: {exc}") from None
            if self.eof:
                raise _invalid(number, "*", f"invalid JSON: {error}")
            if pending > self.limits.max_row_bytes:
                raise self.limits.row_too_large(number)
            self._fill(at_least=pending)  # double what is pending: a large value is re-parsed a few times only
        text = self.buf[self.pos : end]
        self.pos = end
        if len(text) > self.limits.max_row_bytes:
            raise self.limits.row_too_large(number)
        # Parsed already (RecursionError above for what Python cannot): the walk measures depth and cells.
        if len(text) > self.limits.max_cell_bytes // 4 or _brackets(text) > self.limits.max_json_depth:
            _check_value(value, number, self.limits)
        return value

    def array(self) -> Iterator[NumberedRow]:
        """The elements of the array whose ``[`` was just read, numbered from 1."""
        number = 0
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            number += 1
            yield number, self.value(number)
            if self.expect(",]", number, f"',' or ']' after row {number}") == "]":
                return


def _json(path: Path, limits: Limits) -> Iterator[NumberedRow]:
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        stream = _JsonStream(f, limits)
        first = stream.peek()
        if first == "[":
            stream.pos += 1
            yield from stream.array()
        elif first == "{":
            stream.pos += 1
            found = yield from _data_member(stream)
            if not found:
                raise _invalid(0, "*", "a JSON file must hold a list of rows")
        else:
            raise _invalid(0, "*", "a JSON file must hold a list of rows")
        if stream.peek():
            raise _invalid(0, "*", "invalid JSON: extra data after the rows")


def _data_member(stream: _JsonStream) -> Generator[NumberedRow, None, bool]:
    """``{"data": [rows], ...}``: stream the rows of ``data``; other members must be small. Returns
    whether there was a ``data`` list."""
    found = False
    if stream.peek() == "}":
        stream.pos += 1
        return found
    while True:
        if stream.peek() != '"':
            raise _invalid(0, "*", "invalid JSON: expected a key in double quotes")
        key = stream.value(0)
        stream.expect(":", 0, "':' after a key")
        if key == "data" and stream.peek() == "[" and not found:
            stream.pos += 1
            found = True
            yield from stream.array()
        else:
            stream.value(0)
        if stream.expect(",}", 0, "',' or '}'") == "}":
            return found


# --- CSV -----------------------------------------------------------------------------------------------


class _RecordTooLarge(Exception):
    pass


class _NotUtf8(Exception):
    pass


def _csv(path: Path, limits: Limits) -> Iterator[NumberedRow]:
    # Process-wide, but every caller sets the same value: above the row limit, so a long cell is caught
    # below (naming its field) and a long record by the line budget, never as csv's bare "field larger
    # than field limit".
    csv.field_size_limit(max(limits.max_row_bytes, limits.max_cell_bytes) + 1)
    used = [0]  # bytes read for the record being parsed
    with path.open("rb") as f:

        def lines() -> Iterator[str]:
            first = True
            while raw := f.readline(limits.max_row_bytes + 2):
                used[0] += len(raw)
                if used[0] > limits.max_row_bytes + 2 or (len(raw) == limits.max_row_bytes + 2 and raw[-1:] != b"\n"):
                    raise _RecordTooLarge  # (csv would end a record at the end of a partial line)
                if first:
                    raw, first = raw.removeprefix(b"\xef\xbb\xbf"), False
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _NotUtf8(str(exc)) from None

        reader = csv.reader(lines())
        header = _next_record(reader, 0, limits)
        if header is None:
            return
        number = 0
        while True:
            used[0] = 0
            cells = _next_record(reader, number + 1, limits)
            if cells is None:
                return
            if not cells:
                continue  # a blank line is not a row (as csv.DictReader)
            number += 1
            # Empty cells are missing values, so "required" checks name the field.
            row = {k: v for k, v in dict(zip(header, cells, strict=False)).items() if v != ""}
            quarter = limits.max_cell_bytes // 4
            for key, value in row.items():
                if len(value) > quarter and (size := len(value.encode())) > limits.max_cell_bytes:
                    raise limits.cell_too_large(number, key, size)
            yield number, row


def _next_record(reader: Iterator[list[str]], number: int, limits: Limits) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except _RecordTooLarge:
        raise limits.row_too_large(number) from None
    except _NotUtf8 as exc:
        raise _invalid(number, "*", f"CSV must be UTF-8: {exc}") from None
    except csv.Error as exc:
        raise _invalid(number, "*", f"invalid CSV: {exc}") from None


# --- Parquet -------------------------------------------------------------------------------------------


def _parquet(path: Path, limits: Limits) -> Iterator[NumberedRow]:
    """Parquet is decoded in a child process whose data segment is capped (``RLIMIT_DATA``).

    A Parquet file says how big its values are only once they are decoded: one dictionary value can be
    repeated on every row, and a page can decompress to far more than the file holds. So the decoding
    (footer checks, record batches, measuring rows in Arrow) runs in ``parquet_child``, which streams the
    rows back as JSON lines on a pipe; whatever a file does, it costs this process one row at a time,
    and the child at most ``limits.parquet_memory_bytes`` before it is refused.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    command = [sys.executable, "-c", PARQUET_CHILD, str(path), json.dumps(asdict(limits))]
    number = 0
    with tempfile.TemporaryFile() as report:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=report, env=env)
        assert child.stdout is not None
        try:
            while line := child.stdout.readline(2 * limits.max_row_bytes + 2):
                number += 1
                if not line.endswith(b"\n"):
                    raise limits.row_too_large(number)
                yield number, json.loads(line)
            child.wait()
        finally:
            if child.poll() is None:  # the caller stopped early (a bad row): stop decoding
                child.kill()
                child.wait()
            child.stdout.close()
        if child.returncode != 0:
            report.seek(0)
            raise _child_failure(report.read()[-65536:], child.returncode, number + 1, limits)


PARQUET_CHILD = "from app.datasets.readers import parquet_child; parquet_child()"
_CHILD_ERRORS = b"studio-parquet-errors:"


def _child_failure(report: bytes, returncode: int, number: int, limits: Limits) -> DatasetInvalid:
    for line in reversed(report.splitlines()):
        if line.startswith(_CHILD_ERRORS):
            return DatasetInvalid([RowError(**e) for e in json.loads(line[len(_CHILD_ERRORS) :])])
    if returncode < 0:  # killed (the kernel's OOM killer, or an operator)
        return limits.parquet_too_large(number)
    tail = report.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {returncode}"]
    return _invalid(number, "*", f"unreadable Parquet file: {tail[0]}")


def parquet_child() -> None:
    """``python -c PARQUET_CHILD <path> <limits>``: rows as JSON lines on stdout; on a problem, the
    errors on stderr after ``_CHILD_ERRORS`` and exit status 3."""
    path, limits = Path(sys.argv[1]), Limits(**json.loads(sys.argv[2]))
    cap = limits.parquet_memory_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    out = sys.stdout.buffer
    number = 0
    try:
        for n, row in parquet_rows(path, limits):
            out.write(_TO_JSON(row).encode() + b"\n")
            number = n
        out.flush()
    except DatasetInvalid as exc:
        _child_exit(exc)
    except MemoryError:
        _child_exit(limits.parquet_too_large(number + 1))
    except BrokenPipeError:  # the API stopped reading
        os._exit(1)


def _child_exit(exc: DatasetInvalid) -> None:
    errors = [{"row": e.row, "field": e.field, "message": e.message} for e in exc.errors]
    sys.stderr.buffer.write(b"\n" + _CHILD_ERRORS + json.dumps(errors).encode() + b"\n")
    sys.stderr.flush()
    os._exit(3)


def parquet_rows(path: Path, limits: Limits) -> Iterator[NumberedRow]:
    """Decode Parquet in this process (``parquet_child`` runs it under a memory cap)."""
    import pyarrow.parquet as pq

    try:
        # The footer only: its row count is checked before any data is read. Pages are then read through
        # a 1 MiB buffer, not a whole column chunk at a time.
        reader = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        declared = reader.metadata.num_rows
        schema = reader.schema_arrow
    except MemoryError:
        raise
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise _invalid(0, "*", f"unreadable Parquet file: {exc}") from None
    if declared > limits.max_rows:
        raise limits.too_many_rows(limits.max_rows + 1, str(declared))
    for field in schema:
        _check_parquet_type(field.type, field.name, limits)
    plain = _without_dictionaries(schema)
    number = 0
    for group in range(reader.num_row_groups):
        # One row group at a time (a batch spanning two may mix dictionaries, which Arrow cannot do for
        # nested columns), in batches sized from the footer's page sizes: few rows where rows are big.
        meta = reader.metadata.row_group(group)
        per_row = max(1, meta.total_byte_size // max(1, meta.num_rows))
        batch_rows = min(max(PARQUET_BATCH_BYTES // per_row, PARQUET_BATCH_ROWS[0]), PARQUET_BATCH_ROWS[1])
        batches = reader.iter_batches(batch_size=batch_rows, row_groups=[group])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except MemoryError:
                raise
            except Exception as exc:
                raise _invalid(number + 1, "*", f"unreadable Parquet data: {exc}") from None
            for row in _materialise(batch, plain, number, limits):
                number += 1
                yield number, row


def _materialise(batch: Any, plain: Any, number: int, limits: Limits) -> Iterator[dict[str, Any]]:
    """A record batch's rows as Python objects, a few MB at a time, once Arrow says each fits the limits."""
    import numpy as np

    sizes = _row_sizes(batch)
    over = np.flatnonzero(sizes > limits.max_row_bytes)
    if len(over):
        raise limits.row_too_large(number + int(over[0]) + 1, f"about {int(sizes[over[0]])}")
    large = set((np.flatnonzero(sizes > limits.max_cell_bytes // 4)).tolist())  # rows whose cells to measure
    ends = np.cumsum(sizes)
    start = 0
    while start < len(sizes):
        base = ends[start - 1] if start else 0.0
        end = max(start + 1, int(np.searchsorted(ends, base + PARQUET_SLICE_BYTES, side="right")))
        rows = batch.slice(start, end - start).cast(plain).to_pylist()  # (decoded first: much faster)
        for offset, row in enumerate(rows, start=start):
            if offset in large:
                _check_value(row, number + offset + 1, limits)
            yield row
        start = end


def _check_parquet_type(root: Any, name: str, limits: Limits) -> None:
    """Every column must have a JSON form (strings, numbers, booleans, lists, structs) within the depth limit."""
    import pyarrow as pa

    t = pa.types
    stack: list[tuple[Any, int]] = [(root, 2)]  # the row is level 1
    while stack:
        typ, depth = stack.pop()
        if t.is_dictionary(typ):
            typ = typ.value_type
        if t.is_list(typ) or t.is_large_list(typ) or t.is_fixed_size_list(typ) or t.is_struct(typ):
            if depth > limits.max_json_depth:
                raise limits.too_deep(0, name)
            children = [typ.value_type] if not t.is_struct(typ) else [typ.field(i).type for i in range(typ.num_fields)]
            stack += [(child, depth + 1) for child in children]
        elif not (
            t.is_string(typ)
            or t.is_large_string(typ)
            or t.is_boolean(typ)
            or t.is_integer(typ)
            or t.is_float32(typ)
            or t.is_float64(typ)
            or t.is_null(typ)
        ):
            raise _invalid(0, name, f"Parquet type {typ} has no JSON form; use strings, numbers, lists or structs")


def _without_dictionaries(schema: Any) -> Any:
    import pyarrow as pa

    def plain(t: Any) -> Any:
        if pa.types.is_dictionary(t):
            return plain(t.value_type)
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, plain(f.type), f.nullable) for f in t])
        if pa.types.is_fixed_size_list(t):
            return pa.list_(pa.field(t.value_field.name, plain(t.value_type)), t.list_size)
        if pa.types.is_large_list(t):
            return pa.large_list(pa.field(t.value_field.name, plain(t.value_type)))
        if pa.types.is_list(t):
            return pa.list_(pa.field(t.value_field.name, plain(t.value_type)))
        return t

    return pa.schema([pa.field(f.name, plain(f.type), f.nullable) for f in schema])


def _row_sizes(batch: Any) -> Any:
    """Each row's size as JSON (a numpy array), estimated from Arrow's buffers before any Python object
    is made. Within a few percent for strings; lists and structs add their punctuation."""
    import numpy as np

    total = np.zeros(batch.num_rows)
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        total += _sizes(column) + len(name) + 4
    return total


def _ints(arr: Any) -> Any:
    """A view on an integer array's values (pyarrow's own to_numpy is far slower on small arrays)."""
    import numpy as np

    width = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[arr.type.bit_width // 8]
    return np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr)].astype(np.int64)


def _lengths(strings: Any) -> Any:
    """Byte length of every value of a string array (any value under a null: 0), from its offsets."""
    import numpy as np
    import pyarrow as pa

    width = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    offsets = np.frombuffer(strings.buffers()[1], dtype=width)[strings.offset : strings.offset + len(strings) + 1]
    return np.diff(offsets).astype(np.float64)


def _sizes(arr: Any) -> Any:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = pa.types
    n = len(arr)
    if n == 0:
        return np.zeros(0)
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    if t.is_dictionary(arr.type):
        values = arr.dictionary
        if len(values) == 0:
            return np.full(n, 4.0)
        indices = np.clip(_ints(arr.indices), 0, len(values) - 1)  # (under a null the index is anything)
        if t.is_string(values.type) or t.is_large_string(values.type):
            # A view on the dictionary's offsets: O(batch) per batch, not O(dictionary).
            width = np.int64 if t.is_large_string(values.type) else np.int32
            offsets = np.frombuffer(values.buffers()[1], dtype=width)[values.offset :]
            sizes = (offsets[indices + 1] - offsets[indices]).astype(np.float64) + 2
        else:
            sizes = _sizes(values)[indices]
    elif t.is_string(arr.type) or t.is_large_string(arr.type):
        sizes = _lengths(arr) + 2
    elif t.is_list(arr.type) or t.is_large_list(arr.type) or t.is_fixed_size_list(arr.type):
        parents = _ints(pc.list_parent_indices(arr))
        sizes = np.bincount(parents, weights=_sizes(arr.flatten()), minlength=n).astype(np.float64) + 2
    elif t.is_struct(arr.type):
        sizes = np.full(n, 2.0)
        for i, child in enumerate(arr.flatten()):
            sizes += _sizes(child) + len(arr.type.field(i).name) + 4
    else:
        sizes = np.full(n, 8.0)
    return sizes if nulls is None else np.where(nulls, 4.0, sizes)
