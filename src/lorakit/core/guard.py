"""The burn-out guard: a stack of weighted LoRA updates with what makes stacks overcook held back.

Stacking adds each adapter's ΔW_i = w_i·s_i·B_i·A_i. Where adapters learned the same direction, the sum counts it
twice and the model overshoots ("burn-out"). The guard works on the stacked factors' SVD, never on a full matrix,
and gives factors of rank ≤ Σ r_i, so the guarded stack costs what the plain one does at inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lorakit.core.errors import LoraError
from lorakit.core.layers import delta

GUARDS = ("spectral", "shared", "norm")


@dataclass
class Part:
    """One input's contribution to one module (float64, flattened): A (r x in·k), B (out x r), scale s, weight w."""

    A: torch.Tensor
    Braw: torch.Tensor
    s: float = 1.0
    w: float = 1.0

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def B(self) -> torch.Tensor:
        """B with w·s folded in."""
        return self.Braw if self.w * self.s == 1 else self.Braw * (self.w * self.s)

    def delta(self) -> torch.Tensor:
        return delta(self.A, self.B)


def lowrank_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of B·A (B out x R, A R x in) without forming it: QR of B and Aᵀ, SVD of the R x R core."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ Uc, S, Vch @ Qa.T


def guard(parts: list[Part], method: str) -> Part:
    """A stack of weighted updates with burn-out held back, as factors of rank ≤ Σ r_i:
    - spectral: each singular value of Σ ΔW_i capped at the largest input's spectral norm;
    - shared:   each direction v_k of Σ ΔW_i gets at most the largest gain ‖ΔW_i v_k‖ any one input gives it, so a
                direction several inputs share is counted once, and directions only one input has pass unchanged;
    - norm:     Σ ΔW_i scaled down to the largest input's Frobenius norm.
    One input passes unchanged under every method."""
    if method not in GUARDS:
        raise LoraError(f"unknown guard {method!r}; choose one of {GUARDS}")
    A = torch.cat([p.A for p in parts], 0)
    B = torch.cat([p.B for p in parts], 1)
    if len(parts) == 1:
        return Part(A, B)
    U, S, Vh = lowrank_svd(A, B)
    if method == "norm":
        cap = max(float(lowrank_svd(p.A, p.B)[1].norm()) for p in parts)
        S = S * min(1.0, cap / max(float(S.norm()), 1e-300))
    elif method == "spectral":
        cap = max(float(lowrank_svd(p.A, p.B)[1][0]) for p in parts)
        S = S.clamp(max=cap)
    else:
        gains = torch.stack([(p.B @ (p.A @ Vh.T)).norm(dim=0) for p in parts])  # input x direction
        S = torch.minimum(S, gains.max(0).values)
    return Part(Vh, U * S)


def route(prompt: str, weights: dict[str, float], triggers: dict[str, list[str]]) -> dict[str, float]:
    """Prompt routing, the one method that kept stacked Dreambooth LoRAs from burning out in lorakit's measurements:
    an adapter with trigger words is active for `prompt` only when one of them occurs in it (whole words, any case);
    adapters without triggers stay active. Weight-space guards cannot help when each adapter pulls every prompt
    towards its own subject; routing applies each only where it was asked for."""
    low = prompt.lower()
    return {n: w for n, w in weights.items()
            if not triggers.get(n) or any(re.search(rf"(?<!\w){re.escape(t.lower())}(?!\w)", low) for t in triggers[n])}
