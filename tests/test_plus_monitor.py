"""Monitor: CSV, TensorBoard event file and PNGs from a tiny hand-written training loop."""
import csv
import json

import pytest
import torch

from tenslora.api import get_adapted_model
from tenslora.config import TensLoRAConfig
from tenslora.plus.monitor import Monitor, read_csv
from tenslora.plus.optim import build_param_groups
from conftest import tiny_bert


def run_loop(model, callbacks, steps=5, output_dir=None):
    opt = torch.optim.AdamW(build_param_groups(model, lr=1e-2, core_lambda=1.0))
    g = torch.Generator().manual_seed(0)
    for cb in callbacks:
        cb.on_train_begin(model, None, output_dir)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 50, (4, 6), generator=g)
        loss = model(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=g)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        for cb in callbacks:
            cb.after_backward(step, model)
        opt.step()
        opt.zero_grad()
        for cb in callbacks:
            cb.on_step_end(step, model, {"loss": float(loss.detach())})
    for cb in callbacks:
        cb.on_train_end(model)


@pytest.mark.parametrize("construction", ["att_qkv_depth", "att", "lora"])
def test_monitor_writes_csv_tb_pngs(tmp_path, construction):
    model = get_adapted_model(tiny_bert(), TensLoRAConfig(construction=construction, ranks=2))
    run_loop(model, [Monitor(every=2, per_tensor=construction == "att")], steps=5, output_dir=tmp_path)
    with open(tmp_path / "spectra.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = sorted({int(r["step"]) for r in rows})
    assert steps == [2, 4, 5]  # every 2, plus the last step
    series = read_csv(tmp_path / "spectra.csv")
    modes = ("input", "output", "qkv", "layers") if construction == "lora" else \
        TensLoRAConfig(construction=construction).mode_names
    for mode in modes:
        assert ("adapter", mode, "entropy") in series and ("adapter", mode, "top1_energy") in series
        assert (("adapter", mode, "grad_norm") in series) == (construction != "lora" or mode in ("input", "output"))
    groups = {m for (t, m, k) in series if t == "group"}
    assert groups >= ({"lora_A", "lora_B", "head"} if construction == "lora" else {"core", "factor:input", "head"})
    # gradients are logged at steps 2 and 4 only (after_backward), spectra at 2, 4, 5
    assert [s for s, _ in series[("group", "head", "grad_norm")]] == [2, 4]
    if construction == "att":
        assert any(t == "query_layer_1" for (t, m, k) in series)
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))
    for png in ("monitor_entropy.png", "monitor_spectra.png", "monitor_grad_norms.png"):
        assert (tmp_path / png).stat().st_size > 1000
    final = json.loads((tmp_path / "spectra_final.json").read_text())
    assert final["step"] == 5 and "input" in final["spectra"]["adapter"]


def test_monitor_uses_given_writer_and_validates(tmp_path):
    class Writer:
        def __init__(self):
            self.tags = []

        def add_scalar(self, tag, value, step):
            self.tags.append((tag, step))

        def flush(self):
            pass

    writer = Writer()
    model = get_adapted_model(tiny_bert(2), TensLoRAConfig(construction="qkv_depth", ranks=2))
    run_loop(model, [Monitor(every=1, writer=writer, plots=False)], steps=2, output_dir=tmp_path)
    assert ("tensloraplus/adapter/layers/entropy", 2) in writer.tags
    assert ("tensloraplus/group/core/grad_norm", 1) in writer.tags
    assert not list(tmp_path.glob("tensorboard/*")) and not list(tmp_path.glob("*.png"))
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Monitor(every=0)


def test_fresh_run_replaces_previous_outputs_resume_appends(tmp_path):
    model = get_adapted_model(tiny_bert(2), TensLoRAConfig(construction="qkv_depth", ranks=2))
    run_loop(model, [Monitor(every=1, plots=False)], steps=3, output_dir=tmp_path)
    run_loop(model, [Monitor(every=2, plots=False)], steps=2, output_dir=tmp_path)
    assert [s for s, _ in read_csv(tmp_path / "spectra.csv")[("adapter", "input", "entropy")]] == [2]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    (tmp_path / "checkpoint").mkdir()  # the trainer resumes: rows are appended
    run_loop(model, [Monitor(every=1, plots=False)], steps=1, output_dir=tmp_path)
    assert [s for s, _ in read_csv(tmp_path / "spectra.csv")[("adapter", "input", "entropy")]] == [1, 2]
