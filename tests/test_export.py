"""``tenslora export``: exact PEFT LoRA and merged-model exports, loaded where tenslora cannot be imported."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import export_randomized_as_peft, tiny_bert
from tenslora import CONSTRUCTIONS, TensLoRAConfig, get_adapted_model, load_adapted_model
from tenslora.export import export_adapter
from test_train_utils import run_cli

PAIRS = [(c, f) for c in CONSTRUCTIONS for f in ("tucker", "cp", "tt")]
INPUT_IDS = torch.tensor([[2, 17, 33, 5, 48, 3, 0, 0], [2, 91, 7, 64, 12, 60, 22, 3]])
MASK = (INPUT_IDS != 0).long()

# Runs with tenslora unimportable: a meta-path finder refuses it (the venv has it installed editable).
LOADER = textwrap.dedent("""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tenslora" or name.startswith("tenslora."):
                raise ImportError("tenslora is blocked in this process")
    sys.meta_path.insert(0, Block())
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    jobs, ids, mask = json.loads(sys.argv[1]), torch.load(sys.argv[2]), torch.load(sys.argv[3])
    out = {}
    for name, kind, path, base in jobs:
        if kind == "peft":
            model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), path)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path)
            out[name + "/tokenizer"] = torch.tensor(AutoTokenizer.from_pretrained(path)("a b w3 zzz").input_ids)
        with torch.no_grad():
            out[name] = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert not any(m == "tenslora" or m.startswith("tenslora.") for m in sys.modules)
    torch.save(out, sys.argv[4])
""")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """tiny_bert (3 layers, 4 heads, 3 labels) and a WordPiece tokenizer, saved as a model directory."""
    from transformers import BertTokenizerFast
    path = tmp_path_factory.mktemp("base") / "tiny-bert"
    tiny_bert().save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", *[f"w{i}" for i in range(94)]]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return path


def base_model(base_dir):
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(base_dir).eval()


def ranks_for(construction, factorization):
    n_modes = len(CONSTRUCTIONS[construction].mode_names)
    if factorization == "tt":  # one rank per bond between consecutive modes
        return tuple([3, 2, 2, 2][:n_modes - 1])
    return 3 if factorization == "cp" else tuple([3, 2, 2, 2, 3][:n_modes])


def random_adapter(base_dir, construction, factorization, seed=0, dropout=0.1):
    """A tenslora (or PEFT LoRA) adapter with every weight random (a zero update would test nothing)."""
    ranks = 4 if construction == "lora" else ranks_for(construction, factorization)
    config = TensLoRAConfig(construction, factorization, ranks=ranks, alpha=6.0, dropout=dropout)
    adapted = get_adapted_model(base_model(base_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapted.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=MASK).logits


def run_blocked(tmp_path, jobs):
    torch.save(INPUT_IDS, tmp_path / "ids.pt")
    torch.save(MASK, tmp_path / "mask.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(tmp_path / "ids.pt"),
                           str(tmp_path / "mask.pt"), str(tmp_path / "out.pt")],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_every_construction_exports_exactly_to_peft_and_merged(tmp_path, base_dir):
    jobs, expected, counts = [], {}, {}
    for construction, factorization in [*PAIRS, ("lora", "tucker")]:
        name = f"{construction}-{factorization}"
        adapted = random_adapter(base_dir, construction, factorization)
        expected[name] = logits(adapted)
        assert expected[name].abs().max() > 0.1
        saved = adapted.save_adapter(tmp_path / "adapters" / name)
        report = export_adapter(saved, "peft", tmp_path / "peft" / name, model=str(base_dir))
        counts[name] = report
        jobs.append([name, "peft", str(tmp_path / "peft" / name), str(base_dir)])
        export_adapter(saved, "merged", tmp_path / "merged" / name, model=str(base_dir))
        jobs.append([f"{name}/merged", "merged", str(tmp_path / "merged" / name), str(base_dir)])
    got = run_blocked(tmp_path, jobs)
    from transformers import AutoTokenizer
    tokens = AutoTokenizer.from_pretrained(base_dir)("a b w3 zzz").input_ids
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5, msg=f"peft export of {name}")
        torch.testing.assert_close(got[f"{name}/merged"], want, rtol=1e-5, atol=1e-5, msg=f"merged {name}")
        assert got[f"{name}/merged/tokenizer"].tolist() == tokens
        assert counts[name]["lora_parameters"] >= 1
    # exported LoRA: rank r on each of 9 projections (3 layers x q/k/v, 32 -> 32): 9 * r * 64 parameters
    assert counts["att_qkv_depth-tucker"]["lora_parameters"] == 9 * 3 * 64
    assert counts["qkv-cp"]["lora_parameters"] == 9 * 3 * 64
    assert counts["lora-tucker"]["lora_parameters"] == counts["lora-tucker"]["adapter_parameters"] == 9 * 4 * 64


def test_peft_config_and_file_follow_peft(tmp_path, base_dir):
    """Keys and config as PEFT itself writes them: lora_alpha = r (scaling 1), dropout copied, head saved."""
    from safetensors.torch import load_file
    adapted = random_adapter(base_dir, "att_qkv_depth", "tucker")
    saved = adapted.save_adapter(tmp_path / "a")
    export_adapter(saved, "peft", tmp_path / "p", model=str(base_dir))
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 3, 3, 0.1)
    assert config["modules_to_save"] == ["classifier"] and sorted(config["target_modules"]) == ["key", "query", "value"]
    tensors = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    prefix = "base_model.model.bert.encoder.layer.1.attention.self.key"
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    assert a.shape == (3, 32) and b.shape == (32, 3)
    torch.testing.assert_close(b @ a, adapted.delta_weight(1, "key"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tensors["base_model.model.classifier.weight"], adapted.base_model.classifier.weight)
    export_adapter(saved, "peft", tmp_path / "nohead", model=str(base_dir), head=False)
    tensors = load_file(str(tmp_path / "nohead" / "adapter_model.safetensors"))
    assert all("lora_" in k for k in tensors)


def test_run_directory_source_takes_best_adapter_and_model(tmp_path, base_dir, capsys):
    run = tmp_path / "run"
    random_adapter(base_dir, "qkv_depth", "cp").save_adapter(run / "best_adapter")
    (run / "config.json").write_text(json.dumps({"train": {}, "resolved": {
        "model_path": str(base_dir), "kind": "text", "num_labels": 3, "label_names": ["n", "o", "p"],
        "problem_type": "classification"}}))
    code, out, err = run_cli(["export", run, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "parameters: LoRA 1,728 (exported) vs adapter" in out
    reloaded = load_adapted_model(base_model(base_dir), run / "best_adapter").eval()  # dropout 0.1
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(base_model(base_dir), tmp_path / "out")
    torch.testing.assert_close(logits(peft_model), logits(reloaded), rtol=1e-5, atol=1e-5)
    code, out, err = run_cli(["export", run, "--format", "merged", "--output", tmp_path / "merged"], capsys)
    assert code == 0, err
    from transformers import AutoModelForSequenceClassification
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "n", 1: "o", 2: "p"}
    torch.testing.assert_close(logits(merged), logits(reloaded), rtol=1e-5, atol=1e-5)


def _fails(capsys, args, match):
    capsys.readouterr()  # drop what earlier model loads printed
    code, out, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    return lines[0]


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, base_dir, capsys):
    saved = random_adapter(base_dir, "att", "tucker").save_adapter(tmp_path / "a")
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["export", tmp_path / "empty", "-o", out, "--model", base_dir], "is not a saved adapter")
    _fails(capsys, ["export", tmp_path / "nothing", "-o", out, "--model", base_dir], "is not a directory")
    _fails(capsys, ["export", saved, "-o", out], "pass --model")
    _fails(capsys, ["export", saved, "-o", out, "--model", base_dir, "--format", "gguf"],
           "unknown export format 'gguf'; allowed: peft, merged")
    other = tmp_path / "other-base"
    tiny_bert(layers=2).save_pretrained(other)
    _fails(capsys, ["export", saved, "-o", out, "--model", other], "adapter does not fit this model")
    _fails(capsys, ["export", saved, "-o", saved / "inside", "--model", base_dir], "overlaps the source")
    assert not out.exists() and not (saved / "inside").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "other-base"]  # no temp dirs left
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["export", saved, "-o", out, "--model", base_dir], "already exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(["export", saved, "-o", out, "--model", base_dir, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "adapter_config.json").is_file() and not (out / "keep.txt").exists()
    probe = get_adapted_model(base_model(base_dir), TensLoRAConfig("none")).save_adapter(tmp_path / "probe")
    _fails(capsys, ["export", probe, "-o", tmp_path / "p", "--model", base_dir], "has no adapter to export")


def test_gqa_export_is_exact(tmp_path):
    """Grouped-query attention (K/V narrower than Q): every construction that supports it exports exactly."""
    from conftest import tiny_llama_gqa
    from transformers import AutoModelForSequenceClassification
    base = tmp_path / "llama"
    tiny_llama_gqa().save_pretrained(base)
    ids = torch.tensor([[5, 6, 7, 8]])
    exported = 0
    for construction, factorization in PAIRS:
        config = TensLoRAConfig(construction, factorization, ranks=2, alpha=4.0)
        try:
            adapted = get_adapted_model(AutoModelForSequenceClassification.from_pretrained(base).eval(), config)
        except ValueError as exc:
            assert "grouped-query" in str(exc)  # the construction refuses GQA (older core)
            continue
        name = f"{construction}-{factorization}"
        peft_model, _ = export_randomized_as_peft(adapted, base, tmp_path, name)
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5, msg=name)
        exported += 1
    assert exported >= 4  # att, att_depth, depth (per-projection tensors) work today


def test_fused_qkv_exports_merged_and_refuses_peft_in_one_line(tmp_path, capsys):
    """GPT-2's fused ``c_attn`` (a Conv1D): ``--format merged`` is exact; ``--format peft`` says it cannot yet."""
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification
    base = tmp_path / "gpt2"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=32,
                                                 num_labels=2, pad_token_id=0)).save_pretrained(base)
    adapted = get_adapted_model(AutoModelForSequenceClassification.from_pretrained(base).eval(),
                                TensLoRAConfig("qkv_depth", ranks=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    saved = adapted.save_adapter(tmp_path / "a")
    _fails(capsys, ["export", saved, "-o", tmp_path / "p", "--model", base], "fused Q/K/V module")
    assert not (tmp_path / "p").exists()
    code, _, err = run_cli(["export", saved, "-o", tmp_path / "m", "--model", base, "--format", "merged"], capsys)
    assert code == 0, err
    ids = torch.tensor([[5, 6, 7, 8]])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
