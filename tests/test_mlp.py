"""``targets="all-linear"``: the MLP's linear layers as tensors of their own (tenslora/mlp.py).

Exactness is checked against the full tensor reconstructed here (``folded_tensor``), sliced by hand:
an up-kind member's update is its slice ``M (d_model, d_ff)``, a down-kind member's is ``M^T``.
"""
import json
import warnings

import pytest
import torch
from torch import nn

from conftest import assert_projection_matches, tiny_bert, tiny_llama_gqa
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model, load_adapted_model
from tenslora.layer import AdaptedLinear
from tenslora.mlp import find_mlp_targets
from tenslora.params import predict_adapter_parameters
from tenslora.targets import model_shape, select_targets

PAIRS = [(c, f) for c in CONSTRUCTIONS for f in ("tucker", "cp", "tt")]


def tiny_gpt2(seed: int = 0):
    """GPT-2: fused ``c_attn`` and an MLP of transformers ``Conv1D`` (``c_fc`` 32 -> 128, ``c_proj`` 128 -> 32)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, num_labels=2,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2ForSequenceClassification(config).eval()


# model -> (MLP member leaf paths of layer 0 in tensor order, down-kind members, d_ff)
MODELS = {
    "bert": (tiny_bert, ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"],
             {"output_dense"}, 64),
    "llama_gqa": (tiny_llama_gqa, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                   "model.layers.0.mlp.down_proj"], {"down_proj"}, 64),
    "gpt2": (tiny_gpt2, ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"], {"c_proj"}, 128),
}
IDS = torch.tensor([[2, 17, 33, 5, 48, 3, 9, 1], [2, 91, 7, 64, 12, 60, 22, 3]])


def adapted_model(name, construction, factorization, ranks=3, seed=0):
    model = MODELS[name][0]()
    config = TensLoRAConfig(construction, factorization, ranks=ranks, targets="all-linear", alpha=4.0)
    with _quiet():
        adapted = get_adapted_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every factor/core non-zero, so each slice is a real update
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return adapted


def _quiet():
    """Warnings off (ranks above tiny mode sizes warn; not what these tests are about)."""
    return warnings.catch_warnings(action="ignore")


def mlp_tensor_name(construction, member, layer):
    """The spec of the MLP tensor names: ``mlp__`` + the member unless stacked + the layer unless stacked."""
    c = CONSTRUCTIONS[construction]
    parts = ([] if c.qkv else [member]) + ([] if c.layers else [f"layer_{layer}"])
    return "mlp__" + ("_".join(parts) or "all")


def expected_modes(construction):
    """MLP tensors: input, output, then the members (``qkv``) and ``layers`` where stacked; never heads."""
    c = CONSTRUCTIONS[construction]
    return ("input", "output", *(("qkv",) if c.qkv else ()), *(("layers",) if c.layers else ()))


def dense_from_full(adapted, construction, member, member_index, layer, layer_index):
    """``M (d_model, d_ff)`` of ``member`` in ``layer``, sliced out of the reconstructed tensor."""
    c = CONSTRUCTIONS[construction]
    name = mlp_tensor_name(construction, member, layer)
    full = adapted.folded_tensor(name)
    assert adapted.adapters[name].tensor.mode_names == expected_modes(construction)
    index = (slice(None), slice(None)) + ((member_index,) if c.qkv else ()) + ((layer_index,) if c.layers else ())
    return full[index]


def check_conv1d(adapted, module, dense, x):
    """``assert_projection_matches`` for a ``Conv1D`` base (weight ``(in, out)``, no ``out_features``)."""
    scaling = adapted.adapter_config.scaling
    assert torch.allclose(module.delta_weight(), scaling * dense.T, atol=1e-5)
    expected = module.base_layer(x) + scaling * x @ dense
    assert torch.allclose(module(x), expected, atol=1e-5)
    with adapted.adapter_pass():
        assert torch.allclose(module(x), expected, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("construction,factorization", PAIRS)
def test_member_updates_are_slices_of_the_reconstructed_tensor(name, construction, factorization):
    adapted = adapted_model(name, construction, factorization)
    _, paths, down, d_ff = MODELS[name]
    mlp = adapted.mlp
    assert [t.name for t in mlp.targets if t.layer_index == 0] == paths
    assert mlp.transposed == down
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for t in mlp.targets:
        module = adapted.layer(("mlp", t.layer), t.proj)
        assert isinstance(module, AdaptedLinear) and module.transposed == (t.proj in down)
        m = dense_from_full(adapted, construction, t.proj, t.proj_index, t.layer, t.layer_index)
        assert m.shape == (32, d_ff)
        dense = m.T if t.proj in down else m  # down: y = x @ M^T
        x = torch.randn(2, 5, dense.shape[0], generator=generator)
        if isinstance(module.base_layer, nn.Linear):
            assert_projection_matches(adapted, module, dense, x)
        else:
            check_conv1d(adapted, module, dense, x)
        assert adapted.delta_weight(("mlp", t.layer), t.proj).abs().sum() > 0
        checked += 1
    assert checked == len(paths) * len({t.layer for t in mlp.targets}) > 0


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("construction,factorization", PAIRS)
def test_forward_equals_merged_forward_and_param_count_equals_prediction(name, construction, factorization):
    adapted = adapted_model(name, construction, factorization)
    base_out = MODELS[name][0]()(input_ids=IDS).logits
    with torch.no_grad():
        out = adapted(input_ids=IDS).logits
        assert not torch.allclose(out, base_out, atol=1e-4)  # the updates do something
        adapted.merge()
        merged = adapted(input_ids=IDS).logits
        adapted.unmerge()
        again = adapted(input_ids=IDS).logits
    assert torch.allclose(out, merged, atol=1e-4) and torch.allclose(out, again, atol=1e-5)
    model = MODELS[name][0]()
    targets = select_targets(model, "all-linear")
    predicted = predict_adapter_parameters(adapted.adapter_config, model_shape(model, targets),
                                           find_mlp_targets(model, targets).shape)
    assert predicted == adapted.adapter_parameters() == sum(p.numel() for p in adapted.adapters.parameters())
    unloaded = adapted.merge_and_unload()
    assert not any(isinstance(m, AdaptedLinear) for m in unloaded.modules())
    with torch.no_grad():
        assert torch.allclose(out, unloaded(input_ids=IDS).logits, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt"])
def test_save_load_round_trip(tmp_path, name, factorization):
    adapted = adapted_model(name, "att_qkv_depth", factorization)
    with torch.no_grad():
        out = adapted(input_ids=IDS).logits
    adapted.save_adapter(tmp_path / "a")
    record = json.loads((tmp_path / "a" / "tenslora_config.json").read_text())
    assert record["config"]["targets"] == "all-linear" and "mlp" in record["model"]
    with _quiet():
        loaded = load_adapted_model(MODELS[name][0](), tmp_path / "a")
    assert set(loaded.adapters) == set(adapted.adapters)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, out, atol=1e-5)


def test_adapter_does_not_load_on_other_mlp_widths(tmp_path):
    adapted_model("bert", "qkv_depth", "tucker").save_adapter(tmp_path / "a")
    other = tiny_bert()
    for layer in other.bert.encoder.layer:  # same attention, wider MLP
        layer.intermediate.dense = nn.Linear(32, 96)
        layer.output.dense = nn.Linear(96, 32)
    with pytest.raises(ValueError, match="mlp"):
        load_adapted_model(other, tmp_path / "a")


def test_old_adapter_without_targets_loads_as_qkv(tmp_path):
    with _quiet():
        adapted = get_adapted_model(tiny_bert(), TensLoRAConfig("qkv_depth", ranks=2))
    adapted.save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "tenslora_config.json"
    record = json.loads(path.read_text())
    del record["config"]["targets"]
    path.write_text(json.dumps(record))
    loaded = load_adapted_model(tiny_bert(), tmp_path / "a")
    assert loaded.adapter_config.targets == "qkv" and loaded.mlp is None
    assert set(loaded.adapters) == {"all"}


@pytest.mark.parametrize("factorization", ["tucker", "tt"])
def test_rank_rule(factorization):
    """Same-named attention ranks; ``output`` under a heads construction takes ``input``'s; capped at what
    the MLP tensor can use (here: 3 members for ``qkv``; TT bond caps)."""
    if factorization == "tucker":
        heads = {"input": 5, "head_dim": 4, "heads": 2, "qkv": 3, "layers": 2}
        plain = {"input": 5, "output": 6, "qkv": 3, "layers": 2}
        expect_heads = {"input": 5, "output": 5, "qkv": 3, "layers": 2}
        expect_plain = {"input": 5, "output": 6, "qkv": 3, "layers": 2}
    else:  # bonds named by their input-side mode
        heads = {"input": 5, "head_dim": 4, "heads": 3, "qkv": 2}
        plain = {"input": 5, "output": 7, "qkv": 2}
        expect_heads = {"input": 5, "output": 5, "qkv": 2}  # output bond: input's rank
        expect_plain = {"input": 5, "output": 6, "qkv": 2}  # output bond capped at qkv * layers = 3 * 2
    for construction, ranks, expected in (("att_qkv_depth", heads, expect_heads), ("qkv_depth", plain, expect_plain)):
        with _quiet():
            adapted = get_adapted_model(tiny_llama_gqa(), TensLoRAConfig(construction, factorization, ranks=ranks,
                                                                         targets="all-linear"))
        tensor = adapted.adapters["mlp__all"].tensor
        names = tensor.mode_names if factorization == "tucker" else tensor.mode_names[:-1]
        assert dict(zip(names, tensor.ranks)) == expected
    with _quiet():  # a single int: every mode, capped (2 layers, 3 members)
        adapted = get_adapted_model(tiny_llama_gqa(), TensLoRAConfig("qkv_depth", "tucker", ranks=8,
                                                                     targets="all-linear"))
    assert adapted.adapters["mlp__all"].tensor.ranks == (8, 8, 3, 2)


def test_lora_all_linear_adapts_what_peft_all_linear_adapts():
    from peft import LoraConfig, get_peft_model
    for make in (tiny_bert, tiny_llama_gqa):
        with _quiet():
            adapted = get_adapted_model(make(), TensLoRAConfig("lora", ranks=4, targets="all-linear"))
            peft = get_peft_model(make(), LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
        expected = {n for n, m in peft.base_model.model.named_modules() if getattr(m, "lora_A", None)}
        assert set(adapted.adapted_modules) == expected
        assert any(".mlp." in n or ".intermediate." in n for n in expected)
        qkv = get_adapted_model(make(), TensLoRAConfig("lora", ranks=4))
        assert set(qkv.adapted_modules) < expected


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
@pytest.mark.parametrize("construction,factorization", [("att_qkv_depth", "tucker"), ("qkv", "cp"),
                                                        ("depth", "tt"), ("att", "tucker")])
def test_peft_export_round_trips(tmp_path, name, construction, factorization):
    from peft import PeftModel

    from tenslora.export.to_peft import write_tenslora_as_peft
    adapted = adapted_model(name, construction, factorization)
    with torch.no_grad():
        out = adapted(input_ids=IDS).logits
    write_tenslora_as_peft(adapted, tmp_path, "unused")
    with _quiet():
        peft = PeftModel.from_pretrained(MODELS[name][0](), str(tmp_path)).eval()
    adapted_names = {n for n, m in peft.base_model.model.named_modules() if getattr(m, "lora_A", None)}
    assert {t.name for t in adapted.mlp.targets} <= adapted_names
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=IDS).logits, out, atol=1e-4)


def test_inconsistent_members_fail_in_one_line():
    model = tiny_llama_gqa()
    model.model.layers[1].mlp.extra_proj = nn.Linear(32, 64)  # a fourth member in layer 1 only
    with pytest.raises(ValueError) as err:
        get_adapted_model(model, TensLoRAConfig("qkv_depth", targets="all-linear"))
    assert "\n" not in str(err.value) and "same members" in str(err.value)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())  # the model is untouched


def test_fused_gate_up_is_refused_in_one_line():
    from transformers import Phi3Config, Phi3ForSequenceClassification
    config = Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=48, vocab_size=101, num_labels=2, pad_token_id=0)
    model = Phi3ForSequenceClassification(config)
    with pytest.raises(ValueError) as err, _quiet():
        get_adapted_model(model, TensLoRAConfig("qkv", targets="all-linear"))
    assert "\n" not in str(err.value) and "fused gate/up" in str(err.value) and "gate_up_proj" in str(err.value)


def test_heads_flag_does_not_apply_to_the_mlp():
    """``att`` (heads, one tensor per projection and layer): the MLP gets one ``(input, output)`` tensor per
    member and layer, no heads mode; the attention tensors keep theirs."""
    adapted = adapted_model("llama_gqa", "att", "tucker")
    mlp = {k: v.tensor.mode_names for k, v in adapted.adapters.items() if k.startswith("mlp__")}
    assert set(mlp) == {f"mlp__{m}_layer_{l}" for m in ("gate_proj", "up_proj", "down_proj") for l in (0, 1)}
    assert set(mlp.values()) == {("input", "output")}
    assert adapted.adapters["q_proj_layer_0"].tensor.mode_names == ("input", "head_dim", "heads")


@pytest.mark.parametrize("factorization", ["tucker", "cp", "tt"])
def test_tensloraplus_groups_and_spectra_cover_the_mlp(factorization):
    from tenslora.plus.metrics import AGGREGATE, MLP_AGGREGATE, adapter_metrics, mode_spectra
    from tenslora.plus.optim import build_param_groups
    adapted = adapted_model("llama_gqa", "att_qkv_depth", factorization)
    groups = build_param_groups(adapted, lr=1e-3, mode_lr={"output": 2.0, "heads": 0.5})
    by_name = {g["name"]: g for g in groups}
    role = "core" if factorization == "tt" else "factor"
    assert "other" not in by_name  # every MLP parameter sits in a mode group
    assert by_name[f"{role}:output"]["lr"] == pytest.approx(2e-3)
    mlp = adapted.adapters["mlp__all"].tensor
    for mode in ("output", "input"):
        assert any(p is mlp.mode_parameters()[mode] for p in by_name[f"{role}:{mode}"]["params"])
    with pytest.raises(ValueError, match="lacks"):
        build_param_groups(adapted, lr=1e-3, mode_lr={"experts": 2.0})
    spectra = mode_spectra(adapted)
    assert set(spectra) == {AGGREGATE, MLP_AGGREGATE}
    assert set(spectra[AGGREGATE]) == {"input", "head_dim", "heads", "qkv", "layers"}
    assert set(spectra[MLP_AGGREGATE]) == {"input", "output", "qkv", "layers"}
    full = adapted.folded_tensor("mlp__all").detach().double()
    for axis, mode in enumerate(mlp.mode_names):  # exact against the reconstruction's unfoldings
        expected = torch.linalg.svdvals(full.movedim(axis, 0).reshape(full.shape[axis], -1))
        got = spectra[MLP_AGGREGATE][mode]
        assert torch.allclose(got[:len(expected)], expected[:len(got)], atol=1e-8 * float(expected[0]) + 1e-10)
    metrics = adapter_metrics(adapted, grads=False)
    assert "effective_rank" in metrics[MLP_AGGREGATE]["output"]


def test_bench_builds_all_linear_for_every_method():
    """``StepBench(targets="all-linear")``: TensLoRA gets its MLP tensors, LoRA PEFT's all-linear modules."""
    from tenslora.bench import StepBench, _build
    bench = StepBench(layers=2, hidden=32, heads=4, kv_heads=2, targets="all-linear")
    with _quiet():
        adapted, count = _build("qkv_depth:tucker", bench)
        lora, _ = _build("lora", bench)
    assert count == adapted.adapter_parameters() and set(adapted.adapters) == {"all", "mlp__all"}
    assert {n.rsplit(".", 1)[-1] for n in lora.adapted_modules} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"}


def test_repro_mode_spectra_of_a_saved_all_linear_adapter_read_the_attention_tensors(tmp_path):
    from tenslora.repro.modes import saved_mode_metrics, saved_tensors
    adapted_model("bert", "qkv_depth", "tucker").save_adapter(tmp_path / "a")
    assert set(saved_tensors(tmp_path / "a")) == {"all"}
    assert set(saved_mode_metrics(tmp_path / "a")) == {"input", "output", "qkv", "layers"}


def test_encoder_decoder_mlps_are_stacks_of_their_own():
    """T5: the encoder's and the decoder's MLPs (``wi``/``wo``) get their own tensors (the decoder block's MLP
    once, though its self- and cross-attention are two stacks); T5's MLP reads ``wo.weight`` (delegated)."""
    from transformers import T5Config, T5Model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = T5Model(T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                                 vocab_size=101)).eval()
    with _quiet():
        adapted = get_adapted_model(model, TensLoRAConfig("qkv_depth", "cp", ranks=3, targets="all-linear"))
    mlp = sorted(k for k in adapted.adapters if k.startswith("mlp"))
    assert mlp == ["mlp_decoder_block_layer_SelfAttention__all", "mlp_encoder_block_layer_SelfAttention__all"]
    assert {t.name for t in adapted.mlp.targets} == {f"{side}.block.{b}.layer.{layer}.DenseReluDense.{m}"
                                                    for side, layer in (("encoder", 1), ("decoder", 2))
                                                    for b in (0, 1) for m in ("wi", "wo")}
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
        out = adapted(input_ids=IDS, decoder_input_ids=IDS).last_hidden_state
        adapted.merge()
        assert torch.allclose(adapted(input_ids=IDS, decoder_input_ids=IDS).last_hidden_state, out, atol=1e-4)


def test_report_names_the_mlp_members():
    adapted = adapted_model("llama_gqa", "qkv_depth", "tucker")
    assert adapted.report.splitlines()[-1] == \
        "mlp: 2 layers x gate_proj, up_proj, down_proj (transposed); d_model 32 -> d_ff 64"


def test_lora_all_linear_save_load_round_trip(tmp_path):
    with _quiet():
        adapted = get_adapted_model(tiny_llama_gqa(), TensLoRAConfig("lora", ranks=4, targets="all-linear"))
    with torch.no_grad():
        for name, p in adapted.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(p.numel()))
        out = adapted(input_ids=IDS).logits
    adapted.save_adapter(tmp_path / "a")
    record = json.loads((tmp_path / "a" / "tenslora_config.json").read_text())
    assert "model.layers.1.mlp.down_proj" in record["model"]["modules"]
    with _quiet():
        loaded = load_adapted_model(tiny_llama_gqa(), tmp_path / "a")
    assert set(loaded.adapted_modules) == set(adapted.adapted_modules)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, out, atol=1e-5)
    widths = [adapted.base_model.get_submodule(n).base_layer.weight.shape for n in adapted.adapted_modules]
    assert adapted.adapter_parameters() == sum(4 * (i + o) for o, i in widths)


def test_square_mlp_is_told_apart_by_names():
    """``d_ff == d_model``: widths cannot tell up from down; the synonym table does (BERT: ``intermediate`` up,
    the layer's ``output`` down; the attention's ``output.dense`` stays out)."""
    from transformers import BertConfig, BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=32, vocab_size=101, num_labels=2))
    mlp = find_mlp_targets(model, select_targets(model, "all-linear"))
    assert [t.name for t in mlp.targets if t.layer_index == 0] == ["bert.encoder.layer.0.intermediate.dense",
                                                                    "bert.encoder.layer.0.output.dense"]
    assert mlp.transposed == {"output_dense"}
