"""Quantized frozen bases (QLoRA), through torchao: nn.Linear weights quantized in place to NF4 or int8.

A quantized weight is a tensor subclass that keeps the module's `weight` name and its logical shape and dtype; the
LoRA math (core/layers.py: is_quantized, dense) reads its dequantized value wherever it needs W itself (merge, DoRA
norms), and a merge puts a plain tensor in place of the quantized one (unmerge puts the quantized one back).
"""

from __future__ import annotations

import contextlib
import logging
import math

from torch import nn

from lorakit.core.errors import QUIET_LOGGERS, LoraError
from lorakit.core.layers import is_quantized
from lorakit.core.targeting import output_heads

MODES = ("nf4", "int8")


def quantize(model: nn.Module, mode: str, skip=()) -> nn.Module:
    """Quantize in place the weights of the model's nn.Linear layers to `mode` ("nf4": 4-bit NormalFloat in blocks of
    64, "int8": per-row int8), frozen; output heads and the modules `skip` names (a name or dotted suffix) stay."""
    if mode not in MODES:
        raise LoraError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    kept = output_heads(model)
    with _quiet():
        to_nf4, quantize_, Int8WeightOnlyConfig = _torchao()
        for name, m in list(model.named_modules()):
            if (type(m) is not nn.Linear or is_quantized(m.weight) or name in kept
                    or any(name == s or name.endswith("." + s) for s in skip)):
                continue
            if mode == "int8":
                quantize_(m, Int8WeightOnlyConfig())
            elif m.weight.numel() % 64 == 0:  # NF4 blocks; a layer of another size stays as it is
                w = m.weight.detach().contiguous()
                m.weight = nn.Parameter(to_nf4(w, 64, math.gcd(w.numel() // 64, 256)), requires_grad=False)
    return model


@contextlib.contextmanager
def _quiet():
    """torchao's logs below errors (errors.QUIET_LOGGERS) within quantize() only, for library users."""
    loggers = [logging.getLogger(n) for n in QUIET_LOGGERS]
    levels = [g.level for g in loggers]
    for g in loggers:
        g.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for g, level in zip(loggers, levels):
            g.setLevel(level)


def _torchao():
    """torchao's NF4 and int8 weight-only entry points, imported on first use."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        try:
            from torchao.quantization import to_nf4
        except ImportError:  # older torchao
            from torchao.dtypes import to_nf4
    except ImportError as e:
        raise LoraError(f"quantizing the base needs torchao ({e}): pip install 'lorakit[quant]'") from None
    return to_nf4, quantize_, Int8WeightOnlyConfig
