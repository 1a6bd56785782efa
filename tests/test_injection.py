"""Injection into Hugging Face architectures, freezing, seeding, dropout, merging, saving."""
import json
import warnings

import pytest
import torch

from conftest import tiny_bert, tiny_llama_gqa
from tenslora import TensLoRAConfig, get_adapted_model, load_adapted_model
from tenslora.layer import AdaptedLinear


def vision_model(kind):
    import transformers as tf
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=28, patch_size=7, num_labels=5)
    config_cls, model_cls = {"vit": (tf.ViTConfig, tf.ViTForImageClassification),
                             "deit": (tf.DeiTConfig, tf.DeiTForImageClassification),
                             "dinov2": (tf.Dinov2Config, tf.Dinov2ForImageClassification)}[kind]
    return model_cls(config_cls(**common)).eval()


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101,
        max_position_embeddings=70, num_labels=2)).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta", "vit", "deit", "dinov2"])
@pytest.mark.parametrize("construction", ["att_qkv_depth", "qkv", "lora"])
def test_injection_covers_qkv_and_freezes_base(kind, construction, tmp_path):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    model = {"bert": tiny_bert, "roberta": roberta}.get(kind, lambda: vision_model(kind))()
    model.save_pretrained(tmp_path)  # the path a hub model takes
    auto = AutoModelForSequenceClassification if kind in ("bert", "roberta") else AutoModelForImageClassification
    model = auto.from_pretrained(tmp_path)
    layers = model.config.num_hidden_layers
    adapted = get_adapted_model(model, TensLoRAConfig(construction, ranks=4))
    # transformers 5 renamed some vision attentions to q_proj/k_proj/v_proj: both are found
    assert adapted.shape.projections in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
    assert len(adapted.shape.layers) == layers
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "adapters." in n or "classifier" in n for n in trainable), trainable
    if construction != "lora":
        assert sum(isinstance(m, AdaptedLinear) for m in model.modules()) == 3 * layers


def test_grouped_query_attention():
    """Every construction injects into GQA; stacked tensors are as wide as the query projection."""
    adapted = get_adapted_model(tiny_llama_gqa(), TensLoRAConfig("att_depth", ranks=2))
    assert adapted.shape.projections == ("q_proj", "k_proj", "v_proj")
    assert adapted.shape.d_out == (32, 16, 16)
    assert adapted.adapters["k_proj"].tensor.shape == (32, 8, 2, 2)  # (d_in, head_dim, kv heads, layers)
    ids = torch.randint(1, 100, (2, 5))
    adapted(input_ids=ids).logits.sum().backward()
    for construction, shape in [("qkv", (32, 32, 3)), ("qkv_depth", (32, 32, 3, 2)), ("att_qkv", (32, 8, 4, 3)),
                                ("att_qkv_depth", (32, 8, 4, 3, 2))]:
        adapted = get_adapted_model(tiny_llama_gqa(), TensLoRAConfig(construction, ranks=2))
        assert next(iter(adapted.adapters.values())).tensor.shape == shape
        assert adapted.delta_weight(1, "k_proj").shape == (16, 32)
    get_adapted_model(tiny_llama_gqa(), TensLoRAConfig("lora", ranks=2))


def test_target_modules_override_and_missing_targets():
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig("qkv_depth", ranks=2, target_modules=("query", "value")))
    assert adapted.adapters["all"].tensor.shape == (32, 32, 2, 3)
    with pytest.raises(ValueError, match="no attention projections named dense_x"):
        get_adapted_model(tiny_bert(), TensLoRAConfig("qkv", ranks=2, target_modules=("dense_x",)))
    with pytest.raises(ValueError, match="no attention projections"):
        get_adapted_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), TensLoRAConfig("qkv", ranks=2))


def test_adapters_start_different_and_seed_reproduces():
    state = torch.random.get_rng_state()
    a = get_adapted_model(tiny_bert(), TensLoRAConfig("att", ranks=2, seed=3))
    b = get_adapted_model(tiny_bert(), TensLoRAConfig("att", ranks=2, seed=3))
    c = get_adapted_model(tiny_bert(), TensLoRAConfig("att", ranks=2, seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched
    f = lambda m, name: m.adapters[name].tensor.factors["input"]
    assert not torch.equal(f(a, "query_layer_0"), f(a, "key_layer_0"))
    assert torch.equal(f(a, "query_layer_0"), f(b, "query_layer_0"))
    assert not torch.equal(f(a, "query_layer_0"), f(c, "query_layer_0"))
    ids = torch.randint(1, 100, (2, 5))
    base = tiny_bert()(input_ids=ids).logits
    assert torch.allclose(a(input_ids=ids).logits, base, atol=1e-6)  # update is zero at init


def test_lora_baseline_seeded_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a = get_adapted_model(tiny_bert(), TensLoRAConfig("lora", ranks=4, seed=1))
    b = get_adapted_model(tiny_bert(), TensLoRAConfig("lora", ranks=4, seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    wa = a.lora_layer(0, "query").lora_A["default"].weight
    assert torch.equal(wa, b.lora_layer(0, "query").lora_A["default"].weight)
    assert not torch.equal(wa, a.lora_layer(0, "key").lora_A["default"].weight)


def test_dropout_active_in_train_only():
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig("qkv_depth", ranks=3, dropout=0.5))
    with torch.no_grad():
        adapted.adapters["all"].tensor.core.normal_()
    layer, x = adapted.layer(0, "query"), torch.randn(4, 32)
    adapted.train()
    assert not torch.allclose(layer(x), layer(x))
    adapted.eval()
    assert torch.equal(layer(x), layer(x))
    assert torch.allclose(layer(x), layer.base_layer(x) + x @ layer.delta_weight().T, atol=1e-5)


@pytest.mark.parametrize("construction", ["att_qkv_depth", "depth", "lora"])
def test_merge_unmerge(construction):
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig(construction, ranks=3, factorization="tucker"))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    ids = torch.randint(1, 100, (2, 6))
    weight_before = adapted.base_model.bert.encoder.layer[1].attention.self.key.base_layer.weight.clone() \
        if construction != "lora" else None
    out = adapted(input_ids=ids).logits
    adapted.merge()
    assert torch.allclose(adapted(input_ids=ids).logits, out, atol=1e-5)
    adapted.unmerge()
    assert torch.allclose(adapted(input_ids=ids).logits, out, atol=1e-5)
    if weight_before is not None:
        assert torch.allclose(adapted.base_model.bert.encoder.layer[1].attention.self.key.base_layer.weight,
                              weight_before, atol=1e-6)


@pytest.mark.parametrize("construction,factorization", [("att_qkv_depth", "tucker"), ("att", "cp"), ("lora", "tucker"),
                                                        ("none", "tucker")])
def test_save_load_roundtrip(construction, factorization, tmp_path):
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig(construction, factorization, ranks=3))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    ids = torch.randint(1, 100, (2, 6))
    out = adapted(input_ids=ids).logits
    adapted.save_adapter(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "tenslora_config.json" in files and "adapter_model.safetensors" in files
    from safetensors import safe_open
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert not any("attention.self.query.weight" in k or "base_layer" in k for k in f.keys())
    loaded = load_adapted_model(tiny_bert(), tmp_path / "adapter")
    assert torch.allclose(loaded(input_ids=ids).logits, out, atol=1e-5)


def test_load_into_wrong_model_names_the_mismatch(tmp_path):
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig("qkv_depth", ranks=3))
    adapted.save_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match="layers: adapter has \\[0, 1, 2\\], model has \\[0, 1\\]"):
        load_adapted_model(tiny_bert(layers=2), tmp_path / "a")
    with pytest.raises(ValueError, match="d_in: adapter has 32, model has 48"):
        load_adapted_model(tiny_bert(hidden=48), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a saved adapter"):
        load_adapted_model(tiny_bert(), tmp_path)
    record = json.loads((tmp_path / "a" / "tenslora_config.json").read_text())
    assert record["config"]["construction"] == "qkv_depth"


def test_bad_configs_name_the_value():
    cases = [
        (dict(construction="heads_only"), "unknown construction 'heads_only'; allowed: att, qkv"),
        (dict(factorization="tensor-ring"), "unknown factorization 'tensor-ring'; allowed: tucker, cp, tt"),
        (dict(construction="qkv", ranks=(4, 4)), r"ranks \(4, 4\) have the wrong length"),
        (dict(construction="qkv", ranks=0), "rank 0 of mode 'input' must be a positive integer"),
        (dict(construction="qkv", ranks="8_x"), "ranks '8_x' must be integers"),
        (dict(construction="qkv", factorization="cp", ranks=(2, 3, 4)), "cp takes one rank"),
        (dict(construction="qkv", ranks={"input": 2}), "must name exactly the modes input, output, qkv"),
        (dict(dropout=1.5), "dropout 1.5"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            TensLoRAConfig(**kwargs)


def test_rank_above_mode_size_warns():
    with pytest.warns(UserWarning, match="rank 5 of mode 'qkv' exceeds its size 3"):
        get_adapted_model(tiny_bert(), TensLoRAConfig("qkv", ranks=(4, 4, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_adapted_model(tiny_bert(), TensLoRAConfig("qkv", factorization="cp", ranks=5))


def test_heads_must_divide_width():
    model = tiny_bert()
    model.config.num_attention_heads = 5
    for module in model.modules():  # what the attention modules execute is what counts
        if hasattr(module, "attention_head_size"):
            module.num_attention_heads, module.attention_head_size = 5, 7
    with pytest.raises(ValueError, match="5 heads do not divide the projection width 32"):
        get_adapted_model(model, TensLoRAConfig("att", ranks=2))


def test_linear_probe_trains_only_the_head():
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig("none"))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.classifier.weight", "base_model.classifier.bias"}
    assert adapted.adapter_parameters() == 0


def model_state(model):
    """What injection may change: the module tree and the requires_grad flags."""
    return [(n, type(m).__name__) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("construction", ["att_qkv_depth", "lora"])
def test_second_adaptation_is_refused_and_changes_nothing(construction):
    model = tiny_bert()
    adapted = get_adapted_model(model, TensLoRAConfig(construction, ranks=2))
    before = model_state(model)
    for again in (model, adapted):
        with pytest.raises(ValueError, match="model already carries an adapter"):
            get_adapted_model(again, TensLoRAConfig("qkv", ranks=2))
    assert model_state(model) == before


def test_adapter_that_does_not_fit_leaves_the_model_untouched(tmp_path):
    """A BERT adapter on a GQA LLaMA: 'does not fit' (checked before building), model unchanged."""
    get_adapted_model(tiny_bert(), TensLoRAConfig("att_qkv", ranks=2)).save_adapter(tmp_path / "a")
    model = tiny_llama_gqa()
    before = model_state(model)
    with pytest.raises(ValueError, match="adapter does not fit this model .*model_type: adapter has 'bert'"):
        load_adapted_model(model, tmp_path / "a")
    assert model_state(model) == before


@pytest.mark.parametrize("construction", ["att_qkv_depth", "lora", "none"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unreadable_weights_name_the_file_and_leave_the_model_untouched(construction, damage, tmp_path):
    get_adapted_model(tiny_bert(), TensLoRAConfig(construction, ranks=2)).save_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if damage == "truncated" else b"")
    model = tiny_bert()
    before = model_state(model)
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        load_adapted_model(model, tmp_path / "a")
    assert model_state(model) == before


def test_failure_while_loading_weights_restores_the_model(tmp_path):
    """Weights whose shapes differ from the model's fail after building: everything is put back."""
    from safetensors.torch import load_file, save_file
    get_adapted_model(tiny_bert(), TensLoRAConfig("qkv_depth", ranks=2)).save_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.startswith("adapters."))
    tensors[key] = torch.zeros(1)
    save_file(tensors, weights)
    model = tiny_bert()
    before = model_state(model)
    with pytest.raises(ValueError, match="has shape"):
        load_adapted_model(model, tmp_path / "a")
    assert model_state(model) == before
    get_adapted_model(model, TensLoRAConfig("qkv", ranks=2))  # and it can still be adapted
