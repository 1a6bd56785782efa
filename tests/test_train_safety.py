"""Nothing a user made is lost: a used --output-dir is refused, resumed or replaced only when asked, and
only after every input was checked; broken or unwritable files give one line (exit 2), no traceback."""
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from test_train_utils import (Crash, fails_cleanly, run_cli, sentences, text_model, write_csv,  # noqa: F401
                              write_jsonl)
from tenslora.train.config import TrainConfig

pytestmark = pytest.mark.slow
STEPS = ["--max-steps", "2", "--batch-size", "8", "--eval-batch-size", "16", "--no-progress"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _train(capsys, data, model, run, *extra):
    code, out, err = run_cli(["train", "--task", data, "--model", model, "--output-dir", run, *STEPS, *extra], capsys)
    assert code == 0, err
    return out


def interrupted_run(data, model, run: Path, lr: float = 3e-3) -> Path:
    """A run killed at step 3 of 4, with the checkpoint of step 2 on disk."""
    from tenslora.train.loop import train
    cfg = TrainConfig(task=str(data), model=str(model), output_dir=str(run), max_steps=4, batch_size=8,
                      eval_batch_size=16, checkpoint_every=1, progress=False, lr=lr)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[Crash(3)])
    assert (run / "checkpoint" / "trainable.pt").is_file() and not (run / "summary.json").exists()
    return run


@pytest.fixture
def data(tmp_path):
    return write_csv(tmp_path / "d.csv", sentences(40))


@pytest.fixture
def finished(tmp_path, capsys, data, text_model):  # noqa: F811
    run = tmp_path / "run"
    _train(capsys, data, text_model, run)
    (run / "notes.txt").write_text("mine")  # a user's file in the run directory
    return run


# item 1: a used directory -------------------------------------------------------------------------
def test_finished_run_is_never_lost(tmp_path, capsys, data, finished, text_model):  # noqa: F811
    before = snapshot(finished)
    assert "summary.json" in before and "best_adapter/adapter_model.safetensors" in before
    fails_cleanly(capsys, ["train", "--task", tmp_path / "typo.csv", "--model", text_model, "--output-dir", finished],
                  "holds a finished run")
    assert snapshot(finished) == before  # a bad input deletes nothing
    line = fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", finished, *STEPS],
                         "holds a finished run")
    assert "--overwrite" in line and "--resume" in line
    assert snapshot(finished) == before
    code, out, err = run_cli(["train", "--task", data, "--model", text_model, "--output-dir", finished, *STEPS,
                              "--resume"], capsys)
    assert code == 0 and "already done" in out + err
    assert snapshot(finished) == before
    for bad in (["--task", tmp_path / "typo.csv"], ["--model", tmp_path / "no-model"], ["--select-metric", "bleu"],
                ["--label-column", "stars"]):
        args = ["train", "--task", data, "--model", text_model, "--output-dir", finished, *STEPS, "--overwrite", *bad]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert snapshot(finished) == before, bad  # --overwrite removes nothing before the inputs are checked
    fails_cleanly(capsys, ["train", "--task", data, "--output-dir", finished, "--resume", "--overwrite"],
                  "--resume and --overwrite exclude each other")
    line = fails_cleanly(capsys, ["train", "--task", data, "--output-dir", finished, "--overwrite", "--targets",
                                  "all-linear", "--ranks", "auto", "--budget", "lora:2"],
                         "--ranks auto allocates the attention tensors' ranks only")
    assert "--targets qkv or qkvo" in line and snapshot(finished) == before

    _train(capsys, data, text_model, finished, "--overwrite", "--max-steps", "3")
    assert json.loads((finished / "summary.json").read_text())["steps"] == 3
    assert (finished / "notes.txt").read_text() == "mine"
    assert not [p for p in finished.iterdir() if p.name.startswith(".")]  # nothing left aside


def test_interrupted_run_needs_resume_or_overwrite(tmp_path, capsys, data, text_model):  # noqa: F811
    run = interrupted_run(data, text_model, tmp_path / "run")
    before = snapshot(run)
    line = fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", run, *STEPS],
                         "holds an interrupted run")
    assert "add --resume to continue it or --overwrite to start over" in line
    assert snapshot(run) == before  # the checkpoint is kept
    out = _train(capsys, data, text_model, run, "--max-steps", "4", "--resume")
    assert "4 steps" in out and not (run / "checkpoint").exists()


def test_resume_guard_does_not_need_config_json(tmp_path, capsys, data, text_model):  # noqa: F811
    """item 2: the checkpoint itself refuses a resume with changed options."""
    run = interrupted_run(data, text_model, tmp_path / "run", lr=3e-3)
    (run / "config.json").unlink()
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", run, "--max-steps", "4",
                           "--batch-size", "8", "--eval-batch-size", "16", "--resume", "--lr", "0.01"],
                  "lr (was 0.003, now 0.01)")
    state = run / "checkpoint" / "state.json"
    record = json.loads(state.read_text())
    assert record["train"]["lr"] == 0.003
    del record["train"]  # a checkpoint that does not know its options is not resumed blindly
    state.write_text(json.dumps(record))
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", run, "--max-steps", "4",
                           "--batch-size", "8", "--eval-batch-size", "16", "--resume"],
                  f"{state} does not record the run's options")


# item 3: broken and unwritable files --------------------------------------------------------------
def test_output_dir_that_is_a_file(tmp_path, capsys, data, text_model):  # noqa: F811
    target = tmp_path / "taken"
    target.write_text("x")
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", target, *STEPS],
                  f"--output-dir {target} is a file")
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", target / "run", *STEPS],
                  f"its parent {target} is a file")
    assert target.read_text() == "x"


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(path)``: remove write permission under ``path``. Root writes anyway, so as root the
    kernel's answer for an ordinary user is simulated at the OS edge (``os.access``)."""
    made = []

    def make(path: Path) -> Path:
        for p in [path, *path.rglob("*")]:
            made.append((p, p.stat().st_mode))
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        return path

    if os.geteuid() == 0:
        real = os.access

        def access(path, mode, *args, **kwargs):
            p = Path(path).absolute()
            if mode & os.W_OK and any(p == q or q in p.parents for q, _ in made):
                return False
            return real(path, mode, *args, **kwargs)
        monkeypatch.setattr(os, "access", access)
    yield make
    for p, mode in reversed(made):
        p.chmod(mode)


def test_read_only_directories(tmp_path, capsys, data, finished, read_only, text_model):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    read_only(empty)
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", empty, *STEPS],
                  f"cannot write to {empty}: permission denied")
    parent = tmp_path / "parent"
    parent.mkdir()
    read_only(parent)
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", parent / "run", *STEPS],
                  f"cannot write to {parent}: permission denied")
    assert not (parent / "run").exists()

    before = snapshot(finished)
    read_only(finished)
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", finished, *STEPS,
                           "--overwrite"], "permission denied")
    fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", finished, *STEPS],
                  "holds a finished run")
    code, out, err = run_cli(["train", "--task", data, "--model", text_model, "--output-dir", finished, *STEPS,
                              "--resume"], capsys)
    assert code == 0 and "already done" in out + err
    code, out, err = run_cli(["evaluate", finished, "--json"], capsys)  # reading needs no write access
    assert code == 0 and "test_accuracy" in json.loads(out), err
    assert snapshot(finished) == before


def test_write_denied_midway_is_one_line(tmp_path, capsys, data, text_model, monkeypatch):  # noqa: F811
    """A write the OS refuses later on (e.g. a read-only mount) names the file, no traceback."""
    import tempfile
    real = tempfile.mkstemp

    def denied(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path / "run":
            raise PermissionError(13, "Permission denied", str(Path(dir) / "config.json"))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    line = fails_cleanly(capsys, ["train", "--task", data, "--model", text_model, "--output-dir", tmp_path / "run",
                                  *STEPS], "permission denied")
    assert str(tmp_path / "run" / "config.json") in line


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_adapter_in_evaluate_and_predict(capsys, finished, damage):
    weights = finished / "best_adapter" / "adapter_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else raw[: len(raw) // 2])
    fails_cleanly(capsys, ["evaluate", finished], str(weights))
    fails_cleanly(capsys, ["predict", finished, "good movie"], str(weights))
    code, _, err = run_cli(["evaluate", finished, "--adapter", "final"], capsys)  # the other one still works
    assert code == 0, err


def test_damaged_checkpoint_on_resume(tmp_path, capsys, data, text_model):  # noqa: F811
    run = interrupted_run(data, text_model, tmp_path / "run")
    args = ["train", "--task", data, "--model", text_model, "--output-dir", run, "--max-steps", "4",
            "--batch-size", "8", "--eval-batch-size", "16", "--no-progress", "--resume"]
    state = run / "checkpoint" / "state.json"
    good = state.read_text()
    state.write_text(good[: len(good) // 2])
    fails_cleanly(capsys, args, f"{state} is not valid JSON")
    state.unlink()
    fails_cleanly(capsys, args, f"{state} does not exist")
    fails_cleanly(capsys, [a for a in args if a != "--resume"], "holds an interrupted run")  # still protected
    state.write_text(good)
    weights = run / "checkpoint" / "trainable.pt"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    before = snapshot(run)
    line = fails_cleanly(capsys, args, f"cannot restore {weights}")
    assert "--overwrite" in line
    assert snapshot(run) == before  # the damaged run is left for the user to look at
    out = _train(capsys, data, text_model, run, "--max-steps", "4", "--overwrite")
    assert "4 steps" in out


# item 4: regression on local files ----------------------------------------------------------------
def test_regression_on_local_files(tmp_path, capsys, text_model):  # noqa: F811
    rows = [{"text": r["text"], "label": round(0.2 + 0.6 * r["label"] + 0.01 * i, 3)}
            for i, r in enumerate(sentences(40))]
    data = write_csv(tmp_path / "r.csv", rows)
    run = tmp_path / "reg"
    out = _train(capsys, data, text_model, run)
    s = json.loads((run / "summary.json").read_text())
    assert s["select_metric"] == "pearson" and "test_pearson" in s["best"] and "majority-class" not in out
    code, out, err = run_cli(["predict", run, "good movie", "--json"], capsys)
    assert code == 0 and "prediction" in json.loads(out)[0], err

    ints = write_csv(tmp_path / "i.csv", sentences(40))
    _train(capsys, ints, text_model, tmp_path / "forced", "--problem-type", "regression")
    assert json.loads((tmp_path / "forced" / "summary.json").read_text())["select_metric"] == "pearson"


# item 5: bad labels -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_labels(tmp_path, capsys, text_model, bad):  # noqa: F811
    rows = [{"text": r["text"], "label": 0.5 * r["label"] + 0.25} for r in sentences(30)]
    rows[6]["label"] = bad
    for path in (write_csv(tmp_path / "d.csv", rows), write_jsonl(tmp_path / "d.jsonl", rows)):
        fails_cleanly(capsys, ["train", "--task", path, "--model", text_model, "--output-dir", tmp_path / "run",
                               *STEPS], f"label {bad!r} of example 7 in the train split is not a finite number")
        fails_cleanly(capsys, ["train", "--task", path, "--model", text_model, "--output-dir", tmp_path / "run",
                               "--problem-type", "classification", *STEPS], "is not a finite number")
    assert not (tmp_path / "run").exists()


def test_one_class_and_num_labels(tmp_path, capsys, text_model):  # noqa: F811
    same = write_csv(tmp_path / "one.csv", [{"text": r["text"], "label": 1} for r in sentences(30)])
    fails_cleanly(capsys, ["train", "--task", same, "--model", text_model, *STEPS],
                  "every training label is '1': classification needs at least 2 classes")
    words = write_csv(tmp_path / "w.csv", [{"text": r["text"], "label": "pos" if r["label"] else "neg"}
                                           for r in sentences(30)])
    fails_cleanly(capsys, ["train", "--task", words, "--model", text_model, "--num-labels", "5", *STEPS],
                  "--num-labels 5 does not match the 2 classes of the training labels (neg, pos)")
    run = tmp_path / "ok"
    _train(capsys, words, text_model, run, "--num-labels", "2")
    assert json.loads((run / "config.json").read_text())["resolved"]["label_names"] == ["neg", "pos"]
