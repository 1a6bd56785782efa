"""Task registry: a name -> a loader ``(cfg) -> TaskData``. Paths are resolved by what they are.

``TASKS`` holds the named tasks; ``register`` adds one. ``load_task(cfg)`` picks the loader for
``cfg.task`` (or ``--train-file``): a registered name, a CSV/JSONL file, an image folder, or a hub
dataset id ``owner/name``.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from tenslora.train.tasks.base import Split, TaskData
from tenslora.train.tasks.fashion_mnist import load_fashion_mnist
from tenslora.train.tasks.glue import GLUE_TASKS, load_glue
from tenslora.train.tasks.hub_images import HUB_IMAGE_DATASETS, load_hub_dataset
from tenslora.train.tasks.imagefolder import load_image_folder
from tenslora.train.tasks.tabular import SUFFIXES, load_file_task
from tenslora.train.tasks.tweets import load_tweets

Loader = Callable[[object], TaskData]
TASKS: dict[str, Loader] = {}


def register(name: str, loader: Loader) -> None:
    TASKS[name] = loader


register("tweets", load_tweets)
register("fashion-mnist", load_fashion_mnist)
for _name in GLUE_TASKS:
    register(_name, partial(load_glue, _name))
for _name, _hub_id in HUB_IMAGE_DATASETS.items():
    register(_name, partial(load_hub_dataset, _hub_id, name=_name))


def resolve_loader(cfg) -> Loader:
    if cfg.train_file or cfg.validation_file or cfg.test_file:
        return load_file_task
    task = cfg.task
    key = task.lower().replace("_", "-")
    if key in TASKS or task in TASKS:
        return TASKS.get(key) or TASKS[task]
    path = Path(task)
    if path.suffix.lower() in SUFFIXES:
        return load_file_task
    if path.is_dir():
        return load_image_folder
    if path.exists():
        raise ValueError(f"cannot use {task} as a task: not a CSV/JSONL file ({', '.join(SUFFIXES)}) or an image folder")
    if task.count("/") == 1 and not task.startswith((".", "/")):
        return partial(load_hub_dataset, task)
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}, "
                     "or a CSV/JSONL file, an image folder, a hub dataset id owner/name")


def load_task(cfg) -> TaskData:
    return resolve_loader(cfg)(cfg)


__all__ = ["TASKS", "Split", "TaskData", "load_task", "register", "resolve_loader"]
