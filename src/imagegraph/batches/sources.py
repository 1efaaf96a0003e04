"""Reading a batch's items from CSV, JSON Lines or a JSON list.

Every problem names its line (files) or index (JSON lists); nothing is queued from a file
with a problem. CSV: the first row names the columns; every row must have as many cells as
the header; empty cells are empty strings. JSON Lines: one object per line, blank lines
skipped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

from imagegraph.batches.expand import Item
from imagegraph.errors import InvalidInput, Issue

Format = Literal["csv", "jsonl", "json"]
MAX_ISSUES = 20


def guess_format(filename: str | None, content_type: str | None) -> Format | None:
    name = (filename or "").lower()
    kind = (content_type or "").split(";")[0].strip().lower()
    if name.endswith(".csv") or kind in ("text/csv", "application/csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson")) or kind in (
        "application/jsonl",
        "application/x-ndjson",
        "application/x-jsonlines",
    ):
        return "jsonl"
    if name.endswith(".json") or kind == "application/json":
        return "json"
    return None


def read_items(data: bytes, fmt: Format, name: str = "file") -> list[Item]:
    """The items of a file; raises InvalidInput naming each bad line (at most 20)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _invalid(name, [f"is not UTF-8 text (byte {exc.start})"]) from None
    if not text.strip():
        raise _invalid(name, ["is empty: it has no items"], code="empty_file")
    if fmt == "csv":
        return _csv(text, name)
    if fmt == "jsonl":
        return _jsonl(text, name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(name, [f"line {exc.lineno}: not valid JSON ({exc.msg})"]) from None
    return from_list(value, name)


def from_list(value: Any, where: str = "items") -> list[Item]:
    """Items given inline as a JSON list of objects."""
    if not isinstance(value, list):
        raise _invalid(where, ["must be a list of objects"])
    problems = [
        f"[{index}] must be an object of input values, not {type(entry).__name__}"
        for index, entry in enumerate(value)
        if not isinstance(entry, dict)
    ]
    if problems:
        raise _invalid(where, problems)
    if not value:
        raise _invalid(where, ["is empty: it has no items"], code="empty_batch")
    return [Item(entry, f"{where}[{index}]") for index, entry in enumerate(value)]


def _csv(text: str, name: str) -> list[Item]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    problems: list[str] = []
    try:
        header = next(reader)
    except csv.Error as exc:
        raise _invalid(name, [f"line 1: {exc}"]) from None
    columns = [c.strip() for c in header]
    if not any(columns):
        raise _invalid(name, ["line 1: the header row names no columns"])
    for position, column in enumerate(columns, start=1):
        if not column:
            problems.append(f"line 1: column {position} has no name")
        elif columns.index(column) != position - 1:
            problems.append(f"line 1: column {column!r} appears twice")
    items: list[Item] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(f"line {reader.line_num}: {exc}")
            break
        line = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            problems.append(
                f"line {line}: has {len(row)} cells, the header has {len(columns)} "
                f"({', '.join(columns)})"
            )
            if len(problems) >= MAX_ISSUES:
                break
            continue
        items.append(Item(dict(zip(columns, row, strict=True)), f"line {line}"))
    if problems:
        raise _invalid(name, problems)
    if not items:
        raise _invalid(name, ["has a header but no rows: it has no items"], code="empty_file")
    return items


def _jsonl(text: str, name: str) -> list[Item]:
    items: list[Item] = []
    problems: list[str] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(f"line {line}: not valid JSON ({exc.msg}, column {exc.colno})")
        else:
            if isinstance(value, dict):
                items.append(Item(value, f"line {line}"))
            else:
                problems.append(f"line {line}: must be a JSON object, not {type(value).__name__}")
        if len(problems) >= MAX_ISSUES:
            break
    if problems:
        raise _invalid(name, problems)
    return items


def _invalid(name: str, problems: Sequence[str], code: str = "invalid_items") -> InvalidInput:
    issues = [Issue(code, f"{name} {p}", field=name) for p in problems[:MAX_ISSUES]]
    return InvalidInput(f"{name} {problems[0]}; nothing was queued", issues)
