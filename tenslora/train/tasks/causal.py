"""Causal-LM (instruction) tasks from local files: JSONL prompt/response or chat messages, or plain text.

Rows (the split's ``inputs``), one of:

* ``{"prompt": str, "response": str}`` -- JSONL ``prompt`` with ``response`` (or TRL's ``completion``);
* ``{"messages": [{"role", "content"}, ...], "response": str}`` -- JSONL ``messages``: every message but the
  last is the prompt, the last (role ``assistant``) is the response;
* ``{"text": str}`` -- a ``.txt`` file, one example per non-empty line, loss on all tokens.

The split's ``labels`` are the response strings ("" for plain text). When the training responses form a
small closed set (2..20 distinct values, each used twice on average) they are the task's label names and
evaluation adds exact-match accuracy and macro-F1 of greedy generations.
"""
from __future__ import annotations

import json
from pathlib import Path

from tenslora.train.tasks.base import Rows, Split, TaskData
from tenslora.train.tasks.tabular import read_records

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
RESPONSE_KEYS = ("response", "completion")
MAX_LABELS = 20


def is_causal_file(path: str | None) -> bool:
    """A ``.txt`` file, or a JSONL file whose first record has ``prompt`` or ``messages``."""
    if not path:
        return False
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return True
    if suffix not in JSONL_SUFFIXES or not p.is_file():
        return False
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and ("prompt" in first or "messages" in first)
    return False


def _message_row(messages, where: str) -> dict:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs a string 'role' and 'content', got {m!r}")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ValueError(f"{where}: the last message must be the assistant's response after at least one "
                         f"prompt message (last role is {messages[-1]['role']!r})")
    return {"messages": messages[:-1], "response": messages[-1]["content"]}


def _prompt_row(record: dict, where: str) -> dict:
    key = next((k for k in RESPONSE_KEYS if k in record), None)
    if key is None:
        raise ValueError(f"{where}: a 'prompt' record needs a {' or '.join(repr(k) for k in RESPONSE_KEYS)} field")
    prompt, response = record["prompt"], record[key]
    if not isinstance(prompt, str) or not isinstance(response, str) or not response:
        raise ValueError(f"{where}: 'prompt' and {key!r} must be strings (the response non-empty)")
    return {"prompt": prompt, "response": response}


def read_causal_split(path: str | Path) -> Split:
    """One file -> a split of rows (see the module doc) with the responses as labels."""
    path = Path(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{path} holds no text")
        return Split(Rows(len(lines), lambda i: {"text": lines[i]}), [""] * len(lines))
    rows = []
    for n, record in enumerate(read_records(path), 1):
        where = f"{path}: example {n}"
        if "messages" in record:
            rows.append(_message_row(record["messages"], where))
        elif "prompt" in record:
            rows.append(_prompt_row(record, where))
        else:
            raise ValueError(f"{where} has neither 'prompt' nor 'messages' (fields: {', '.join(record)})")
    return Split(Rows(len(rows), lambda i: rows[i]), [r["response"] for r in rows])


def response_label_names(responses: list[str]) -> list[str] | None:
    """The distinct responses when they look like class labels (2..MAX_LABELS values, repeated), else None."""
    names = sorted({r.strip() for r in responses})
    if 2 <= len(names) <= MAX_LABELS and 2 * len(names) <= len(responses) and all(names):
        return names
    return None


def causal_task(name: str, splits: dict[str, Split], label_names: list[str] | None = None, **extra) -> TaskData:
    """A ``causal`` task: problem type ``generation``; selected by macro-F1 when responses are labels, else loss."""
    names = label_names if label_names is not None else response_label_names(splits["train"].labels)
    return TaskData(name=name, kind="causal", splits=splits, label_names=names, problem_type="generation",
                    main_metric="macro_f1" if names else "loss", **extra)


def load_causal_file(cfg) -> TaskData:
    """``--task file.jsonl|file.txt`` or ``--train-file/--validation-file/--test-file`` for a causal LM."""
    files = {"train": cfg.train_file or cfg.task}
    if cfg.validation_file:
        files["validation"] = cfg.validation_file
    if cfg.test_file:
        files["test"] = cfg.test_file
    splits = {split: read_causal_split(path) for split, path in files.items()}
    return causal_task(Path(files["train"]).stem, splits)
