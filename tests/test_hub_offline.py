"""An uncached hub id with the hub unreachable fails at once in one line (no ~30 s of retries).

The hub is "unreachable" through a local port that is bound but not listening (connection refused at
once): no real network is involved.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tenslora.hub import registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def closed_port():
    """A port nobody listens on (held bound for the test, so nobody can start listening on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def offline_hub(monkeypatch, tmp_path, closed_port):
    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    real = socket.create_connection
    monkeypatch.setattr(registry.socket, "create_connection", lambda *a, **k: calls.append(a) or real(*a, **k))
    return constants, calls


def test_uncached_hub_id_fails_fast_in_one_line(offline_hub):
    _, calls = offline_hub
    with pytest.raises(FileNotFoundError) as info:
        registry.resolve_model_name("someorg/some-model")
    text = str(info.value)
    assert "cannot load model 'someorg/some-model': the Hugging Face hub (http://127.0.0.1:" in text
    assert "is unreachable" in text and "not in the local cache" in text and "minilm" in text
    assert "\n" not in text and len(calls) == 1  # one probe, no retries


def test_offline_mode_without_cache_names_hf_hub_offline(offline_hub):
    constants, calls = offline_hub
    constants.HF_HUB_OFFLINE = True
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        registry.resolve_model_name("bert-base-uncased")
    assert calls == []  # offline: no probe at all


def test_cached_model_loads_offline_when_the_hub_is_unreachable(offline_hub, tmp_path):
    constants, _ = offline_hub
    snap = tmp_path / "hub" / "models--someorg--cached" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someorg--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--cached" / "refs" / "main").write_text("abc123")
    assert registry.resolve_model_name("someorg/cached") == "someorg/cached"
    assert constants.HF_HUB_OFFLINE is True  # transformers then reads the cache without retrying


def test_local_paths_and_short_names_are_not_probed(offline_hub, tmp_path):
    _, calls = offline_hub
    assert registry.resolve_model_name(str(tmp_path)) == str(tmp_path)
    registry.check_hub_reachable("./not/a/hub/id")
    assert calls == []


def test_cli_train_with_an_unreachable_hub_prints_one_line(tmp_path, closed_port):
    """Before: 12 lines of 'Retrying in Ns' over ~30 s, then the error."""
    data = tmp_path / "tiny.csv"
    data.write_text("text,label\n" + "".join(f"example {i},{i % 2}\n" for i in range(12)))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}", "HF_HUB_CACHE": str(tmp_path / "hub"),
                "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    proc = subprocess.run([sys.executable, "-m", "tenslora", "train", "--model", "someorg/some-model", "--task",
                           str(data), "--max-steps", "1", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot load model 'someorg/some-model': the Hugging Face hub")
    assert proc.stderr.count("\n") == 1 and "Retrying" not in proc.stderr + proc.stdout
