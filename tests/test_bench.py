import json
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tenslora", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_step_time_bench_reports_ratios_to_lora():
    done = run_cli("bench", "step-time", "--layers", "2", "--hidden", "32", "--heads", "4", "--batch", "2",
                   "--seq", "8", "--steps", "2", "--methods", "base,qkv_depth:tucker,att:cp", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["method"]: r for r in json.loads(done.stdout)["rows"]}
    assert set(rows) == {"lora", "base", "qkv_depth:tucker", "att:cp"}
    assert rows["lora"]["time_ratio"] == 1.0 and rows["lora"]["memory_ratio"] == 1.0
    assert rows["base"]["adapter_parameters"] == 0
    assert rows["qkv_depth:tucker"]["adapter_parameters"] > 0
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())


def test_unknown_bench_method_is_a_usage_error():
    done = run_cli("bench", "step-time", "--methods", "qkv_depth:ring")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: unknown benchmark method 'qkv_depth:ring'; allowed: base, lora, "
                                   "CONSTRUCTION:tucker, CONSTRUCTION:cp or CONSTRUCTION:tt")


def test_gqa_shape_builds_a_llama_with_exact_counts():
    """``kv_heads``: a LLaMA with grouped-query attention; stacked constructions work on it."""
    import torch

    from tenslora import TensLoRAConfig, predict_adapter_parameters
    from tenslora.bench import StepBench, _batch, _build, typical_ranks
    bench = StepBench(layers=2, hidden=32, heads=4, kv_heads=2, batch=2, seq=4, rank=8)
    assert bench.shape().d_out == (32, 16, 16)
    assert typical_ranks("att_qkv_depth", "tucker", bench) == (8, 8, 4, 3, 2)
    model, count = _build("att_qkv_depth:tucker", bench)
    assert type(model.base_model).__name__ == "LlamaForSequenceClassification"
    config = TensLoRAConfig("att_qkv_depth", ranks=typical_ranks("att_qkv_depth", "tucker", bench))
    assert count == predict_adapter_parameters(config, model.shape) > 0
    ids, labels = _batch(bench)
    model(input_ids=ids, labels=labels).loss.backward()
    base, _ = _build("base", bench)
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {"score.weight"}
    assert torch.isfinite(base(input_ids=ids, labels=labels).loss)
