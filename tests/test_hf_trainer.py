"""The adapted model inside a real ``transformers.Trainer`` (default arguments): the inputs reach
the model, tied embeddings do not break checkpointing, ``save_model`` and checkpoints load with
``load_adapted_model``, and training resumes from a checkpoint."""
import inspect

import pytest
import torch

from tenslora import TensLoRAConfig, get_adapted_model, load_adapted_model


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=101, pad_token_id=0, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def dataset(n=8):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 100, (6,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long), "labels": ids.clone(),
                     "note": "a column the model does not take"})
    return rows


def trainer_for(adapted, out, max_steps):
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps, save_steps=2,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, seed=0)
    # default collator: it stacks every column Trainer keeps, so "note" must be dropped and input_ids kept
    return Trainer(model=adapted, args=args, train_dataset=dataset())


@pytest.mark.parametrize("construction", ["att_qkv_depth", "att", "lora"])
def test_trainer_trains_saves_and_resumes(construction, tmp_path):
    adapted = get_adapted_model(tied_llama(), TensLoRAConfig(construction, ranks=2, alpha=4))
    assert "input_ids" in inspect.signature(adapted.forward).parameters  # what Trainer inspects
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    trainer = trainer_for(adapted, tmp_path / "run", max_steps=3)
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in adapted.state_dict().items())  # it learned
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    adapted.eval()
    expected = adapted(input_ids=ids).logits
    loaded = load_adapted_model(tied_llama(), tmp_path / "final")
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert load_adapted_model(tied_llama(), checkpoint).adapter_config.construction == construction
    # resume from the checkpoint: ends where the uninterrupted run ended
    resumed = get_adapted_model(tied_llama(), TensLoRAConfig(construction, ranks=2, alpha=4))
    trainer_for(resumed, tmp_path / "run", max_steps=3).train(resume_from_checkpoint=str(checkpoint))
    resumed.eval()
    assert torch.allclose(resumed(input_ids=ids).logits, expected, atol=1e-4)


def test_save_pretrained_writes_the_adapter_directory(tmp_path):
    adapted = get_adapted_model(tied_llama(), TensLoRAConfig("att", ranks=2))
    adapted.save_pretrained(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"tenslora_config.json", "adapter_model.safetensors"}
    assert load_adapted_model(tied_llama(), tmp_path / "a").adapter_config.construction == "att"
