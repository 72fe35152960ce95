"""Reading JSONL with errors that name the file and line."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

from engine.data.errors import DataError


class BadRecord(Exception):
    """Raised by a record parser: the message says what is wrong with the line, e.g.
    'has no "text" field'. The reader turns it into a DataError naming file and line."""


class JsonlReader:
    """Iterates (line_number, parse(record)) over a JSONL file; blank lines are ignored.

    A line that is not a JSON object, or that `parse` rejects with BadRecord, raises a
    DataError naming file and line, or, with skip_bad_lines=True, is skipped and counted in
    `skipped`. A file with no usable record at all is an error either way.
    """

    def __init__(self, path: str, parse: Callable[[dict], Any] = lambda r: r, skip_bad_lines: bool = False):
        if not os.path.isfile(path):
            raise DataError(f"Input file {path} does not exist.")
        self.path = path
        self.parse = parse
        self.skip_bad_lines = skip_bad_lines
        self.skipped = 0
        self.records = 0

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        with open(self.path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = self.parse(parse_json_object(line))
                except BadRecord as e:
                    self._bad(line_number, str(e))
                    continue
                self.records += 1
                yield line_number, value
        if self.records == 0:
            skipped = f" ({self.skipped} bad lines skipped)" if self.skipped else ""
            raise DataError(f"{self.path} holds no usable records{skipped}.")

    def _bad(self, line_number: int, problem: str) -> None:
        if not self.skip_bad_lines:
            raise DataError(f"{self.path}:{line_number}: line {problem}.")
        self.skipped += 1


def parse_json_object(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadRecord("is not a JSON object")
    return record


def text_field(record: dict, key: str) -> str:
    """record[key] as a string, or BadRecord saying why not."""
    if key not in record:
        raise BadRecord(f"has no {key!r} field")
    if not isinstance(record[key], str):
        raise BadRecord(f"has a {key!r} field that is not a string")
    return record[key]
