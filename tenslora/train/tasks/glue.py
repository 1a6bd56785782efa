"""GLUE tasks through ``datasets`` (Hugging Face hub ``nyu-mll/glue``).

Test labels are hidden in GLUE, so the official validation split is reported as ``test`` and a
validation split is held out from train (by ``--data-seed``). Sentence pairs stay pairs: the
tokenizer encodes them with its separator and segment ids.
"""
from __future__ import annotations

from dataclasses import dataclass

from tenslora.train.tasks.base import TaskData, hf_split

HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    text: str
    pair: str | None
    main_metric: str
    regression: bool = False


GLUE_TASKS = {
    "cola": GlueTask("sentence", None, "mcc"),
    "sst2": GlueTask("sentence", None, "accuracy"),
    "mrpc": GlueTask("sentence1", "sentence2", "f1"),
    "qnli": GlueTask("question", "sentence", "accuracy"),
    "rte": GlueTask("sentence1", "sentence2", "accuracy"),
    "stsb": GlueTask("sentence1", "sentence2", "pearson", regression=True),
}


def load_glue(name: str, cfg) -> TaskData:
    import datasets
    spec = GLUE_TASKS[name]
    try:
        data = datasets.load_dataset(HUB_ID, name)
    except Exception as exc:  # offline, or hub errors: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"cannot load GLUE task {name!r} from the hub ({HUB_ID}): {first}; "
                                "offline, pass local files with --train-file/--validation-file") from None
    columns = {"text": spec.text} | ({"text_pair": spec.pair} if spec.pair else {})
    splits = {"train": hf_split(data["train"], columns, "label"),
              "test": hf_split(data["validation"], columns, "label")}
    names = None if spec.regression else list(data["train"].features["label"].names)
    return TaskData(name=name, kind="text", splits=splits, label_names=names,
                    problem_type="regression" if spec.regression else "classification",
                    main_metric=spec.main_metric, test_source="official GLUE validation split")
