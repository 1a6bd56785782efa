"""Bad input: one line on stderr, exit code 2, no traceback."""
import pytest

from test_train_utils import (QUICK, fails_cleanly as _fails, run_cli, sentences, text_model, vit_model,  # noqa: F401
                              write_csv, write_jsonl)


@pytest.fixture
def csv_file(tmp_path):
    return write_csv(tmp_path / "d.csv", sentences(30))


def test_unknown_task(capsys, text_model):  # noqa: F811
    _fails(capsys, ["train", "--task", "no-such-task", "--model", text_model], "unknown task 'no-such-task'")


def test_missing_column(capsys, csv_file, text_model):  # noqa: F811
    line = _fails(capsys, ["train", "--task", csv_file, "--model", text_model, "--label-column", "stars"],
                  "label column 'stars' not found")
    assert "available columns: text, label" in line


def test_empty_data(capsys, tmp_path, text_model):  # noqa: F811
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    _fails(capsys, ["train", "--task", empty, "--model", text_model], "holds no examples")


def test_labels_do_not_fit(capsys, tmp_path, text_model):  # noqa: F811
    rows = sentences(30) + [{"text": "good", "label": 7}]
    path = write_csv(tmp_path / "d.csv", rows)
    _fails(capsys, ["train", "--task", path, "--model", text_model, "--num-labels", "2", "--validation-size", "1",
                    "--test-size", "1"], "does not fit 2 classes")


def test_model_without_head_class(capsys, csv_file, vit_model):  # noqa: F811
    _fails(capsys, ["train", "--task", csv_file, "--model", vit_model], "has no sequence-classification head class")


def test_model_missing(capsys, csv_file, tmp_path):
    _fails(capsys, ["train", "--task", csv_file, "--model", tmp_path / "nothing-here"], "cannot load model")


def test_unreadable_files(capsys, tmp_path, text_model):  # noqa: F811
    _fails(capsys, ["train", "--task", tmp_path / "missing.csv", "--model", text_model], "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{not json\n')
    _fails(capsys, ["train", "--task", bad, "--model", text_model], "bad.jsonl:2 is not valid JSON")
    _fails(capsys, ["evaluate", tmp_path], "not a tenslora run directory")


def test_bad_options(capsys, csv_file, text_model):  # noqa: F811
    _fails(capsys, ["train", "--task", csv_file, "--model", text_model, "--precision", "fp16"], "fp16 needs a CUDA GPU")
    _fails(capsys, ["train", "--task", csv_file, "--mode-lr", "layers:2"], "must look like layers=2,input=0.5")
    _fails(capsys, ["train", "--task", csv_file, "--model", text_model, "--construction", "qkv_deep"],
           "unknown construction 'qkv_deep'")
    _fails(capsys, ["train", "--task", csv_file, "--model", text_model, "--select-metric", "bleu", *QUICK,
                    "--output-dir", csv_file.parent / "run"], "--select-metric 'bleu' is not a validation metric")
