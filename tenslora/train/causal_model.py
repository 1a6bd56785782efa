"""A causal LM and its tokenizer for the ``causal`` task kind (any ``AutoModelForCausalLM``)."""
from __future__ import annotations

import warnings

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(name: str) -> bool:
    """Whether a model name / directory holds a causal LM (its config's ``architectures``)."""
    from tenslora.train.modeling import load_model_config, resolve_model_name
    config = load_model_config(resolve_model_name(name))
    return any(a.endswith(CAUSAL_SUFFIXES) for a in (getattr(config, "architectures", None) or []))


def load_causal_lm(path: str):
    """``AutoModelForCausalLM`` in float32 (mixed precision is Accelerate's job)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tenslora.train.modeling import _first_line, load_model_config
    config = load_model_config(path)
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"model {path!r} ({config.model_type}) is not a causal LM "
                         "(AutoModelForCausalLM does not support it)")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_causal_tokenizer(path: str):
    """The model's tokenizer with a pad token (EOS when it has none) and left padding for generation
    (training batches are right-padded by :class:`tenslora.train.causal_data.CausalCollator`)."""
    from transformers import AutoTokenizer

    from tenslora.train.modeling import _first_line
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load the tokenizer of {path!r}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
