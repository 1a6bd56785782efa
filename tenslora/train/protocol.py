"""The data protocol: held-out splits and subsamples fixed by ``--data-seed``, labels encoded.

* A task without a validation split: validation is held out from train. Without a test split:
  test is held out from train too (GLUE loaders already give the official validation as test).
* ``--train-samples`` / ``--eval-samples`` subsample, also by ``--data-seed``, independently of the
  training ``--seed``.
* Classification labels become ids ``0..K-1``: from the task's class names, else ``0..max`` for
  integer labels (``--num-labels`` may raise K) or the sorted distinct string labels (they define K:
  a different ``--num-labels`` is an error); a label outside them is an error naming it.
* A NaN or infinite label is an error naming its example, and so are training labels that are all
  the same value (nothing to learn).
* The default ``--select-metric`` follows the problem type (macro-F1 / Pearson) unless the task
  names one that fits it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from tenslora.train.metrics import main_metric
from tenslora.train.tasks.base import Split, TaskData, random_indices


@dataclass
class PreparedData:
    task: TaskData
    train: Split
    validation: Split
    test: Split
    label_names: list[str] | None
    num_labels: int
    problem_type: str  # classification | regression | generation (a causal-LM task; num_labels 0 unless
    #                    the responses are labels)
    main_metric: str  # the default --select-metric

    def split(self, name: str) -> Split:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; allowed: train, validation, test")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def _count(size: float, n: int, what: str) -> int:
    count = int(round(size * n)) if size < 1 else int(size)
    if size <= 0 or count < 1:
        raise ValueError(f"{what} size {size} gives no examples out of {n}")
    return count


def hold_out(splits: dict[str, Split], cfg, task: TaskData) -> dict[str, Split]:
    splits = dict(splits)
    if "train" not in splits:
        raise ValueError(f"task {task.name!r} has no training split")
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        train = splits["train"]
        sizes = {"validation": cfg.validation_size if cfg.validation_size is not None else task.validation_size,
                 "test": cfg.test_size if cfg.test_size is not None else task.test_size}
        counts = {s: _count(sizes[s], len(train), s) for s in missing}
        if sum(counts.values()) >= len(train):
            raise ValueError(f"task {task.name!r}: {len(train)} examples are too few to hold out "
                             f"{' and '.join(f'{c} {s}' for s, c in counts.items())} and still train")
        order = random_indices(len(train), cfg.data_seed, "hold-out")
        start = 0
        for s in missing:
            splits[s] = train.subset(order[start:start + counts[s]])
            start += counts[s]
        splits["train"] = train.subset(sorted(order[start:]))
    return splits


def subsample(split: Split, n: int | None, seed: int, stream: str) -> Split:
    if n is None or n >= len(split):
        return split
    return split.subset(sorted(random_indices(len(split), seed, stream)[:n]))


def infer_problem_type(cfg, task: TaskData, labels: list) -> str:
    if task.problem_type == "generation":  # a causal-LM task: responses are text, not class ids
        if cfg.problem_type != "auto":
            raise ValueError(f"--problem-type {cfg.problem_type} does not apply to the causal-LM task "
                             f"{task.name!r}; allowed: auto")
        return "generation"
    if cfg.problem_type != "auto":
        return cfg.problem_type
    if task.problem_type == "regression":
        return "regression"
    if labels and all(isinstance(v, float) for v in labels) and any(v != int(v) for v in labels):
        return "regression"
    return "classification"


def encode_labels(splits: dict[str, Split], cfg, task: TaskData) -> tuple[list[str] | None, int, dict[str, Split]]:
    problem = infer_problem_type(cfg, task, splits["train"].labels)
    if problem == "generation":  # responses stay text; label names (when they are labels) come from the task
        names = list(task.label_names) if task.label_names else None
        return names, len(names or ()), splits
    if problem == "regression":
        if cfg.num_labels not in (None, 1):
            raise ValueError(f"--num-labels {cfg.num_labels} does not apply to regression (one output); drop it")
        out = {}
        for name, split in splits.items():
            try:
                out[name] = Split(split.inputs, [float(v) for v in split.labels])
            except (TypeError, ValueError):
                bad = next(v for v in split.labels if not _is_number(v))
                raise ValueError(f"regression label {bad!r} in the {name} split is not a number") from None
            check_finite(name, out[name].labels)
        _check_varies(out["train"].labels, "regression")
        return None, 1, out
    names = list(task.label_names) if task.label_names else None
    train_labels = splits["train"].labels
    if names is None:
        if all(_is_int(v) for v in train_labels):
            top = max(int(v) for v in train_labels)
            k = cfg.num_labels or top + 1
            names = [str(i) for i in range(k)]
        else:
            names = sorted({str(v).strip() if isinstance(v, str) else str(v) for v in train_labels})
            if cfg.num_labels is not None and cfg.num_labels != len(names):
                raise ValueError(f"--num-labels {cfg.num_labels} does not match the {len(names)} classes of the "
                                 f"training labels ({', '.join(names[:20])}); text labels define the classes: "
                                 "drop --num-labels")
    elif cfg.num_labels is not None and cfg.num_labels != len(names):
        raise ValueError(f"--num-labels {cfg.num_labels} does not match the task's {len(names)} classes {names}")
    k = len(names)
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for name, split in splits.items():
        ids = []
        for v in split.labels:
            if _is_int(v) and not isinstance(v, str):
                i = int(v)
                if not 0 <= i < k:
                    raise ValueError(f"label {v!r} in the {name} split does not fit {k} classes (allowed 0..{k - 1})")
            else:
                i = index.get(str(v).strip() if isinstance(v, str) else str(v))
                if i is None:
                    raise ValueError(f"label {v!r} in the {name} split is not one of the {k} classes "
                                     f"{', '.join(names[:20])}")
            ids.append(i)
        out[name] = Split(split.inputs, ids)
    _check_varies([names[i] for i in out["train"].labels], "classification")
    return names, k, out


def check_finite(split: str, labels: list) -> None:
    """A NaN or infinite numeric label is an error naming its example (1-based, in the split's order)."""
    for n, v in enumerate(labels, 1):
        if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not math.isfinite(float(v)):
            raise ValueError(f"label {v!r} of example {n} in the {split} split is not a finite number; "
                             "fix or remove that example")


def _check_varies(train_labels: list, problem: str) -> None:
    values = set(train_labels)
    if len(values) < 2:
        what = "classification needs at least 2 classes" if problem == "classification" else \
            "regression needs a target that varies"
        raise ValueError(f"every training label is {next(iter(values), None)!r}: {what} in the training data "
                         "(check --label-column, or use more --train-samples)")


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, float):
        return v.is_integer()
    return False


def prepare(task: TaskData, cfg) -> PreparedData:
    for name, split in task.splits.items():
        if len(split) == 0:
            raise ValueError(f"task {task.name!r}: the {name} split is empty")
        check_finite(name, split.labels)
    splits = hold_out(task.splits, cfg, task)
    splits = {"train": subsample(splits["train"], cfg.train_samples, cfg.data_seed, "train-samples"),
              "validation": subsample(splits["validation"], cfg.eval_samples, cfg.data_seed, "eval-samples/validation"),
              "test": subsample(splits["test"], cfg.eval_samples, cfg.data_seed, "eval-samples/test")}
    names, k, splits = encode_labels(splits, cfg, task)
    problem = task.problem_type if task.problem_type == "generation" else \
        "regression" if names is None else "classification"
    return PreparedData(task, splits["train"], splits["validation"], splits["test"], names, k, problem,
                        main_metric(problem, k, task.main_metric))
