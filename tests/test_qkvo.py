"""``targets="qkvo"``: the attention output projection O joins the tensor, transposed.

Every construction x factorization on a tiny BERT (O = ``attention.output.dense``), a tiny GQA LLaMA
whose query width differs from its model width (``head_dim`` 16: Q 32 -> 64, O 64 -> 32) and a tiny
GPT-2 (fused ``c_attn``, ``Conv1D`` ``c_proj``): each projection's update against its slice of the full
tensor rebuilt here from the factors/cores (einsum), O's transposed; merge; save/load; parameter
count; PEFT export; refusals; LoRA on the same four projections; TensLoRA+ on the 4-wide ``qkv`` mode.
"""
import json

import pytest
import torch
from torch import nn

from conftest import export_randomized_as_peft, tiny_bert
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model, load_adapted_model, predict_adapter_parameters
from tenslora.constructions import get_construction
from tenslora.fused import AdaptedFused
from tenslora.layer import AdaptedLinear
from tenslora.targets import select_targets
from tenslora.tensor.factorized import CP, TensorTrain, Tucker

FACTORIZATIONS = ("tucker", "cp", "tt")
CASES = [(c, f) for c in CONSTRUCTIONS for f in FACTORIZATIONS]
IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 3, 4, 2, 1]])


def llama(head_dim=16, seed=0):
    """4 query heads of ``head_dim`` (query width 64 != model width 32), 2 key/value heads, 2 layers."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=head_dim, intermediate_size=64, vocab_size=101, num_labels=2, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config).eval()


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=32, num_labels=2,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2ForSequenceClassification(config).eval()


MODELS = {"bert": tiny_bert, "llama": llama, "gpt2": gpt2}
O_NAMES = {"bert": "dense", "llama": "o_proj", "gpt2": "c_proj"}


def ranks_for(construction, factorization):
    n = len(CONSTRUCTIONS[construction].mode_names)
    return 3 if factorization == "cp" else tuple([3, 2, 2, 2, 2][:n - (factorization == "tt")])


def randomized(model_name, construction, factorization, seed=0, targets="qkvo"):
    config = TensLoRAConfig(construction, factorization, ranks=ranks_for(construction, factorization), alpha=6.0,
                            targets=targets)
    adapted = get_adapted_model(MODELS[model_name](), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return adapted


def reconstruct(tensor) -> torch.Tensor:
    """The full tensor from its factors/cores by explicit einsum (not the library's ``full()``)."""
    modes = tensor.mode_names
    outs = "ijklmn"[:len(modes)]
    if isinstance(tensor, Tucker):
        core = "abcdef"[:len(modes)]
        spec = core + "," + ",".join(o + c for o, c in zip(outs, core)) + "->" + outs
        return torch.einsum(spec, tensor.core, *[tensor.factors[m] for m in modes])
    if isinstance(tensor, CP):
        return torch.einsum(",".join(o + "r" for o in outs) + "->" + outs, *[tensor.factors[m] for m in modes])
    assert isinstance(tensor, TensorTrain)
    out = tensor.cores[modes[0]]
    for m in modes[1:]:
        out = torch.einsum("...a,abc->...bc", out, tensor.cores[m])
    return out[0, ..., 0]


def expected_update(adapted, t) -> torch.Tensor:
    """``M (module in, module out)`` with ``y = x @ M``: the target's slice of the rebuilt tensor (its batch
    index, heads merged head-major, its own columns: K/V head j at query head j * H / n), transposed for O."""
    c = get_construction(adapted.adapter_config.construction)
    name = (f"{t.stack}__" if t.stack else "") + c.group_key(t.proj, t.layer)
    s = reconstruct(adapted.adapters[name].tensor)
    s = s[(..., *c.batch_index(t.proj_index, t.layer_index))]
    d_in, d_out = t.tensor_widths
    if c.heads:  # (d_in, head_dim, H)
        head_dim, heads = s.shape[1], s.shape[2]
        n = d_out // head_dim
        s = s[:, :, [j * (heads // n) for j in range(n)]].permute(0, 2, 1).reshape(d_in, -1)
    else:
        s = s[:, :d_out]
    return s.T if t.transposed else s


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("construction,factorization", CASES)
def test_every_projection_equals_its_slice_of_the_rebuilt_tensor(model_name, construction, factorization):
    adapted = randomized(model_name, construction, factorization)
    scaling = adapted.adapter_config.scaling
    targets = select_targets(MODELS[model_name](), "qkvo")
    outputs = [t for t in targets if t.transposed]
    assert [t.proj for t in outputs] == [O_NAMES[model_name]] * len(adapted.shape.layers)
    assert len(targets) == 4 * len(adapted.shape.layers)
    g = torch.Generator().manual_seed(3)
    for t in targets:
        module = adapted.base_model.get_submodule(t.name)
        dense = expected_update(adapted, t)
        assert dense.shape == (t.in_features, t.out_features)
        if isinstance(module, AdaptedFused):
            torch.testing.assert_close(module.delta_weight(t.proj_index), scaling * dense.T, atol=1e-5, rtol=1e-5)
            continue
        assert isinstance(module, AdaptedLinear) and module.transposed == t.transposed
        torch.testing.assert_close(module.delta_weight(), scaling * dense.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapted.delta_weight(t.layer, t.proj), scaling * dense.T, atol=1e-5, rtol=1e-5)
        x = torch.randn(2, 3, t.in_features, generator=g)
        expected = module.base_layer(x) + scaling * x @ dense
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
        with adapted.adapter_pass():
            torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    assert predict_adapter_parameters(adapted.adapter_config, adapted.shape) == adapted.adapter_parameters()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("construction,factorization", CASES)
def test_merge_save_load_round_trip(model_name, construction, factorization, tmp_path):
    adapted = randomized(model_name, construction, factorization)
    with torch.no_grad():
        want = adapted(input_ids=IDS).logits
        base = MODELS[model_name]()(input_ids=IDS).logits
        assert not torch.allclose(want, base, atol=1e-4)  # the adapter changes the output
        saved = adapted.save_adapter(tmp_path / "a")
        record = json.loads((saved / "tenslora_config.json").read_text())
        assert record["config"]["targets"] == "qkvo" and len(record["model"]["projections"]) == 4
        adapted.merge()
        torch.testing.assert_close(adapted(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-4)
        adapted.unmerge()
        torch.testing.assert_close(adapted(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-4)
        reloaded = load_adapted_model(MODELS[model_name](), saved)
        assert reloaded.adapter_config.targets == "qkvo"
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, want, atol=0, rtol=0)
        plain = adapted.merge_and_unload()
        assert not any(isinstance(m, (AdaptedLinear, AdaptedFused)) for m in plain.modules())
        torch.testing.assert_close(plain(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-4)


def test_output_projection_gradients_equal_reconstruction():
    """Backward through O's transposed thin path equals backward through the rebuilt dense update."""
    adapted = randomized("llama", "att_qkv_depth", "tucker")
    scaling = adapted.adapter_config.scaling
    params = list(adapted.adapters.parameters())
    g = torch.Generator().manual_seed(1)
    outputs = [t for t in select_targets(llama(), "qkvo") if t.transposed]
    xs = {t.name: torch.randn(4, t.in_features, generator=g) for t in outputs}
    with adapted.adapter_pass():
        fast = sum(adapted.base_model.get_submodule(t.name)(xs[t.name]).pow(2).sum() for t in outputs)
    fast_grads = torch.autograd.grad(fast, params)
    slow = sum((adapted.base_model.get_submodule(t.name).base_layer(xs[t.name])
                + scaling * xs[t.name] @ expected_update(adapted, t)).pow(2).sum() for t in outputs)
    for a, b in zip(fast_grads, torch.autograd.grad(slow, params)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_heads_mode_lines_o_up_with_query_heads():
    """With a heads mode, O's input head h is the tensor's head h, the one Q's output head h is."""
    adapted = randomized("llama", "att_qkv_depth", "cp")
    q = adapted.layer(0, "q_proj")
    o = adapted.layer(0, "o_proj")
    assert o.transposed and not q.transposed
    a, b_q = q.adapter.pair(q.batch_index)
    _, b_o = o.adapter.pair(o.batch_index)
    assert b_q.shape == b_o.shape == (a.shape[1], 64)  # O reads every query column (GQA: the widest)
    full = reconstruct(adapted.adapters["all"].tensor)  # (d_model, head_dim, H, 4, L)
    head_1 = full[:, :, 1, 3, 0]  # O's slice, head 1: (d_model, head_dim)
    torch.testing.assert_close(o.delta_weight()[:, 16:32], adapted.adapter_config.scaling * head_1, atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_peft_export_round_trips(model_name, tmp_path):
    from transformers import AutoModelForSequenceClassification
    base = tmp_path / "base"
    MODELS[model_name]().save_pretrained(base)
    for construction, factorization in [(c, "tucker") for c in CONSTRUCTIONS] + [("att_qkv_depth", "cp"),
                                                                               ("qkv_depth", "tt")]:
        config = TensLoRAConfig(construction, factorization, ranks=2, alpha=4.0, targets="qkvo")
        adapted = get_adapted_model(AutoModelForSequenceClassification.from_pretrained(base).eval(), config)
        name = f"{construction}-{factorization}"
        peft_model, peft_dir = export_randomized_as_peft(adapted, base, tmp_path, name)
        peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
        assert O_NAMES[model_name] in peft_config["target_modules"] or any(
            m.endswith("." + O_NAMES[model_name]) for m in peft_config["target_modules"])
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=IDS).logits, adapted(input_ids=IDS).logits,
                                       rtol=1e-5, atol=1e-5, msg=name)


def _refusal(model, targets="qkvo") -> str:
    with pytest.raises(ValueError) as info:
        get_adapted_model(model, TensLoRAConfig("att_qkv_depth", ranks=2, targets=targets))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_output_projection_that_does_not_fit_is_refused_in_one_line():
    model = llama()
    model.model.layers[1].self_attn.o_proj = nn.Linear(64, 48, bias=False)
    message = _refusal(model)
    assert message == ("targets 'qkvo': output projection 'model.layers.1.self_attn.o_proj' maps 64 -> 48, but joins "
                       "the tensor only if it maps the query width 64 -> the model width 32; use targets 'qkv'")
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())  # the model is left as it was
    bert = tiny_bert()
    bert.bert.encoder.layer[0].attention.output.dense = nn.Linear(32, 16)
    assert "'bert.encoder.layer.0.attention.output.dense' maps 32 -> 16" in _refusal(bert)


def test_missing_output_projection_is_refused():
    model = llama()
    del model.model.layers[0].self_attn.o_proj
    assert _refusal(model).startswith("targets 'qkvo': no output projection found for the attention module "
                                      "'model.layers.0.self_attn' (names tried: o_proj, out_proj, c_proj")
    no_o = llama()
    del no_o.model.layers[0].self_attn.o_proj
    assert _refusal(no_o, "all-linear").startswith("targets 'all-linear': no output projection found")


def test_target_modules_may_name_the_output_projection():
    adapted = get_adapted_model(llama(), TensLoRAConfig("att", ranks=2, targets="qkvo",
                                                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    assert adapted.shape.projections == ("q_proj", "k_proj", "v_proj", "o_proj")
    message = _refusal_with(dict(targets="qkvo", target_modules=("q_proj", "k_proj", "v_proj", "gate_proj")))
    assert "'model.layers.0.mlp.gate_proj'" not in message and "names tried: gate_proj" in message


def _refusal_with(kwargs) -> str:
    with pytest.raises(ValueError) as info:
        get_adapted_model(llama(), TensLoRAConfig("att", ranks=2, **kwargs))
    return str(info.value)


def test_adapter_saved_without_targets_loads_as_qkv(tmp_path):
    adapted = randomized("bert", "qkv_depth", "tucker", targets="qkv")
    saved = adapted.save_adapter(tmp_path / "old")
    path = saved / "tenslora_config.json"
    record = json.loads(path.read_text())
    del record["config"]["targets"]  # an adapter written before the option existed
    path.write_text(json.dumps(record))
    reloaded = load_adapted_model(tiny_bert(), saved)
    assert reloaded.adapter_config.targets == "qkv" and len(reloaded.layers) == 9
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, adapted(input_ids=IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("model_name", ["bert", "llama", "gpt2"])
def test_lora_qkvo_adapts_q_k_v_and_o(model_name, tmp_path):
    from peft.tuners.lora import LoraLayer
    adapted = get_adapted_model(MODELS[model_name](), TensLoRAConfig("lora", ranks=2, targets="qkvo"))
    layers = len(adapted.shape.layers)
    per_layer = 2 if model_name == "gpt2" else 4  # GPT-2: the fused c_attn (whole) and c_proj
    lora_modules = [n for n, m in adapted.base_model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_modules) == per_layer * layers
    assert sum(n.endswith("." + O_NAMES[model_name]) for n in lora_modules) == layers
    # a fused c_attn is one LoRA of rank r, not three (the shape records which projections share a module)
    assert adapted.adapter_parameters() == predict_adapter_parameters(adapted.adapter_config, adapted.shape)
    with torch.no_grad():
        for n, p in adapted.peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
        want = adapted(input_ids=IDS).logits
        saved = adapted.save_adapter(tmp_path / "lora")
        reloaded = load_adapted_model(MODELS[model_name](), saved)
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, want, atol=1e-6, rtol=1e-5)


def test_lora_spectra_see_o_in_the_tensor_orientation():
    """LoRA on BERT (query width == model width, so a wrong orientation would go unnoticed by shapes): the
    ``qkv`` mode spectrum equals the SVD of the mode unfolding of the stacked updates, O's transposed."""
    from tenslora.plus.metrics import mode_spectra
    adapted = get_adapted_model(tiny_bert(), TensLoRAConfig("lora", ranks=2, targets="qkvo"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in adapted.peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    targets = select_targets(tiny_bert(), "qkvo")
    updates = {}
    for t in targets:
        module = adapted.base_model.get_submodule(t.name)
        dw = module.lora_B["default"].weight @ module.lora_A["default"].weight  # nn.Linear layout (out, in)
        updates[(t.layer, t.proj_index)] = dw if t.transposed else dw.T  # (d_model, d_q): the tensor's slice
    stacked = torch.stack([torch.stack([updates[(l, p)] for l in range(3)], -1) for p in range(4)], -2)
    unfolding = stacked.permute(2, 0, 1, 3).reshape(4, -1).double()
    spectra = mode_spectra(adapted)["adapter"]
    torch.testing.assert_close(spectra["qkv"], torch.linalg.svdvals(unfolding), rtol=1e-6, atol=1e-6)


def test_tensloraplus_groups_spectra_and_allocation_on_qkvo():
    from tenslora.plus.allocate import allocate_from_metrics
    from tenslora.plus.metrics import adapter_metrics, mode_spectra
    from tenslora.plus.optim import build_param_groups
    adapted = randomized("llama", "qkv_depth", "tucker")
    tensor = adapted.adapters["all"].tensor
    assert dict(zip(tensor.mode_names, tensor.shape))["qkv"] == 4
    groups = build_param_groups(adapted, lr=1e-3)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in adapted.parameters() if p.requires_grad)
    full = reconstruct(tensor).detach().double()
    spectrum = mode_spectra(adapted)["adapter"]["qkv"]  # as many values as the mode's rank (2 of 4)
    exact = torch.linalg.svdvals(full.movedim(2, 0).reshape(4, -1))
    torch.testing.assert_close(spectrum, exact[:len(spectrum)], rtol=1e-5, atol=1e-6)
    assert len(spectrum) == 2 and float(exact[2:].abs().max()) < 1e-6 * float(exact[0])
    metrics = adapter_metrics(adapted, grads=False)["adapter"]
    record = allocate_from_metrics(metrics, "qkv_depth", adapted.shape, "lora:1")
    assert record["mode_sizes"]["qkv"] == 4
    config = TensLoRAConfig("qkv_depth", ranks=record["ranks_string"], targets="qkvo")
    built = get_adapted_model(llama(), config)
    assert built.adapter_parameters() == record["predicted_parameters"] <= record["budget"]


def test_step_bench_targets_qkvo_builds_o_for_every_method():
    """``tenslora bench step-time --targets qkvo``: the bench's shape is the model's, LoRA adapts O too."""
    from tenslora.bench import StepBench, _batch, _build, _Trainee, typical_ranks
    bench = StepBench(layers=2, hidden=32, heads=4, kv_heads=2, batch=2, seq=4, rank=4, targets="qkvo")
    model, count = _build("att_qkv_depth:tucker", bench)
    assert (model.shape.d_in, model.shape.d_out) == (bench.shape().d_in, bench.shape().d_out) == (32, (32, 16, 16, 32))
    config = TensLoRAConfig("att_qkv_depth", ranks=typical_ranks("att_qkv_depth", "tucker", bench), targets="qkvo")
    assert count == predict_adapter_parameters(config, model.shape) > 0
    assert _Trainee("lora", StepBench(**{**bench.__dict__, "clock": "process"})).step(*_batch(bench)) > 0
    lora, lora_count = _build("lora", bench)
    assert any(n.endswith("o_proj") for n in lora.adapted_modules)
    assert lora_count == predict_adapter_parameters(TensLoRAConfig("lora", ranks=4), bench.shape())


def _tiny(kind):
    import transformers as tf
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101)
    return {
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                                                 num_layers=2, vocab_size=101)),
        "bart": lambda: tf.BartModel(tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=101)),
        "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                     vocab_size=101)),
        "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**small)),
        "deberta": lambda: tf.DebertaV2Model(tf.DebertaV2Config(**small)),
        "albert": lambda: tf.AlbertModel(tf.AlbertConfig(embedding_size=16, **small)),
        "gpt_neox": lambda: tf.GPTNeoXModel(tf.GPTNeoXConfig(**small)),
        "falcon": lambda: tf.FalconModel(tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         vocab_size=101)),
        "modernbert": lambda: tf.ModernBertModel(tf.ModernBertConfig(pad_token_id=0, **small)),
        "clip": lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**small)),
    }[kind]()


@pytest.mark.parametrize("kind,leaf,sites", [
    ("t5", "o", 6), ("bart", "out_proj", 6), ("distilbert", "out_lin", 2), ("roberta", "attention.output.dense", 2),
    ("deberta", "attention.output.dense", 2), ("albert", "attention.dense", 1), ("gpt_neox", "attention.dense", 2),
    ("falcon", "self_attention.dense", 2), ("modernbert", "Wo", 2), ("clip", "out_proj", 2)])
def test_output_projection_is_found_across_architectures(kind, leaf, sites):
    """One O per attention site (self-, cross-attention, a shared ALBERT layer, fused Q/K/V), after its Q/K/V."""
    targets = select_targets(_tiny(kind), "qkvo")
    outputs = [t for t in targets if t.transposed]
    assert len(outputs) == sites and len(targets) == 4 * sites
    assert all(t.name.endswith("." + leaf) and t.proj_index == 3 for t in outputs)
    assert [t.transposed for t in targets] == [False, False, False, True] * sites
    assert len({t.site for t in outputs}) == sites


def test_bench_refuses_unknown_targets_in_one_line():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "tenslora", "bench", "step-time", "--targets", "qkvx"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown --targets 'qkvx'; allowed: qkv, qkvo, all-linear"
    done = subprocess.run([sys.executable, "-m", "tenslora", "bench", "step-time", "--clock", "process",
                           "--device", "cuda"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --clock 'process' on cuda; allowed: wall, or process on cpu"
