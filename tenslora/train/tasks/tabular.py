"""Local CSV / JSONL files with a text column, an optional second text column and a label column."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from tenslora.train.tasks.base import Rows, Split, TaskData

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "content")
PAIR_FOR = {"sentence1": "sentence2", "question": "sentence"}
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "target")
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def read_records(path: str | Path, encoding: str | None = None) -> list[dict]:
    """Rows of a CSV/TSV (header line) or JSONL file as dicts; UTF-8, falling back to latin-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot read {path}: unknown file type {path.suffix!r}; allowed: {', '.join(SUFFIXES)}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read {path}: {exc.strerror or exc}") from None
    if encoding:
        text = raw.decode(encoding)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    if kind == "jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n} is not a JSON object")
            records.append(record)
    else:
        try:
            records = list(csv.DictReader(text.splitlines(), delimiter="\t" if kind == "tsv" else ","))
        except csv.Error as exc:
            raise ValueError(f"{path} is not a valid {kind.upper()} file ({exc})") from None
    if not records:
        raise ValueError(f"{path} holds no examples")
    return records


def _columns(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in records[:100] for k in r if k is not None))


def _pick(available: list[str], given: str | None, defaults: tuple[str, ...], what: str, path) -> str:
    if given is not None:
        if given not in available:
            raise ValueError(f"{what} column {given!r} not found in {path}; available columns: {', '.join(available)}")
        return given
    for name in defaults:
        if name in available:
            return name
    raise ValueError(f"no {what} column in {path} (looked for {', '.join(defaults)}); "
                     f"available columns: {', '.join(available)}; name it with --{what}-column")


def _convert_labels(values: list) -> list:
    """CSV labels are strings: make them ints or floats when every one parses."""
    if not values or not all(isinstance(v, str) for v in values):
        return values
    for cast in (int, float):
        try:
            return [cast(v) for v in values]
        except ValueError:
            continue
    return [v.strip() for v in values]


def records_split(records: list[dict], path, text_column: str | None, pair_column: str | None,
                  label_column: str | None, drop_empty: bool = False) -> tuple[Split, dict]:
    available = _columns(records)
    text = _pick(available, text_column, TEXT_COLUMNS, "text", path)
    if pair_column is None and text_column is None and PAIR_FOR.get(text) in available:
        pair_column = PAIR_FOR[text]
    pair = _pick(available, pair_column, (), "text-pair", path) if pair_column is not None else None
    label = _pick(available, label_column, LABEL_COLUMNS, "label", path)
    if drop_empty:
        records = [r for r in records if all(r.get(c) not in (None, "") for c in (text, pair, label) if c)]
        if not records:
            raise ValueError(f"{path} holds no complete examples")
    for n, r in enumerate(records, 1):
        for col in (text, pair, label):
            if col is not None and (r.get(col) is None or r.get(col) == ""):
                raise ValueError(f"{path}: example {n} has no value in column {col!r}")
    columns = {"text": [str(r[text]) for r in records]}
    if pair:
        columns["text_pair"] = [str(r[pair]) for r in records]
    split = Split(Rows.from_columns(columns), _convert_labels([r[label] for r in records]))
    return split, {"text_column": text, "text_pair_column": pair, "label_column": label}


def load_files(cfg, files: dict[str, str], name: str | None = None, encoding: str | None = None,
               drop_empty: bool = False) -> TaskData:
    """``files``: ``{split: path}``; every file is read with the same column names."""
    splits, notes = {}, {}
    for split_name, path in files.items():
        splits[split_name], notes = records_split(read_records(path, encoding), path, cfg.text_column,
                                                  cfg.text_pair_column, cfg.label_column, drop_empty)
    return TaskData(name=name or Path(files.get("train") or next(iter(files.values()))).stem, kind="text",
                    splits=splits, notes=notes)


def load_file_task(cfg) -> TaskData:
    """``--task file.csv`` or ``--train-file/--validation-file/--test-file``."""
    files = {}
    if cfg.train_file:
        files["train"] = cfg.train_file
    elif Path(cfg.task).suffix.lower() in SUFFIXES:
        files["train"] = cfg.task
    else:
        raise ValueError("--validation-file/--test-file need --train-file")
    if cfg.validation_file:
        files["validation"] = cfg.validation_file
    if cfg.test_file:
        files["test"] = cfg.test_file
    return load_files(cfg, files)
