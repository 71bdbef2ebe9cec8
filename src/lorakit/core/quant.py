"""Quantized frozen bases (QLoRA): which weights are quantized, and their plain (dequantized) value.

A quantized weight is a tensor subclass that keeps the module's `weight` name and its logical shape and dtype; the
LoRA math reads `dense(w)` wherever it needs W itself (merge, DoRA norms), and a merge puts a plain tensor in place
of the quantized one (unmerge puts the quantized one back).
"""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(w: torch.Tensor) -> bool:
    """Whether `w` is a quantized weight (a tensor subclass), rather than a plain tensor or Parameter."""
    return type(w) not in (torch.Tensor, nn.Parameter)


def dense(w: torch.Tensor) -> torch.Tensor:
    """`w` as a plain tensor of its logical shape and dtype: dequantized when it is quantized."""
    return w.dequantize() if is_quantized(w) else w
