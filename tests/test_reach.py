"""Any architecture: fused Q/K/V, other projection names, several stacks, hierarchical vision,
sub-config heads, shared layers. Each adapted model is compared with a reference built here: a copy
of the base model whose weights get the update sliced by hand from the full reconstructed tensor,
placed at the columns that transformers' own split code reads (written out in each test)."""
import copy
import warnings

import pytest
import torch

from tenslora import TensLoRAConfig, get_adapted_model
from tenslora.constructions import get_construction

torch.set_num_threads(1)


def build(cls_name, config_name, **kw):
    import transformers
    config = getattr(transformers, config_name)(**kw)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(transformers, cls_name)(config).eval()


def text_inputs(eos=None):
    ids = torch.randint(2, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    if eos is not None:
        ids[:, -1] = eos
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def image_inputs(size=32):
    return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}


def randomize(adapted):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def hand_matrix(adapted, t):
    """``(d_in, d_out)`` update of target ``t`` sliced from its full tensor: batch modes indexed,
    (head_dim, heads) merged as column = head * head_dim + d, key/value columns of a wider tensor as
    in docs/constructions.md (here only the leading columns / equal widths occur)."""
    construction = get_construction(adapted.adapter_config.construction)
    key = construction.group_key(t.proj, t.layer)
    full = adapted.folded_tensor(f"{t.stack}__{key}" if t.stack else key)
    if construction.layers:
        full = full[..., t.layer_index]
    if construction.qkv:
        full = full[..., t.proj_index]
    if construction.heads:
        full = full.permute(0, 2, 1).reshape(full.shape[0], -1)
    return adapted.adapter_config.scaling * full[:, : t.out_features]


def reference(base, adapted, targets, fused_columns=None):
    """A copy of ``base`` with every update added to its weight by hand. ``fused_columns(t)``: the
    fused module's output columns of target ``t``, from the model's split code."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for t in targets:
            module = ref.get_submodule(t.name)
            dense = hand_matrix(adapted, t)
            if t.columns is None:
                module.weight += dense.T
            elif isinstance(module, torch.nn.Linear):
                module.weight[fused_columns(t)] += dense.T
            else:  # transformers Conv1D: weight (in, out)
                module.weight[:, fused_columns(t)] += dense
    return ref


def check_exact(base, construction, inputs, fused_columns=None, expect_stacks=None):
    from tenslora.targets import find_targets
    targets = find_targets(base)
    original = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_adapted_model(base, TensLoRAConfig(construction, ranks=3, alpha=6.0))
    randomize(adapted)
    ref = reference(original, adapted, targets, fused_columns)
    with torch.no_grad():
        out = adapted(**inputs).logits
        expected = ref(**inputs).logits
        assert not torch.allclose(out, original(**inputs).logits, atol=1e-4)  # the adapter does something
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
        adapted.merge()  # merged weights (fused, Conv1D transposed) give the same answer
        assert torch.allclose(adapted(**inputs).logits, expected, atol=1e-5)
        adapted.unmerge()
        assert torch.allclose(adapted(**inputs).logits, expected, atol=1e-5)
    if expect_stacks is not None:
        assert len(adapted.shape.by_stack()) == expect_stacks, adapted.report
    return adapted, targets


def blocks(widths):
    """``[Q | K | V]`` contiguous blocks of the given widths."""
    starts = [sum(widths[:i]) for i in range(3)]
    return lambda t: list(range(starts[t.proj_index], starts[t.proj_index] + widths[t.proj_index]))


@pytest.mark.parametrize("construction", ["att", "qkv_depth", "att_qkv_depth"])
def test_gpt2_fused_conv1d(construction):
    """GPT-2: ``c_attn`` is a Conv1D d -> 3d, split as ``.split(d, dim=2)`` into Q, K, V."""
    model = build("GPT2ForSequenceClassification", "GPT2Config", n_embd=32, n_layer=2, n_head=4, vocab_size=101,
                  n_positions=64, num_labels=3, pad_token_id=0)
    adapted, targets = check_exact(model, construction, text_inputs(), blocks([32, 32, 32]), expect_stacks=1)
    assert {t.name for t in targets} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert adapted.shape.d_out == (32, 32, 32) and adapted.shape.head_dim == 8


@pytest.mark.parametrize("construction", ["att", "qkv_depth"])
def test_bloom_fused_linear_per_head_interleave(construction):
    """Bloom: ``query_key_value`` output viewed as (heads, 3, head_dim): head h's q, k, v are adjacent."""
    model = build("BloomForSequenceClassification", "BloomConfig", hidden_size=32, n_layer=2, n_head=4,
                  vocab_size=101, num_labels=3, pad_token_id=0)

    def columns(t):
        return [h * 24 + t.proj_index * 8 + d for h in range(4) for d in range(8)]
    check_exact(model, construction, text_inputs(), columns, expect_stacks=1)


def test_gpt_neox_fused_per_head():
    """GPT-NeoX: ``view(..., -1, 3 * head_dim).chunk(3)``: the same per-head interleave."""
    model = build("GPTNeoXForSequenceClassification", "GPTNeoXConfig", hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, vocab_size=101, num_labels=3, pad_token_id=0)
    check_exact(model, "att", text_inputs(),
                lambda t: [h * 24 + t.proj_index * 8 + d for h in range(4) for d in range(8)])


@pytest.mark.parametrize("construction", ["att", "qkv_depth"])
def test_gpt_bigcode_multi_query(construction):
    """GPT-BigCode multi-query: ``c_attn`` d -> d + 2 head_dim, split (d, head_dim, head_dim)."""
    model = build("GPTBigCodeForSequenceClassification", "GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=4,
                  multi_query=True, vocab_size=101, n_positions=64, num_labels=3, pad_token_id=0)
    adapted, _ = check_exact(model, construction, text_inputs(), blocks([32, 8, 8]))
    assert adapted.shape.d_out == (32, 8, 8)


def test_t5_names_and_three_stacks():
    """T5: projections named q, k, v; encoder self-, decoder self- and cross-attention are three stacks."""
    model = build("T5ForSequenceClassification", "T5Config", d_model=32, d_kv=8, d_ff=64, num_layers=2,
                  num_heads=4, vocab_size=101, decoder_start_token_id=0, pad_token_id=0, num_labels=3)
    adapted, targets = check_exact(model, "qkv_depth", text_inputs(eos=1), expect_stacks=3)
    assert {t.proj for t in targets} == {"q", "k", "v"}
    assert any("EncDecAttention" in t.name for t in targets)  # cross-attention is adapted, in its own stack
    assert len(adapted.adapters) == 3
    from tenslora.params import predict_adapter_parameters  # summed over the stacks, exactly
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters()


def test_bart_encoder_decoder():
    model = build("BartForSequenceClassification", "BartConfig", d_model=32, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  vocab_size=101, max_position_embeddings=64, num_labels=3)
    with pytest.warns(UserWarning, match="3 attention stacks"):
        get_adapted_model(copy.deepcopy(model), TensLoRAConfig("att", ranks=2))
    check_exact(model, "att_qkv_depth", text_inputs(eos=2), expect_stacks=3)


def test_swin_hierarchical_stages_are_stacks():
    """Swin: widths double per stage; each stage is a stack with its own tensors and head count."""
    model = build("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                  depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3)
    adapted, _ = check_exact(model, "qkv_depth", image_inputs(), expect_stacks=2)
    widths = sorted(s.d_in for s in adapted.shape.by_stack().values())
    assert widths == [16, 32]
    from tenslora.params import predict_adapter_parameters
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters()


def test_clip_heads_from_vision_sub_config():
    """CLIP image classification: heads live in ``vision_config`` (and on the attention modules)."""
    model = build("CLIPForImageClassification", "CLIPConfig", num_labels=3,
                  vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, image_size=32, patch_size=8),
                  text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, vocab_size=101))
    adapted, _ = check_exact(model, "att_depth", image_inputs(), expect_stacks=1)
    assert adapted.shape.head_dim == 8


def test_albert_shared_layer_is_one_layer():
    """ALBERT runs one shared layer L times: it is one site, its update is shared like its weights."""
    model = build("AlbertForSequenceClassification", "AlbertConfig", embedding_size=16, hidden_size=32,
                  num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=101, num_labels=3)
    adapted, targets = check_exact(model, "att_qkv_depth", text_inputs(), expect_stacks=1)
    assert adapted.shape.layers == (0,) and len(targets) == 3
    assert "1 layers" in adapted.report


def test_unverified_fused_layout_is_refused():
    """A fused Q/K/V module of a model type whose column layout is not verified is refused by name."""
    model = build("GPT2ForSequenceClassification", "GPT2Config", n_embd=32, n_layer=2, n_head=4, vocab_size=101,
                  n_positions=64, num_labels=3, pad_token_id=0)
    model.config.model_type = "unverified_gpt"
    for block in model.transformer.h:
        block.attn.config = model.config
    with pytest.raises(ValueError, match="c_attn.*'unverified_gpt' has no verified column layout"):
        get_adapted_model(copy.deepcopy(model), TensLoRAConfig("att", ranks=2))


def test_lora_uses_peft_defaults_where_tenslora_finds_nothing():
    """RWKV has no Q/K/V projections TensLoRA recognises: the LoRA baseline falls back to PEFT's own
    default targets for the model type and says so."""
    model = build("RwkvForCausalLM", "RwkvConfig", hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                  intermediate_size=64, vocab_size=101, context_length=64)
    with pytest.raises(ValueError, match="RwkvSelfAttention"):
        get_adapted_model(copy.deepcopy(model), TensLoRAConfig("att", ranks=2))
    with pytest.warns(UserWarning, match="PEFT's default targets"):
        lora = get_adapted_model(model, TensLoRAConfig("lora", ranks=2))
    assert sorted(lora.adapted_modules) == sorted(f"rwkv.blocks.{i}.{part}.{leaf}" for i in range(2)
                                    for part, leaves in (("attention", ("key", "value", "receptance", "output")),
                                                         ("feed_forward", ("key", "value", "receptance")))
                                    for leaf in leaves)


def test_lora_adapts_fused_module_whole():
    model = build("GPT2ForSequenceClassification", "GPT2Config", n_embd=32, n_layer=2, n_head=4, vocab_size=101,
                  n_positions=64, num_labels=3, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_adapted_model(model, TensLoRAConfig("lora", ranks=2))
    assert lora.adapted_modules == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert "fused" in lora.report


FUSED_MODELS = {
    "gpt2": ("GPT2ForSequenceClassification", "GPT2Config",
             dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, pad_token_id=0)),
    "bloom": ("BloomForSequenceClassification", "BloomConfig",
              dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=101, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXForSequenceClassification", "GPTNeoXConfig",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=101, pad_token_id=0)),
    "gpt_bigcode": ("GPTBigCodeForSequenceClassification", "GPTBigCodeConfig",
                    dict(n_embd=32, n_layer=2, n_head=4, multi_query=True, vocab_size=101, n_positions=64,
                         pad_token_id=0)),
    "phi3": ("Phi3ForSequenceClassification", "Phi3Config",
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=101, pad_token_id=0)),
    "mpt": ("MptForSequenceClassification", "MptConfig",
            dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, vocab_size=101, pad_token_id=0)),
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertConfig",
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=101, pad_token_id=0)),
    "gpt_neox_japanese": ("GPTNeoXJapaneseForCausalLM", "GPTNeoXJapaneseConfig",
                          dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2,
                               vocab_size=101)),
    "openai-gpt": ("OpenAIGPTForSequenceClassification", "OpenAIGPTConfig",
                   dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, pad_token_id=0)),
    **{f"falcon-{arch}": ("FalconForSequenceClassification", "FalconConfig",
                          dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                               pad_token_id=0, **flags))
       for arch, flags in (("mq", dict(multi_query=True)), ("mha", dict(multi_query=False)),
                           ("grouped", dict(new_decoder_architecture=True, num_kv_heads=2)))},
}


@pytest.mark.parametrize("model_type", list(FUSED_MODELS))
def test_fused_columns_are_what_the_model_reads(model_type):
    """Checks each verified fused layout against the model itself: with one token, attention puts all
    its weight on that token, so changing the columns taken as query or key changes nothing, while
    changing the value columns changes the output."""
    from tenslora.targets import find_targets
    cls_name, config_name, kw = FUSED_MODELS[model_type]
    model = build(cls_name, config_name, num_labels=3, **kw)
    targets = [t for t in find_targets(model) if t.columns is not None]
    assert {t.proj for t in targets} == {"query", "key", "value"}
    inputs = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    with torch.no_grad():
        base = model(**inputs).logits
        for proj, changes in (("query", False), ("key", False), ("value", True)):
            edited = copy.deepcopy(model)
            for t in targets:
                if t.proj != proj:
                    continue
                module = edited.get_submodule(t.name)
                cols = torch.tensor(t.columns)
                if isinstance(module, torch.nn.Linear):
                    module.weight[cols] += torch.randn(len(cols), module.weight.shape[1])
                else:
                    module.weight[:, cols] += torch.randn(module.weight.shape[0], len(cols))
            moved = not torch.allclose(edited(**inputs).logits, base, atol=1e-5)
            assert moved == changes, f"{model_type}: changing its {proj} columns: output moved={moved}"


def test_phi3_fused_grouped_query():
    """Phi-3: ``qkv_proj`` is [Q (4 heads) | K (2) | V (2)]; a qkv tensor as wide as Q, K/V read its leading columns."""
    cls_name, config_name, kw = FUSED_MODELS["phi3"]
    adapted, _ = check_exact(build(cls_name, config_name, num_labels=3, **kw), "qkv", text_inputs(),
                             blocks([32, 16, 16]))
    assert adapted.shape.d_out == (32, 16, 16)


def test_attention_without_recognised_projections_is_named():
    """An attention module of another kind (here a latent-attention stand-in) is never skipped silently."""
    from conftest import tiny_bert
    from tenslora.targets import find_targets

    class LatentAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_a_proj = torch.nn.Linear(32, 8)

    model = tiny_bert()
    model.bert.encoder.layer[1].attention = LatentAttention()
    with pytest.warns(UserWarning, match=r"1 attention modules \(LatentAttention"):
        targets = find_targets(model)
    assert {t.layer for t in targets} == {0, 2}
    bare = torch.nn.Sequential(LatentAttention())
    with pytest.raises(ValueError, match="LatentAttention.*hold no recognised Q/K/V"):
        find_targets(bare)


def test_separate_conv1d_projections_merge_transposed():
    """Separate q/k/v held as transformers' Conv1D (weight (in, out)): merging must transpose the update."""
    from transformers.pytorch_utils import Conv1D

    class Att(torch.nn.Module):
        num_heads = 2

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = Conv1D(8, 6), Conv1D(8, 6), Conv1D(8, 6)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Att(), Att()])

        def forward(self, x):
            return sum(layer(x) for layer in self.layers)

    model = Model()
    adapted = get_adapted_model(model, TensLoRAConfig("att", ranks=2))
    randomize(adapted)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = adapted(x)
        adapted.merge()
        assert torch.allclose(adapted(x), unmerged, atol=1e-5)


def test_cross_attention_without_encoder_is_skipped_and_said():
    """BartForCausalLM is BART's decoder alone: its cross-attention never runs, so it is skipped with a
    warning, and every adapted module is called by the forward."""
    model = build("BartForCausalLM", "BartConfig", d_model=32, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  vocab_size=101, max_position_embeddings=64)
    with pytest.warns(UserWarning, match="2 cross-attention modules .* are skipped"):
        adapted = get_adapted_model(model, TensLoRAConfig("qkv_depth", ranks=2))
    wrapped = [n for n, m in adapted.base_model.named_modules() if type(m).__name__ == "AdaptedLinear"]
    assert len(wrapped) == 6 and all(".self_attn." in n for n in wrapped)
    called = set()
    for module in adapted.layers.values():
        module.register_forward_hook(lambda mod, *_: called.add(id(mod)))
    with torch.no_grad():
        adapted(**text_inputs())
    assert called == {id(m) for m in adapted.layers.values()}


def test_multi_stack_and_fused_adapters_save_and_load(tmp_path):
    from tenslora import load_adapted_model
    t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=101, decoder_start_token_id=0,
              pad_token_id=0, num_labels=3)
    gpt2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, num_labels=3, pad_token_id=0)
    for cls_name, config_name, kw, inputs in (("T5ForSequenceClassification", "T5Config", t5, text_inputs(eos=1)),
                                              ("GPT2ForSequenceClassification", "GPT2Config", gpt2, text_inputs())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapted = get_adapted_model(build(cls_name, config_name, **kw), TensLoRAConfig("att_qkv_depth", ranks=2))
            randomize(adapted)
            adapted.save_adapter(tmp_path / cls_name)
            loaded = load_adapted_model(build(cls_name, config_name, **kw), tmp_path / cls_name)
        with torch.no_grad():
            assert torch.allclose(loaded(**inputs).logits, adapted(**inputs).logits, atol=1e-6)


def test_lora_on_peft_defaults_saves_and_loads(tmp_path):
    from tenslora import load_adapted_model
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101,
              num_labels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_adapted_model(build("DebertaForSequenceClassification", "DebertaConfig", **kw),
                                 TensLoRAConfig("lora", ranks=2))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.3, generator=torch.Generator().manual_seed(3))
        lora.save_adapter(tmp_path / "lora")
        loaded = load_adapted_model(build("DebertaForSequenceClassification", "DebertaConfig", **kw), tmp_path / "lora")
    inputs = text_inputs()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, lora(**inputs).logits, atol=1e-6)
    wrong = build("DebertaForSequenceClassification", "DebertaConfig", **{**kw, "num_hidden_layers": 3})
    with pytest.raises(ValueError, match="adapter does not fit this model"):
        load_adapted_model(wrong, tmp_path / "lora")


def test_wrapper_holding_a_linear_and_linear_subclass():
    """Moshi-style wrappers (``q_proj.linear``) and ``nn.Linear`` subclasses are adapted like ``nn.Linear``."""
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.linear(x)

    class MyLinear(torch.nn.Linear):
        pass

    class Attention(torch.nn.Module):
        num_heads = 2

        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = Wrapper(), MyLinear(8, 8), Wrapper()

        def forward(self, x):
            return self.q_proj(x) * self.k_proj(x) + self.v_proj(x)

    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([Attention(), Attention()])})
    model.forward = lambda x: sum(layer(x) for layer in model["layers"])
    from tenslora.targets import find_targets
    assert [t.name for t in find_targets(model)][:3] == ["layers.0.q_proj.linear", "layers.0.k_proj",
                                                         "layers.0.v_proj.linear"]
    adapted = get_adapted_model(model, TensLoRAConfig("att_qkv_depth", ranks=2))
    randomize(adapted)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer = model["layers"][0]
        q, k, v = (layer.q_proj.linear, layer.k_proj, layer.v_proj.linear)
        assert torch.allclose(q(x), q.base_layer(x) + x @ adapted.delta_weight(0, "q_proj").T, atol=1e-6)
        assert torch.allclose(k(x), k.base_layer(x) + x @ adapted.delta_weight(0, "k_proj").T, atol=1e-6)
        assert torch.allclose(v(x), v.base_layer(x) + x @ adapted.delta_weight(0, "v_proj").T, atol=1e-6)
