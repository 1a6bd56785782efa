"""The fast thin-matmul path against an explicit reconstruction of the full tensor."""
import pytest
import torch

from conftest import tiny_bert
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model

PROJS = ("query", "key", "value")


def randomized(construction, factorization, ranks, seed=0):
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig(construction, factorization, ranks=ranks, alpha=6.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapted


def reference_matrix(adapted, construction, layer, proj, full=None):
    """Slice the reconstructed tensor by hand; merge (head_dim, heads) as column = head * head_dim + d."""
    p = PROJS.index(proj)
    stacked_qkv, stacked_layers = "qkv" in construction, "depth" in construction
    name = ("all" if stacked_qkv and stacked_layers else f"layer_{layer}" if stacked_qkv
            else proj if stacked_layers else f"{proj}_layer_{layer}")
    t = adapted.folded_tensor(name) if full is None else full
    if stacked_layers:
        t = t[..., layer]
    if stacked_qkv:
        t = t[..., p]
    if construction.startswith("att"):
        t = t.permute(0, 2, 1).reshape(t.shape[0], -1)
    return t  # (d_in, d_out)


def ranks_for(construction, factorization):
    n_modes = len(CONSTRUCTIONS[construction].mode_names)
    return 3 if factorization == "cp" else tuple([3, 2, 2, 2, 3][:n_modes])


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
def test_fast_path_equals_reconstruction(construction, factorization):
    adapted = randomized(construction, factorization, ranks_for(construction, factorization))
    scaling = adapted.adapter_config.scaling
    x = torch.randn(2, 5, 32)
    for layer in range(3):
        for proj in PROJS:
            module = adapted.layer(layer, proj)
            dense = reference_matrix(adapted, construction, layer, proj)
            assert torch.allclose(adapted.delta_weight(layer, proj), scaling * dense.T, atol=1e-5)
            expected = module.base_layer(x) + scaling * x @ dense
            assert torch.allclose(module(x), expected, atol=1e-5)
            with adapted.adapter_pass():  # the cached per-pass slices give the same answer
                assert torch.allclose(module(x), expected, atol=1e-5)


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
def test_gradients_equal_reconstruction(construction, factorization):
    adapted = randomized(construction, factorization, ranks_for(construction, factorization))
    scaling = adapted.adapter_config.scaling
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    params = list(adapted.adapters.parameters())

    with adapted.adapter_pass():
        fast = sum((adapted.layer(l, p)(x) * weights).sum() for l in range(3) for p in PROJS)
    fast_grads = torch.autograd.grad(fast, params)

    fulls = {name: a.tensor.full() for name, a in adapted.adapters.items()}
    slow = 0.0
    for l in range(3):
        for p in PROJS:
            stacked_qkv, stacked_layers = "qkv" in construction, "depth" in construction
            name = ("all" if stacked_qkv and stacked_layers else f"layer_{l}" if stacked_qkv
                    else p if stacked_layers else f"{p}_layer_{l}")
            dense = reference_matrix(adapted, construction, l, p, full=fulls[name])
            base = adapted.layer(l, p).base_layer
            slow = slow + ((base(x) + scaling * x @ dense) * weights).sum()
    slow_grads = torch.autograd.grad(slow, params)
    assert torch.allclose(fast, slow, rtol=1e-5)
    for gf, gs in zip(fast_grads, slow_grads):  # float32: 1e-5 relative to the gradient's scale
        assert (gf - gs).abs().max() <= 1e-5 * gs.abs().max()


@pytest.mark.parametrize("construction", ["att", "att_qkv", "att_depth", "att_qkv_depth"])
@pytest.mark.parametrize("factorization", ["tucker", "cp"])
def test_heads_mode_indexes_the_models_heads(construction, factorization):
    """Changing head 2's row of the heads factor changes only columns 2*head_dim..3*head_dim-1."""
    adapted = randomized(construction, factorization, ranks_for(construction, factorization))
    head_dim = adapted.shape.head_dim
    before = adapted.delta_weight(1, "key").clone()  # (d_out, d_in): rows are output columns
    tensor = next(iter(adapted.adapters.values())) if len(adapted.adapters) == 1 else adapted.adapters[
        {"att": "key_layer_1", "att_qkv": "layer_1", "att_depth": "key"}[construction]]
    with torch.no_grad():
        tensor.tensor.factors["heads"][2] += 1.0
    changed = (adapted.delta_weight(1, "key") - before).abs().sum(dim=1) > 1e-7
    expected = torch.zeros(32, dtype=torch.bool)
    expected[2 * head_dim:3 * head_dim] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
def test_attention_output_uses_update_per_head(construction):
    """End to end: the adapted model's logits equal a model whose weights carry the dense updates."""
    adapted = randomized(construction, "tucker", ranks_for(construction, "tucker"))
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    out = adapted(input_ids=ids).logits
    merged = adapted.merge_and_unload()
    assert torch.allclose(merged(input_ids=ids).logits, out, atol=1e-5)
