"""lorakit: LoRA (Hu et al. 2021) for any PyTorch model.

    cfg = lorakit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
    lorakit.inject(model, cfg)                 # W' = W + (alpha/r)·B·A, only A and B train
    lorakit.save(model, "adapter.safetensors")
    lorakit.load(base, "adapter.safetensors", name="style")
    lorakit.set_weights(base, {"style": 0.8, "blur": -0.5})
    lorakit.merge(base); lorakit.unmerge(base); lorakit.unload(base, merge=True)
    lorakit.prepare_hotswap(base, max_rank=16); fast = torch.compile(base)   # later loads/swaps: no recompile
    with lorakit.per_row(base, ["style", None, {"style": 0.5, "blur": 1}]): base(batch)   # serving: a set per row
    lorakit.combine([(lorakit.read(f1)[0], 1.0), (lorakit.read(f2)[0], -0.5)], method="cat")  # and resize, extract
"""

from lorakit.algebra import combine, extract, resize
from lorakit.analysis import analyze
from lorakit.core.config import LoraConfig
from lorakit.core.errors import LoraError
from lorakit.core.layers import LoraLayer, SavedModule
from lorakit.core.model import (active, adapters, delete, disabled, inject, merge, per_row, prepare_hotswap,
                                set_rows, set_weights, summary, unload, unmerge)
from lorakit.formats.adapter import Adapter, ModuleLora
from lorakit.formats.io import load, read, save
from lorakit.merged import merge_into

__version__ = "0.1.0"

__all__ = [
    "Adapter", "LoraConfig", "LoraError", "LoraLayer", "ModuleLora", "SavedModule", "active", "adapters", "analyze",
    "combine", "delete", "disabled", "extract", "inject", "load", "merge", "merge_into", "per_row", "prepare_hotswap",
    "read", "resize", "save", "set_rows", "set_weights", "summary", "unload", "unmerge",
]
