"""Half precision: ``adapted.to(bfloat16/float16)`` then a forward works for every construction x
factorization and for LoRA, and stays close to the float32 result."""
import pytest
import torch

from conftest import tiny_llama_gqa
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model

METHODS = [(c, f) for c in CONSTRUCTIONS for f in ("tucker", "cp")] + [("lora", "tucker")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("construction,factorization", METHODS)
def test_half_precision_forward(construction, factorization, dtype):
    adapted = get_adapted_model(tiny_llama_gqa(), TensLoRAConfig(construction, factorization, ranks=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(1, 100, (2, 5), generator=g)
    reference = adapted(input_ids=ids).logits
    adapted.to(dtype)
    logits = adapted(input_ids=ids).logits
    assert logits.dtype == dtype
    assert torch.allclose(logits.float(), reference, atol=0.1, rtol=0.05)
    if construction != "lora":
        assert adapted.delta_weight(0, "k_proj").dtype == dtype
