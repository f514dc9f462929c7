"""The Mistral / Mixtral decoder that training, chat and export share; usable alone (imports nothing from finetune)."""

from model.args import ARCHITECTURES, ModelArgs, MoeArgs, load_model_args, num_parameters
from model.generate import generate
from model.lora import LoRAArgs, LoRALinear, inject_lora, lora_state_dict, merge_lora
from model.loading import load_model, save_model_folder
from model.transformer import Transformer

__all__ = [
    "ARCHITECTURES",
    "LoRAArgs",
    "LoRALinear",
    "ModelArgs",
    "MoeArgs",
    "Transformer",
    "generate",
    "inject_lora",
    "load_model",
    "load_model_args",
    "lora_state_dict",
    "merge_lora",
    "num_parameters",
    "save_model_folder",
]
