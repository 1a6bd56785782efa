"""The TensLoRA+ seed's RoBERTa command, on tenslora: ``python train_scripts/train_roberta.py tenslora
--tensor-method att_qkv_depth --n-components 8_8_8_8_8`` runs ``tenslora train`` with the same adapter.

The seed's flags are kept (names and defaults); each becomes a ``tenslora train`` option (table:
``docs/seed-commands.md``). Options after ``--`` go to ``tenslora train`` as they are (e.g.
``-- --max-steps 20``). Without the hub, roberta-base and CoLA fall back to the offline MiniLM and tweets.
"""
from __future__ import annotations

from typing import Optional

import typer

import seed_cli

DEFAULTS = seed_cli.Defaults(model="roberta-base", offline_model="minilm", dataset="cola", offline_dataset="tweets",
                             dataset_hub_id="nyu-mll/glue", datasets={})


def main(
    ctx: typer.Context,
    lora_type: str = typer.Argument(..., help="tenslora, or lora / lora_hf / custom_lora (PEFT LoRA)"),
    scaling: float = typer.Option(4.0, help="multiplies the update (tenslora: alpha = scaling x input rank)"),
    tensor_method: Optional[str] = typer.Option(None, help="construction: att, qkv, depth, att_qkv, att_depth, "
                                                           "qkv_depth, att_qkv_depth"),
    tensor_fac: str = typer.Option("tucker", help="tucker or cp"),
    tensor_init: str = typer.Option("orthogonal", help="orthogonal, normal or kaiming_uniform"),
    n_components: str = typer.Option("4", help="ranks: one, or one per mode like 8_8_8_8_8 (input, head_dim/heads "
                                               "or output, qkv, layers)"),
    dataset: Optional[str] = typer.Option(None, help="GLUE task, a tenslora task or a CSV/JSONL file "
                                                     "[default: cola; offline: tweets]"),
    lr: float = typer.Option(5e-4, help="learning rate"),
    n_epochs: int = typer.Option(10, help="epochs"),
    batch_size: int = typer.Option(64, help="batch size"),
    seed: Optional[int] = typer.Option(None, help="seed [default: 0]"),
    test: bool = typer.Option(False, help="quick run on 500 training / 128 evaluation examples"),
    run_name: Optional[str] = typer.Option(None, help="run directory runs/RUN_NAME [default: a timestamp]"),
    use_wandb: bool = typer.Option(False, help="not used: tenslora logs to TensorBoard (<run>/tb) and metrics.csv"),
    use_amp: bool = typer.Option(False, help="float16 mixed precision (CUDA only)"),
    lr_core_mult: float = typer.Option(1.0, help="Tucker core learning-rate multiplier (--core-lambda)"),
    lr_input_mult: float = typer.Option(1.0, help="input factor learning-rate multiplier"),
    lr_headdim_mult: float = typer.Option(1.0, help="head_dim factor learning-rate multiplier"),
    lr_heads_mult: float = typer.Option(1.0, help="heads factor learning-rate multiplier"),
    lr_qkv_mult: float = typer.Option(1.0, help="qkv factor learning-rate multiplier"),
    lr_layers_mult: float = typer.Option(1.0, help="layers factor learning-rate multiplier"),
    lr_output_mult: float = typer.Option(1.0, help="output factor learning-rate multiplier"),
    compute_detailed_metrics: bool = typer.Option(False, help="gradient norms and SVD spectra per mode "
                                                              f"(--monitor-every {seed_cli.MONITOR_EVERY})"),
    model: Optional[str] = typer.Option(None, help="tenslora extra: model id or directory "
                                                   "[default: roberta-base; offline: minilm]"),
    output_dir: Optional[str] = typer.Option(None, help="tenslora extra: run directory"),
    print_command: bool = typer.Option(False, help="tenslora extra: print the tenslora command, run nothing"),
) -> None:
    """Fine-tune RoBERTa (or the offline MiniLM) with TensLoRA or PEFT LoRA, as the seed's script did."""
    try:
        adapter = seed_cli.adapter_options(lora_type, tensor_method, tensor_fac, tensor_init, n_components, scaling)
        model, task = seed_cli.resolve_defaults(model, dataset, DEFAULTS)
        argv = ["train", "--model", model, "--task", task, *adapter,
                "--lr", repr(lr), "--max-steps", "0", "--epochs", str(n_epochs), "--batch-size", str(batch_size),
                "--seed", str(0 if seed is None else seed), "--weight-decay", "0.01",  # torch AdamW's default
                "--scheduler", "cosine", "--warmup-ratio", "0.1",
                *seed_cli.lr_options(lora_type, tensor_method, tensor_fac, lr_core_mult,
                                     {"lr_input_mult": lr_input_mult, "lr_headdim_mult": lr_headdim_mult,
                                      "lr_heads_mult": lr_heads_mult, "lr_qkv_mult": lr_qkv_mult,
                                      "lr_layers_mult": lr_layers_mult, "lr_output_mult": lr_output_mult}),
                *seed_cli.precision_options(use_amp)]
    except ValueError as exc:
        seed_cli.fail(str(exc))
    if test:
        argv += ["--train-samples", str(seed_cli.TEST_SAMPLES[0]), "--eval-samples", str(seed_cli.TEST_SAMPLES[1])]
    if compute_detailed_metrics:
        argv += ["--monitor-every", str(seed_cli.MONITOR_EVERY)]
    if run_name:
        argv += ["--run-name", run_name]
    seed_cli.launch(argv, list(ctx.args), print_command, output_dir=output_dir, use_wandb=use_wandb)


if __name__ == "__main__":
    seed_cli.run(main)
