"""LoraConfig: what to adapt and how (rank, alpha, targets), as PEFT's LoraConfig names it."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from lorakit.core.errors import LoraError

BIAS_MODES = ("none", "all", "lora_only")
INITS = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_K"
FACTOR_DTYPES = ("fp32", "base")


@dataclass
class LoraConfig:
    """One adapter's settings.

    targets: a list of module names or name suffixes (``["q_proj", "v_proj"]``), a regular
    expression that must match the whole dotted name (``r".*\\.(q|v)_proj"``), or ``"all-linear"``
    (every Linear/Conv1D except the output head). ``exclude`` follows the same rules and wins.
    rank_pattern / alpha_pattern: ``{key: value}`` overrides, where key is a suffix regex of the
    module name (PEFT's rule). scale = alpha/r, or alpha/sqrt(r) with ``use_rslora``.
    init: True (A kaiming-uniform, B=0; embeddings A=0, B~N(0,1)), "gaussian" (A~N(0,1/r)),
    False (both random: a non-identity adapter, for tests), or, on Linear/Conv1D layers, "pissa" (B·A = the weight's
    top-r singular part, moved out of the base weight), "pissa_niter_K" (the same by K-iteration randomised SVD) or
    "olora" (B·A = the first r columns of W's QR factors): PEFT's inits. Those two change the base weight; saving
    writes the equivalent plain LoRA (rank 2r) for the untouched base, and delete() puts the base back.
    bias: "none", "all" (train every bias) or "lora_only" (biases of targeted layers); trained
    biases are saved with the adapter. modules_to_save: modules trained in full, one copy per adapter.
    factor_dtype: "fp32" (the factors of a bf16/fp16 base are kept in fp32, as PEFT does, so small updates are not
    rounded away; outputs keep the base dtype) or "base" (the factors take the base's dtype: half the memory).
    fast_dropout: draw dropout masks from 15-bit random numbers (4 to 5 times cheaper on CPU, where the Bernoulli draw
    costs about as much as the layer's own product; p is rounded to a multiple of 1/32768); the default draws them
    as F.dropout (and PEFT) do, so a seed gives PEFT's masks.
    use_dora: DoRA (weight-decomposed LoRA): each adapted weight also learns a magnitude per output row, as PEFT's
    use_dora; costs one W-sized sum and norm per layer and step. Not on embeddings or grouped convs.
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: bool | str = True
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=list)
    factor_dtype: Literal["fp32", "base"] = "fp32"
    fast_dropout: bool = False
    use_dora: bool = False

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise LoraError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise LoraError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        niter = isinstance(self.init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", self.init)
        if self.init not in INITS and not niter:
            raise LoraError(f"LoraConfig.init must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K a positive "
                            f"integer) or 'olora', got {self.init!r}")
        for key in ("fast_dropout", "use_dora", "use_rslora"):
            if not isinstance(getattr(self, key), bool):
                raise LoraError(f"LoraConfig.{key} must be True or False, got {getattr(self, key)!r}")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise LoraError(f"LoraConfig.factor_dtype must be 'fp32' or 'base', got {self.factor_dtype!r}")
        if not self.targets:
            raise LoraError("LoraConfig.targets is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj']")
        for pattern in [self.targets, self.exclude, *self.rank_pattern, *self.alpha_pattern]:
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise LoraError(f"LoraConfig: {pattern!r} is not a valid regular expression ({e})") from None

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """The (r, alpha) for module `name`, after rank_pattern/alpha_pattern."""
        r = self.r if (k := pattern_key(self.rank_pattern, name)) is None else self.rank_pattern[k]
        alpha = self.alpha if (k := pattern_key(self.alpha_pattern, name)) is None else self.alpha_pattern[k]
        return r, alpha

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def moves_base(init) -> bool:
    """Whether `init` (PiSSA, OLoRA) moves part of the base weight into the factors."""
    return isinstance(init, str) and init.startswith(("pissa", "olora"))


def scale(r: int, alpha: float, use_rslora: bool) -> float:
    """The LoRA scale s: alpha/r (the paper, PEFT), or alpha/sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_key(patterns: dict, name: str) -> str | None:
    """The first key of `patterns` that matches module `name` as a suffix regex (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None
