"""Task registry: a name -> a loader ``(cfg) -> TaskData``. Paths are resolved by what they are.

``TASKS`` holds the named tasks; ``register`` adds one. ``load_task(cfg)`` picks the loader for
``cfg.task`` (or ``--train-file``): a registered name, a CSV/JSONL file, an image folder, or a hub
dataset id ``owner/name``. Causal-LM data (a ``.txt`` file, JSONL with ``prompt`` or ``messages``) loads
as a ``causal`` task; a task with an instruction variant (``tweets`` -> ``tweets-instruct``) switches to it
when the model is a causal LM and ``--problem-type`` is ``auto``.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from tenslora.train.tasks.base import Split, TaskData
from tenslora.train.tasks.causal import is_causal_file, load_causal_file
from tenslora.train.tasks.fashion_mnist import load_fashion_mnist
from tenslora.train.tasks.glue import GLUE_TASKS, load_glue
from tenslora.train.tasks.hub_images import HUB_IMAGE_DATASETS, load_hub_dataset
from tenslora.train.tasks.imagefolder import load_image_folder
from tenslora.train.tasks.tabular import SUFFIXES, load_file_task
from tenslora.train.tasks.tweets import load_tweets
from tenslora.train.tasks.tweets_instruct import load_tweets_instruct

Loader = Callable[[object], TaskData]
TASKS: dict[str, Loader] = {}
#: classification task -> its instruction variant, used when the model is a causal LM
INSTRUCT_VARIANTS: dict[str, str] = {"tweets": "tweets-instruct"}


def register(name: str, loader: Loader) -> None:
    TASKS[name] = loader


register("tweets", load_tweets)
register("tweets-instruct", load_tweets_instruct)
register("fashion-mnist", load_fashion_mnist)
for _name in GLUE_TASKS:
    register(_name, partial(load_glue, _name))
for _name, _hub_id in HUB_IMAGE_DATASETS.items():
    register(_name, partial(load_hub_dataset, _hub_id, name=_name))


def _use_instruct_variant(cfg, key: str) -> bool:
    if key not in INSTRUCT_VARIANTS or cfg.problem_type != "auto":
        return False
    from tenslora.train.causal_model import is_causal_lm
    return is_causal_lm(cfg.model)


def resolve_loader(cfg) -> Loader:
    if is_causal_file(cfg.train_file or (None if cfg.validation_file or cfg.test_file else cfg.task)):
        return load_causal_file
    if cfg.train_file or cfg.validation_file or cfg.test_file:
        return load_file_task
    task = cfg.task
    key = task.lower().replace("_", "-")
    if _use_instruct_variant(cfg, key):
        key = INSTRUCT_VARIANTS[key]
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
