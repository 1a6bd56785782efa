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
    done = run_cli("bench", "step-time", "--methods", "qkv_depth:tt")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: unknown benchmark method 'qkv_depth:tt'; allowed: base, lora, "
                                   "CONSTRUCTION:tucker or CONSTRUCTION:cp")
