"""Causal-LM examples -> token ids and labels: the chat template, loss on the response only, dynamic padding.

An example (see :mod:`tenslora.train.tasks.causal`) becomes ``input_ids`` (length ``<= max_length``) and
``labels``: ``-100`` on every prompt token (and, after collation, on padding); the response tokens carry their
ids. With a chat template the prompt is the template with ``add_generation_prompt=True`` and the response is
what the full conversation adds after it (content, end-of-turn token...). Without one, the prompt is the raw
text (with the tokenizer's special tokens) and the response is ``" " + response`` plus EOS. Plain text: loss on
every token, EOS appended. Too long: the response keeps its tokens first (up to half of ``max_length`` when
the prompt is long), the prompt loses tokens from its start.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from tenslora.train.tasks.base import Split

IGNORE = -100


def prompt_messages(row: dict) -> list[dict]:
    return row["messages"] if row.get("messages") is not None else [{"role": "user", "content": row["prompt"]}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, row: dict) -> str:
    """The prompt as text, ending where the model's answer starts (the generation prompt of a chat template)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
    if row.get("messages") is not None:
        return "\n".join(m["content"] for m in row["messages"])
    return row["prompt"]


def encode_prompt(tokenizer, row: dict) -> list[int]:
    """The prompt's token ids (what generation starts from)."""
    return tokenizer(prompt_text(tokenizer, row), add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def encode_response(tokenizer, row: dict) -> list[int]:
    """The response's token ids as they follow the prompt (end-of-turn / EOS included)."""
    if has_chat_template(tokenizer):
        prompt = prompt_text(tokenizer, row)
        full = tokenizer.apply_chat_template(prompt_messages(row) + [{"role": "assistant", "content": row["response"]}],
                                             tokenize=False)
        if full.startswith(prompt):
            return tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(" " + row["response"], add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut ``prompt + response`` to ``max_length``: the response first, the prompt from its start."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt > 0 else []
    return prompt, response[:max_length - len(prompt)]


def encode_example(tokenizer, row: dict, max_length: int) -> dict:
    """``{"input_ids": [..], "labels": [..]}`` for one row (prompt/messages + response, or text)."""
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    prompt, response = fit(encode_prompt(tokenizer, row), encode_response(tokenizer, row), max_length)
    return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}


class CausalDataset(Dataset):
    """Tokenized on access, not padded (the collator pads each batch to its longest example)."""

    def __init__(self, split: Split, tokenizer, max_length: int):
        self.split, self.tokenizer, self.max_length = split, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return encode_example(self.tokenizer, self.split.inputs[i], self.max_length)


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """``(batch, longest)`` tensor of ``seqs`` padded with ``value`` on ``side``."""
    width = max(len(s) for s in seqs)
    rows = [[value] * (width - len(s)) + list(s) if side == "left" else list(s) + [value] * (width - len(s))
            for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class CausalCollator:
    """Right-pads a training/evaluation batch: ``input_ids`` with the pad id, ``attention_mask`` 0 and
    ``labels`` -100 on padding. ``tokenizer`` is kept for evaluation (decoding, generation)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        ids = [b["input_ids"] for b in batch]
        return {"input_ids": pad(ids, self.tokenizer.pad_token_id),
                "attention_mask": pad([[1] * len(s) for s in ids], 0),
                "labels": pad([b["labels"] for b in batch], IGNORE)}
