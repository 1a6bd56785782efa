"""End-to-end runs on tiny random models saved like hub models (loaded through the CLI's path)."""
import csv
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from test_train_utils import (QUICK, Crash, run_cli, sentences, text_model, vit_model, write_csv,  # noqa: F401
                              write_idx, write_image_folder, write_jsonl)
from tenslora.train.config import TrainConfig
from tenslora.train.loop import train

METRICS = ("test_accuracy", "test_macro_f1", "test_mcc")


def _summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_text_csv_outputs_evaluate_predict(tmp_path, capsys, text_model):  # noqa: F811
    data = write_csv(tmp_path / "d.csv", sentences(60))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--task", data, "--model", text_model, "--output-dir", run, *QUICK,
                              "--eval-every", "2"], capsys)
    assert code == 0, err
    assert "best (step" in out and "majority-class baseline" in out
    s = _summary(run)
    assert s["status"] == "done" and s["steps"] == 4
    assert s["adapter_parameters"] > 0 and s["trainable_parameters"] > s["adapter_parameters"]
    for key in ("best", "final"):
        assert all(m in s[key] for m in METRICS) and "validation_macro_f1" in s[key] and "step" in s[key]
    assert s["final"]["step"] == 4 and s["best"]["step"] in (2, 4)
    assert s["wall_time_s"] > 0 and s["steps_per_second"] > 0 and s["peak_memory_mb"] > 0
    for name in ("config.json", "metrics.csv", "loss.png", "validation_metrics.png",
                 "best_adapter/adapter_model.safetensors", "final_adapter/tenslora_config.json"):
        assert (run / name).is_file(), name
    assert any(f.name.startswith("events.out.tfevents") for f in (run / "tb").iterdir())
    assert not (run / "checkpoint").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows if r["validation_accuracy"]] == ["2", "4"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["task"] == str(data) and cfg["resolved"]["label_names"] == ["0", "1"]

    code, out, err = run_cli(["evaluate", run, "--adapter", "final", "--json"], capsys)
    assert code == 0, err
    again = json.loads(out)
    for m in METRICS:
        assert again[m] == pytest.approx(s["final"][m])
    code, out, err = run_cli(["evaluate", run, "--split", "validation"], capsys)
    assert code == 0 and "validation_accuracy" in out

    texts = tmp_path / "texts.txt"
    texts.write_text("bad film\n\ngreat acting\n")
    code, out, err = run_cli(["predict", run, "good movie", "--file", texts, "--json"], capsys)
    assert code == 0, err
    preds = json.loads(out)
    assert [p["input"] for p in preds] == ["good movie", "bad film", "great acting"]
    for p in preds:
        assert p["label"] in ("0", "1") and sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    code, out, _ = run_cli(["predict", run, "good movie"], capsys)
    assert code == 0 and out.split("\t")[0] in ("0", "1")


@pytest.mark.slow
def test_jsonl_sentence_pairs_with_lora(tmp_path, capsys, text_model):  # noqa: F811
    data = write_jsonl(tmp_path / "p.jsonl", sentences(50, pairs=True))
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--task", data, "--model", text_model, "--text-pair-column", "text2",
                            "--construction", "lora", "--ranks", "2", "--lora-plus-ratio", "4",
                            "--output-dir", run, *QUICK], capsys)
    assert code == 0, err
    s = _summary(run)
    assert s["construction"] == "lora" and s["adapter_parameters"] == 2 * (32 + 32) * 3 * 2
    assert json.loads((run / "config.json").read_text())["resolved"]["task_notes"]["text_pair_column"] == "text2"


@pytest.mark.slow
def test_image_folder_and_predict_images(tmp_path, capsys, vit_model):  # noqa: F811
    root = write_image_folder(tmp_path / "imgs", per_class=8)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--task", root, "--model", vit_model, "--construction", "att_qkv_depth",
                            "--ranks", "2", "--output-dir", run, *QUICK], capsys)
    assert code == 0, err
    s = _summary(run)
    assert s["select_metric"] == "accuracy" and all(m in s["best"] for m in METRICS)
    code, out, err = run_cli(["predict", run, "--images", root / "cats" / "0.png", root / "owls" / "1.png",
                              "--json"], capsys)
    assert code == 0, err
    assert {p["label"] for p in json.loads(out)} <= {"cats", "dogs", "owls"}


@pytest.mark.slow
def test_fashion_mnist(tmp_path, capsys, vit_model, monkeypatch):  # noqa: F811
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        monkeypatch.setenv("TENSLORA_FASHION_MNIST_DIR", str(write_idx(tmp_path / "fm", 80, 20)))
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--task", "fashion-mnist", "--model", vit_model, "--train-samples", "32",
                            "--eval-samples", "16", "--image-size", "14", "--output-dir", run, *QUICK], capsys)
    assert code == 0, err
    s = _summary(run)
    assert s["task"] == "fashion-mnist" and s["data_sizes"]["train"] == 32 and s["data_sizes"]["test"] == 16


class Record:
    def __init__(self):
        self.events, self.grad_ok = [], True

    def on_train_begin(self, adapted, accelerator, output_dir):
        self.events.append(("begin", output_dir.name))

    def after_backward(self, step, adapted):
        grads = [p.grad for p in adapted.parameters() if p.requires_grad]
        self.grad_ok &= all(g is not None and torch.isfinite(g).all() for g in grads)
        self.events.append(("backward", step))

    def on_step_end(self, step, adapted, logs):
        self.events.append(("step", step, logs["step"]))

    def on_train_end(self, adapted):
        self.events.append(("end",))


@pytest.mark.slow
def test_resume_is_exact(tmp_path, text_model):  # noqa: F811
    data = write_csv(tmp_path / "d.csv", sentences(50))
    base = TrainConfig(task=str(data), model=str(text_model), batch_size=4, grad_accum=2, max_steps=7, eval_every=2,
                       eval_batch_size=8, lr=5e-3, dropout=0.1, progress=False, log_every=1)

    caller = torch.get_rng_state()
    rec = Record()
    full = train(dataclasses.replace(base, output_dir=str(tmp_path / "full")), callbacks=[rec])
    assert torch.equal(torch.get_rng_state(), caller)  # the caller's RNG is left as found
    assert rec.grad_ok and rec.events[0] == ("begin", "full") and rec.events[-1] == ("end",)
    assert [e[1] for e in rec.events if e[0] == "backward"] == list(range(1, 8))

    torch.rand(17)  # what the caller drew before does not matter: dropout follows the run's seed
    cut = dataclasses.replace(base, output_dir=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        train(cut, callbacks=[Crash(5)])  # checkpoint of step 4 (mid-epoch) is on disk
    assert (tmp_path / "cut" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "cut" / "summary.json").exists()
    torch.manual_seed(123)  # the resumed run restores the RNG state, whatever the caller's
    resumed = train(dataclasses.replace(cut, resume=True))

    for key in ("best", "final"):
        assert resumed[key] == full[key]
    a = load_file(str(tmp_path / "full" / "final_adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "metrics.csv").read_text() == (tmp_path / "cut" / "metrics.csv").read_text()
    # a finished run is not run again; resuming with other options is refused
    with pytest.raises(ValueError, match=r"cannot --resume .* lr \(was 0.005, now 0.1\)"):
        crash2 = dataclasses.replace(base, output_dir=str(tmp_path / "cut2"))
        with pytest.raises(KeyboardInterrupt):
            train(crash2, callbacks=[Crash(3)])
        train(dataclasses.replace(crash2, resume=True, lr=0.1))
    assert train(dataclasses.replace(cut, resume=True))["wall_time_s"] == resumed["wall_time_s"]


@pytest.mark.slow
def test_best_vs_final_are_reported_from_validation(tmp_path, capsys, text_model):  # noqa: F811
    data = write_csv(tmp_path / "d.csv", sentences(60))
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--task", data, "--model", text_model, "--output-dir", run, *QUICK,
                            "--max-steps", "6", "--eval-every", "1", "--lr", "0.05", "--select-metric", "loss"], capsys)
    assert code == 0, err
    s = _summary(run)
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r["validation_loss"]]
    losses = [float(r["validation_loss"]) for r in rows]
    assert s["best"]["step"] == int(rows[losses.index(min(losses))]["step"])  # chosen on validation only
    assert s["best"]["validation_loss"] == pytest.approx(min(losses))
    for adapter in ("best", "final"):
        code, out, err = run_cli(["evaluate", run, "--adapter", adapter, "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["test_accuracy"] == pytest.approx(s[adapter]["test_accuracy"])


def test_accelerator_precision(monkeypatch):
    from tenslora.train import accel
    seen = {}

    class FakeAccelerator:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(accel, "Accelerator", FakeAccelerator)
    accel.build_accelerator(TrainConfig(precision="bf16"))
    assert seen["mixed_precision"] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        accel.build_accelerator(TrainConfig(precision="fp16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # fake only the hardware edge
    accel.build_accelerator(TrainConfig(precision="fp16"))
    assert seen["mixed_precision"] == "fp16" and seen["cpu"] is False
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        accel.build_accelerator(TrainConfig(precision="fp16", cpu=True))


@pytest.mark.slow
def test_two_processes_on_cpu(tmp_path, text_model):  # noqa: F811
    """The same command under torchrun: a 2-process gloo group, one writer, gathered evaluation."""
    import subprocess
    import sys
    data = write_csv(tmp_path / "d.csv", sentences(60))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tenslora",
                           "train", "--task", str(data), "--model", str(text_model), "--output-dir", str(run),
                           *QUICK, "--checkpoint-every", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("best (step") == 1  # only the main process reports
    s = _summary(run)
    assert s["num_processes"] == 2 and s["data_sizes"]["test"] == 6
    assert all(m in s["final"] for m in METRICS)


def test_gradient_checkpointing_option_trains_the_same_weights(tmp_path, capsys, text_model):  # noqa: F811
    """``--gradient-checkpointing`` (transformers' default settings) gives the same adapter as a plain run."""
    data = write_csv(tmp_path / "d.csv", sentences(40))
    runs = {}
    for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        run = tmp_path / flag.strip("-")
        code, _, err = run_cli(["train", "--task", data, "--model", text_model, "--output-dir", run, *QUICK,
                                "--construction", "att_qkv_depth", flag], capsys)
        assert code == 0, err
        runs[flag] = load_file(run / "final_adapter" / "adapter_model.safetensors")
        assert json.loads((run / "config.json").read_text())["train"]["gradient_checkpointing"] == (
            flag == "--gradient-checkpointing")
    plain, checkpointed = runs.values()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in plain.items() if k.endswith("core"))


def test_enable_gradient_checkpointing_turns_it_on_or_refuses():
    from torch import nn

    from conftest import tiny_bert
    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    from tenslora.train.session import enable_gradient_checkpointing
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig("qkv_depth", ranks=2))
    assert not adapted.base_model.is_gradient_checkpointing
    enable_gradient_checkpointing(adapted)
    assert adapted.base_model.is_gradient_checkpointing

    class Plain(nn.Module):
        base_model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="--gradient-checkpointing: Linear does not support"):
        enable_gradient_checkpointing(Plain())
