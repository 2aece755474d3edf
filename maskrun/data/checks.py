"""Checks of a user's dataset file (CSV, JSON / JSON Lines, Parquet) before any work starts.

`check_dataset_file` (a classification file) and `check_text_file` (a causal_lm or instruction file) read
the file once and raise ConfigError saying what is wrong and how to fix it: missing or empty file,
unparsable content, wrong encoding, absent columns, empty texts, and for classification a single class,
or labels that are neither all ints nor all strings (or are fractional numbers).
"""

import codecs
import csv
import json
from pathlib import Path

from maskrun.errors import ConfigError

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def check_dataset_file(path, format: str | None, text_column: str, label_column: str, encoding: str) -> None:
    """A classification file: a text and a label in every record."""
    path = Path(path).expanduser()
    rows = read_checked_rows(path, format, encoding, {"dataset.text_column": text_column, "dataset.label_column": label_column})
    check_texts(path, rows, text_column)
    check_labels(path, rows, label_column)


def check_text_file(path, format: str | None, columns: dict[str, str], encoding: str) -> None:
    """A causal_lm or instruction file: text in each of `columns` ({config key: column name}) of every record."""
    path = Path(path).expanduser()
    rows = read_checked_rows(path, format, encoding, columns)
    for column in columns.values():
        check_texts(path, rows, column)


def read_checked_rows(path: Path, format: str | None, encoding: str, columns: dict[str, str]) -> list[dict]:
    """The file's records, once the file is there, parses, has records and has every column in `columns`."""
    format = check_format(path, format)
    check_file(path)
    check_encoding_name(encoding)
    rows = read_rows(path, format, encoding)
    if not rows:
        raise ConfigError(f"dataset.path={path} holds no rows", "point dataset.path at a file with a header and data")
    check_columns(path, rows, columns)
    return rows


def check_format(path: Path, format: str | None) -> str:
    format = format or FORMATS.get(path.suffix.lower())
    if format not in set(FORMATS.values()):
        raise ConfigError(f"cannot tell the format of dataset.path={path}",
                          f"name the file *.csv, *.json, *.jsonl or *.parquet, or set dataset.format to one of: "
                          f"{', '.join(sorted(set(FORMATS.values())))}")
    return format


def check_file(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"dataset.path={path} does not exist", "check the path (relative paths start at the current directory)")
    if not path.is_file():
        raise ConfigError(f"dataset.path={path} is not a file", "point dataset.path at a CSV, JSON or Parquet file")
    if path.stat().st_size == 0:
        raise ConfigError(f"dataset.path={path} is empty", "point dataset.path at a file with a header and data")


def check_encoding_name(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ConfigError(f"dataset.encoding={encoding!r} is not a known encoding", "e.g. dataset.encoding=utf-8 or latin-1") from None


def read_rows(path: Path, format: str, encoding: str) -> list[dict]:
    try:
        if format == "csv":
            return read_csv(path, encoding)
        if format == "json":
            return read_json(path, encoding)
        return read_parquet(path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"dataset.path={path} is not valid {encoding} (byte {err.start}: {err.reason})",
                          "set dataset.encoding to the file's encoding, e.g. dataset.encoding=latin-1") from None


def read_csv(path: Path, encoding: str) -> list[dict]:
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # a byte order mark, as spreadsheet exports write, is not part of the first column's name
    with path.open(encoding=encoding, newline="") as f:
        try:
            lines = list(csv.reader(f, strict=True))
        except csv.Error as err:
            raise ConfigError(f"dataset.path={path} is not valid CSV: {err}", "fix the file's quoting, or export it again as CSV") from None
    lines = [line for line in lines if line]
    if not lines:
        return []
    header, body = lines[0], lines[1:]
    for number, line in enumerate(body, start=2):
        if len(line) != len(header):
            raise ConfigError(f"dataset.path={path} is not valid CSV: row {number} has {len(line)} fields, the header {len(header)}",
                              "quote fields that contain commas, or export the file again as CSV")
    return [dict(zip(header, line)) for line in body]


def read_json(path: Path, encoding: str) -> list[dict]:
    text = path.read_text(encoding=encoding)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON Lines: one object per line
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ConfigError(f"dataset.path={path} is not valid JSON or JSON Lines: {err}",
                              "write a list of objects, or one object per line") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ConfigError(f"dataset.path={path} is not a list of records", "write a list of objects, or one object per line")
    return data


def read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise ConfigError(f"dataset.path={path} is not valid Parquet: {err}", "export the file again as Parquet") from None


def check_columns(path: Path, rows: list[dict], columns: dict[str, str]) -> None:
    present = list(rows[0])
    for key, column in columns.items():
        if any(column not in row for row in rows):
            raise ConfigError(f"dataset.path={path} has no column {column!r} ({key})",
                              f"set {key} to one of: {', '.join(map(str, present))}")


def check_texts(path: Path, rows: list[dict], text_column: str) -> None:
    for number, row in enumerate(rows, start=1):
        if not isinstance(row[text_column], str):
            raise ConfigError(f"dataset.path={path} record {number}: text {row[text_column]!r} is not a string",
                              f"make column {text_column!r} hold text")
        if not row[text_column].strip():
            raise ConfigError(f"dataset.path={path} record {number} has an empty text",
                              f"fill in column {text_column!r} or drop the record")


def check_labels(path: Path, rows: list[dict], label_column: str) -> None:
    labels = [row[label_column] for row in rows]
    odd = [label for label in labels if type(label) not in (int, str)]  # bools and floats too
    if odd:
        raise ConfigError(f"dataset.path={path}: label {odd[0]!r} in column {label_column!r} is neither an int nor a string",
                          "use class names or class ids, one per record")
    if len({type(label) for label in labels}) > 1:
        raise ConfigError(f"dataset.path={path}: labels in column {label_column!r} mix ints and strings",
                          "use either class names or class ids throughout")
    fractional = [label for label in labels if isinstance(label, str) and is_fractional_number(label)]
    if fractional:  # e.g. a regression target: as class names, every distinct value would be a class
        raise ConfigError(f"dataset.path={path}: label {fractional[0]!r} in column {label_column!r} is a fractional number",
                          "a classification task needs class names or whole-number class ids")
    if "" in labels:
        number = labels.index("") + 1
        raise ConfigError(f"dataset.path={path} record {number} has an empty label", f"fill in column {label_column!r}")
    if len(set(labels)) < 2:
        raise ConfigError(f"dataset.path={path} has one class only ({labels[0]!r})",
                          "a classification task needs at least two labels")


def is_fractional_number(text: str) -> bool:
    try:
        return not float(text).is_integer()
    except ValueError:
        return False
