"""Gradient checkpointing and the once-per-parameter-version slice cache.

Gradients with ``gradient_checkpointing_enable()`` (transformers' default, non-reentrant, and
``use_reentrant=True``) equal gradients without, for every construction x factorization on a tiny
GQA LLaMA and a tiny BERT; gradient accumulation without a step stays exact; ``generate()`` builds
the slices once and matches the merged model.
"""
import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_llama_gqa
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model
from tenslora import adapter as adapter_module

PAIRS = [(c, f) for c in CONSTRUCTIONS for f in ("tucker", "cp")]


def adapted_model(kind, construction, factorization, seed=0):
    model = tiny_llama_gqa() if kind == "llama" else tiny_bert()
    for m in model.modules():  # no dropout: runs with and without checkpointing draw alike
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    adapted = get_adapted_model(model, TensLoRAConfig(construction, factorization, ranks=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapted.train()


def batch(n=2, seq=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (n, seq), generator=g), torch.randint(0, 2, (n,), generator=g)


def grads(adapted):
    return {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}


def assert_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().clamp_min(1e-12)
        assert (a[name] - b[name]).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("construction,factorization", PAIRS)
def test_checkpointing_gives_the_same_gradients(kind, construction, factorization):
    ids, labels = batch()
    plain = adapted_model(kind, construction, factorization)
    plain(input_ids=ids, labels=labels).loss.backward()
    reference = grads(plain)
    assert any(g.abs().sum() > 0 for n, g in reference.items() if "adapters." in n)
    for kwargs in (None, {"use_reentrant": True}):
        adapted = adapted_model(kind, construction, factorization)
        adapted.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        adapted(input_ids=ids, labels=labels).loss.backward()
        assert_close(grads(adapted), reference)


@pytest.mark.parametrize("construction,factorization", [("att_qkv_depth", "tucker"), ("qkv", "cp")])
def test_gradient_accumulation_without_a_step(construction, factorization):
    (ids1, labels1), (ids2, labels2) = batch(seed=1), batch(seed=2)
    plain = adapted_model("llama", construction, factorization)
    plain(input_ids=ids1, labels=labels1).loss.backward()
    plain(input_ids=ids2, labels=labels2).loss.backward()
    reference = grads(plain)
    for checkpointing in (False, True):
        adapted = adapted_model("llama", construction, factorization)
        if checkpointing:
            adapted.gradient_checkpointing_enable()
        # two forwards first, then two backwards: each backward recomputes against its own pass
        loss1 = adapted(input_ids=ids1, labels=labels1).loss
        loss2 = adapted(input_ids=ids2, labels=labels2).loss
        loss1.backward()
        loss2.backward()
        assert_close(grads(adapted), reference)


def test_optimizer_step_invalidates_the_cache():
    adapted = adapted_model("llama", "att_qkv_depth", "tucker")
    adapted.eval()
    ids, labels = batch()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():
        before = adapted(input_ids=ids).logits
    adapted(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    with torch.no_grad():
        after_direct = adapted.base_model(input_ids=ids).logits  # outside any pass: cache keyed by versions
        after = adapted(input_ids=ids).logits
    assert not torch.allclose(before, after)
    assert torch.allclose(after_direct, after, atol=1e-6)
    dense = adapted.layer(0, "k_proj").delta_weight()
    assert torch.allclose(dense, adapted.layer(0, "k_proj").delta_weight())


@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt"])
def test_a_replaced_or_copied_parameter_invalidates_the_cache(factorization):
    """Every model forward recomputes the slices; a call outside a pass (``base_model`` directly, as
    ``generate()`` steps do) is served from the cache only while its key (the parameters' versions and
    storages) still matches: after each change below it must equal a fresh pass."""
    import copy

    from tenslora.layer import AdaptedLinear

    adapted = adapted_model("bert", "att_qkv_depth", factorization).eval()
    ids, _ = batch()

    def direct_then_fresh():
        direct = adapted.base_model(input_ids=ids).logits  # first: from the cache if its key matches
        fresh = adapted(input_ids=ids).logits  # a pass: slices recomputed
        torch.testing.assert_close(direct, fresh)
        return fresh

    with torch.no_grad():
        before = direct_then_fresh()
        clone = copy.deepcopy(adapted)  # the copy reads its own parameters, not the original's
        for p in adapted.adapters.parameters():
            p.mul_(0.5)  # in place: the versions change
        halved = direct_then_fresh()
        assert not torch.allclose(before, halved)
        torch.testing.assert_close(clone.base_model(input_ids=ids).logits, before)
        adapter = next(iter(adapted.adapters.values()))
        adapter.tensor = copy.deepcopy(adapter.tensor)  # a new tensor module, same values
        torch.testing.assert_close(direct_then_fresh(), halved)
        for p in adapter.tensor.parameters():  # the new module's parameters are the ones read
            p.mul_(2.0)
        doubled = direct_then_fresh()
        assert not torch.allclose(doubled, halved)
        holder = adapter.tensor.cores if factorization == "tt" else adapter.tensor.factors
        name, old = next(iter(holder.items()))
        holder[name] = nn.Parameter(torch.zeros_like(old))  # a new parameter object, same shape
        assert not torch.allclose(direct_then_fresh(), doubled)
        state = {k: torch.randn_like(v) for k, v in adapted.adapters.state_dict().items()}
        adapted.adapters.load_state_dict(state, assign=True)  # every parameter replaced
        direct_then_fresh()
        for p in adapted.adapters.parameters():
            p.zero_()
        zero = direct_then_fresh()
        for layer in adapted.modules():
            if isinstance(layer, AdaptedLinear):
                layer.disabled = True
        torch.testing.assert_close(zero, adapted(input_ids=ids).logits)


def count_computes(monkeypatch):
    """Every adapter whose slices are computed (stacked or alone), once per computation."""
    calls = []
    original = adapter_module.compute_slices

    def counting(adapters):
        calls.extend(adapters)
        return original(adapters)
    monkeypatch.setattr(adapter_module, "compute_slices", counting)
    return calls


@pytest.mark.parametrize("construction", ["att_qkv_depth", "att"])
def test_generate_builds_slices_once_and_matches_merged(construction, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=101, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    adapted = get_adapted_model(model, TensLoRAConfig(construction, ranks=2, target_modules=("q_proj", "k_proj", "v_proj")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids = torch.randint(1, 100, (2, 4), generator=g)
    calls = count_computes(monkeypatch)
    out = adapted.generate(input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert len(calls) == len(adapted.adapters)  # once per tensor for the whole generation, not per token
    calls.clear()
    direct = adapted.base_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert len(calls) <= len(adapted.adapters)  # the base model's own generate reuses them too
    assert torch.equal(direct, out)
    merged = adapted.merge_and_unload()
    assert torch.equal(merged.generate(input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6), out)


def test_deepcopy_after_a_training_forward():
    import copy
    adapted = adapted_model("llama", "att_qkv_depth", "tucker")
    ids, labels = batch()
    loss = adapted(input_ids=ids, labels=labels).loss
    twin = copy.deepcopy(adapted)  # the cached slices are non-leaf tensors: they stay behind
    loss.backward()
    twin.eval(), adapted.eval()
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, adapted(input_ids=ids).logits)


def test_no_grad_evaluation_between_forward_and_backward():
    """An evaluation (no grad) between a checkpointed forward and its backward changes nothing."""
    ids, labels = batch()
    plain = adapted_model("llama", "att_qkv_depth", "cp")
    plain(input_ids=ids, labels=labels).loss.backward()
    adapted = adapted_model("llama", "att_qkv_depth", "cp")
    adapted.gradient_checkpointing_enable()
    loss = adapted(input_ids=ids, labels=labels).loss
    with torch.no_grad():
        adapted(input_ids=ids)
    loss.backward()
    assert_close(grads(adapted), grads(plain))


@pytest.mark.parametrize("construction", ["att", "qkv", "att_qkv", "att_qkv_depth"])
@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt"])
def test_same_layout_tensors_are_contracted_as_one_stack(construction, factorization, monkeypatch):
    """The per-layer tensors (and the MLP's, all-linear) of one layout are contracted in one stacked call;
    the loss and every gradient equal those of each tensor computed alone; a tensor cast to another
    dtype is not stacked with the others."""
    from tenslora.tensor.factorized import FACTORIZATIONS
    model = tiny_llama_gqa()
    adapted = get_adapted_model(model, TensLoRAConfig(construction, factorization, ranks=2, targets="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    adapted.train()
    ids, labels = batch()
    kind = FACTORIZATIONS[factorization]
    original = kind.stacked_thin_pair.__func__
    sizes = []

    def counting(cls, tensors, *args):
        sizes.append(len(tensors))
        return original(cls, tensors, *args)
    monkeypatch.setattr(kind, "stacked_thin_pair", classmethod(counting))
    adapted(input_ids=ids, labels=labels).loss.backward()
    stacked = grads(adapted)
    layouts = {a.tensor.layout for a in adapted.adapters.values()}
    assert sorted(sizes) == sorted(sum(a.tensor.layout == lay for a in adapted.adapters.values()) for lay in layouts)
    if construction != "att_qkv_depth":  # per-layer tensors: fewer stacked calls than tensors
        assert len(sizes) < len(adapted.adapters)
    adapted.zero_grad()
    alone = adapter_module.compute_slices
    monkeypatch.setattr(adapter_module, "compute_slices",
                        lambda adapters: [s for a in adapters for s in alone([a])])
    sizes.clear()
    adapted(input_ids=ids, labels=labels).loss.backward()
    assert set(sizes) == {1}
    for name, grad in grads(adapted).items():
        assert torch.allclose(grad, stacked[name], atol=1e-5), name
    monkeypatch.setattr(adapter_module, "compute_slices", alone)
    first = next(iter(adapted.adapters.values()))
    first.double()
    sizes.clear()
    with torch.no_grad():
        adapted(input_ids=ids)
    assert sizes.count(1) >= 1 and len(sizes) == len(layouts) + (construction != "att_qkv_depth")
