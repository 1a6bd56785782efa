"""TensLoRA+ through the real trainer: --monitor-every, tenslora allocate, --ranks auto (tiny models)."""
import csv
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

tu = pytest.importorskip("test_train_utils")
text_model = tu.text_model  # the session fixture

QUICK = ["--batch-size", "8", "--eval-batch-size", "16", "--no-progress"]


@pytest.mark.slow
def test_train_with_monitor(tmp_path, text_model):  # noqa: F811
    from tenslora.train.config import TrainConfig
    from tenslora.train.loop import train
    data = tu.write_csv(tmp_path / "d.csv", tu.sentences(60))
    run = tmp_path / "run"
    cfg = TrainConfig(task=str(data), model=str(text_model), construction="att_qkv_depth", ranks="2",
                      max_steps=5, batch_size=8, eval_batch_size=16, monitor_every=2, core_lambda=4,
                      output_dir=str(run), progress=False)
    train(cfg)
    rows = list(csv.DictReader(open(run / "spectra.csv")))
    assert sorted({int(r["step"]) for r in rows}) == [2, 4, 5]
    groups = {r["mode"] for r in rows if r["tensor"] == "group"}
    assert {"core", "factor:input", "factor:layers", "head"} <= groups
    for png in ("monitor_entropy.png", "monitor_spectra.png", "monitor_grad_norms.png"):
        assert (run / png).stat().st_size > 1000


@pytest.mark.slow
def test_allocate_cli_and_ranks_auto(tmp_path, capsys, text_model, monkeypatch):  # noqa: F811
    from tenslora.plus import allocate as A
    from tenslora.train.config import TrainConfig
    from tenslora.train.loop import train
    data = tu.write_csv(tmp_path / "d.csv", tu.sentences(60))
    out = tmp_path / "alloc"
    code, stdout, err = tu.run_cli(["allocate", "--task", data, "--model", text_model, "--budget", "lora:1",
                                    "--construction", "qkv_depth", "--probe-steps", "3", "--probe-rank", "4",
                                    "--output-dir", out, "--batch-size", "8", "--no-progress", "--reverse"], capsys)
    assert code == 0, err
    record = json.loads((out / "allocation.json").read_text())
    assert record["predicted_parameters"] <= record["budget"] and record["probe"]["steps"] == 3
    assert set(record["ranks"]) == {"input", "output", "qkv", "layers"}
    assert stdout.strip().splitlines()[-1] == f"ranks: {record['reverse_allocation']['ranks_string']}"
    # allocating again into the same directory replaces the probe (the tool's own scratch), not refused
    code, _, err = tu.run_cli(["allocate", "--task", data, "--model", text_model, "--budget", "lora:1",
                               "--construction", "qkv_depth", "--probe-steps", "3", "--probe-rank", "4",
                               "--output-dir", out, "--batch-size", "8", "--no-progress"], capsys)
    assert code == 0, err

    code, _, err = tu.run_cli(["allocate", "--task", data, "--model", text_model, "--budget", "10",
                               "--construction", "qkv_depth", "--probe-steps", "3", "--output-dir", tmp_path / "x",
                               "--no-progress"], capsys)
    assert code == 2 and "budget 10 is below the" in err

    monkeypatch.setitem(A.PROBE_DEFAULTS, "probe_steps", 3)
    run = tmp_path / "auto"
    cfg = TrainConfig(task=str(data), model=str(text_model), construction="att_qkv_depth", ranks="auto",
                      budget=record["budget"], max_steps=2, batch_size=8, eval_batch_size=16,
                      output_dir=str(run), progress=False)
    summary = train(cfg)
    auto = json.loads((run / "allocation" / "allocation.json").read_text())
    assert summary["ranks"] == auto["ranks"]
    assert summary["adapter_parameters"] == auto["predicted_parameters"] <= record["budget"]

    # the probe runs first but leaves no trace: the same ranks given by hand train to the same weights
    fixed = tmp_path / "fixed"
    train(dataclasses.replace(cfg, ranks=auto["ranks_string"], budget=None, output_dir=str(fixed)))
    name = "final_adapter/adapter_model.safetensors"  # adapter tensors and the task head
    a, b = load_file(run / name), load_file(fixed / name)
    assert a.keys() == b.keys() and any(k.startswith("head.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
