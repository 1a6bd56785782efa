"""What a task loader returns: splits of examples with raw labels, and what the task is."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


class Rows(Sequence):
    """A lazy sequence of input dicts: ``rows[i] -> {"text": .., "text_pair": ..}`` or ``{"image": ..}``."""

    def __init__(self, n: int, get: Callable[[int], dict]):
        self._n, self._get = n, get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._get(int(i) % self._n)

    @classmethod
    def from_columns(cls, columns: dict[str, Sequence]) -> "Rows":
        n = len(next(iter(columns.values())))
        return cls(n, lambda i: {k: v[i] for k, v in columns.items()})


@dataclass
class Split:
    """One split: ``inputs[i]`` (lazy) and ``labels[i]`` (eager: raw strings, ints or floats)."""

    inputs: Sequence[dict]
    labels: list

    def __post_init__(self):
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"split has {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "Split":
        idx = [int(i) for i in indices]
        base = self.inputs
        return Split(Rows(len(idx), lambda i: base[idx[i]]), [self.labels[i] for i in idx])


@dataclass
class TaskData:
    """A loaded task before the split protocol.

    splits: any of ``train``, ``validation``, ``test`` (missing ones are held out from train).
    kind: ``text`` or ``image``. label_names: class names by index when the source defines them
    (else they come from the training labels). main_metric: default ``--select-metric`` (None: the
    problem type's, see :func:`tenslora.train.metrics.main_metric`).
    test_source: where the test split comes from, for the summary (e.g. "official validation split").
    """

    name: str
    kind: str
    splits: dict[str, Split]
    label_names: list[str] | None = None
    problem_type: str = "classification"
    main_metric: str | None = None
    validation_size: float = 0.1
    test_size: float = 0.1
    test_source: str = "test split"
    notes: dict = field(default_factory=dict)


def hf_split(dataset, input_columns: dict[str, str], label_column: str) -> Split:
    """A ``datasets.Dataset`` as a lazy :class:`Split` (labels read as one column)."""
    missing = [c for c in [*input_columns.values(), label_column] if c not in dataset.column_names]
    if missing:
        raise ValueError(f"column {missing[0]!r} not found; available columns: {', '.join(dataset.column_names)}")
    labels = list(dataset[label_column])

    def get(i: int) -> dict:
        row = dataset[i]
        return {key: row[col] for key, col in input_columns.items()}
    return Split(Rows(len(dataset), get), labels)


def random_indices(n: int, seed: int, stream: str) -> np.ndarray:
    """A permutation of ``range(n)`` fixed by ``seed`` and a stream name (independent streams)."""
    import hashlib
    key = int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little")
    return np.random.default_rng(key).permutation(n)
