"""Image-classification datasets from the Hugging Face hub through ``datasets.load_dataset``.

Short names map to hub ids; any ``owner/name`` id is accepted too (its image and ClassLabel columns
are found from the features). Split names ``valid``/``val`` count as ``validation``.
"""
from __future__ import annotations

from tenslora.train.tasks.base import TaskData, hf_split

HUB_IMAGE_DATASETS = {
    "eurosat": "timm/eurosat-rgb",
    "dtd": "tanganke/dtd",
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "mnist": "ylecun/mnist",
    "beans": "AI-Lab-Makerere/beans",
    "food101": "ethz/food101",
    "oxford-pets": "timm/oxford-iiit-pet",
}
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "test": "test"}


def load_hub_dataset(hub_id: str, cfg, name: str | None = None) -> TaskData:
    import datasets
    try:
        data = datasets.load_dataset(hub_id)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"cannot load dataset {hub_id!r} from the hub: {first}") from None
    if "train" not in data:
        raise ValueError(f"dataset {hub_id!r} has no train split; splits: {', '.join(data)}")
    features = data["train"].features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    label = cfg.label_column or (labels[0] if labels else "label")
    if label not in features:
        raise ValueError(f"label column {label!r} not found in {hub_id}; available columns: {', '.join(features)}")
    if images:
        columns, kind = {"image": images[0]}, "image"
    else:
        text = cfg.text_column or next((c for c in ("text", "sentence", "sentence1") if c in features), None)
        if text is None:
            raise ValueError(f"no image or text column in {hub_id}; available columns: {', '.join(features)}; "
                             "name it with --text-column")
        columns, kind = {"text": text}, "text"
        if cfg.text_pair_column:
            columns["text_pair"] = cfg.text_pair_column
    splits = {SPLIT_ALIASES[s]: hf_split(data[s], columns, label) for s in data if s in SPLIT_ALIASES}
    names = list(features[label].names) if isinstance(features[label], datasets.ClassLabel) else None
    return TaskData(name=name or hub_id, kind=kind, splits=splits, label_names=names,
                    main_metric="accuracy" if kind == "image" else "macro_f1")
