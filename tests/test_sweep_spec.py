"""Sweep files: validation, expansion, stable names, the job command line, CLI errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tenslora.sweep.spec import expand, job_argv, load_sweep, option_args, parse_sweep, run_name


def test_names_are_stable_readable_and_order_independent():
    a = run_name({"construction": "qkv_depth", "ranks": [8, 8, 4], "seed": 0})
    b = run_name({"seed": 0, "ranks": [8, 8, 4], "construction": "qkv_depth"})
    assert a == b == "construction=qkv_depth,ranks=8_8_4,seed=0"
    assert run_name({"lr": 0.001, "flag": True}) == "flag=true,lr=0.001"


def test_long_or_unsafe_names_get_a_hash():
    long = run_name({"model": "x" * 200, "seed": 1})
    assert len(long) <= 80 and long.startswith("model=xxx")
    assert long == run_name({"seed": 1, "model": "x" * 200})
    assert long != run_name({"model": "x" * 200, "seed": 2})
    slash, dash = run_name({"model": "org/name"}), run_name({"model": "org-name"})
    assert "/" not in slash and slash != dash and slash.startswith("model=org-name-")


def test_grid_runs_and_seeds_expand():
    spec = parse_sweep({"base": {"epochs": 1, "construction": "att"},
                        "grid": {"construction": ["qkv", "qkv_depth"], "ranks": [[8, 8, 4], [4, 4, 2]]},
                        "runs": [{"construction": "lora", "rank": 8}], "seeds": [0, 1, 2]})
    jobs = expand(spec)
    assert len(jobs) == (2 * 2 + 1) * 3
    assert len({j.name for j in jobs}) == len(jobs)
    first = jobs[0]
    assert first.options == {"epochs": 1, "construction": "qkv", "ranks": [8, 8, 4], "seed": 0}
    assert first.name == "construction=qkv,ranks=8_8_4,seed=0"
    assert jobs[-1].options == {"epochs": 1, "construction": "lora", "rank": 8, "seed": 2}
    # same values written in another order -> same names
    spec2 = parse_sweep({"seeds": [0, 1, 2], "runs": [{"rank": 8, "construction": "lora"}],
                         "grid": {"ranks": [[8, 8, 4], [4, 4, 2]], "construction": ["qkv", "qkv_depth"]},
                         "base": {"construction": "att", "epochs": 1}})
    assert {j.name for j in expand(spec2)} == {j.name for j in jobs}


def test_seed_in_grid_and_duplicates_removed():
    spec = parse_sweep({"grid": {"seed": [0, 1], "lr": [0.1]}, "runs": [{"lr": 0.1, "seed": 0}]})
    assert [j.name for j in expand(spec)] == ["lr=0.1,seed=0", "lr=0.1,seed=1"]


def test_option_args_follow_the_cli_contract(tmp_path):
    assert option_args({"core_lambda": 0.5, "ranks": [8, 8, 4], "plus": True, "bias": False, "x": None}) == [
        "--core-lambda", "0.5", "--ranks", "8_8_4", "--plus", "--no-bias"]
    argv = job_argv(["tenslora", "train"], {"seed": 1}, tmp_path / "r")
    assert argv[argv.index("--output-dir") + 1] == str(tmp_path / "r")
    assert "--resume" in argv and argv[-2:] == ["--seed", "1"]
    assert job_argv(["python", "t.py"], {}, "d") == ["python", "t.py", "--output-dir", "d", "--resume"]


@pytest.mark.parametrize("doc, message", [
    ({"grid": {"lr": [0.1]}, "bogus": 1}, "unknown key 'bogus'"),
    ({"grid": {}}, "grid"),
    ({"grid": {"lr": []}}, "grid.lr is an empty list"),
    ({"grid": {"lr": 0.1}}, "grid.lr must be a list"),
    ({"base": {"lr": 0.1}}, "nothing to run"),
    ({"grid": {"lr": [0.1]}, "seeds": "0"}, "seeds"),
    ({"grid": {"lr": [0.1], "seed": [0]}, "seeds": [1]}, "not both"),
    ({"grid": {"lr": [{"a": 1}]}}, "is not allowed"),
    ({"grid": {"lr": [0.1]}, "retries": -1}, "retries must be an integer >= 0"),
    ({"grid": {"lr": [0.1]}, "timeout_s": "soon"}, "timeout_s must be a number"),
    ({"grid": {"lr": [0.1]}, "command": []}, "command must be a non-empty list"),
    ({"grid": {"output_dir": ["x"]}}, "set by the sweep itself"),
    ({"runs": [{"lr": 0.1}, "oops"]}, "runs[1] must be a mapping"),
    ([1, 2], "must be a YAML mapping"),
])
def test_bad_sweep_files_raise_value_error(doc, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        parse_sweep(doc)


def test_load_sweep_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_sweep(bad)
    good = tmp_path / "good.yaml"
    good.write_text("grid:\n  lr: [0.1, 0.2]\nseeds: [0]\n")
    spec = load_sweep(good)
    assert spec.name == "good" and len(expand(spec)) == 2


def test_cli_reports_bad_sweep_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  lr: [0.1]\ntypo_key: 3\n")
    proc = subprocess.run([sys.executable, "-m", "tenslora", "sweep", "run", str(bad), "--dir",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error:") and "typo_key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_example_sweep_file_is_valid():
    from pathlib import Path

    spec = load_sweep(Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps" / "example.yaml")
    jobs = expand(spec)
    assert len(jobs) >= 4 and all("seed" in j.options for j in jobs)
