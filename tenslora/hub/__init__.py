"""Offline models: short names -> local Hugging Face directories, and the DINOv2-small ONNX import.

Importing this package is cheap (onnx / transformers are imported inside the functions).
"""
from tenslora.hub.dinov2_onnx import import_dinov2_small, verify_against_onnx
from tenslora.hub.registry import default_image_size, list_models, resolve_model_name

__all__ = ["default_image_size", "import_dinov2_small", "list_models", "resolve_model_name", "verify_against_onnx"]
