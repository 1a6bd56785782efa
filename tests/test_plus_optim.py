"""build_param_groups: lrs and weight decays read back from AdamW.param_groups, and the errors."""
import pytest
import torch

from tenslora.api import get_adapted_model
from tenslora.config import TensLoRAConfig
from tenslora.plus.optim import build_param_groups, parse_mode_lr
from conftest import tiny_bert


def adapted(construction="att_qkv_depth", factorization="tucker", ranks=3, layers=3):
    return get_adapted_model(tiny_bert(layers), TensLoRAConfig(construction=construction,
                                                                factorization=factorization, ranks=ranks))


def read_back(model, **kw):
    groups = build_param_groups(model, **kw)
    opt = torch.optim.AdamW(groups)
    return {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups}


def test_tucker_groups_lrs_and_decay():
    model = adapted()
    got = read_back(model, lr=1e-3, weight_decay=0.1, core_lambda=8, mode_lr={"layers": 0.5, "input": 2})
    assert got["core"][:2] == (pytest.approx(8e-3), 0.1)
    assert got["factor:input"][:2] == (pytest.approx(2e-3), 0.1)
    assert got["factor:layers"][:2] == (pytest.approx(5e-4), 0.1)
    for m in ("head_dim", "heads", "qkv"):
        assert got[f"factor:{m}"][:2] == (pytest.approx(1e-3), 0.1)
    assert got["head"][:2] == (pytest.approx(1e-3), 0.1)
    assert got["head_no_decay"][:2] == (pytest.approx(1e-3), 0.0)
    assert "other" not in got


def test_multi_tensor_factors_aggregate_and_cover_everything():
    model = adapted("att", ranks=2)  # 3 projections x 3 layers = 9 tensors
    groups = build_param_groups(model, lr=1e-3, head_lr=5e-3)
    by = {g["name"]: g for g in groups}
    assert len(by["core"]["params"]) == 9 and len(by["factor:heads"]["params"]) == 9
    assert by["head"]["lr"] == 5e-3
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_cp_groups():
    model = adapted("qkv_depth", "cp", 3)
    got = read_back(model, lr=1e-3, mode_lr={"qkv": 3})
    assert "core" not in got
    assert got["factor:qkv"][0] == pytest.approx(3e-3)
    assert got["factor:input"][0] == pytest.approx(1e-3)


def test_lora_plus_groups():
    model = get_adapted_model(tiny_bert(), TensLoRAConfig(construction="lora", ranks=2))
    got = read_back(model, lr=1e-4, weight_decay=0.01, lora_plus_ratio=16, head_lr=1e-3)
    assert got["lora_A"][:2] == (pytest.approx(1e-4), 0.01)
    assert got["lora_B"][:2] == (pytest.approx(1.6e-3), 0.01)
    assert got["lora_A"][2] == got["lora_B"][2] == 3 * 3  # 3 layers x q,k,v
    assert got["head"][:2] == (pytest.approx(1e-3), 0.01)
    assert got["head_no_decay"][:2] == (pytest.approx(1e-3), 0.0)
    plain = read_back(model, lr=1e-4)
    assert plain["lora_B"][0] == pytest.approx(1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=0), "lr must be a positive"),
    (dict(lr=1e-3, core_lambda=-1), "core_lambda must be a positive"),
    (dict(lr=1e-3, mode_lr={"input": 0}), "mode_lr\\['input'\\]"),
    (dict(lr=1e-3, head_lr=0), "head_lr"),
    (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
    (dict(lr=1e-3, mode_lr={"heads": 2}), "'heads'.*lacks; allowed: input, output, qkv, layers"),
    (dict(lr=1e-3, lora_plus_ratio=16), "lora_plus_ratio=16 applies to the PEFT LoRA"),
])
def test_errors_tucker(kw, match):
    with pytest.raises(ValueError, match=match):
        build_param_groups(adapted("qkv_depth"), **kw)


def test_errors_cp_and_lora():
    with pytest.raises(ValueError, match="core_lambda=4 needs a Tucker adapter"):
        build_param_groups(adapted("qkv_depth", "cp", 2), lr=1e-3, core_lambda=4)
    lora = get_adapted_model(tiny_bert(), TensLoRAConfig(construction="lora", ranks=2))
    with pytest.raises(ValueError, match="core_lambda=2 needs a Tucker adapter; LoRA"):
        build_param_groups(lora, lr=1e-3, core_lambda=2)
    with pytest.raises(ValueError, match="mode_lr .* tensor adapters only"):
        build_param_groups(lora, lr=1e-3, mode_lr={"input": 2})
    with pytest.raises(ValueError, match="lora_plus_ratio must be a positive"):
        build_param_groups(lora, lr=1e-3, lora_plus_ratio=0)


def test_linear_probe_has_only_head_groups():
    probe = get_adapted_model(tiny_bert(), TensLoRAConfig(construction="none"))
    groups = build_param_groups(probe, lr=1e-3, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"head", "head_no_decay"}
    with pytest.raises(ValueError, match="core_lambda=4 needs a Tucker adapter; a linear probe"):
        build_param_groups(probe, lr=1e-3, core_lambda=4)


def test_unfrozen_extra_goes_to_other():
    model = adapted("qkv_depth")
    model.base_model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    got = read_back(model, lr=1e-3, weight_decay=0.1)
    assert got["other"] == (1e-3, 0.1, 1)


def test_parse_mode_lr():
    assert parse_mode_lr("input=2, layers=0.5") == {"input": 2.0, "layers": 0.5}
    assert parse_mode_lr(None) == {}
    with pytest.raises(ValueError, match="must look like"):
        parse_mode_lr("input2")
