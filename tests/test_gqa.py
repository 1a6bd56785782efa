"""Grouped-query attention: every construction x factorization against a dense reconstruction built
here from ``tensor.full()`` (slice, the projection's own columns, heads merged), plus merge/unmerge,
save/load and exact parameter counts."""
import pytest
import torch

from conftest import assert_projection_matches
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model, load_adapted_model, predict_adapter_parameters
from tenslora.constructions import get_construction
from tenslora.layout import column_index
from tenslora.targets import ModelShape

PAIRS = [(c, f) for c in CONSTRUCTIONS for f in ("tucker", "cp")]
PROJS = ("q_proj", "k_proj", "v_proj")


def llama(head_dim=None, seed=0):
    """4 query heads, 2 key/value heads, 2 layers; ``head_dim`` explicit when given (then != hidden/heads)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    extra = {} if head_dim is None else {"head_dim": head_dim}
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=101, num_labels=2, pad_token_id=0, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config).eval()


def randomized(construction, factorization, head_dim=None, seed=0):
    ranks = 3 if factorization == "cp" else tuple([3, 2, 2, 2, 2][:len(CONSTRUCTIONS[construction].mode_names)])
    adapted = get_adapted_model(llama(head_dim), TensLoRAConfig(construction, factorization, ranks=ranks, alpha=6.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapted


def dense_update(adapted, construction, layer, proj):
    """``(d_in, d_out_p)`` by hand from the full tensor: slice, merge heads, take the projection's columns."""
    c = get_construction(construction)
    p = PROJS.index(proj)
    t = adapted.folded_tensor(c.group_key(proj, layer))
    if c.layers:
        t = t[..., layer]
    if c.qkv:
        t = t[..., p]
    width = adapted.base_model.get_submodule(f"model.layers.{layer}.self_attn.{proj}").base_layer.out_features
    if c.heads:  # (d_in, head_dim, H) -> columns h * head_dim + d
        head_dim, heads = t.shape[1], t.shape[2]
        n = width // head_dim
        group = heads // n  # kv head j sits at query head j * group (the first of its group)
        t = t[:, :, [j * group for j in range(n)]]
        return t.permute(0, 2, 1).reshape(t.shape[0], -1)
    return t[:, :width]  # output mode: the leading columns


@pytest.mark.parametrize("head_dim", [None, 16])
@pytest.mark.parametrize("construction,factorization", PAIRS)
def test_gqa_forward_equals_reconstruction(construction, factorization, head_dim):
    adapted = randomized(construction, factorization, head_dim)
    x = torch.randn(2, 3, 32)
    for layer in (0, 1):
        for proj in PROJS:
            assert_projection_matches(adapted, adapted.layer(layer, proj),
                                      dense_update(adapted, construction, layer, proj), x)
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters()


@pytest.mark.parametrize("construction,factorization", PAIRS)
def test_gqa_gradients_equal_reconstruction(construction, factorization):
    adapted = randomized(construction, factorization, head_dim=16)
    scaling = adapted.adapter_config.scaling
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    params = list(adapted.adapters.parameters())
    g = torch.Generator().manual_seed(2)  # its own generator: the same weights on every run (no global RNG)
    weights = {(l, p): torch.randn(4, adapted.layer(l, p).base_layer.out_features, generator=g)
               for l in (0, 1) for p in PROJS}
    with adapted.adapter_pass():
        fast = sum((adapted.layer(l, p)(x) * w).sum() for (l, p), w in weights.items())
    fast_grads = torch.autograd.grad(fast, params)
    slow = sum(((adapted.layer(l, p).base_layer(x) + scaling * x @ dense_update(adapted, construction, l, p)) * w).sum()
               for (l, p), w in weights.items())
    slow_grads = torch.autograd.grad(slow, params)
    assert torch.allclose(fast, slow, rtol=1e-5)
    for gf, gs in zip(fast_grads, slow_grads):
        assert (gf - gs).abs().max() <= 1e-5 * gs.abs().max() + 1e-7  # float32 sums in two orders


@pytest.mark.parametrize("head_dim", [None, 16])
@pytest.mark.parametrize("construction,factorization", PAIRS)
def test_gqa_merge_unmerge_and_save_load(construction, factorization, head_dim, tmp_path):
    adapted = randomized(construction, factorization, head_dim)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    out = adapted(input_ids=ids).logits
    weight = adapted.layer(1, "k_proj").base_layer.weight.clone()
    adapted.merge()
    assert torch.allclose(adapted(input_ids=ids).logits, out, atol=1e-5)
    adapted.unmerge()
    assert torch.allclose(adapted.layer(1, "k_proj").base_layer.weight, weight, atol=1e-6)
    adapted.save_adapter(tmp_path / "a")
    loaded = load_adapted_model(llama(head_dim), tmp_path / "a")
    assert torch.allclose(loaded(input_ids=ids).logits, out, atol=1e-5)
    assert torch.allclose(loaded.merge_and_unload()(input_ids=ids).logits, out, atol=1e-5)


def test_explicit_head_dim_shape():
    adapted = get_adapted_model(llama(head_dim=16), TensLoRAConfig("att_qkv_depth", ranks=2))
    assert adapted.shape.d_out == (64, 32, 32) and adapted.shape.head_dim == 16
    assert [adapted.shape.heads(p) for p in range(3)] == [4, 2, 2]
    assert adapted.adapters["all"].tensor.shape == (32, 16, 4, 3, 2)


def test_column_index_when_heads_do_not_divide():
    """3 key heads among 4 query heads: key head j reads heads-mode index j (no group to line up with)."""
    shape = ModelShape(("q", "k"), (0,), 8, (8, 6), 2)
    assert column_index(get_construction("att_qkv"), shape, 1) == [0, 1, 2, 3, 4, 5]
    assert column_index(get_construction("att_qkv"), shape, 0) is None
    shape = ModelShape(("q", "k"), (0,), 8, (8, 4), 2)  # 2 key heads: heads-mode indices 0 and 2
    assert column_index(get_construction("att_qkv"), shape, 1) == [0, 1, 4, 5]
    assert column_index(get_construction("qkv"), shape, 1) == [0, 1, 2, 3]
    assert column_index(get_construction("att"), shape, 1) is None


def test_head_dim_from_hidden_size_when_only_key_value_are_adapted():
    """No ``config.head_dim``: the head size is hidden / query heads, not the first adapted width / heads."""
    model = llama()
    model.config.head_dim = None
    adapted = get_adapted_model(model, TensLoRAConfig("att_qkv", ranks=2, target_modules=("k_proj", "v_proj")))
    assert adapted.shape.head_dim == 8 and adapted.shape.d_out == (16, 16)
    assert adapted.adapters["layer_0"].tensor.shape == (32, 8, 2, 2)
