"""Factorized tensors in pure torch: mode-n algebra, Tucker, CP and tensor-train (no transformers import)."""
from tenslora.tensor.algebra import fold, khatri_rao, mode_dot, multi_mode_dot, stacked_mode_dot, unfold
from tenslora.tensor.factorized import CP, FACTORIZATIONS, FactorizedTensor, TensorTrain, Tucker

__all__ = ["fold", "khatri_rao", "mode_dot", "multi_mode_dot", "stacked_mode_dot", "unfold",
           "CP", "FACTORIZATIONS", "FactorizedTensor", "TensorTrain", "Tucker"]
