"""``TrainConfig``: every option of ``tenslora train`` (field name = option name with underscores).

The CLI only parses into this dataclass; :func:`tenslora.train.loop.train` takes it. Each field's
``metadata["help"]`` is the option's help text, so the CLI and this file cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS = ("no", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PROBLEM_TYPES = ("auto", "classification", "regression")


def _opt(default, help: str, group: str = "", **extra):
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    # what ---------------------------------------------------------------------------------------
    model: str = _opt("minilm", "Hugging Face model id, local directory, or a short offline name (minilm, dinov2-small, "
                     "smollm2)")
    task: str = _opt("tweets", "task name (tweets, cola, sst2, mrpc, qnli, rte, stsb, fashion-mnist, eurosat, dtd, "
                     "cifar10, ..., tweets-instruct for causal LMs, chosen for tweets when the model is one), a CSV/JSONL "
                     "file, a JSONL prompt/response or messages file or a .txt file (causal LM), or an image folder")
    train_file: str | None = _opt(None, "training CSV/JSONL file (instead of --task)")
    validation_file: str | None = _opt(None, "validation CSV/JSONL file")
    test_file: str | None = _opt(None, "test CSV/JSONL file")
    text_column: str | None = _opt(None, "text column (default: text, sentence or sentence1)")
    text_pair_column: str | None = _opt(None, "second text column of a sentence-pair task")
    label_column: str | None = _opt(None, "label column (default: label)")
    problem_type: str = _opt("auto", "classification, regression, or auto (float labels -> regression)")
    num_labels: int | None = _opt(None, "number of classes (default: from the data)")
    max_length: int = _opt(128, "maximum tokens per example (batches are padded to their longest only)")
    image_size: int | None = _opt(None, "resize images to this many pixels (default: the image processor's size)")
    # adapter ------------------------------------------------------------------------------------
    construction: str = _opt("qkv_depth", "TensLoRA construction (att, qkv, depth, att_qkv, att_depth, qkv_depth, "
                             "att_qkv_depth) or lora (PEFT LoRA baseline)")
    factorization: str = _opt("tucker", "tucker, cp or tt (tensor-train)")
    ranks: str = _opt("8", "one rank, one per mode like 8_8_4_4 (tt: one per bond, N-1 for N modes), "
                      "or auto (needs --budget; tucker only)")
    budget: str | None = _opt(None, "adapter parameter budget for --ranks auto: a count, or lora:k (LoRA rank k's count)")
    alpha: float = _opt(8.0, "update scaling numerator (scaling = alpha / input rank)")
    dropout: float = _opt(0.0, "adapter input dropout")
    init: str = _opt("orthogonal", "factor initialisation")
    targets: str = _opt("qkv", "which linear layers to adapt: qkv (attention Q, K, V), qkvo (plus the attention output "
                        "projection) or all-linear (plus the MLP)")
    target_modules: str | None = _opt(None, "comma-separated projection names to adapt (default: per architecture)")
    init_from: str | None = _opt(None, "start from this saved tenslora adapter (e.g. tenslora compress's): its ranks, "
                                 "alpha, targets and weights (head included); --construction/--factorization must match")
    # optimisation -------------------------------------------------------------------------------
    lr: float = _opt(3e-3, "base learning rate (adapters need far more than full fine-tuning's 1e-5)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    core_lambda: float = _opt(1.0, "TensLoRA+: Tucker core learning rate = lr * core_lambda (tt: use --mode-lr per core)")
    mode_lr: str | None = _opt(None, "TensLoRA+: per-mode lr multipliers, e.g. layers=2,input=0.5")
    lora_plus_ratio: float | None = _opt(None, "LoRA+: lr of B = lr * ratio (PEFT LoRA only)")
    head_lr: float | None = _opt(None, "learning rate of the task head (default: lr)")
    batch_size: int = _opt(32, "training examples per optimizer step per process (before accumulation)")
    eval_batch_size: int = _opt(128, "examples per evaluation batch")
    grad_accum: int = _opt(1, "gradient accumulation steps")
    max_steps: int = _opt(300, "optimizer steps (0: use --epochs)")
    epochs: float = _opt(1.0, "epochs when --max-steps is 0")
    warmup_ratio: float = _opt(0.06, "fraction of the steps used for linear warmup")
    scheduler: str = _opt("cosine", "learning-rate decay after warmup: cosine, linear, constant, constant_with_warmup")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    gradient_checkpointing: bool = _opt(False, "recompute each layer's activations in backward (transformers' "
                                               "gradient_checkpointing_enable): less activation memory, more compute")
    precision: str = _opt("no", "mixed precision: no, bf16, fp16 (fp16 needs a GPU)")
    cpu: bool = _opt(False, "run on CPU even when a GPU is present")
    threads: int = _opt(0, "torch CPU threads (0: torch's default; 1 is often much faster on a busy, shared CPU)")
    # protocol -----------------------------------------------------------------------------------
    seed: int = _opt(0, "training seed (adapter init, data order, dropout)")
    data_seed: int = _opt(0, "seed of the train/validation/test split and of subsampling")
    train_samples: int | None = _opt(None, "use this many training examples (subsampled with --data-seed)")
    eval_samples: int | None = _opt(None, "use at most this many validation and test examples")
    validation_size: float | None = _opt(None, "held-out validation size when the task has none: fraction < 1 or a count")
    test_size: float | None = _opt(None, "held-out test size when the task has none: fraction < 1 or a count")
    eval_every: int = _opt(0, "evaluate on validation every N steps (0: five times per run); always at the end")
    select_metric: str | None = _opt(None, "validation metric choosing the best checkpoint (default: the task's main)")
    # outputs ------------------------------------------------------------------------------------
    output_dir: str | None = _opt(None, "run directory (default: runs/<run-name or timestamp>)")
    run_name: str | None = _opt(None, "name of the run directory under runs/")
    checkpoint_every: int = _opt(0, "write a resumable checkpoint every N steps (0: at each evaluation)")
    resume: bool = _opt(False, "continue from the run directory's last checkpoint (fresh start if none); "
                        "a finished run is left as is")
    overwrite: bool = _opt(False, "replace the finished or interrupted run in the run directory (its outputs are "
                           "removed only once the new run has loaded its data and model)")
    log_every: int = _opt(10, "log the training loss every N steps")
    monitor_every: int = _opt(0, "TensLoRA+ gradient/SVD monitor every N steps (0: off)")
    num_workers: int = _opt(0, "data-loader worker processes")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not allowed; allowed: {', '.join(SCHEDULERS)}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not allowed; allowed: {', '.join(PROBLEM_TYPES)}")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "log_every", "monitor_every", "num_workers",
                     "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("train_samples", "eval_samples", "num_labels", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("with --max-steps 0, --epochs must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.resume and not (self.output_dir or self.run_name):
            raise ValueError("--resume needs --output-dir or --run-name (the run directory to continue)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in the "
                             "run directory, --overwrite replaces it")
        if self.init_from and str(self.ranks).strip().lower() == "auto":
            raise ValueError("--init-from takes its ranks from the saved adapter; drop --ranks auto")
        if self.targets == "all-linear" and str(self.ranks).strip().lower() == "auto":
            raise ValueError("--ranks auto allocates the attention tensors' ranks only; with --targets all-linear the "
                             "MLP tensors would go over the budget. Allowed: --ranks auto with --targets qkv or qkvo, "
                             "or explicit --ranks with all-linear")
        self.mode_lr_dict()  # validate early

    # derived ------------------------------------------------------------------------------------
    def mode_lr_dict(self) -> dict[str, float] | None:
        """``"layers=2,input=0.5"`` -> ``{"layers": 2.0, "input": 0.5}``."""
        if not self.mode_lr:
            return None
        out = {}
        for part in self.mode_lr.split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            try:
                if not sep or not name.strip():
                    raise ValueError
                out[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"mode_lr {self.mode_lr!r} must look like layers=2,input=0.5") from None
        return out

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / (self.run_name or time.strftime("%Y%m%d-%H%M%S"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
