"""Per-mode spectra of a saved TensLoRA adapter, read from its files alone (no base model).

For claim 6: the effective rank ``exp(SVD entropy)`` of each mode-n unfolding of the trained tensor
(:func:`tenslora.plus.spectra.spectrum_metrics`; every tensor of the construction stacked, as
:func:`tenslora.plus.metrics.mode_spectra` does for a live model). Tucker and CP adapters only.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


def saved_tensors(adapter_dir: str | Path) -> dict[str, SimpleNamespace]:
    """``{tensor name: namespace(core, factors, mode_names, shape)}`` of a saved adapter directory.

    The adapter file holds ``adapters.<tensor>.tensor.core`` and ``adapters.<tensor>.tensor.factors.<mode>``
    (factor ``(d_mode, r_mode)``); the mode order is the construction's."""
    from tenslora.api import read_adapter_record
    from tenslora.config import TensLoRAConfig
    from tenslora.model import RECORD_KEY, WEIGHTS_FILE, read_weights

    adapter_dir = Path(adapter_dir)
    record = read_adapter_record(adapter_dir)
    if record.get("method") == "lora":
        raise ValueError(f"{adapter_dir} is a PEFT LoRA adapter; mode spectra need a TensLoRA tensor")
    modes = TensLoRAConfig.from_dict(record["config"]).mode_names
    weights = read_weights(adapter_dir / WEIGHTS_FILE)
    weights.pop(RECORD_KEY, None)
    parts: dict[str, dict] = {}
    for key, value in weights.items():
        if not key.startswith("adapters."):
            continue
        name, sep, param = key[len("adapters."):].partition(".tensor.")
        if not sep:
            continue
        entry = parts.setdefault(name, {"core": None, "factors": {}})
        if param == "core":
            entry["core"] = value
        elif param.startswith("factors."):
            entry["factors"][param[len("factors."):]] = value
    out = {}
    for name, entry in parts.items():
        missing = [m for m in modes if m not in entry["factors"]]
        if missing:
            raise ValueError(f"{adapter_dir}: tensor {name!r} has no factor for mode(s) {', '.join(missing)}")
        out[name] = SimpleNamespace(core=entry["core"], factors=entry["factors"], mode_names=tuple(modes),
                                    shape=tuple(entry["factors"][m].shape[0] for m in modes))
    if not out:
        raise ValueError(f"{adapter_dir}: no adapter tensors found")
    return out


def saved_mode_metrics(adapter_dir: str | Path) -> dict[str, dict[str, float]]:
    """``{mode: {"effective_rank", "entropy", "top1_energy", "max_rank", "norm"}}`` of a saved adapter."""
    from tenslora.plus.spectra import single_thread, spectrum_metrics, tensors_spectra

    with single_thread():
        spectra = tensors_spectra(saved_tensors(adapter_dir))
        return {mode: spectrum_metrics(s) for mode, s in spectra.items()}
