"""A causal LM and its tokenizer for the ``causal`` task kind (any ``AutoModelForCausalLM``)."""
from __future__ import annotations

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

    from tenslora.train.modeling import load_model_config, quiet_loading
    config = load_model_config(path)
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"model {path!r} ({config.model_type}) is not a causal LM "
                         "(AutoModelForCausalLM does not support it)")
    with quiet_loading(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


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
