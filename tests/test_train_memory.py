"""Peak memory of a training run: freed training buffers go back to the OS (glibc: a buffer pattern that
glibc's default keeps resident is returned once ``release_freed_memory`` has run), and the metrics do not
import scikit-learn. Each process-level case runs in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from test_train_utils import sentences, text_model, write_csv  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

PATTERN = textwrap.dedent('''
    import ctypes, sys
    from tenslora.train.memory import release_freed_memory
    if sys.argv[1] == "fixed":
        assert release_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    def touched(n):
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        return p
    libc.free(touched(8 << 20))  # a freed 8 MiB mmap block: glibc's threshold rises above 5 MiB
    before = rss_mb()
    blocks, keep = [], []
    for _ in range(40):  # 200 MiB of 5 MiB "activations", each followed by a small live object
        blocks.append(touched(5 << 20))
        keep.append(touched(1024))
    for p in blocks:
        libc.free(p)
    print(round(rss_mb() - before))
''')


def retained_mb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/statm"),
                    reason="glibc malloc on Linux")
def test_freed_buffers_are_returned_to_the_os():
    assert retained_mb("default") > 150  # glibc's default keeps the freed 200 MiB resident
    assert retained_mb("fixed") < 20  # with the fixed threshold they are unmapped at once


def test_user_setting_wins(monkeypatch):
    from tenslora.train.memory import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_freed_memory() is False


def test_classification_metrics_equal_sklearn_exactly():
    """The numpy metrics give sklearn's floats bit for bit: random cases, missing and extra classes, one class."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from tenslora.train.metrics import classification_metrics
    rng = np.random.default_rng(0)
    cases = [([0, 0, 0], [0, 0, 0]), ([1, 1], [0, 0]), ([0, 1, 1, 0], [2, 2, 2, 2]), ([5, 3, 3], [3, 5, 7])]
    for _ in range(500):
        n, k_true, k_pred = rng.integers(1, 60), rng.integers(1, 5), rng.integers(1, 6)
        cases.append((rng.integers(0, k_true, n), rng.integers(0, k_pred, n)))
    for labels, preds in cases:
        labels, preds = np.asarray(labels), np.asarray(preds)
        binary = set(np.concatenate([labels, preds]).tolist()) <= {0, 1}
        m = classification_metrics(preds, labels, 2 if binary else 3)
        assert m["accuracy"] == accuracy_score(labels, preds)
        assert m["macro_f1"] == f1_score(labels, preds, average="macro", zero_division=0)
        assert m["mcc"] == matthews_corrcoef(labels, preds)
        if binary:
            assert m["f1"] == f1_score(labels, preds, pos_label=1, average="binary", zero_division=0)


TRAIN_AND_LIST_MODULES = textwrap.dedent('''
    import sys
    from tenslora.train.config import TrainConfig
    from tenslora.train.loop import train
    summary = train(TrainConfig(task=sys.argv[1], model=sys.argv[2], output_dir=sys.argv[3], max_steps=2,
                                batch_size=8, eval_batch_size=16, eval_every=1, progress=False, threads=1))
    assert summary["status"] == "done" and "test_macro_f1" in summary["best"], summary
    print(" ".join(sorted(m for m in ("sklearn",) if m in sys.modules)) or "none")
''')


@pytest.mark.slow
def test_a_classification_run_never_imports_sklearn(tmp_path, text_model):  # noqa: F811
    """Training, validation, test evaluation and the majority baseline use the numpy metrics: importing
    scikit-learn alone adds ~100 MB to the peak RSS of every run."""
    data = write_csv(tmp_path / "d.csv", sentences(60))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", TRAIN_AND_LIST_MODULES, str(data), str(text_model),
                          str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "none", out.stdout


# -- tcmalloc (opt-in): a model command relaunches itself with the library preloaded (the decision is a pure
# function; the library lookup is the faked edge, the real one runs where the library is installed) --------
ON = {"TENSLORA_ALLOCATOR": "tcmalloc"}

def test_a_model_command_relaunches_on_tcmalloc_and_only_once():
    from tenslora.train.memory import tcmalloc_relaunch

    found = lambda: "libtcmalloc_minimal.so.4"  # noqa: E731
    argv, env = tcmalloc_relaunch(["tenslora", "train", "--max-steps", "3"], {**ON, "PATH": "/bin"}, find=found)
    assert argv == [sys.executable, "-m", "tenslora", "train", "--max-steps", "3"]
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no line per large allocation
    script = REPO / "tenslora" / "__main__.py"  # python -m tenslora: the module again; a console script: itself
    assert tcmalloc_relaunch([str(script), "train"], ON, find=found)[0] == [sys.executable, "-m", "tenslora", "train"]
    console = Path(sys.executable).with_name("tenslora")
    if console.is_file():
        assert tcmalloc_relaunch([str(console), "train"], ON, find=found)[0] == [sys.executable, str(console), "train"]
    # the user's own preload is kept (after ours); the relaunched process does not relaunch again
    _, env2 = tcmalloc_relaunch(["tenslora", "predict"], {**ON, "LD_PRELOAD": "libfoo.so"}, find=found)
    assert env2["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so"
    assert tcmalloc_relaunch(["tenslora", "train"], env, find=found) is None
    assert tcmalloc_relaunch(["tenslora", "train"], {**ON, "LD_PRELOAD": "/x/libjemalloc.so.2"}, find=found) is None


def test_relaunch_is_skipped_or_refused_as_documented():
    from tenslora.train.memory import tcmalloc_relaunch

    found, missing = (lambda: "libtcmalloc.so.4"), (lambda: None)
    assert tcmalloc_relaunch(["tenslora", "train"], {}, find=found) is None  # the default: the C library's malloc
    assert tcmalloc_relaunch(["tenslora", "train"], {"TENSLORA_ALLOCATOR": "system"}, find=found) is None
    assert tcmalloc_relaunch(["tenslora", "sweep", "run", "s.yaml"], ON, find=found) is None  # not a model command
    assert tcmalloc_relaunch(["tenslora", "--help"], ON, find=found) is None
    with pytest.raises(ValueError, match="no tcmalloc library is installed"):
        tcmalloc_relaunch(["tenslora", "train"], ON, find=missing)
    with pytest.raises(ValueError, match="TENSLORA_ALLOCATOR='jemalloc' is not one of system, tcmalloc"):
        tcmalloc_relaunch(["tenslora", "train"], {"TENSLORA_ALLOCATOR": "jemalloc"}, find=found)


def test_a_bad_allocator_setting_is_one_line_and_exit_2():
    env = {**os.environ, "TENSLORA_ALLOCATOR": "fast", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tenslora", "train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "TENSLORA_ALLOCATOR='fast'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_a_real_run_records_its_allocator(tmp_path, text_model):  # noqa: F811
    """By default ``tenslora train`` runs on the C library's malloc; with ``TENSLORA_ALLOCATOR=tcmalloc``
    (where the library is installed: CI installs it) on tcmalloc. The summary says which."""
    from tenslora.train.memory import find_tcmalloc

    csv = write_csv(tmp_path / "t.csv", sentences(24))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TENSLORA_ALLOCATOR")}
    env["PYTHONPATH"] = str(REPO)
    cases = [("system", {})] + ([("tcmalloc", ON)] if find_tcmalloc() else [])
    for expected, extra in cases:
        out = tmp_path / expected
        subprocess.run([sys.executable, "-m", "tenslora", "train", "--model", str(text_model), "--task", str(csv),
                        "--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--construction", "qkv_depth",
                        "--ranks", "2_2_2_2", "--no-progress", "--output-dir", str(out)], env={**env, **extra},
                       check=True, timeout=600, capture_output=True)
        assert json.loads((out / "summary.json").read_text())["allocator"] == expected
