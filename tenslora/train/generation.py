"""Evaluation and prediction of causal LMs: held-out loss / perplexity, and greedy generations.

* loss: mean cross-entropy over the response tokens of the whole split (token-weighted, labels != -100,
  next-token shift); perplexity = exp(loss).
* when the responses are labels (``num_labels > 0``): each prompt (the tokens before the first labelled one)
  is generated from greedily, left-padded, ``max_new_tokens`` = the longest gold response in tokens + 1;
  the decoded text (special tokens skipped) is compared to the gold response after :func:`normalize`
  (case-folded, surrounding whitespace and punctuation stripped: "Positive." matches "positive"):
  exact-match accuracy and macro-F1 over the gold classes (an answer outside them counts as wrong).
"""
from __future__ import annotations

import math
import string

import torch
import torch.nn.functional as F

from tenslora.train.causal_data import IGNORE, encode_prompt, pad


def response_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed next-token cross-entropy over labelled positions, and their count. Shapes
    ``(B, T, V), (B, T) -> (B,), (B,)``."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view(labels.shape)
    mask = labels != IGNORE
    return (ce * mask).sum(1), mask.sum(1)


def split_prompt(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """One right-padded row -> (prompt ids, gold response ids): the prompt ends at the first labelled token."""
    ids, lab = input_ids[attention_mask.bool()], labels[attention_mask.bool()]
    labelled = (lab != IGNORE).nonzero()
    start = int(labelled[0]) if len(labelled) else len(ids)
    return ids[:start].tolist(), lab[start:][lab[start:] != IGNORE].tolist()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded per batch), decoded and stripped."""
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        input_ids = pad(chunk, tokenizer.pad_token_id, side="left").to(device)
        attention_mask = pad([[1] * len(p) for p in chunk], 0, side="left").to(device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts += [t.strip() for t in tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]
    return texts


def normalize(text: str) -> str:
    """``"  Positive. "`` -> ``"positive"``: case-folded, surrounding whitespace and punctuation stripped."""
    return text.strip(string.whitespace + string.punctuation).casefold()


def label_metrics(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Exact-match accuracy and macro-F1 over the gold classes, on :func:`normalize`\ d texts."""
    from sklearn.metrics import f1_score
    preds, golds = [normalize(p) for p in preds], [normalize(g) for g in golds]
    classes = sorted(set(golds))
    return {"accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds),
            "macro_f1": float(f1_score(golds, preds, labels=classes, average="macro", zero_division=0))}


@torch.no_grad()
def evaluate_causal(model, loader, accelerator, num_labels: int) -> dict[str, float]:
    """Loss and perplexity over the split; with labels, accuracy and macro-F1 of greedy generations.
    The tokenizer is the loader's collator's (:class:`tenslora.train.causal_data.CausalCollator`)."""
    tokenizer = loader.collate_fn.tokenizer
    was_training = model.training
    model.eval()
    sums, counts, prompts, golds = [], [], [], []
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, c = accelerator.gather_for_metrics(response_loss_sums(logits, batch["labels"]))
        sums.append(s.cpu())
        counts.append(c.cpu())
        if num_labels:
            for row in zip(batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu()):
                prompt, gold = split_prompt(*row)
                prompts.append(prompt)
                golds.append(gold)
    total = int(torch.cat(counts).sum())
    if total == 0:
        raise ValueError("cannot compute the loss: no response tokens in the split (all cut by --max-length?)")
    loss = float(torch.cat(sums).sum()) / total
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if num_labels:
        max_new = max(len(g) for g in golds) + 1
        preds = generate(accelerator.unwrap_model(model), tokenizer, prompts, max_new, loader.batch_size or 8)
        gold_text = [t.strip() for t in tokenizer.batch_decode(golds, skip_special_tokens=True)]
        pairs = accelerator.gather_for_metrics(list(zip(preds, gold_text)), use_gather_object=True)
        metrics.update(label_metrics([p for p, _ in pairs], [g for _, g in pairs]))
    model.train(was_training)
    return metrics


def default_max_new_tokens(tokenizer, label_names: list[str] | None) -> int:
    """Enough for the longest label (+2: end of turn, spare) when responses are labels, else 64."""
    if not label_names:
        return 64
    return max(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in label_names) + 2


def predict_causal(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[dict]:
    """``[{"input": prompt, "generation": text}]``: greedy generations (chat template applied)."""
    ids = [encode_prompt(tokenizer, {"prompt": p}) for p in prompts]
    return [{"input": p, "generation": g}
            for p, g in zip(prompts, generate(model.eval(), tokenizer, ids, max_new_tokens, batch_size))]
