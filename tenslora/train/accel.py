"""The HF Accelerate side: one Accelerator for CPU, one GPU or many; memory and RNG bookkeeping."""
from __future__ import annotations

import os
import random
import resource
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from accelerate import Accelerator


def use_cpu(cfg) -> bool:
    """``--cpu``, or several processes launched (torchrun / accelerate launch) on a machine without
    CUDA: Accelerate only forms a multi-CPU (gloo) group when told ``cpu=True``."""
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    return bool(cfg.cpu or (launched and not torch.cuda.is_available()))


def build_accelerator(cfg) -> Accelerator:
    """``--precision fp16`` needs CUDA (loss scaling); ``bf16`` autocasts on CPU and GPU."""
    cpu = use_cpu(cfg)
    cuda = torch.cuda.is_available() and not cpu
    if cfg.precision == "fp16" and not cuda:
        raise ValueError("--precision fp16 needs a CUDA GPU; on CPU use --precision bf16 or no")
    if cfg.precision == "bf16" and not cuda:
        warnings.warn("bf16 autocast on CPU is supported but often slower than fp32", stacklevel=2)
    return Accelerator(mixed_precision=cfg.precision, cpu=cpu)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, else this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_time_s() -> float:
    """CPU seconds used by this process (user + system): on a shared CPU, a fairer cost than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def seeded_rng(seed: int):
    """Seed torch (CPU and CUDA), numpy and ``random`` for the block; restore the caller's states after.

    A run then draws its dropout masks from its own seed, whatever ran before it in the process."""
    saved = rng_state()
    try:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield
    finally:
        set_rng_state(saved)
