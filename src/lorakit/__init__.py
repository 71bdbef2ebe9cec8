"""lorakit: LoRA (Hu et al. 2021) for any PyTorch model.

    cfg = lorakit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
    lorakit.inject(model, cfg)                 # W' = W + (alpha/r)·B·A, only A and B train
    lorakit.save(model, "adapter.safetensors")
    lorakit.load(base, "adapter.safetensors", name="style")
    lorakit.set_weights(base, {"style": 0.8, "blur": -0.5})
    lorakit.merge(base); lorakit.unmerge(base); lorakit.unload(base, merge=True)
"""

from .adapter import Adapter, ModuleLora
from .config import LoraConfig
from .errors import LoraError
from .io import load, read, save
from .layers import LoraLayer, SavedModule
from .model import (active, adapters, delete, disabled, inject, merge, set_weights, summary, unload,
                    unmerge)

__version__ = "0.1.0"

__all__ = [
    "Adapter", "LoraConfig", "LoraError", "LoraLayer", "ModuleLora", "SavedModule", "active", "adapters",
    "delete", "disabled", "inject", "load", "merge", "read", "save", "set_weights", "summary", "unload",
    "unmerge",
]
