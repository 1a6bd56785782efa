"""tenslora: tensor-factorized LoRA (TensLoRA) and heterogeneous allocation (TensLoRA+)."""
from tenslora.api import get_adapted_model, load_adapted_model
from tenslora.config import TensLoRAConfig
from tenslora.constructions import CONSTRUCTIONS
from tenslora.lora import LoraModel
from tenslora.model import TensLoRAModel
from tenslora.params import predict_adapter_parameters

__version__ = "0.1.0"
__all__ = ["CONSTRUCTIONS", "LoraModel", "TensLoRAConfig", "TensLoRAModel", "get_adapted_model",
           "load_adapted_model", "predict_adapter_parameters"]
