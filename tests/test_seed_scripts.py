"""The seed's commands (train_scripts/train_roberta.py, train_vit.py, tools/experiment_scheduler.py):
flag translation, the offline fallbacks, the mode order, and tiny real runs from another directory."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_train_utils import sentences, text_model, vit_model, write_csv, write_image_folder  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "train_scripts"
SCHEDULER = REPO / "tools" / "experiment_scheduler.py"
DOC = REPO / "docs" / "seed-commands.md"


@pytest.fixture
def seed(monkeypatch):
    """The scripts' modules (imported by path, as ``python train_scripts/X.py`` would) and their shared
    ``seed_cli``; the hub counts as unreachable and nothing as cached unless a test says otherwise."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import seed_cli
    monkeypatch.setattr(seed_cli, "hub_unreachable", lambda: True)
    monkeypatch.setattr(seed_cli, "model_cached", lambda repo_id: False)
    monkeypatch.setattr(seed_cli, "dataset_cached", lambda hub_id: False)
    modules = {}
    for name in ("train_roberta", "train_vit"):
        spec = importlib.util.spec_from_file_location(f"seed_script_{name}", SCRIPTS / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return seed_cli, modules


def invoke(seed, script: str, args: list[str]):
    """``python train_scripts/SCRIPT.py ARGS --print-command`` in-process: (exit code, options, stderr)."""
    seed_cli, modules = seed
    result = CliRunner().invoke(seed_cli.make_app(modules[script].main), ["--print-command", *map(str, args)])
    if result.exit_code != 0:
        return result.exit_code, None, result.stderr
    words = shlex.split(result.stdout.strip().splitlines()[-1])
    assert words[:2] == ["tenslora", "train"], words
    return 0, options(words[2:]), result.stderr


def options(words: list[str]) -> dict[str, str | bool]:
    """``--a 1 --flag --b x`` -> ``{"a": "1", "flag": True, "b": "x"}`` (a repeated option: the last, as Click)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(words):
        key = words[i].removeprefix("--")
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            out[key], i = words[i + 1], i + 2
        else:
            out[key], i = True, i + 1
    return out


# -- the README's command, as written ------------------------------------------------------------------
def test_readme_command_offline(seed):
    code, opts, err = invoke(seed, "train_roberta", ["tenslora", "--tensor-method", "att_qkv_depth",
                                                     "--n-components", "8_8_8_8_8"])
    assert code == 0, err
    assert opts == {"model": "minilm", "task": "tweets", "construction": "att_qkv_depth", "factorization": "tucker",
                    "init": "orthogonal", "ranks": "8_8_8_8_8", "alpha": "32.0", "lr": "0.0005", "max-steps": "0",
                    "epochs": "10", "batch-size": "64", "seed": "0", "weight-decay": "0.01", "scheduler": "cosine",
                    "warmup-ratio": "0.1"}
    assert err.splitlines() == [
        "notice: the hub is unreachable and roberta-base is not cached: using the offline minilm",
        "notice: the hub is unreachable and cola is not cached: using the offline tweets task"]


def test_defaults_kept_when_cached_or_online(seed, monkeypatch):
    seed_cli, _ = seed
    monkeypatch.setattr(seed_cli, "model_cached", lambda repo_id: True)
    monkeypatch.setattr(seed_cli, "dataset_cached", lambda hub_id: True)
    code, opts, err = invoke(seed, "train_roberta", ["lora", "--n-components", "8"])
    assert code == 0 and (opts["model"], opts["task"]) == ("roberta-base", "cola") and not err
    monkeypatch.setattr(seed_cli, "hub_unreachable", lambda: False)
    monkeypatch.setattr(seed_cli, "model_cached", lambda repo_id: False)
    code, opts, err = invoke(seed, "train_vit", ["lora", "--n-components", "8"])
    assert code == 0 and (opts["model"], opts["task"]) == ("google/vit-base-patch16-224", "fashion-mnist")
    code, opts, err = invoke(seed, "train_roberta", ["lora", "--model", "my-model", "--dataset", "mrpc"])
    assert (opts["model"], opts["task"]) == ("my-model", "mrpc")  # named ones never fall back


def test_hub_unreachable_reads_offline_variables(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import seed_cli
    seed_cli.hub_unreachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert seed_cli.hub_unreachable() is True
    seed_cli.hub_unreachable.cache_clear()


# -- every seed flag ---------------------------------------------------------------------------------------
ROBERTA_FLAGS = [  # (seed arguments after the lora type, expected tenslora options)
    (["--tensor-method", "qkv_depth", "--n-components", "4_8_3_6", "--scaling", "2"],
     {"construction": "qkv_depth", "ranks": "4_8_3_6", "alpha": "8.0"}),
    (["--tensor-method", "att", "--tensor-fac", "cp", "--n-components", "8"], {"factorization": "cp", "alpha": "32.0"}),
    (["--tensor-method", "att", "--tensor-init", "normal"], {"init": "normal", "ranks": "4", "alpha": "16.0"}),
    (["--tensor-method", "att", "--dataset", "mrpc"], {"task": "mrpc"}),
    (["--tensor-method", "att", "--lr", "1e-3"], {"lr": "0.001"}),
    (["--tensor-method", "att", "--n-epochs", "3"], {"epochs": "3", "max-steps": "0"}),
    (["--tensor-method", "att", "--batch-size", "16"], {"batch-size": "16"}),
    (["--tensor-method", "att", "--seed", "42"], {"seed": "42"}),
    (["--tensor-method", "att", "--test"], {"train-samples": "500", "eval-samples": "128"}),
    (["--tensor-method", "att", "--run-name", "phase7"], {"run-name": "phase7"}),
    (["--tensor-method", "att", "--lr-core-mult", "16"], {"core-lambda": "16.0"}),
    (["--tensor-method", "att_qkv_depth", "--lr-input-mult", "0.5", "--lr-headdim-mult", "2", "--lr-heads-mult", "3",
      "--lr-qkv-mult", "4", "--lr-layers-mult", "5"], {"mode-lr": "input=0.5,head_dim=2.0,heads=3.0,qkv=4.0,layers=5.0"}),
    (["--tensor-method", "qkv", "--lr-output-mult", "2"], {"mode-lr": "output=2.0"}),
    (["--tensor-method", "att", "--compute-detailed-metrics"], {"monitor-every": "10"}),
    (["--tensor-method", "att", "--output-dir", "out/x"], {"output-dir": "out/x"}),
    (["--tensor-method", "att", "--model", "some/model"], {"model": "some/model"}),
    (["--tensor-method", "att", "--n-epochs", "3", "--", "--max-steps", "5", "--no-progress"],
     {"max-steps": "5", "progress": None, "no-progress": True}),
]


@pytest.mark.parametrize("args,expected", ROBERTA_FLAGS)
def test_roberta_flag(seed, args, expected):
    code, opts, err = invoke(seed, "train_roberta", ["tenslora", *args])
    assert code == 0, err
    for key, value in expected.items():
        assert opts.get(key) == value, (key, opts)


VIT_FLAGS = [
    (["--tensor-method", "qkv_depth", "--n-components", "8_8_3_8"],
     {"construction": "qkv_depth", "factorization": "tucker", "alpha": "8.0", "model": "dinov2-small",
      "task": "fashion-mnist", "warmup-ratio": "0.0", "weight-decay": "0.01", "dropout": "0.0", "lr": "0.0005"}),
    (["--tensor-method", "att", "--dataset", "cifar", "--weight-decay", "0", "--dropout-prob", "0.1"],
     {"task": "cifar10", "weight-decay": "0.0", "dropout": "0.1"}),
    (["--tensor-method", "att", "--save-directory", "out/v"], {"output-dir": "out/v"}),
    (["--tensor-method", "att", "--output-dir", "out/w", "--seed", "3", "--n-epochs", "2", "--batch-size", "8"],
     {"output-dir": "out/w", "seed": "3", "epochs": "2", "batch-size": "8"}),
]


@pytest.mark.parametrize("args,expected", VIT_FLAGS)
def test_vit_flag(seed, args, expected):
    code, opts, err = invoke(seed, "train_vit", ["tenslora", *args])
    assert code == 0, err
    for key, value in expected.items():
        assert opts.get(key) == value, (key, opts)
    assert "google/vit-base-patch16-224 is not cached" in err


def test_lora_types_and_notices(seed):
    for lora_type in ("lora", "lora_hf", "custom_lora"):
        code, opts, err = invoke(seed, "train_roberta", [lora_type, "--n-components", "8", "--tensor-method", "att"])
        assert code == 0 and opts["construction"] == "lora" and opts["ranks"] == "8" and "factorization" not in opts
    code, opts, err = invoke(seed, "train_roberta", ["lora", "--n-components", "8", "--lr-core-mult", "4",
                                                     "--lr-layers-mult", "2", "--use-wandb"])
    assert code == 0 and "core-lambda" not in opts and "mode-lr" not in opts
    assert "notice: --lr-core-mult 4 ignored: no Tucker core in lora" in err
    assert "notice: the layers learning-rate multiplier is ignored: no Tucker layers factor in lora" in err
    assert "notice: --use-wandb ignored" in err
    code, opts, err = invoke(seed, "train_roberta", ["tenslora", "--tensor-method", "qkv_depth", "--lr-heads-mult", "2"])
    assert "mode-lr" not in opts and "no Tucker heads factor in qkv_depth/tucker" in err
    code, opts, err = invoke(seed, "train_roberta", ["tenslora", "--tensor-method", "qkv", "--use-amp"])
    import torch
    assert (opts.get("precision") == "fp16") if torch.cuda.is_available() else ("--use-amp needs CUDA" in err)


@pytest.mark.parametrize("args,message", [
    (["tenslora"], "error: tenslora needs --tensor-method"),
    (["qlora", "--tensor-method", "att"], "error: lora type 'qlora' is not allowed; allowed: tenslora, lora"),
    (["tenslora", "--tensor-method", "att", "--n-components", "8_x"], "error: ranks '8_x' must be integers"),
])
def test_errors_are_one_line(seed, args, message):
    code, _, err = invoke(seed, "train_roberta", args)
    assert code == 2 and err.strip().splitlines()[-1].startswith(message), err


def test_doc_table_names_every_flag(seed):
    import typer.main
    seed_cli, modules = seed
    doc = DOC.read_text()
    for name, module in modules.items():
        command = typer.main.get_command(seed_cli.make_app(module.main))
        for param in command.params:
            for flag in param.opts:
                if flag.startswith("--"):
                    assert f"`{flag}`" in doc or f"`{flag} " in doc or f"{flag}`" in doc, (name, flag)


# -- the mode order: the original TensLoRA parameter count -----------------------------------------------
def original_count(method: str, r: list[int], d: int, layers: int, heads: int) -> int:
    """Adapter parameters as the original TensLoRA code counts them (tenslora/utils/parameter_count.py
    in ax-le/TensLoRA), ranks in its order."""
    hd = d // heads
    sizes = {"att": (d, hd, heads), "qkv": (d, d, 3), "depth": (d, d, layers), "att_qkv": (d, hd, heads, 3),
             "att_depth": (d, hd, heads, layers), "qkv_depth": (d, d, 3, layers),
             "att_qkv_depth": (d, hd, heads, 3, layers)}[method]
    tensors = {"att": 3 * layers, "qkv": layers, "depth": 3, "att_qkv": layers, "att_depth": 3}.get(method, 1)
    return tensors * (sum(ri * di for ri, di in zip(r, sizes)) + math.prod(r))


@pytest.mark.parametrize("method", ["att", "qkv", "depth", "att_qkv", "att_depth", "qkv_depth", "att_qkv_depth"])
def test_n_components_order_is_tenslora_ranks_order(method):
    from tenslora.config import TensLoRAConfig
    from tenslora.params import predict_adapter_parameters
    from tenslora.targets import ModelShape
    d, heads, layers = 768, 12, 12  # RoBERTa-base
    shape = ModelShape(projections=("query", "key", "value"), layers=tuple(range(layers)), d_in=d, d_out=(d,) * 3,
                       head_dim=d // heads)
    n = len(TensLoRAConfig(construction=method).mode_names)
    ranks = [2, 5, 3, 1, 4][:n]  # distinct: a permuted order would count differently
    ours = predict_adapter_parameters(TensLoRAConfig(construction=method, ranks="_".join(map(str, ranks))), shape)
    assert ours == original_count(method, ranks, d, layers, heads)
    assert original_count("att_qkv_depth", [8] * 5, 768, 12, 12) == 39640  # the reference figure


# -- the scheduler ------------------------------------------------------------------------------------------
def test_ablation_file_is_the_seed_kind_of_queue():
    from tenslora.config import TensLoRAConfig
    from tenslora.constructions import get_construction
    from tenslora.layout import mode_sizes
    from tenslora.sweep.spec import expand, load_sweep
    from tenslora.targets import ModelShape
    spec = load_sweep(REPO / "tools" / "ablation.yaml")
    jobs = expand(spec)
    assert len(jobs) == 42 and {j.options["seed"] for j in jobs} == {0, 1, 2}
    minilm = ModelShape(projections=("query", "key", "value"), layers=tuple(range(6)), d_in=384, d_out=(384,) * 3,
                        head_dim=32)
    lambdas = {j.options.get("core_lambda") for j in jobs if j.options["ranks"] == "8_8_8_3_6"}
    assert lambdas == {1.0, 4.0, 8.0, 16.0}
    for job in jobs:
        o = job.options
        cfg = TensLoRAConfig(construction=o["construction"], factorization=o["factorization"], ranks=o["ranks"])
        ranks = cfg.mode_ranks()
        assert o["alpha"] == 4 * ranks["input"]  # the seed's scaling 4
        if cfg.method == "tenslora" and o["factorization"] == "tucker":
            sizes = mode_sizes(get_construction(o["construction"]), minilm, reduce=min)
            assert all(ranks[m] <= sizes[m] for m in ranks), (job.name, sizes)


def test_scheduler_argv():
    spec = importlib.util.spec_from_file_location("experiment_scheduler", SCHEDULER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.sweep_argv([]) == ["sweep", "run", str(REPO / "tools" / "ablation.yaml")]
    assert module.sweep_argv(["--dry-run"]) == ["sweep", "run", str(REPO / "tools" / "ablation.yaml"), "--dry-run"]
    assert module.sweep_argv(["x.yaml", "--cpu"]) == ["sweep", "run", "x.yaml", "--cpu"]


# -- tiny real runs, as a user would start them: by path, from another directory, no PYTHONPATH -------------
def run_script(path: Path, args: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


QUICK = ["--", "--max-steps", "3", "--eval-batch-size", "16", "--no-progress", "--threads", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("lora_type,method,components", [("tenslora", "att_qkv_depth", "2_3_2_1_2"),
                                                         ("lora", None, "2")])
def test_roberta_script_trains(tmp_path, text_model, lora_type, method, components):  # noqa: F811
    data = write_csv(tmp_path / "d.csv", sentences(60))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    args = [lora_type, "--n-components", components, "--model", text_model, "--dataset", data, "--batch-size", "8",
            "--n-epochs", "1", "--scaling", "4", "--output-dir", "run"]
    args += ["--tensor-method", method] if method else []
    result = run_script(SCRIPTS / "train_roberta.py", args + QUICK, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tenslora train --model" in result.stderr
    summary = json.loads((cwd / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 3
    config = json.loads((cwd / "run" / "config.json").read_text())
    if method:
        assert summary["ranks"] == {"input": 2, "head_dim": 3, "heads": 2, "qkv": 1, "layers": 2}
        # tiny BERT: hidden 32, 4 heads, 2 layers; counted as the original TensLoRA code does
        assert summary["adapter_parameters"] == original_count(method, [2, 3, 2, 1, 2], 32, 2, 4)
        assert config["train"]["alpha"] == 8.0  # scaling 4 x input rank 2
    else:
        assert config["train"]["construction"] == "lora" and config["train"]["alpha"] == 8.0


@pytest.mark.slow
def test_vit_script_trains(tmp_path, vit_model):  # noqa: F811
    images = write_image_folder(tmp_path / "imgs", per_class=8)
    result = run_script(SCRIPTS / "train_vit.py", ["tenslora", "--tensor-method", "qkv_depth", "--n-components",
                                                   "2_2_2_2", "--model", vit_model, "--dataset", images,
                                                   "--batch-size", "4", "--save-directory", tmp_path / "run", *QUICK],
                        tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["ranks"] == {"input": 2, "output": 2, "qkv": 2, "layers": 2}


@pytest.mark.slow
def test_scheduler_runs_a_sweep(tmp_path, text_model):  # noqa: F811
    data = write_csv(tmp_path / "d.csv", sentences(60))
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "name": "tiny", "base": {"model": str(text_model), "task": str(data), "construction": "qkv_depth",
                                 "ranks": "2_2_2_2", "max_steps": 2, "batch_size": 8, "eval_batch_size": 16,
                                 "progress": False, "threads": 1},
        "grid": {"core_lambda": [1.0, 4.0]}, "seeds": [0], "retries": 0, "timeout_s": 600}))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    dry = run_script(SCHEDULER, ["--dry-run"], cwd)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "42 job(s); sweep directory sweeps/ablation" in dry.stdout and not (cwd / "sweeps").exists()
    result = run_script(SCHEDULER, [sweep, "--dir", "sw", "--cpu", "--slots", "1"], cwd)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = sorted(p.parent.name for p in (cwd / "sw" / "runs").glob("*/summary.json"))
    assert runs == ["core_lambda=1.0,seed=0", "core_lambda=4.0,seed=0"]
