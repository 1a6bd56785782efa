"""More structures: latent attention (DeepSeek MLA and its copies), DeBERTa v1's and CodeGen's fused
``in_proj``/``qkv_proj``. Exactness against a reference built here (test_reach's helpers: the update sliced by
hand from the full reconstructed tensor, added at the columns that transformers' own split code reads),
and each layout checked against the model itself (one token: query and key columns change nothing,
value columns change the output)."""
import copy
import warnings

import pytest
import torch
from test_reach import build, check_exact, text_inputs

from tenslora import TensLoRAConfig, get_adapted_model
from tenslora.targets import find_targets

torch.set_num_threads(1)

DEEPSEEK = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64,
                moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                first_k_dense_replace=2, vocab_size=101, pad_token_id=0, num_labels=3)


def kv_b_columns(t, heads=4, nope=8, v_dim=8):
    """``kv_b_proj`` viewed as (heads, nope + v_head_dim), split [nope, v_head_dim]: key then value per head."""
    offset = 0 if t.proj == "key" else nope
    width = nope if t.proj == "key" else v_dim
    return [h * (nope + v_dim) + offset + d for h in range(heads) for d in range(width)]


@pytest.mark.parametrize("construction", ["att", "qkv_depth", "att_qkv_depth"])
def test_deepseek_latent_attention_exact(construction):
    """DeepSeek-V3 MLA: the query from ``q_b_proj`` (16 -> 4 x 12) is one stack, key and value from
    ``kv_b_proj``'s columns (12 -> 4 x (8 + 8)) another; the warning says what is not adapted."""
    model = build("DeepseekV3ForSequenceClassification", "DeepseekV3Config", **DEEPSEEK)
    with pytest.warns(UserWarning, match=r"latent attention \(DeepseekV3Attention\).*not adapted.*kv_a_proj_with_mqa"):
        targets = find_targets(model)
    assert {(t.name.rsplit(".", 1)[-1], t.proj) for t in targets} == {
        ("q_b_proj", "query"), ("kv_b_proj", "key"), ("kv_b_proj", "value")}
    adapted, _ = check_exact(model, construction, text_inputs(), kv_b_columns, expect_stacks=2)
    shapes = adapted.shape.by_stack()
    assert sorted((s.projections, s.d_in, s.d_out, s.head_dim) for s in shapes.values()) == [
        (("key", "value"), 12, (32, 32), 8), (("query",), 16, (48,), 12)]


def test_latent_attention_without_query_latent_uses_q_proj():
    """Without ``q_lora_rank`` the query is ``q_proj`` (hidden -> heads x qk_head_dim): adapted the same way."""
    model = build("DeepseekV3ForSequenceClassification", "DeepseekV3Config", **{**DEEPSEEK, "q_lora_rank": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        targets = find_targets(model)
    assert {t.name.rsplit(".", 1)[-1] for t in targets if t.proj == "query"} == {"q_proj"}
    check_exact(model, "att", text_inputs(), kv_b_columns, expect_stacks=2)


def one_token_moves(model, targets, proj, module_leaf=None):
    """Whether adding noise to the columns of ``proj`` (in ``targets``) moves a one-token output."""
    inputs = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    g = torch.Generator().manual_seed(3)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        base = model(**inputs).logits
        for t in targets:
            if t.proj != proj or (module_leaf and not t.name.endswith(module_leaf)):
                continue
            module = edited.get_submodule(t.name)
            cols = torch.tensor(t.columns) if t.columns is not None else torch.arange(module.weight.shape[0])
            module.weight[cols] += torch.randn(len(cols), module.weight.shape[1], generator=g)
        return not torch.allclose(edited(**inputs).logits, base, atol=1e-5)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3", "minicpm3", "mistral4", "kimi_linear",
                                        "longcat_flash", "glm4_moe_lite", "youtu", "sarvam_mla"])
def test_latent_kv_columns_are_what_the_model_reads(model_type):
    """Each latent-attention type of transformers, built tiny: with one token, the columns taken as key
    change nothing and those taken as value change the output (so key/value are not swapped or shifted)."""
    from tenslora.coverage import model_types
    from tenslora.tiny_models import build as build_tiny
    (_, _, class_name), = model_types([model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_tiny(model_type, class_name)
        targets = [t for t in find_targets(model) if t.name.endswith("kv_b_proj")]
    assert {t.proj for t in targets} == {"key", "value"}
    assert not one_token_moves(model, targets, "key")
    assert one_token_moves(model, targets, "value")


def per_head(t, heads=4, head_dim=8):
    return [h * 3 * head_dim + t.proj_index * head_dim + d for h in range(heads) for d in range(head_dim)]


DEBERTA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101,
               num_labels=3)


@pytest.mark.parametrize("construction", ["att", "qkv"])
def test_deberta_in_proj_per_head(construction):
    """DeBERTa v1: ``in_proj`` d -> 3d viewed as (heads, 3 head_dim) and chunked in 3: head h's q, k, v adjacent."""
    model = build("DebertaForSequenceClassification", "DebertaConfig", **DEBERTA)
    check_exact(model, construction, text_inputs(), per_head, expect_stacks=1)


def codegen_columns(t, d=32, shards=4):
    """CodeGen: ``view(..., 4, 3 * d/4).split(d/4)`` into (query, value, key) per shard."""
    local = d // shards
    offset = {"query": 0, "value": local, "key": 2 * local}[t.proj]
    return [m * 3 * local + offset + r for m in range(shards) for r in range(local)]


CODEGEN = dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=101, n_positions=64)


def test_codegen_qkv_proj_shards():
    model = build("CodeGenForCausalLM", "CodeGenConfig", **CODEGEN)
    check_exact(model, "att", text_inputs(), codegen_columns, expect_stacks=1)


DBRX = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=101,
            attn_config=dict(kv_n_heads=2, clip_qkv=8.0), ffn_config=dict(ffn_hidden_size=64, moe_num_experts=2,
                                                                          moe_top_k=1))


def dbrx_model():
    """DBRX: ``Wqkv`` d -> d + 2 kv_heads head_dim, split [d, kv, kv] (grouped-query: 4 query, 2 key/value heads)."""
    from transformers import DbrxConfig, DbrxForCausalLM
    config = DbrxConfig(**DBRX)
    config.attn_config.rope_theta = 10000.0  # transformers' default DbrxAttentionConfig lacks it
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DbrxForCausalLM(config).eval()


def test_dbrx_wqkv_blocks():
    adapted, _ = check_exact(dbrx_model(), "att", text_inputs(), lambda t: list(
        range(*{"query": (0, 32), "key": (32, 48), "value": (48, 64)}[t.proj])), expect_stacks=1)
    assert adapted.shape.d_out == (32, 16, 16)


@pytest.mark.parametrize("cls_name,config_name,kw", [
    ("DebertaForSequenceClassification", "DebertaConfig", DEBERTA),
    ("CodeGenForCausalLM", "CodeGenConfig", CODEGEN),
    ("dbrx", None, None),
])
def test_fused_layouts_are_what_the_model_reads(cls_name, config_name, kw):
    model = dbrx_model() if cls_name == "dbrx" else build(cls_name, config_name, **kw)
    targets = find_targets(model)
    assert not one_token_moves(model, targets, "query")
    assert not one_token_moves(model, targets, "key")
    assert one_token_moves(model, targets, "value")


def test_lora_adapts_latent_attention_modules():
    """The LoRA baseline adapts the same modules (``q_b_proj`` and ``kv_b_proj`` whole)."""
    model = build("DeepseekV3ForSequenceClassification", "DeepseekV3Config", **DEEPSEEK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_adapted_model(model, TensLoRAConfig("lora", ranks=2))
    assert lora.adapted_modules == [f"model.layers.{i}.self_attn.{leaf}" for i in range(2)
                                    for leaf in ("q_b_proj", "kv_b_proj")]


PREDICTED_MODELS = {
    "gpt2 (fused Conv1D)": ("GPT2ForSequenceClassification", "GPT2Config",
                            dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, pad_token_id=0,
                                 num_labels=3)),
    "gpt_bigcode (multi-query)": ("GPTBigCodeForSequenceClassification", "GPTBigCodeConfig",
                                  dict(n_embd=32, n_layer=2, n_head=4, multi_query=True, vocab_size=101,
                                       n_positions=64, pad_token_id=0, num_labels=3)),
    "deepseek_v3 (latent, 2 stacks)": ("DeepseekV3ForSequenceClassification", "DeepseekV3Config", DEEPSEEK),
    "t5 (3 stacks)": ("T5ForSequenceClassification", "T5Config",
                      dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=101, num_labels=3)),
}


@pytest.mark.parametrize("construction", ["lora", "att", "qkv_depth"])
@pytest.mark.parametrize("name", list(PREDICTED_MODELS))
def test_predicted_parameters_equal_real_on_fused_and_stacked(name, construction):
    """PEFT LoRA adapts a fused module whole (``r (d_in + d_out_fused)``, not one ``r d_in`` per projection):
    the prediction from the shape equals the real count; so does every TensLoRA construction's."""
    from tenslora import predict_adapter_parameters
    cls_name, config_name, kw = PREDICTED_MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_adapted_model(build(cls_name, config_name, **kw), TensLoRAConfig(construction, ranks=3))
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters()


def test_lora_prediction_on_gpt2_c_attn_by_hand():
    """GPT-2, 2 layers, d = 32, r = 3: c_attn 32 -> 96 whole: 2 x 3 x (32 + 96) = 768 (not 2 x 3 x 3 x (32 + 32))."""
    from tenslora import predict_adapter_parameters
    cls_name, config_name, kw = PREDICTED_MODELS["gpt2 (fused Conv1D)"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_adapted_model(build(cls_name, config_name, **kw), TensLoRAConfig("lora", ranks=3))
    assert adapted.shape.fused == ((0, 1, 2),)
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == 768 == adapted.adapter_parameters()


IBERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101,
             num_labels=3)


@pytest.mark.parametrize("construction", ["att", "qkv_depth"])
def test_ibert_quant_linear_outside_quant_mode(construction):
    """I-BERT's ``QuantLinear`` returns ``(y, scaling factor)``; outside quantization mode ``y`` is a plain
    linear map: adapted exactly (the tuple kept), merged into the same ``(out, in)`` weight."""
    model = build("IBertForSequenceClassification", "IBertConfig", quant_mode=False, **IBERT)
    check_exact(model, construction, text_inputs(), expect_stacks=1)


def test_ibert_quant_mode_is_not_adapted():
    """In quantization mode the weights are re-quantized integers: no float update fits; refused, named."""
    model = build("IBertForSequenceClassification", "IBertConfig", quant_mode=True, **IBERT)
    with pytest.raises(ValueError, match="IBertAttention.*hold no recognised Q/K/V"):
        find_targets(model)


def test_deepseek_v4_shared_kv_exact():
    """DeepSeek-V4 reads one ``kv_proj`` head as both key and value: adapted as one ``key_value`` projection
    (its own stack) next to the query's ``q_b_proj``; exact against the weights edited by hand; the
    warning names what is not adapted."""
    from tenslora.coverage import model_types
    from tenslora.tiny_models import build as build_tiny
    (_, _, class_name), = model_types(["deepseek_v4"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_tiny("deepseek_v4", class_name)
    with pytest.warns(UserWarning, match=r"shared-KV latent attention \(DeepseekV4Attention\).*not adapted: q_a_proj"):
        targets = find_targets(model)
    assert {(t.name.rsplit(".", 1)[-1], t.proj) for t in targets} == {("q_b_proj", "query"), ("kv_proj", "key_value")}
    check_exact(model, "att", text_inputs(), expect_stacks=2)


@pytest.mark.parametrize("model_type", ["gptj", "zamba2", "llama4", "musicgen", "dots3_note_text", "falcon_h1",
                                        "kimi_linear", "blt"])
def test_tiny_builder_builds_types_the_default_shrink_broke(model_type):
    """Each needs a repair: rotary_dim past head_dim, Mamba heads tiling the inner width, a text config
    inside a composite one, one row of ids per codebook, per-layer overrides on dropped layers,
    Falcon-H1's named inner width, per-layer lists cut with the layers, BLT's global width."""
    from tenslora.coverage import model_types
    from tenslora.tiny_models import build as build_tiny, has_attention
    (_, _, class_name), = model_types([model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, how, inputs = build_tiny(model_type, class_name)
    assert how == "tiny" and has_attention(model)
    assert sum(p.numel() for p in model.parameters()) < 60e6


@pytest.mark.parametrize("model_type", ["gemma3", "git"])
def test_vision_language_input_runs_every_tower(model_type):
    """The benchmark's input for a vision-language model carries an image (its placeholder tokens counted
    from the model), so the vision tower's adapted projections run: status ok, not partly-used."""
    from tenslora.coverage import model_types, try_method
    from tenslora.tiny_models import build as build_tiny, output
    (_, _, class_name), = model_types([model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, inputs = build_tiny(model_type, class_name)
        assert "pixel_values" in inputs
        with torch.no_grad():
            result = try_method(model, inputs, output(model, inputs), "att")
    assert result["status"] == "ok", result


def test_latent_note_does_not_hide_another_uncovered_attention():
    """A model with latent attention and, elsewhere, an attention kind with no Q/K/V: both are named."""
    class OtherAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(32, 32)

    model = build("DeepseekV3ForSequenceClassification", "DeepseekV3Config", **DEEPSEEK)
    model.model.extra = OtherAttention()
    with pytest.warns(UserWarning) as record:
        find_targets(model)
    text = " ".join(str(w.message) for w in record)
    assert "latent attention (DeepseekV3Attention)" in text and "1 attention modules (OtherAttention" in text


SQUEEZEBERT = dict(hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=101, num_labels=3)


@pytest.mark.parametrize("construction", ["att", "qkv_depth"])
def test_squeezebert_conv1d_kernel_one(construction):
    """SqueezeBERT with one group: ``query/key/value`` are ``nn.Conv1d(d, d, 1)`` on ``(N, C, W)``, a linear map
    over channels (weight ``(out, in, 1)``); the reference adds the hand-sliced update to ``weight[..., 0]``."""
    from test_reach import hand_matrix, randomize
    model = build("SqueezeBertForSequenceClassification", "SqueezeBertConfig", q_groups=1, k_groups=1, v_groups=1,
                  **SQUEEZEBERT)
    targets = find_targets(model)
    assert {t.name.rsplit(".", 1)[-1] for t in targets} == {"query", "key", "value"} and len(targets) == 6
    original = copy.deepcopy(model)
    adapted = get_adapted_model(model, TensLoRAConfig(construction, ranks=3, alpha=6.0))
    randomize(adapted)
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for t in targets:
            ref.get_submodule(t.name).weight[..., 0] += hand_matrix(adapted, t).T
        inputs = text_inputs()
        out, expected = adapted(**inputs).logits, ref(**inputs).logits
        assert not torch.allclose(out, original(**inputs).logits, atol=1e-4)
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
        adapted.merge()
        assert torch.allclose(adapted(**inputs).logits, expected, atol=1e-5)


def test_squeezebert_grouped_conv1d_is_not_adapted():
    """The default SqueezeBERT (``q_groups=4``): grouped 1x1 convolutions are refused, the attention class named."""
    model = build("SqueezeBertForSequenceClassification", "SqueezeBertConfig", q_groups=4, k_groups=4, v_groups=4,
                  **SQUEEZEBERT)
    with pytest.raises(ValueError, match="SqueezeBertSelfAttention.*hold no recognised Q/K/V"):
        find_targets(model)


def test_squeezebert_conv1d_lora_and_predicted_count():
    """The LoRA baseline adapts the same ``nn.Conv1d`` modules (PEFT's Conv1d LoRA); predicted count = real."""
    from tenslora import predict_adapter_parameters
    model = build("SqueezeBertForSequenceClassification", "SqueezeBertConfig", q_groups=1, k_groups=1, v_groups=1,
                  **SQUEEZEBERT)
    lora = get_adapted_model(model, TensLoRAConfig("lora", ranks=3))
    assert len(lora.adapted_modules) == 6
    assert predict_adapter_parameters(lora.adapter_config, lora.shape) == lora.adapter_parameters() == 2 * 3 * 3 * 64
    with torch.no_grad():
        lora(**text_inputs())
