"""Tensor-train (TT) factorization: every construction on a tiny BERT and a tiny GQA LLaMA against a
dense reconstruction built here (tensorly's ``tt_to_tensor`` of the cores, sliced by hand), gradients,
parameter counts, save/load, merge, bf16, checkpointing, TensLoRA+ groups/spectra and config errors."""
import csv
import json
import math

import pytest
import tensorly as tl
import torch
from tensorly.tt_tensor import tt_to_tensor

from conftest import assert_projection_matches, tiny_bert, tiny_llama_gqa
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model, load_adapted_model, predict_adapter_parameters
from tenslora.constructions import get_construction
from tenslora.params import count_trainable
from tenslora.targets import ModelShape
from tenslora.tensor import TensorTrain
from tenslora.tensor.algebra import unfold

MODELS = {"bert": (tiny_bert, ("query", "key", "value"), 3),
          "llama": (tiny_llama_gqa, ("q_proj", "k_proj", "v_proj"), 2)}
CASES = [(kind, c) for kind in MODELS for c in CONSTRUCTIONS]
BOND_RANKS = (3, 2, 4, 2)  # r_1 .. r_4; a construction of N modes takes the first N - 1


def bond_ranks(construction):
    return BOND_RANKS[:len(CONSTRUCTIONS[construction].mode_names) - 1]


def reference_full(tensor):
    """The full tensor from the cores by tensorly (independent of ``TensorTrain.full``)."""
    with tl.backend_context("pytorch"):
        return tt_to_tensor([tensor.cores[m] for m in tensor.mode_names])


def randomized(kind, construction, seed=0, **config):
    make, _, _ = MODELS[kind]
    adapted = get_adapted_model(make(), TensLoRAConfig(construction, "tt", ranks=bond_ranks(construction),
                                                      alpha=6.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapted


def dense_update(adapted, construction, layer, proj, fulls):
    """``(d_in, d_out_p)`` by hand: slice the full tensor, take the projection's heads/columns, merge heads."""
    c = get_construction(construction)
    projs = MODELS["llama" if proj.endswith("_proj") else "bert"][1]
    t = fulls[c.group_key(proj, layer)]
    if c.layers:
        t = t[..., layer]
    if c.qkv:
        t = t[..., projs.index(proj)]
    width = adapted.layer(layer, proj).base_layer.out_features
    if c.heads:  # (d_in, head_dim, H) -> column h * head_dim + d; kv head j at query head j * H / n
        head_dim, heads = t.shape[1], t.shape[2]
        n = width // head_dim
        t = t[:, :, [j * (heads // n) for j in range(n)]]
        return t.permute(0, 2, 1).reshape(t.shape[0], -1)
    return t[:, :width]


def reference_fulls(adapted):
    return {name: reference_full(a.tensor) for name, a in adapted.adapters.items()}


# the tensor itself ------------------------------------------------------------------------------
def test_full_and_thin_pair_equal_tensorly_in_any_mode_order():
    """Batch modes before, between and after the column modes of the chain: A @ B[b] is the slice."""
    g = torch.Generator().manual_seed(0)
    t = TensorTrain((5, 3, 4, 2, 6), (3, 2, 4, 2), ("input", "qkv", "heads", "layers", "head_dim"), generator=g)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    full = reference_full(t)
    assert torch.allclose(t.full(), full, atol=1e-5)
    a, b = t.thin_pair(("heads", "head_dim"), ("qkv", "layers"))
    assert a.shape == (5, 3) and b.shape == (3, 2, 3, 24)
    for q in range(3):
        for l in range(2):
            want = full[:, q, :, l, :].reshape(5, 24)  # heads major, head_dim minor
            assert torch.allclose(a @ b[q, l], want, atol=1e-5)
    a, b = t.thin_pair(("head_dim", "qkv"), ("layers", "heads"))
    assert torch.allclose(a @ b[1, 3], full[:, :, 3, 1, :].permute(0, 2, 1).reshape(5, 18), atol=1e-5)


def test_initialisation_zero_update_last_core_zero_no_global_rng():
    state = torch.random.get_rng_state()
    t1 = TensorTrain((8, 6, 3, 2), (4, 3, 2), ("input", "output", "qkv", "layers"),
                     generator=torch.Generator().manual_seed(1))
    t2 = TensorTrain((8, 6, 3, 2), (4, 3, 2), ("input", "output", "qkv", "layers"),
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [tuple(t1.cores[m].shape) for m in t1.mode_names] == [(1, 8, 4), (4, 6, 3), (3, 3, 2), (2, 2, 1)]
    assert torch.count_nonzero(t1.cores["layers"]) == 0 and torch.count_nonzero(t1.full()) == 0
    for m in ("input", "output", "qkv"):  # orthogonal: left unfoldings have orthonormal columns
        c = t1.cores[m].detach()
        left = c.reshape(-1, c.shape[2])
        assert torch.allclose(left.T @ left, torch.eye(c.shape[2]), atol=1e-5)
        assert torch.equal(c, t2.cores[m])
    for init in ("normal", "kaiming_uniform"):
        t = TensorTrain((8, 6, 3), (4, 3), ("input", "output", "qkv"), init=init,
                        generator=torch.Generator().manual_seed(0))
        assert torch.count_nonzero(t.cores["input"]) == 32 and torch.count_nonzero(t.cores["qkv"]) == 0


def test_untrained_adapter_leaves_the_model_unchanged():
    model = tiny_llama_gqa()
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    adapted = get_adapted_model(model, TensLoRAConfig("att_qkv_depth", "tt", ranks=2))
    assert torch.allclose(adapted(input_ids=ids).logits, before, atol=1e-6)


# every construction, both models ----------------------------------------------------------------
@pytest.mark.parametrize("kind,construction", CASES)
def test_forward_and_delta_equal_reconstruction(kind, construction):
    adapted = randomized(kind, construction)
    _, projs, layers = MODELS[kind]
    scaling = adapted.adapter_config.scaling
    assert scaling == 6.0 / 3  # alpha / r_1
    fulls = reference_fulls(adapted)
    for name, a in adapted.adapters.items():
        assert torch.allclose(a.tensor.full(), fulls[name], atol=1e-5)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    for layer in range(layers):
        for proj in projs:
            assert_projection_matches(adapted, adapted.layer(layer, proj),
                                      dense_update(adapted, construction, layer, proj, fulls), x)


@pytest.mark.parametrize("kind,construction", CASES)
def test_gradients_equal_reconstruction(kind, construction):
    adapted = randomized(kind, construction)
    _, projs, layers = MODELS[kind]
    scaling = adapted.adapter_config.scaling
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    params = list(adapted.adapters.parameters())
    g = torch.Generator().manual_seed(2)
    weights = {(l, p): torch.randn(4, adapted.layer(l, p).base_layer.out_features, generator=g)
               for l in range(layers) for p in projs}
    with adapted.adapter_pass():
        fast = sum((adapted.layer(l, p)(x) * w).sum() for (l, p), w in weights.items())
    fast_grads = torch.autograd.grad(fast, params)
    fulls = reference_fulls(adapted)
    slow = sum(((adapted.layer(l, p).base_layer(x) + scaling * x @ dense_update(adapted, construction, l, p, fulls))
                * w).sum() for (l, p), w in weights.items())
    slow_grads = torch.autograd.grad(slow, params)
    assert torch.allclose(fast, slow, rtol=1e-5)
    for gf, gs in zip(fast_grads, slow_grads):
        assert gs.abs().max() > 0
        assert (gf - gs).abs().max() <= 1e-5 * gs.abs().max()


@pytest.mark.parametrize("kind,construction", CASES)
def test_parameter_count_equals_prediction(kind, construction):
    adapted = randomized(kind, construction)
    sizes_per_tensor = [list(a.tensor.shape) for a in adapted.adapters.values()]
    bonds = [1, *bond_ranks(construction), 1]
    by_hand = sum(sum(bonds[k] * d * bonds[k + 1] for k, d in enumerate(s)) for s in sizes_per_tensor)
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters() == by_hand
    trainable, _ = count_trainable(adapted)
    head = sum(p.numel() for path in adapted.head_modules
               for p in adapted.base_model.get_submodule(path).parameters())
    assert trainable - head == by_hand


def test_prediction_roberta_base():
    """``qkv_depth`` (768, 768, 3, 12), bonds 8: 768*8 + 8*768*8 + 8*3*8 + 8*12 = 55,584."""
    shape = ModelShape(("query", "key", "value"), tuple(range(12)), 768, (768, 768, 768), 64)
    assert predict_adapter_parameters(TensLoRAConfig("qkv_depth", "tt", ranks=8), shape) == 55_584
    assert predict_adapter_parameters(TensLoRAConfig("att", "tt", ranks=(8, 4)), shape) == \
        36 * (768 * 8 + 8 * 64 * 4 + 4 * 12)


@pytest.mark.parametrize("kind,construction", [("bert", "att_qkv_depth"), ("llama", "att_qkv"),
                                               ("llama", "qkv_depth"), ("bert", "depth")])
def test_merge_unmerge_save_load(kind, construction, tmp_path):
    adapted = randomized(kind, construction)
    make, projs, _ = MODELS[kind]
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    out = adapted(input_ids=ids).logits
    weight = adapted.layer(1, projs[1]).base_layer.weight.clone()
    adapted.merge()
    assert torch.allclose(adapted(input_ids=ids).logits, out, atol=1e-5)
    assert not torch.allclose(adapted.layer(1, projs[1]).base_layer.weight, weight, atol=1e-3)
    adapted.unmerge()
    assert torch.allclose(adapted.layer(1, projs[1]).base_layer.weight, weight, atol=1e-6)
    adapted.save_adapter(tmp_path / "a")
    loaded = load_adapted_model(make(), tmp_path / "a")
    assert loaded.adapter_config.factorization == "tt"
    assert loaded.adapter_config.mode_ranks() == adapted.adapter_config.mode_ranks()
    assert torch.allclose(loaded(input_ids=ids).logits, out, atol=1e-5)
    assert torch.allclose(loaded.merge_and_unload()(input_ids=ids).logits, out, atol=1e-5)


@pytest.mark.parametrize("construction", ["att_qkv_depth", "qkv"])
def test_bfloat16(construction):
    adapted = randomized("llama", construction)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.mul_(0.6)
    ids = torch.randint(1, 100, (2, 5), generator=g)
    reference = adapted(input_ids=ids).logits
    adapted.to(torch.bfloat16)
    logits = adapted(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and adapted.delta_weight(0, "k_proj").dtype == torch.bfloat16
    assert torch.allclose(logits.float(), reference, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kind,construction", [("llama", "att_qkv_depth"), ("bert", "qkv_depth"), ("llama", "att")])
def test_gradient_checkpointing_same_gradients(kind, construction):
    from torch import nn

    def build():
        adapted = randomized(kind, construction)
        for m in adapted.base_model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        return adapted.train()

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, 100, (2, 5), generator=g), torch.randint(0, 2, (2,), generator=g)
    plain = build()
    plain(input_ids=ids, labels=labels).loss.backward()
    want = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    for kwargs in (None, {"use_reentrant": True}):
        adapted = build()
        adapted.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        adapted(input_ids=ids, labels=labels).loss.backward()
        got = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys() and any("cores" in n for n in got)
        for n in want:
            assert (got[n] - want[n]).abs().max() <= 1e-5 * want[n].abs().max().clamp_min(1e-12), n


# config -----------------------------------------------------------------------------------------
def test_ranks_meaning():
    cfg = TensLoRAConfig("att_qkv_depth", "tt", ranks=4)
    assert cfg.mode_ranks() == {"input": 4, "head_dim": 4, "heads": 4, "qkv": 4}  # the bond after each mode
    cfg = TensLoRAConfig("qkv_depth", "tt", ranks="6_5_3", alpha=12)
    assert cfg.mode_ranks() == {"input": 6, "output": 5, "qkv": 3} and cfg.scaling == 2.0
    cfg = TensLoRAConfig("qkv", "tt", ranks={"input": 2, "output": 3})
    assert TensLoRAConfig.from_dict(cfg.to_dict()).mode_ranks() == {"input": 2, "output": 3}


@pytest.mark.parametrize("kwargs,message", [
    (dict(construction="qkv_depth", ranks=(4, 4, 4, 4)),
     r"^ranks \(4, 4, 4, 4\) have the wrong length for qkv_depth/tt: expected 3 bond ranks, one per pair of "
     r"consecutive modes \(input, output, qkv, layers\)$"),
    (dict(construction="att", ranks=(4,)), r"^ranks \(4,\) have the wrong length for att/tt: expected 2 bond ranks"),
    (dict(construction="qkv", ranks={"input": 2, "output": 2, "qkv": 2}),
     r"^ranks .* must name exactly the modes input, output \(a TT bond is named by the mode on its input side\)$"),
    (dict(construction="qkv", ranks=(2, 0)), r"^rank 0 of mode 'output' must be a positive integer$"),
])
def test_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        TensLoRAConfig(factorization="tt", **kwargs)
    assert "\n" not in str(err.value)


def test_bond_rank_above_what_it_can_use_warns():
    with pytest.warns(UserWarning, match="rank 5 of mode 'qkv' exceeds what its bond can use, 2"):
        get_adapted_model(tiny_llama_gqa(), TensLoRAConfig("qkv_depth", "tt", ranks=(4, 4, 5)))


# TensLoRA+ ----------------------------------------------------------------------------------------
def test_optimizer_groups_per_core():
    from tenslora.plus.optim import build_param_groups
    adapted = randomized("bert", "att_depth")  # 3 tensors (one per projection), 4 cores each
    groups = {g["name"]: g for g in build_param_groups(adapted, lr=1e-3, mode_lr={"input": 2, "layers": 0.5})}
    assert set(groups) == {"core:input", "core:head_dim", "core:heads", "core:layers", "head", "head_no_decay"}
    assert groups["core:input"]["lr"] == pytest.approx(2e-3) and groups["core:layers"]["lr"] == pytest.approx(5e-4)
    assert groups["core:heads"]["lr"] == pytest.approx(1e-3)
    for mode in ("input", "head_dim", "heads", "layers"):
        assert {id(p) for p in groups[f"core:{mode}"]["params"]} == \
            {id(a.tensor.cores[mode]) for a in adapted.adapters.values()}
    with pytest.raises(ValueError, match=r"^core_lambda=2 needs a Tucker adapter; 'tt' has one core per mode: "
                                         r"use mode_lr \(e.g. input=2\) \(allowed: 1\)$"):
        build_param_groups(adapted, lr=1e-3, core_lambda=2)


def brute_singular_values(tensors, mode):
    """SVD of the mode unfoldings of the reconstructed tensors, concatenated (float64)."""
    mats = [unfold(reference_full(t).detach().double(), t.mode_names.index(mode)) for t in tensors]
    return torch.linalg.svdvals(torch.cat(mats, dim=1))


@pytest.mark.parametrize("construction", ["att_qkv_depth", "depth", "qkv"])
def test_spectra_exact_without_reconstruction(construction):
    from tenslora.plus import spectra
    adapted = randomized("bert", construction)
    tensors = [a.tensor for a in adapted.adapters.values()]
    for mode in tensors[0].mode_names:
        fast = spectra.mode_singular_values(tensors, mode)
        slow = brute_singular_values(tensors, mode)
        n = min(len(fast), len(slow))
        assert torch.allclose(fast[:n], slow[:n], rtol=1e-6, atol=1e-8 * float(slow[0]))
        assert float((slow[n:] ** 2).sum()) <= 1e-12 * float((slow ** 2).sum())
        single = spectra.mode_singular_values(tensors[0], mode)
        want = brute_singular_values(tensors[:1], mode)
        assert torch.allclose(single[:len(want)], want[:len(single)], rtol=1e-6, atol=1e-8 * float(want[0]))


def test_metrics_and_grad_norms_per_core():
    from tenslora.plus import metrics as M
    adapted = randomized("llama", "qkv_depth")
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, 100, (2, 5), generator=g), torch.randint(0, 2, (2,), generator=g)
    adapted.train()(input_ids=ids, labels=labels).loss.backward()
    got = M.adapter_metrics(adapted)[M.AGGREGATE]
    assert set(got) == {"input", "output", "qkv", "layers"}  # no "core" entry for a tensor train
    tensor = adapted.adapters["all"].tensor
    for mode in got:
        assert got[mode]["grad_norm"] == pytest.approx(float(tensor.cores[mode].grad.double().norm()), rel=1e-9)
        s = brute_singular_values([tensor], mode)
        p = s ** 2 / (s ** 2).sum()
        p = p[p > 0]
        assert got[mode]["entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6, abs=1e-9)


def test_allocation_refuses_tt():
    from tenslora.train.config import TrainConfig
    from tenslora.train.probe import run_probe
    cfg = TrainConfig(construction="qkv_depth", factorization="tt")
    with pytest.raises(ValueError, match="^rank allocation needs a Tucker tensor construction, not qkv_depth/tt$"):
        run_probe(cfg, 3, 4, None)


def test_train_config_flows_to_a_tt_adapter():
    from tenslora.train.config import TrainConfig
    from tenslora.train.modeling import adapter_config
    cfg = adapter_config(TrainConfig(construction="att_qkv", factorization="tt", ranks="4_2_3"))
    assert cfg.factorization == "tt" and cfg.mode_ranks() == {"input": 4, "head_dim": 2, "heads": 3}


def test_bench_typical_ranks_and_methods():
    from tenslora.bench import StepBench, default_methods, typical_ranks
    bench = StepBench(layers=2, hidden=32, heads=4, kv_heads=2, rank=8)
    assert {"qkv_depth:tt", "att_qkv_depth:tt"} <= set(default_methods())
    # (32, 32, 3, 2): bond caps min(32, 192), min(1024, 6), min(3072, 2)
    assert typical_ranks("qkv_depth", "tt", bench) == (8, 6, 2)
    config = TensLoRAConfig("qkv_depth", "tt", ranks=typical_ranks("qkv_depth", "tt", bench))
    assert predict_adapter_parameters(config, bench.shape()) == 32 * 8 + 8 * 32 * 6 + 6 * 3 * 2 + 2 * 2


@pytest.mark.slow
def test_cli_train_with_tt_and_monitor(tmp_path, capsys):
    tu = pytest.importorskip("test_train_utils")
    model = tu.make_text_model(tmp_path / "tiny-bert")
    data = tu.write_csv(tmp_path / "d.csv", tu.sentences(40))
    run = tmp_path / "run"
    code, _, err = tu.run_cli(["train", "--task", data, "--model", model, "--construction", "att_qkv_depth",
                               "--factorization", "tt", "--ranks", "4_2_2_2", "--mode-lr", "input=2",
                               "--max-steps", "4", "--monitor-every", "2", "--batch-size", "8",
                               "--eval-batch-size", "16", "--no-progress", "--output-dir", run], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(run / "spectra.csv")))
    groups = {r["mode"] for r in rows if r["tensor"] == "group"}
    assert {"core:input", "core:head_dim", "core:heads", "core:qkv", "core:layers"} <= groups
    entropies = [float(r["value"]) for r in rows if r["metric"] == "entropy" and r["tensor"] == "adapter"]
    assert entropies and all(math.isfinite(e) for e in entropies)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["factorization"] == "tt"
    record = json.loads((run / "final_adapter" / "tenslora_config.json").read_text())
    assert record["config"]["factorization"] == "tt" and record["config"]["ranks"] == [4, 2, 2, 2]
