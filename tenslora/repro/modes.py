"""Per-mode spectra of a saved TensLoRA adapter, read from its files alone (no base model).

For claim 6: the effective rank ``exp(SVD entropy)`` of each mode-n unfolding of the trained tensor
(:func:`tenslora.plus.spectra.spectrum_metrics`; every tensor of the construction stacked, as
:func:`tenslora.plus.metrics.mode_spectra` does for a live model), for every factorization.
"""
from __future__ import annotations

from pathlib import Path


def saved_tensors(adapter_dir: str | Path) -> dict:
    """``{tensor name: the factorized tensor}`` of a saved adapter directory, rebuilt from its file: the
    adapter file holds ``adapters.<tensor>.tensor.<parameter>``; the mode order is the construction's."""
    from tenslora.api import read_adapter_record, read_adapter_weights
    from tenslora.config import TensLoRAConfig
    from tenslora.tensor.factorized import FACTORIZATIONS

    adapter_dir = Path(adapter_dir)
    record = read_adapter_record(adapter_dir)
    method = record.get("method")
    if method != "tenslora":
        what = "a PEFT LoRA adapter" if method == "lora" else f"a {method!r} adapter"
        raise ValueError(f"{adapter_dir} is {what}; mode spectra need a TensLoRA tensor")
    config = TensLoRAConfig.from_dict(record["config"])
    states: dict[str, dict] = {}
    for key, value in read_adapter_weights(adapter_dir).items():
        name, sep, param = key.removeprefix("adapters.").partition(".tensor.")
        if key.startswith("adapters.") and sep:
            states.setdefault(name, {})[param] = value
    if not states:
        raise ValueError(f"{adapter_dir}: no adapter tensors found")
    kind = FACTORIZATIONS[config.factorization]
    out = {}
    for name, state in states.items():
        if config.targets == "all-linear" and name.split("__")[0].startswith("mlp"):
            continue  # the MLP's own tensors (other modes): these are the attention tensors' spectra
        try:
            out[name] = kind.from_state(config.mode_names, state)
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"{adapter_dir}: tensor {name!r} does not match a {config.factorization} tensor of "
                             f"modes {', '.join(config.mode_names)} ({exc})") from None
    return out


def saved_mode_metrics(adapter_dir: str | Path) -> dict[str, dict[str, float]]:
    """``{mode: {"effective_rank", "entropy", "top1_energy", "max_rank", "norm"}}`` of a saved adapter."""
    from tenslora.plus.spectra import single_thread, spectrum_metrics, tensors_spectra

    with single_thread():
        spectra = tensors_spectra(saved_tensors(adapter_dir))
        return {mode: spectrum_metrics(s) for mode, s in spectra.items()}
