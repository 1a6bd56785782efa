"""Model-level metrics: aggregated over every tensor of a construction, and for the LoRA baseline."""
import pytest
import torch

from tenslora.api import get_adapted_model
from tenslora.config import TensLoRAConfig
from tenslora.plus import metrics as M
from tenslora.plus.spectra import spectrum_metrics
from tenslora.tensor.algebra import unfold
from conftest import tiny_bert


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def backward(model):
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()


@pytest.mark.parametrize("construction, factorization", [("att", "tucker"), ("qkv", "cp"),
                                                          ("att_qkv_depth", "tucker"), ("depth", "cp")])
def test_aggregated_metrics_match_brute_force(construction, factorization):
    model = get_adapted_model(tiny_bert(), TensLoRAConfig(construction=construction, factorization=factorization,
                                                           ranks=3))
    randomize(model)
    got = M.adapter_metrics(model, per_tensor=True, grads=False)
    tensors = M.adapter_tensors(model)
    for mode in model.adapter_config.mode_names:
        for name, group in [(M.AGGREGATE, list(tensors.values()))] + [(n, [t]) for n, t in tensors.items()]:
            if name != M.AGGREGATE and len(tensors) == 1:
                continue
            n = group[0].mode_names.index(mode)
            s = torch.linalg.svdvals(torch.cat([unfold(t.full().detach().double(), n) for t in group], 1))
            want = spectrum_metrics(s)
            for key in M.SPECTRUM_METRICS:
                assert got[name][mode][key] == pytest.approx(want[key], rel=1e-4), (name, mode, key)


def test_lora_metrics_match_stacked_delta_weights():
    model = get_adapted_model(tiny_bert(), TensLoRAConfig(construction="lora", ranks=2))
    randomize(model)
    got = M.adapter_metrics(model, per_tensor=True, grads=False)
    keys = [(t.layer, t.proj) for t in model.targets]
    layers, projs = sorted({k[0] for k in keys}), list(dict.fromkeys(k[1] for k in keys))
    full = torch.zeros(32, 32, len(projs), len(layers), dtype=torch.float64)
    for l, p in keys:
        full[:, :, projs.index(p), layers.index(l)] = model.delta_weight(l, p).detach().double().T
    for n, mode in enumerate(("input", "output", "qkv", "layers")):
        want = spectrum_metrics(torch.linalg.svdvals(unfold(full, n)))
        for key in M.SPECTRUM_METRICS:
            assert got[M.AGGREGATE][mode][key] == pytest.approx(want[key], rel=1e-4), (mode, key)
    l, p = keys[4]
    want = spectrum_metrics(torch.linalg.svdvals(model.delta_weight(l, p).detach().double()))
    assert got[f"layer_{l}.{p}"]["matrix"]["entropy"] == pytest.approx(want["entropy"], rel=1e-4)


def test_gradient_norms_aggregate_every_tensor():
    model = get_adapted_model(tiny_bert(), TensLoRAConfig(construction="att", ranks=2))
    randomize(model)
    backward(model)
    got = M.gradient_norms(model, per_tensor=True)
    tensors = M.adapter_tensors(model).values()
    want = torch.sqrt(sum(t.factors["heads"].grad.double().pow(2).sum() for t in tensors))
    assert got[M.AGGREGATE]["heads"] == pytest.approx(float(want), rel=1e-9)
    want_core = torch.sqrt(sum(t.core.grad.double().pow(2).sum() for t in tensors))
    assert got[M.AGGREGATE]["core"] == pytest.approx(float(want_core), rel=1e-9)
    assert got["query_layer_1"]["input"] == pytest.approx(
        float(model.adapters["query_layer_1"].tensor.factors["input"].grad.norm()), rel=1e-5)
    rows = M.rows(M.adapter_metrics(model), step=3)
    assert (3, M.AGGREGATE, "core", "grad_norm", got[M.AGGREGATE]["core"]) in rows


def test_lora_gradient_norms():
    model = get_adapted_model(tiny_bert(), TensLoRAConfig(construction="lora", ranks=2))
    randomize(model)
    backward(model)
    got = M.gradient_norms(model)[M.AGGREGATE]
    a = [n for n, p in model.peft_model.named_parameters() if "lora_A" in n]
    assert len(a) == 9
    want = torch.sqrt(sum(p.grad.double().pow(2).sum() for n, p in model.peft_model.named_parameters()
                          if "lora_B" in n))
    assert got["output"] == pytest.approx(float(want), rel=1e-9)
