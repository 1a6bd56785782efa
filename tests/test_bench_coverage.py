"""``tenslora bench coverage``: the architecture-coverage benchmark on chosen types; bad input: one line, exit 2."""
import json
import subprocess
import sys


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tenslora", *args], capture_output=True, text=True, cwd=cwd)


def test_coverage_on_three_types(tmp_path):
    """bert (separate Q/K/V), gpt2 (fused Conv1D) and resnet (no attention): counts, statuses and files."""
    out = tmp_path / "res" / "cov"
    done = run_cli("bench", "coverage", "--types", "bert,gpt2,resnet", "--methods", "att,lora", "--out", str(out),
                   "--label", "t", "--timeout", "120")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "res" / "cov-t.json").read_text())
    results = data["results"]
    assert set(results) == {"bert", "gpt2", "resnet"}
    statuses = {t: results[t]["methods"]["att"]["status"] for t in results}
    assert statuses == {"bert": "ok", "gpt2": "ok", "resnet": "error"}
    assert results["resnet"]["attention"] is False
    counts = data["summary"]["counts"]["all"]
    assert counts["types"] == {"n": 3, "built": 3, "attention": 2}
    assert counts["att"]["ok"] == 2 and counts["lora"]["ok"] == 2
    md = (tmp_path / "res" / "cov-t.md").read_text()
    assert "| all | 3 | 3 | 0 | 2 | 2 (2) | 2 (2) |" in md
    assert md in done.stdout


def test_bad_inputs_are_one_line_errors(tmp_path):
    for args, expected in (
        (("--methods", "att,ring"), "methods 'att,ring': unknown ['ring']; allowed: all or"),
        (("--types", "bert,no_such_type"), "unknown model types ['no_such_type']"),
        (("--types", "bert", "--timeout", "0"), "timeout 0: must be a positive number"),
    ):
        done = run_cli("bench", "coverage", "--out", str(tmp_path / "x"), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written
