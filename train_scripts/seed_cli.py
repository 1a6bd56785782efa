"""What ``train_roberta.py`` and ``train_vit.py`` share: the TensLoRA+ seed's flags -> ``tenslora train``.

The seed scripts (``python train_scripts/train_roberta.py tenslora --tensor-method att_qkv_depth
--n-components 8_8_8_8_8``) are kept as thin front ends: they translate the seed's flags into
``tenslora train`` options (table: ``docs/seed-commands.md``) and run the ``tenslora`` CLI in this
process. Nothing here trains; :mod:`tenslora.train` does.

``--n-components`` keeps the seed's mode order, which is tenslora's: ``input``, then ``output`` or
``head_dim, heads``, then ``qkv``, then ``layers`` (the original TensLoRA code counts parameters and
names factors in that order). The seed's ``--scaling s`` multiplies the update directly (its PEFT
baseline sets ``lora_alpha = r * s``); tenslora scales by ``alpha / r_input``, so ``alpha = s * r_input``.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA_TYPES = ("lora", "lora_hf", "custom_lora")  # the seed's LoRA baselines: all PEFT LoRA here
SEED_TYPES = ("tenslora", *LORA_TYPES)
MODE_MULTIPLIERS = {  # the seed's per-factor learning-rate flags -> tenslora mode names
    "lr_input_mult": "input", "lr_headdim_mult": "head_dim", "lr_heads_mult": "heads", "lr_qkv_mult": "qkv",
    "lr_layers_mult": "layers", "lr_output_mult": "output"}
TEST_SAMPLES = (500, 128)  # the seed's --test: 500 training and 128 validation examples
MONITOR_EVERY = 10  # --compute-detailed-metrics: gradient norms and spectra every this many steps


@dataclass(frozen=True)
class Defaults:
    """One seed script's defaults, and what they become when the hub cannot be reached."""

    model: str
    offline_model: str
    dataset: str
    offline_dataset: str
    dataset_hub_id: str | None  # None: the default dataset needs no hub
    datasets: dict  # the seed's dataset names -> tenslora task names (others unchanged)


def make_app(command):
    """A Typer app of one seed script's ``command``; extra options pass through to ``tenslora train``."""
    import typer
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)
    return app


def run(command) -> None:
    """Run a seed script's ``command`` on the ``tenslora`` package next to this directory, from any cwd,
    installed or not."""
    use_checkout(REPO_ROOT)
    make_app(command)()


def use_checkout(root: Path) -> None:
    """Import ``tenslora`` from the checkout at ``root`` (when it has one) rather than from elsewhere."""
    if (root / "tenslora" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


@functools.cache
def hub_unreachable() -> bool:
    """True when offline mode is set (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) or the hub does not answer
    a TCP connection within tenslora's probe timeout."""
    from huggingface_hub import constants

    from tenslora.hub.registry import hub_unreachable as probe
    from tenslora.hub.registry import offline_mode
    return offline_mode() or probe(constants.ENDPOINT) is not None


def model_cached(repo_id: str) -> bool:
    from tenslora.hub.registry import hub_cached
    return hub_cached(repo_id)


def dataset_cached(hub_id: str) -> bool:
    """Whether the hub dataset (any configuration) was downloaded before (hub or ``datasets`` cache)."""
    from huggingface_hub.constants import HF_HUB_CACHE
    hub = Path(HF_HUB_CACHE) / ("datasets--" + hub_id.replace("/", "--"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or
                          Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "datasets")
    return hub.is_dir() or (datasets_cache / hub_id.replace("/", "___")).is_dir()


def resolve_defaults(model: str | None, dataset: str | None, defaults: Defaults) -> tuple[str, str]:
    """The model and task to train: what was given, else the seed's default, else (hub unreachable and
    the default not cached) the offline stand-in, with a one-line notice."""
    if model is None:
        model = defaults.model
        if not model_cached(model) and hub_unreachable():
            notice(f"the hub is unreachable and {model} is not cached: using the offline {defaults.offline_model}")
            model = defaults.offline_model
    if dataset is None:
        dataset = defaults.dataset
        if defaults.dataset_hub_id and not dataset_cached(defaults.dataset_hub_id) and hub_unreachable():
            notice(f"the hub is unreachable and {dataset} is not cached: using the offline "
                   f"{defaults.offline_dataset} task")
            dataset = defaults.offline_dataset
    return model, defaults.datasets.get(dataset, dataset)


def input_rank(n_components: str) -> int:
    """The input-mode rank (the first of ``8_8_4``, or the single rank)."""
    from tenslora.config import parse_ranks
    ranks = parse_ranks(n_components)
    return ranks if isinstance(ranks, int) else ranks[0]


def adapter_options(lora_type: str, tensor_method: str | None, tensor_fac: str | None, tensor_init: str,
                    n_components: str, scaling: float) -> list[str]:
    """``--construction/--factorization/--init/--ranks/--alpha`` of the seed's adapter flags."""
    if lora_type not in SEED_TYPES:
        raise ValueError(f"lora type {lora_type!r} is not allowed; allowed: {', '.join(SEED_TYPES)}")
    alpha = scaling * input_rank(n_components)
    if lora_type in LORA_TYPES:
        return ["--construction", "lora", "--ranks", n_components, "--alpha", repr(alpha)]
    if tensor_method is None:
        raise ValueError("tenslora needs --tensor-method (att, qkv, depth, att_qkv, att_depth, qkv_depth, "
                         "att_qkv_depth)")
    return ["--construction", tensor_method, "--factorization", tensor_fac or "tucker", "--init", tensor_init,
            "--ranks", n_components, "--alpha", repr(alpha)]


def lr_options(lora_type: str, tensor_method: str | None, tensor_fac: str | None, lr_core_mult: float,
               mode_mults: dict[str, float]) -> list[str]:
    """``--core-lambda`` and ``--mode-lr`` from the seed's multipliers. As in the seed, they act on Tucker
    factors only; a multiplier without a matching Tucker core or mode is dropped with a notice."""
    tucker = lora_type == "tenslora" and (tensor_fac or "tucker") == "tucker"
    adapter = f"{tensor_method}/{tensor_fac or 'tucker'}" if lora_type == "tenslora" else lora_type
    modes = ()
    if tucker:
        from tenslora.constructions import get_construction
        modes = get_construction(tensor_method).mode_names
    out = []
    if lr_core_mult != 1.0:
        if tucker:
            out += ["--core-lambda", repr(lr_core_mult)]
        else:
            notice(f"--lr-core-mult {lr_core_mult:g} ignored: no Tucker core in {adapter}")
    given = {MODE_MULTIPLIERS[k]: v for k, v in mode_mults.items() if v != 1.0}
    kept = {m: v for m, v in given.items() if m in modes}
    for mode in given.keys() - kept.keys():
        notice(f"the {mode} learning-rate multiplier is ignored: no Tucker {mode} factor in {adapter}")
    if kept:
        out += ["--mode-lr", ",".join(f"{m}={v!r}" for m, v in kept.items())]
    return out


def precision_options(use_amp: bool) -> list[str]:
    """The seed's ``--use-amp`` (CUDA float16 autocast) -> ``--precision fp16`` when CUDA is there."""
    if not use_amp:
        return []
    import torch
    if not torch.cuda.is_available():
        notice("--use-amp needs CUDA, which is unavailable: training in full precision")
        return []
    return ["--precision", "fp16"]


def launch(argv: list[str], extra: list[str], print_command: bool, output_dir: str | None = None,
           use_wandb: bool = False) -> None:
    """Run ``tenslora ARGV [--output-dir DIR] EXTRA`` in this process (its errors: one line, exit code 2), or
    only print it. ``extra``: options passed through to ``tenslora train`` unchanged."""
    if output_dir:
        argv = [*argv, "--output-dir", output_dir]
    if use_wandb:
        notice("--use-wandb ignored: tenslora logs to TensorBoard (<run>/tb) and metrics.csv")
    argv = [*argv, *extra]
    line = "tenslora " + subprocess.list2cmdline(argv)
    if print_command:
        print(line)
        return
    print(line, file=sys.stderr)
    from tenslora.cli import main
    sys.argv = ["tenslora", *argv]
    main()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
