"""``tenslora compress``: a PEFT LoRA's updates stacked into a construction's tensor and fitted (tensorly)."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_bert
from tenslora import TensLoRAConfig, get_adapted_model, load_adapted_model
from tenslora.export.compress import compress_lora
from tenslora.export import export_adapter
from test_export import base_dir, base_model, logits, random_adapter  # noqa: F401
from test_train_utils import run_cli

PROJS = ("query", "key", "value")


def lora_dir(tmp_path, base_dir, seed=0):  # noqa: F811
    """A random PEFT LoRA r=4 (head included) saved by tenslora's LoRA baseline."""
    return random_adapter(base_dir, "lora", "tucker", seed=seed).save_adapter(tmp_path / f"lora{seed}")


def exported_as_peft(tmp_path, base_dir, config, seed):  # noqa: F811
    """A tenslora adapter of ``config`` with random weights (head included), saved under ``tmp_path/t`` and
    exported as a PEFT LoRA to ``tmp_path/peft``; returns the adapted model (eval mode)."""
    adapted = get_adapted_model(base_model(base_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapted.base_model.classifier.weight.normal_(generator=g)
    adapted.eval()
    export_adapter(adapted.save_adapter(tmp_path / "t"), "peft", tmp_path / "peft", model=str(base_dir))
    return adapted


def reference_tensor(updates, construction, name, head_dim=8):
    """The dense tensor ``name`` built by hand from ``{(layer, proj): (d_in, d_out) update}``."""
    stack_q, stack_l = "qkv" in construction, "depth" in construction
    keys = sorted(updates)
    def pick(layer, proj):
        want = ("all" if stack_q and stack_l else f"layer_{layer}" if stack_q else proj if stack_l
                else f"{proj}_layer_{layer}")
        return want == name
    mats = {}
    for layer, proj in keys:
        if pick(layer, proj):
            m = updates[(layer, proj)]
            if construction.startswith("att"):
                m = m.reshape(m.shape[0], -1, head_dim).permute(0, 2, 1)  # (d_in, head_dim, heads)
            mats[(layer, proj)] = m
    if stack_q and stack_l:
        return torch.stack([torch.stack([mats[(l, p)] for l in range(3)], -1) for p in PROJS], -2)
    if stack_q:
        return torch.stack([mats[(int(name[6:]), p)] for p in PROJS], -1)
    if stack_l:
        return torch.stack([mats[(l, name)] for l in range(3)], -1)
    return next(iter(mats.values()))


def hosvd_error(t, ranks):
    """Relative error of the truncated HOSVD (numpy): HOOI may only improve on it."""
    x = t.numpy()
    factors = []
    for mode, r in enumerate(ranks):
        unfolded = np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)
        factors.append(np.linalg.svd(unfolded, full_matrices=False)[0][:, :r])
    approx = x
    for mode, u in enumerate(factors):
        approx = np.moveaxis(np.tensordot(u @ u.T, np.moveaxis(approx, mode, 0), axes=1), 0, mode)
    return np.linalg.norm(x - approx) ** 2, np.linalg.norm(x) ** 2


@pytest.mark.parametrize("construction,factorization,ranks", [
    ("qkv_depth", "tucker", (3, 2, 2, 2)), ("att_qkv_depth", "tucker", (3, 2, 2, 2, 3)), ("att", "tucker", (3, 2, 2)),
    ("qkv_depth", "cp", 2), ("att_qkv", "cp", 2), ("qkv_depth", "tt", (3, 2, 2)), ("att_qkv_depth", "tt", (3, 2, 2, 2))])
def test_exactly_low_rank_tensor_is_recovered(tmp_path, base_dir, construction, factorization, ranks):  # noqa: F811
    """tenslora adapter -> exact PEFT export -> compress at the same ranks: error ~0, same outputs, same head."""
    adapted = exported_as_peft(tmp_path, base_dir, TensLoRAConfig(construction, factorization, ranks=ranks,
                                                                   alpha=6.0), seed=3)
    report = compress_lora(tmp_path / "peft", construction, factorization, "_".join(map(str, np.atleast_1d(ranks))),
                           tmp_path / "c", model=str(base_dir), iterations=500)
    assert report["relative_error"] < 1e-4, report
    back = load_adapted_model(base_model(base_dir), tmp_path / "c").eval()
    assert back.adapter_config.scaling == 1.0 and back.adapter_config.dropout == 0.0
    for layer in range(3):
        for proj in PROJS:
            torch.testing.assert_close(back.delta_weight(layer, proj), adapted.delta_weight(layer, proj),
                                       rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(logits(back), logits(adapted), rtol=1e-3, atol=1e-4)
    assert report["adapter_parameters"] == adapted.adapter_parameters()


@pytest.mark.parametrize("construction,factorization,ranks", [
    ("qkv_depth", "tucker", "3_2_2_2"), ("att_qkv_depth", "tucker", "2"), ("att_depth", "tucker", "2_2_2_2"),
    ("qkv", "cp", "3")])
def test_random_lora_reports_its_real_error(tmp_path, base_dir, construction, factorization, ranks,  # noqa: F811
                                            capsys):
    from peft import PeftModel
    src = lora_dir(tmp_path, base_dir)
    code, out, err = run_cli(["compress", src, "--construction", construction, "--factorization", factorization,
                              "--ranks", ranks, "--output", tmp_path / "c", "--model", base_dir], capsys)
    assert code == 0, err
    reported = float(out.split("||T|| = ")[1].split()[0])
    # the LoRA's updates through PEFT itself, and the fitted tensors rebuilt in full
    peft_model = PeftModel.from_pretrained(base_model(base_dir), src)
    mods = dict(peft_model.named_modules())
    updates = {(l, p): mods[f"base_model.model.bert.encoder.layer.{l}.attention.self.{p}"]
               .get_delta_weight("default").T.double() for l in range(3) for p in PROJS}
    back = load_adapted_model(base_model(base_dir), tmp_path / "c")
    num = den = 0.0
    for name in back.adapters:
        t, t_hat = reference_tensor(updates, construction, name), back.folded_tensor(name).double()
        t_hat = t_hat.detach()
        num += float((t - t_hat).pow(2).sum())
        den += float(t.pow(2).sum())
        if factorization == "tucker":
            h_num, h_den = hosvd_error(t, back.adapters[name].tensor.ranks)
            assert float((t - t_hat).pow(2).sum()) <= h_num * (1 + 1e-6) + 1e-12  # HOOI >= HOSVD
    real = (num / den) ** 0.5
    assert 0.05 < real < 1  # a random LoRA is far from low tensor rank
    assert reported == pytest.approx(real, rel=1e-3)
    lora_params, tensor_params = 9 * 4 * 64, back.adapter_parameters()
    assert f"parameters: LoRA {lora_params:,} -> tensor {tensor_params:,}" in out
    # the head is carried over and the compressed model is the LoRA model up to the fit error
    torch.testing.assert_close(back.base_model.classifier.weight, mods["base_model.model.classifier"]
                               .modules_to_save["default"].weight)


def test_full_rank_tucker_reproduces_the_lora_model(tmp_path, base_dir):  # noqa: F811
    from peft import PeftModel
    src = lora_dir(tmp_path, base_dir, seed=1)
    report = compress_lora(src, "qkv", "tucker", "32_32_3", tmp_path / "c", model=str(base_dir))
    assert report["relative_error"] < 1e-6
    back = load_adapted_model(base_model(base_dir), tmp_path / "c").eval()
    lora = PeftModel.from_pretrained(base_model(base_dir), src).eval()
    torch.testing.assert_close(logits(back), logits(lora), rtol=1e-4, atol=1e-5)


def test_ranks_above_a_mode_size_are_zero_padded(tmp_path, base_dir):  # noqa: F811
    src = lora_dir(tmp_path, base_dir, seed=2)
    with pytest.warns(UserWarning, match="exceeds its size"):
        report = compress_lora(src, "qkv_depth", "tucker", "4_4_5_5", tmp_path / "c", model=str(base_dir))
    back = load_adapted_model(base_model(base_dir), tmp_path / "c")
    assert back.adapters["all"].tensor.core.shape == (4, 4, 5, 5)
    assert report["relative_error"] == pytest.approx(
        compress_lora(src, "qkv_depth", "tucker", "4_4_3_3", tmp_path / "d", model=str(base_dir))["relative_error"],
        rel=1e-4)


def _fails(capsys, args, match):
    capsys.readouterr()
    code, out, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, base_dir, capsys):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    src = lora_dir(tmp_path, base_dir)
    out = tmp_path / "out"
    args = ["--construction", "qkv_depth", "--ranks", "2", "--output", out, "--model", base_dir]
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["compress", tmp_path / "empty", *args], "is not a saved adapter")
    tens = random_adapter(base_dir, "att", "tucker").save_adapter(tmp_path / "tens")
    _fails(capsys, ["compress", tens, *args], "is not a PEFT LoRA adapter")
    _fails(capsys, ["compress", src, *args[:-4], "--output", out, "--model", base_dir, "--construction", "lora"],
           "unknown construction 'lora'")
    _fails(capsys, ["compress", src, *args, "--factorization", "ring"], "unknown factorization 'ring'")
    # layers missing from the LoRA; modules the construction cannot hold
    for name, kwargs, match in [("partial", {"layers_to_transform": [0, 1]}, "missing ['bert.encoder.layer.2"),
                                ("mlp", {"target_modules": ["query", "key", "value", "dense"]},
                                 "also adapted ['bert.encoder.layer.0.intermediate.dense'"),  # MLP dense layers
                                ("dora", {"use_dora": True}, "DoRA")]:
        kwargs.setdefault("target_modules", ["query", "key", "value"])
        peft_model = get_peft_model(base_model(base_dir), LoraConfig(r=2, **kwargs))
        peft_model.save_pretrained(tmp_path / name)
        _fails(capsys, ["compress", tmp_path / name, *args], match)
    other = tmp_path / "other"
    tiny_bert(layers=2).save_pretrained(other)
    _fails(capsys, ["compress", src, *args[:-1], other], "the LoRA adapts modules the model does not have")
    wide = tmp_path / "wide"
    tiny_bert(hidden=48, heads=4).save_pretrained(wide)
    _fails(capsys, ["compress", src, *args[:-1], wide], "does not fit model")
    assert not out.exists()
    out.mkdir()
    _fails(capsys, ["compress", src, *args], "already exists; pass --overwrite")
    assert list(out.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_train_init_from_a_compressed_lora(tmp_path, capsys):
    """lora run -> compress its run directory -> tenslora train --init-from starts from those weights."""
    from safetensors.torch import load_file
    from test_train_utils import QUICK, make_text_model, sentences, write_csv
    model = make_text_model(tmp_path / "bert")
    data = write_csv(tmp_path / "d.csv", sentences(40))
    common = ["train", "--task", data, "--model", model, *QUICK]
    code, _, err = run_cli([*common, "--construction", "lora", "--ranks", "2", "--output-dir", tmp_path / "lora"],
                           capsys)
    assert code == 0, err
    code, out, err = run_cli(["compress", tmp_path / "lora", "--construction", "att_qkv_depth", "--ranks", "2",
                              "--output", tmp_path / "c"], capsys)
    assert code == 0, err
    _fails(capsys, [*common, "--init-from", tmp_path / "c", "--output-dir", tmp_path / "bad"],
           "pass --construction att_qkv_depth --factorization tucker")
    _fails(capsys, [*common, "--init-from", tmp_path / "lora" / "best_adapter", "--construction", "lora",
                    "--output-dir", tmp_path / "bad"], "it takes a tenslora adapter")
    code, _, err = run_cli([*common, "--init-from", tmp_path / "c", "--construction", "att_qkv_depth",
                            "--lr", "1e-9", "--max-steps", "1", "--output-dir", tmp_path / "ft"], capsys)
    assert code == 0, err
    start, end = load_file(str(tmp_path / "c" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "ft" / "final_adapter" / "adapter_model.safetensors"))
    assert sorted(start) == sorted(end) and any(k.startswith("head.") for k in start)
    for key in start:  # one Adam step of lr 1e-9 moves each weight by at most ~1e-9
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=1e-6)
    assert float(start["adapters.all.tensor.core"].abs().max()) > 1e-3  # not a fresh (zero-core) adapter
    saved = json.loads((tmp_path / "ft" / "final_adapter" / "tenslora_config.json").read_text())
    compressed = json.loads((tmp_path / "c" / "tenslora_config.json").read_text())
    assert saved["config"]["ranks"] == compressed["config"]["ranks"]


def test_grouped_query_attention(tmp_path):
    """K/V narrower than Q: per-projection constructions fit it exactly (ranks above the K/V head count are
    zero-padded); a q/k/v-stacked tensor holds K/V in the columns they read (docs/constructions.md), exact at
    full ranks."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_llama_gqa
    base = tmp_path / "llama"
    tiny_llama_gqa().save_pretrained(base)
    adapted = get_adapted_model(AutoModelForSequenceClassification.from_pretrained(base),
                                TensLoRAConfig("lora", ranks=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    src = adapted.save_adapter(tmp_path / "lora")
    report = compress_lora(src, "att_depth", "tucker", "32_8_4_2", tmp_path / "c", model=str(base))
    assert report["relative_error"] < 1e-6
    ids = torch.tensor([[5, 6, 7, 8]])
    back = load_adapted_model(AutoModelForSequenceClassification.from_pretrained(base), tmp_path / "c").eval()
    lora = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), src).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    for construction, ranks in (("qkv_depth", "32_32_3_2"), ("att_qkv_depth", "32_8_4_3_2")):
        out = tmp_path / construction
        assert compress_lora(src, construction, "tucker", ranks, out, model=str(base))["relative_error"] < 1e-6
        stacked = load_adapted_model(AutoModelForSequenceClassification.from_pretrained(base), out).eval()
        with torch.no_grad():
            torch.testing.assert_close(stacked(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=1e-4,
                                       atol=1e-5)
    low = compress_lora(src, "qkv_depth", "tucker", "2", tmp_path / "low", model=str(base))["relative_error"]
    assert 0.05 < low < 1.0  # a real, reported error at low rank


@pytest.mark.parametrize("construction,factorization,ranks", [
    ("qkv_depth", "tucker", (3, 2, 4, 2)), ("att_qkv_depth", "tucker", (3, 2, 2, 4, 3)), ("att", "cp", 2),
    ("att_qkv_depth", "tt", (3, 2, 2, 2))])
def test_a_lora_with_the_output_projection_compresses_into_a_qkvo_tensor(tmp_path, base_dir, construction,  # noqa: F811
                                                                          factorization, ranks):
    """tenslora qkvo adapter -> exact PEFT export (Q, K, V and BERT's attention.output.dense) -> compress at
    the same ranks: a qkvo adapter, error ~0, O's updates (entering the tensor transposed) recovered."""
    config = TensLoRAConfig(construction, factorization, ranks=ranks, alpha=6.0, targets="qkvo")
    adapted = exported_as_peft(tmp_path, base_dir, config, seed=5)
    report = compress_lora(tmp_path / "peft", construction, factorization, "_".join(map(str, np.atleast_1d(ranks))),
                           tmp_path / "c", model=str(base_dir), iterations=500)
    assert report["relative_error"] < 1e-4, report
    back = load_adapted_model(base_model(base_dir), tmp_path / "c").eval()
    assert back.adapter_config.targets == "qkvo"
    for layer in range(3):
        for proj in (*PROJS, "dense"):  # BERT's O: attention.output.dense
            torch.testing.assert_close(back.delta_weight(layer, proj), adapted.delta_weight(layer, proj),
                                       rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(logits(back), logits(adapted), rtol=1e-3, atol=1e-4)


def test_a_lora_on_every_linear_layer_is_refused_in_one_line(tmp_path, base_dir):  # noqa: F811
    lora = get_adapted_model(base_model(base_dir), TensLoRAConfig("lora", ranks=2, targets="all-linear"))
    src = lora.save_adapter(tmp_path / "lora")
    with pytest.raises(ValueError) as info:
        compress_lora(src, "qkv_depth", "tucker", "2", tmp_path / "c", model=str(base_dir))
    message = str(info.value)
    assert "\n" not in message and "intermediate.dense" in message and not (tmp_path / "c").exists()
