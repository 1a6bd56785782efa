"""Shared fixtures: tiny random Hugging Face models (built from configs, never downloaded)."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global torch RNG state, whatever ran before it (order-independent)."""
    torch.manual_seed(0)


def tiny_bert(num_labels: int = 3, layers: int = 3, hidden: int = 32, heads: int = 4, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, vocab_size=101, max_position_embeddings=64,
                        num_labels=num_labels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BertForSequenceClassification(config).eval()


def tiny_llama_gqa(num_labels: int = 2, seed: int = 0):
    """A LLaMA-style decoder with grouped-query attention: 4 query heads, 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=101, num_labels=num_labels, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config).eval()


def assert_projection_matches(adapted, module, dense, x):
    """``module`` (an adapted projection of ``adapted``) against ``dense (d_in, d_out)``, the update built in
    the test from a reconstruction: its delta, its forward, and its forward inside an adapter pass."""
    scaling = adapted.adapter_config.scaling
    assert dense.shape == (x.shape[-1], module.base_layer.out_features)
    assert torch.allclose(module.delta_weight(), scaling * dense.T, atol=1e-5)
    expected = module.base_layer(x) + scaling * x @ dense
    assert torch.allclose(module(x), expected, atol=1e-5)
    with adapted.adapter_pass():
        assert torch.allclose(module(x), expected, atol=1e-5)


@pytest.fixture
def bert():
    return tiny_bert()


def export_randomized_as_peft(adapted, base, out, name: str):
    """Fill ``adapted``'s adapters with seeded noise, save them, export them as a PEFT LoRA under
    ``out/p/<name>`` and load that onto a fresh copy of the model saved at ``base``: the ``PeftModel``
    and its directory."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tenslora.export import export_adapter
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    saved = adapted.save_adapter(out / "a" / name)
    export_adapter(saved, "peft", out / "p" / name, model=str(base))
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base).eval(),
                                           out / "p" / name)
    return peft_model, out / "p" / name
