"""tenslora: tensor-factorized LoRA for transformers."""
__version__ = "0.1.0"
