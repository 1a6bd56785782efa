"""The TensLoRA seed's ViT command, on tenslora: ``python train_scripts/train_vit.py tenslora
--tensor-method qkv_depth --n-components 8_8_3_8`` runs ``tenslora train`` on an image task.

The seed's flags are kept (names and defaults; its default dataset, ``cola``, was not an image task, so
the default here is Fashion-MNIST); each becomes a ``tenslora train`` option (table:
``docs/seed-commands.md``). Options after ``--`` go to ``tenslora train`` as they are. Without the hub,
google/vit-base-patch16-224 falls back to the offline DINOv2-small.
"""
from __future__ import annotations

from typing import Optional

import typer

import seed_cli

DEFAULTS = seed_cli.Defaults(model="google/vit-base-patch16-224", offline_model="dinov2-small",
                             dataset="fashion-mnist", offline_dataset="fashion-mnist", dataset_hub_id=None,
                             datasets={"cifar": "cifar10"})


def main(
    ctx: typer.Context,
    lora_type: str = typer.Argument(..., help="tenslora, or lora / lora_hf / custom_lora (PEFT LoRA)"),
    scaling: float = typer.Option(1.0, help="multiplies the update (tenslora: alpha = scaling x input rank)"),
    tensor_method: Optional[str] = typer.Option(None, help="construction: att, qkv, depth, att_qkv, att_depth, "
                                                           "qkv_depth, att_qkv_depth"),
    tensor_fac: Optional[str] = typer.Option(None, help="tucker or cp [default: tucker]"),
    tensor_init: str = typer.Option("orthogonal", help="orthogonal, normal or kaiming_uniform"),
    n_components: str = typer.Option("4", help="ranks: one, or one per mode like 8_8_3_8 (input, head_dim/heads "
                                               "or output, qkv, layers)"),
    dataset: Optional[str] = typer.Option(None, help="image task (fashion-mnist, eurosat, dtd, cifar, ...) or "
                                                     "an image folder [default: fashion-mnist]"),
    lr: float = typer.Option(5e-4, help="learning rate"),
    n_epochs: int = typer.Option(10, help="epochs"),
    batch_size: int = typer.Option(64, help="batch size"),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay"),
    dropout_prob: float = typer.Option(0.0, help="adapter dropout"),
    seed: Optional[int] = typer.Option(None, help="seed [default: 0]"),
    use_wandb: bool = typer.Option(False, help="not used: tenslora logs to TensorBoard (<run>/tb) and metrics.csv"),
    save_directory: Optional[str] = typer.Option(None, "--save-directory", "--output-dir",
                                                 help="run directory (adapters, metrics) [default: runs/<time>]"),
    model: Optional[str] = typer.Option(None, help="tenslora extra: model id or directory "
                                                   "[default: google/vit-base-patch16-224; offline: dinov2-small]"),
    print_command: bool = typer.Option(False, help="tenslora extra: print the tenslora command, run nothing"),
) -> None:
    """Fine-tune ViT (or the offline DINOv2-small) with TensLoRA or PEFT LoRA, as the seed's script did."""
    try:
        adapter = seed_cli.adapter_options(lora_type, tensor_method, tensor_fac, tensor_init, n_components, scaling)
        model, task = seed_cli.resolve_defaults(model, dataset, DEFAULTS)
    except ValueError as exc:
        seed_cli.fail(str(exc))
    argv = ["train", "--model", model, "--task", task, *adapter, "--dropout", repr(dropout_prob),
            "--lr", repr(lr), "--max-steps", "0", "--epochs", str(n_epochs), "--batch-size", str(batch_size),
            "--seed", str(0 if seed is None else seed), "--weight-decay", repr(weight_decay),
            "--scheduler", "cosine", "--warmup-ratio", "0.0"]  # the seed: cosine annealing, no warmup
    seed_cli.launch(argv, list(ctx.args), print_command, output_dir=save_directory, use_wandb=use_wandb)


if __name__ == "__main__":
    seed_cli.run(main)
