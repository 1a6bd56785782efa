"""Adapter configuration: one dataclass for every construction and for the PEFT LoRA baseline."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tenslora.constructions import METHODS, TARGETS, get_construction
from tenslora.tensor.factorized import FACTORIZATIONS, INITS

Ranks = int | Sequence[int] | Mapping[str, int]


@dataclass
class TensLoRAConfig:
    """What to adapt and how.

    construction: one of ``att, qkv, depth, att_qkv, att_depth, qkv_depth, att_qkv_depth``, ``lora``
    (the PEFT LoRA baseline) or ``none`` (a linear probe: only the task head trains).
    factorization: ``tucker`` (one rank per mode), ``cp`` (one rank) or ``tt`` (tensor-train: one rank
    per bond between consecutive modes, ``N - 1`` for ``N`` modes).
    ranks: an int (all modes/bonds), one int per mode (TT: per bond) in construction order, a
    ``{mode: rank}`` mapping (TT: keyed by the mode on each bond's input side, i.e. every mode but the
    last), or a string like ``"8_8_4_4_2"``. The update is scaled by ``alpha / r`` with ``r`` the
    input-mode rank (TT: the first bond's, ``r_1``; LoRA's meaning). ``targets``: ``qkv`` (the attention
    projections Q, K, V), ``qkvo`` (plus the output projection) or ``all-linear`` (plus the MLP). ``target_modules``: leaf names of
    the projections to adapt, in ``qkv`` order (default: found per architecture). ``modules_to_save``:
    trainable task-head modules (default: ``classifier``/``score`` where present).
    """

    construction: str = "att_qkv_depth"
    factorization: str = "tucker"
    ranks: Ranks = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init: str = "orthogonal"
    seed: int = 0
    targets: str = "qkv"
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.construction not in METHODS:
            raise ValueError(f"unknown construction {self.construction!r}; allowed: {', '.join(METHODS)}")
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"unknown factorization {self.factorization!r}; allowed: {', '.join(FACTORIZATIONS)}")
        if self.targets not in TARGETS:
            raise ValueError(f"unknown targets {self.targets!r}; allowed: {', '.join(TARGETS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; allowed: {', '.join(INITS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if isinstance(self.ranks, str):
            self.ranks = parse_ranks(self.ranks)
        if isinstance(self.ranks, list):
            self.ranks = tuple(self.ranks)
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)
        self.mode_ranks()  # validate early

    @property
    def method(self) -> str:
        return self.construction if self.construction in ("lora", "none") else "tenslora"

    @property
    def mode_names(self) -> tuple[str, ...]:
        if self.method == "lora":
            return ("input", "output")
        if self.method == "none":
            return ()
        return get_construction(self.construction).mode_names

    def mode_ranks(self) -> dict[str, int]:
        """``{mode: rank}`` in mode order (CP and LoRA: the same rank for every mode; TT: one per bond,
        keyed by the mode on its input side, so every mode but the last)."""
        ranks = self.ranks
        if self.method == "none":
            return {}
        kind = FACTORIZATIONS[self.factorization]
        names = self.mode_names if self.method == "lora" else kind.rank_modes(self.mode_names)
        single = self.method == "lora" or kind.single_rank
        bonds = self.method != "lora" and kind.rank_unit == "bond"
        if isinstance(ranks, Mapping):
            unknown = set(ranks) - set(names)
            missing = set(names) - set(ranks)
            if unknown or missing:
                raise ValueError(f"ranks {dict(ranks)} must name exactly the modes {', '.join(names)}"
                                 + (" (a TT bond is named by the mode on its input side)" if bonds else ""))
            values = [ranks[n] for n in names]
        elif isinstance(ranks, int):
            values = [ranks] * len(names)
        else:
            values = list(ranks)
            if single and len(values) == 1:
                values = values * len(names)
            if len(values) != len(names):
                what = f"one rank per mode ({', '.join(names)})"
                if single:
                    what = "one rank"
                elif bonds:
                    what = f"{len(names)} bond ranks, one per pair of consecutive modes ({', '.join(self.mode_names)})"
                raise ValueError(f"ranks {tuple(ranks)} have the wrong length for {self.construction}/"
                                 f"{self.factorization}: expected {what}")
        for name, value in zip(names, values):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"rank {value!r} of mode {name!r} must be a positive integer")
        if single and len(set(values)) != 1:
            raise ValueError(f"{self.factorization if self.method != 'lora' else 'lora'} takes one rank "
                             f"for all modes, got {tuple(values)}")
        return dict(zip(names, values))

    @property
    def scaling(self) -> float:
        return self.alpha / self.mode_ranks()["input"] if self.method != "none" else 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(self.ranks, tuple):
            out["ranks"] = list(self.ranks)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "TensLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown adapter config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)


def parse_ranks(text: str) -> int | tuple[int, ...]:
    """``"8"`` -> 8, ``"8_8_4"`` or ``"8,8,4"`` -> (8, 8, 4)."""
    parts = [p for p in text.replace(",", "_").split("_") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"ranks {text!r} must be integers separated by '_' (e.g. 8_8_4_4_2)") from None
    if not values:
        raise ValueError(f"ranks {text!r} are empty")
    return values[0] if len(values) == 1 else tuple(values)


def warn_ranks_above_sizes(ranks: Mapping[str, int], sizes: Mapping[str, int], what: str = "",
                           limit: str = "its size") -> None:
    """A rank above its mode's size (or another ``limit``) adds parameters but no capacity: warn once per mode."""
    for mode, rank in ranks.items():
        if mode in sizes and rank > sizes[mode]:
            warnings.warn(f"{what}rank {rank} of mode {mode!r} exceeds {limit} {sizes[mode]}: "
                          "it adds parameters but no capacity", stacklevel=3)
