"""Predicted parameter counts equal the real ones, for every construction and factorization."""
import pytest

from conftest import tiny_bert, tiny_llama_gqa
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model, predict_adapter_parameters
from tenslora.params import count_trainable
from tenslora.targets import ModelShape

ROBERTA_BASE = ModelShape(("query", "key", "value"), tuple(range(12)), 768, (768, 768, 768), 64)


@pytest.mark.parametrize("construction,factorization",
                         [(c, f) for c in CONSTRUCTIONS for f in ("tucker", "cp")] + [("lora", "tucker")])
def test_prediction_equals_real_count(construction, factorization):
    n_modes = 2 if construction == "lora" else len(CONSTRUCTIONS[construction].mode_names)
    ranks = 3 if factorization == "cp" or construction == "lora" else tuple([4, 3, 2, 3, 2][:n_modes])
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig(construction, factorization, ranks=ranks))
    trainable, _ = count_trainable(adapted)
    head = sum(p.numel() for n, p in adapted.named_parameters() if p.requires_grad and "classifier" in n
               and "lora_" not in n)
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters()
    assert adapted.adapter_parameters() == trainable - head


@pytest.mark.parametrize("construction,factorization",
                         [(c, f) for c in CONSTRUCTIONS for f in ("tucker", "cp")] + [("lora", "tucker")])
def test_prediction_for_grouped_query_attention(construction, factorization):
    n_modes = 2 if construction == "lora" else len(CONSTRUCTIONS[construction].mode_names)
    ranks = 3 if factorization == "cp" or construction == "lora" else tuple([4, 3, 2, 3, 2][:n_modes])
    adapted = get_adapted_model(tiny_llama_gqa(), TensLoRAConfig(construction, factorization, ranks=ranks))
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters()


def test_reference_counts_roberta_base():
    """The figures of the reference notes for RoBERTa-base (D=768, H=12, L=12)."""
    count = lambda c, f, r: predict_adapter_parameters(TensLoRAConfig(c, f, ranks=r), ROBERTA_BASE)
    assert count("lora", "tucker", 8) == 442_368
    assert count("att_qkv_depth", "tucker", 8) == 39_640
    assert count("att_qkv_depth", "cp", 8) == 6_872
