"""Model, preprocessor and adapter for a run: any HF id or local directory, offline short names."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from tenslora.config import TensLoRAConfig, parse_ranks


def resolve_model_name(name: str) -> str:
    """Short offline names (``minilm``, ``dinov2-small``) -> local directories; others unchanged."""
    from tenslora.hub.registry import resolve_model_name as resolve
    return str(resolve(name))


def default_image_size(name: str) -> int | None:
    """The training image size a short model name suggests (e.g. 56 px for ``dinov2-small``)."""
    from tenslora.hub.registry import default_image_size as lookup
    try:
        return lookup(name)
    except ValueError:
        return None


def forward_kwargs(model, kind: str, image_size: int | None) -> dict:
    """Extra forward arguments: ViT-style models need ``interpolate_pos_encoding=True`` to take images
    of another size than their position grid (DINOv2 interpolates on its own)."""
    import inspect
    native = getattr(getattr(model, "config", None), "image_size", None)
    if kind != "image" or not image_size or native in (None, image_size):
        return {}
    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        return {"interpolate_pos_encoding": True}
    return {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model_config(path: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        where = "directory" if Path(path).exists() else "model id or directory"
        raise FileNotFoundError(f"cannot load model {path!r} ({where}): {_first_line(exc)}") from None


def auto_class(kind: str):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    return AutoModelForImageClassification if kind == "image" else AutoModelForSequenceClassification


def load_classifier(path: str, kind: str, num_labels: int, label_names: list[str] | None, problem_type: str):
    """``AutoModelFor{Sequence,Image}Classification`` with a fresh head of ``num_labels`` outputs
    (kind ``causal``: ``AutoModelForCausalLM`` as it is, see :mod:`tenslora.train.causal_model`)."""
    if kind == "causal":
        from tenslora.train.causal_model import load_causal_lm
        return load_causal_lm(path)
    config = load_model_config(path)
    cls = auto_class(kind)
    mapping = cls._model_mapping
    if type(config) not in mapping:
        what = "image" if kind == "image" else "sequence"
        raise ValueError(f"model {path!r} ({config.model_type}) has no {what}-classification head class in "
                         f"transformers ({cls.__name__} does not support it)")
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True,
              "problem_type": "regression" if problem_type == "regression" else "single_label_classification"}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    with quiet_loading(path):  # "newly initialized head" is expected when fine-tuning
        return cls.from_pretrained(path, **kwargs)


@contextlib.contextmanager
def quiet_loading(path: str):
    """Load weights without transformers' warnings and progress bars; a failed load is one line naming ``path``."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_preprocessor(path: str, kind: str, image_size: int | None = None):
    """The model's own tokenizer, or its image processor (``image_size`` overrides its size)."""
    if kind == "causal":
        from tenslora.train.causal_model import load_causal_tokenizer
        return load_causal_tokenizer(path)
    if kind == "text":
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"cannot load the tokenizer of {path!r}: {_first_line(exc)}") from None
    from transformers import AutoImageProcessor
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load the image processor of {path!r}: {_first_line(exc)}") from None
    if image_size:
        if getattr(processor, "crop_size", None) and getattr(processor, "do_center_crop", False):
            processor.size = {"shortest_edge": image_size}
            processor.crop_size = {"height": image_size, "width": image_size}
        else:
            processor.size = {"height": image_size, "width": image_size}
    return processor


def adapter_config(cfg) -> TensLoRAConfig:
    """The adapter of a run. ``--ranks auto`` is resolved first (:func:`resolve_auto_ranks`)."""
    if cfg.init_from:
        return _init_from_config(cfg)
    ranks = cfg.ranks
    if str(ranks).strip().lower() == "auto":
        raise ValueError("--ranks auto must be resolved before building the adapter (see resolve_auto_ranks)")
    targets = tuple(t.strip() for t in cfg.target_modules.split(",") if t.strip()) if cfg.target_modules else None
    return TensLoRAConfig(construction=cfg.construction, factorization=cfg.factorization,
                          ranks=parse_ranks(str(ranks)), alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init,
                          seed=cfg.seed, targets=cfg.targets, target_modules=targets)


def _init_from_config(cfg) -> TensLoRAConfig:
    """``--init-from DIR``: the saved adapter's config (dropout and seed from the run)."""
    import dataclasses

    from tenslora.api import read_adapter_record
    record = read_adapter_record(cfg.init_from)
    saved = TensLoRAConfig.from_dict(record["config"])
    if saved.method != "tenslora":
        raise ValueError(f"--init-from {cfg.init_from} holds a {saved.construction!r} adapter; it takes a tenslora "
                         "adapter (compress a LoRA first: tenslora compress)")
    if (cfg.construction, cfg.factorization) != (saved.construction, saved.factorization):
        raise ValueError(f"--init-from {cfg.init_from} is {saved.construction}/{saved.factorization}; pass "
                         f"--construction {saved.construction} --factorization {saved.factorization}")
    return dataclasses.replace(saved, dropout=cfg.dropout, seed=cfg.seed)


def load_initial_weights(adapted, path: str) -> None:
    """Load the adapter and head weights of the saved adapter ``path`` into ``adapted`` (fit and shapes checked)."""
    from tenslora.api import read_adapter_record, read_adapter_weights
    from tenslora.targets import check_fingerprint
    check_fingerprint(read_adapter_record(path)["model"], adapted.shape_fingerprint())
    adapted.load_state_dict(read_adapter_weights(path))


def resolve_auto_ranks(cfg) -> str:
    """``--ranks auto --budget N``: the ranks string TensLoRA+ allocation chooses (a short probe run,
    :func:`tenslora.train.probe.allocate_for_training`)."""
    from tenslora.train.probe import allocate_for_training
    return allocate_for_training(cfg)["ranks_string"]
