"""LoRA layers: the LoRA math, in one place.

A targeted module keeps its object, its class's forward and its parameter names: lorakit swaps
its class for a subclass that adds the low-rank update (so ``q_proj.weight`` stays
``q_proj.weight``, a base checkpoint still loads, and ``isinstance(m, nn.Linear)`` still holds).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import moves_base
from lorakit.core.errors import LoraError

# What lorakit can adapt: "linear" (nn.Linear), "conv1d_t" (transformers' GPT-2 Conv1D, weight
# stored in x out), "embedding" (nn.Embedding) and "conv" (nn.Conv1d/2d/3d).
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_FUSED = True  # linear layers run base + LoRA as one autograd node (_LoraLinear); False: the reference path


def use_fast(enabled: bool = True):
    """Choose the fused path for linear layers (the default) or the reference path (dropout, then two F.linear, as
    PEFT computes): the same results (same dropout masks from the same seed) at a higher cost; tests compare them."""
    global _FUSED
    _FUSED = bool(enabled)


def is_quantized(w: torch.Tensor) -> bool:
    """Whether `w` is a quantized weight (a tensor subclass), rather than a plain tensor or Parameter."""
    return type(w) not in (torch.Tensor, nn.Parameter)


def dense(w: torch.Tensor) -> torch.Tensor:
    """`w` as a plain tensor of its logical shape and dtype: dequantized when it is quantized (torchao's NF4Tensor
    names that get_original_weight; its dequantize is a static helper)."""
    if not is_quantized(w):
        return w
    return w.get_original_weight() if hasattr(w, "get_original_weight") else w.dequantize()


def kind_of(module: nn.Module) -> str | None:
    """The LoRA kind of a module, or None when lorakit cannot adapt it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf"):
        return "conv1d_t"
    return None


def delta(A: torch.Tensor, B: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """B·A as an (out x in·k) matrix, for factors in nn.Linear orientation (conv kernels flattened): the one place
    the product of the factors is formed. A grouped conv's ΔW is block-diagonal over its groups."""
    if groups == 1:
        return B.flatten(1) @ A.flatten(1)
    Bg = B.reshape(groups, B.shape[0] // groups, B.shape[1])
    Ag = A.reshape(groups, A.shape[0] // groups, -1)
    return torch.bmm(Bg, Ag).reshape(B.shape[0], -1)


def factor_shapes(module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B for a rank-r adapter on `module` (a plain or lorakit layer)."""
    w, kind = module.weight, kind_of(module)
    if kind == "linear":
        return (r, w.shape[1]), (w.shape[0], r)
    if kind in ("conv1d_t", "embedding"):
        return (r, w.shape[0]), (w.shape[1], r)
    g = module.groups
    if r % g:
        raise LoraError(f"rank {r} is not divisible by the conv's groups={g}; choose a multiple of {g}")
    return (r, *w.shape[1:]), (w.shape[0], r // g, *[1] * (w.dim() - 2))


class LoraLayer(nn.Module):
    """Adds weighted low-rank updates to a frozen base layer.

    For each adapter i with A_i (r_i x in), B_i (out x r_i), scale s_i and weight w_i:
        W' = W + sum_i w_i * s_i * B_i @ A_i          (Conv1D, Embedding: the transpose)
        y  = base(x) + (dropout(x) @ A^T) @ B^T       with A = [A_1; A_2; ...], B = [w_1 s_1 B_1, ...]
    so any set of active adapters costs one pair of matrix products. Conv: A is a conv with the base
    kernel, stride, padding, dilation, padding mode and groups (r % groups == 0) and B a 1x1 conv
    with the same groups, so the update is itself a conv of W's shape and merges exactly.
    Embedding: A (r x num), B (dim x r), y = E[x] + s * A^T[x] @ B^T; no dropout on indices.
    DoRA (Liu et al. 2024, PEFT's numerics): an adapter with a magnitude m changes the weight to g⊙(W + s·B·A),
    where g = m / ‖W + s·B·A‖ per output row (PEFT; LyCORIS's dora_scale: per input column) and the norm is
    detached; at weight w it adds w·(g⊙(W + s·B·A) − W), so weights and stacks mean what they mean for LoRA.
    Serving: per-row sets (model.set_rows): rows sharing a set form a group, and a linear layer runs one pair of
    batched products for all its groups, over slots that keep each set's factors while they are unchanged.
    Speed: a plain nn.Linear runs base and update as one autograd node (_LoraLinear), tested against the reference
    path above (use_fast(False)); after prepare_hotswap the layer reads fixed-shape factors that swaps overwrite.
    """

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict

    def lora_setup(self):
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters' m
        self.lora_dora_axis: dict[str, str] = {}  # "out" (PEFT) or "in" (LyCORIS dora_scale)
        self.lora_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA: A0, B0 moved out of W
        self.lora_gain_cache: dict[str, tuple] = {}  # DoRA's g at inference, with what it was computed from
        self.lora_kind = kind_of(self)
        self.lora_alpha: dict[str, float] = {}
        self.lora_scale: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.lora_fast_dropout: dict[str, bool] = {}  # dropout masks from 15-bit random numbers (dropout_draw)
        self.lora_weights: dict[str, float] = {}  # the active adapters and their weights
        self.lora_merged: dict[str, float] = {}  # the adapters merge() added to the weight
        self.lora_premerge: torch.Tensor | None = None  # the weight as merge() found it, for an exact unmerge
        self.lora_guarded: tuple[torch.Tensor, torch.Tensor] | None = None  # guarded factors of lora_weights
        self.lora_rows: tuple | None = None  # per-row adapter sets, from lora_route
        self.lora_slots: dict[tuple, tuple[int, tuple]] = {}  # adapter set -> (slot, stamp), most recent last
        self.lora_slot_A: torch.Tensor | None = None  # (slots, R, in): each slot's A, zero-padded to rank R
        self.lora_slot_B: torch.Tensor | None = None  # (slots, R, out): each slot's (w·s·B)ᵀ
        self.disabled = False
        self._lora_hook = self.register_load_state_dict_post_hook(_adapter_keys_optional)

    # --- initialisation -------------------------------------------------------------------------
    def lora_add(self, name: str, r: int, alpha: float, scale: float, dropout: float = 0.0, init=True,
                 factor_dtype: str = "fp32", fast_dropout: bool = False, dora: str | None = None):
        """Create adapter `name` (rank r) in this layer; it starts inactive. Its factors are fp32 on a half-precision
        base unless factor_dtype="base" (as PEFT: half-precision factors round away small updates in training).
        dora="out"|"in": a DoRA adapter whose magnitude starts at ‖W + s·B·A‖ along that axis."""
        if dora and (self.lora_kind == "embedding" or getattr(self, "groups", 1) > 1):
            what = "an embedding" if self.lora_kind == "embedding" else "a grouped conv"
            raise LoraError(f"DoRA is not supported on {what} layer; exclude it from the targets or train plain LoRA")
        a_shape, b_shape = factor_shapes(self, r)
        dtype = self.weight.dtype
        if factor_dtype == "fp32" and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        kw = dict(device=self.weight.device, dtype=dtype)
        A, B = torch.empty(a_shape, **kw), torch.empty(b_shape, **kw)
        with torch.no_grad():
            if self.lora_kind == "embedding":
                nn.init.zeros_(A) if init else nn.init.normal_(A)
                nn.init.normal_(B)
            else:
                if init == "gaussian":
                    nn.init.normal_(A, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(B) if init else nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_slots = {}
        self.lora_alpha[name] = alpha
        self.lora_scale[name] = scale
        self.lora_dropout[name] = 0.0 if self.lora_kind == "embedding" else dropout
        self.lora_fast_dropout[name] = fast_dropout
        if moves_base(init):
            self.lora_principal(name, init, scale)
        if dora:
            self.lora_dora_axis[name] = dora
            with torch.no_grad():
                self.lora_magnitude[name] = nn.Parameter(self.lora_norm(name, self.lora_dora_V(name)).to(dtype))

    @torch.no_grad()
    def lora_principal(self, name: str, init: str, scale: float):
        """PiSSA / OLoRA (PEFT's numerics): A and B start as the weight's principal part, top-r SVD (split as
        √S on each side) or the first r columns of QR, divided by the scale, and W keeps the residual W − s·B·A;
        A0 and B0 are kept for saving (and delete) on the untouched base. Plain Linear/Conv1D weights only
        (add_adapter checks)."""
        A, B, r = self.lora_A[name], self.lora_B[name], self.lora_A[name].shape[0]
        W = self.weight.float() if self.lora_kind == "linear" else self.weight.float().T  # (out, in)
        if init == "olora":
            Q, R = torch.linalg.qr(W)
            A0, B0 = R[:r], Q[:, :r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                U, S, V = torch.svd_lowrank(W, r, niter=int(init.split("_niter_")[1]))
                Vh = V.T
            S = S / scale
            A0, B0 = torch.diag(S.sqrt()) @ Vh, U @ torch.diag(S.sqrt())
        A.copy_(A0)
        B.copy_(B0)
        self.lora_init[name] = (A.detach().clone(), B.detach().clone())
        self.weight.sub_(self.lora_lowrank({name: 1.0}).to(self.weight.dtype))

    @torch.no_grad()
    def lora_unresidual(self, name: str):
        """Give back to W what lora_principal moved out of it (s·B0·A0): the base as it was before the adapter."""
        if name in self.lora_init:
            A0, B0 = self.lora_init.pop(name)
            D = delta(A0, B0) * self.lora_scale[name]
            self.weight.add_((D if self.lora_kind == "linear" else D.T).to(self.weight.dtype))

    def lora_names(self) -> list[str]:
        return list(self.lora_A)

    def lora_remove(self, name: str):
        self.lora_unresidual(name)
        for d in (self.lora_A, self.lora_B):
            del d[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        for d in (self.lora_alpha, self.lora_scale, self.lora_dropout, self.lora_fast_dropout, self.lora_weights,
                  self.lora_dora_axis):
            d.pop(name, None)
        self.lora_guarded = None
        self.lora_slots = {}

    # --- the math ------------------------------------------------------------------------------
    def lora_factors(self, weights: dict[str, float], dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of the weighted sum of `weights`' adapters, stacked along the rank (w·s folded into B); the
        guarded factors instead when set_weights gave a guard for this set."""
        if self.lora_guarded is not None and weights == self.lora_weights:
            return tuple(t.to(dtype) for t in self.lora_guarded)
        A = [self.lora_A[n].to(dtype) for n in weights]
        B = [b if (c := w * self.lora_scale[n]) == 1 else b * c
             for n, w in weights.items() for b in [self.lora_B[n].to(dtype)]]
        if len(A) == 1:
            return A[0], B[0]
        if self.lora_kind == "conv" and self.groups > 1:  # keep each group's rank rows together
            g = self.groups
            A = [a.reshape(g, a.shape[0] // g, *a.shape[1:]) for a in A]
            return torch.cat(A, 1).flatten(0, 1), torch.cat(B, 1)
        return torch.cat(A, 0), torch.cat(B, 1)

    def lora_delta(self, weights: dict[str, float]) -> torch.Tensor:
        """ΔW in the layout of `self.weight` (fp32 for half-precision bases): Σ w·s·B·A, and for a DoRA adapter
        w·(g⊙(W + s·B·A) − W)."""
        plain = {n: w for n, w in weights.items() if n not in self.lora_magnitude}
        D = self.lora_lowrank(plain) if plain else None
        for n in weights.keys() - plain.keys():
            V = self.lora_dora_V(n)
            Dn = weights[n] * (self.lora_gain(n, V, weight_layout=True) * V - dense(self.weight).to(V.dtype))
            D = Dn if D is None else D + Dn
        return D

    def lora_lowrank(self, weights: dict[str, float]) -> torch.Tensor:
        """Σ w·s·B·A in the layout of `self.weight` (computed in fp32 for half-precision bases)."""
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        A, B = self.lora_factors(weights, torch.float32 if half else None)
        if self.lora_kind in ("conv1d_t", "embedding"):
            return delta(A, B).T
        return delta(A, B, getattr(self, "groups", 1)).reshape(self.weight.shape)

    # --- DoRA ----------------------------------------------------------------------------------
    def lora_dora_dim(self, name: str) -> int:
        """The dimension of `self.weight` that DoRA adapter `name`'s magnitude runs along."""
        out_dim = 1 if self.lora_kind == "conv1d_t" else 0
        return out_dim if self.lora_dora_axis[name] == "out" else 1 - out_dim

    @torch.no_grad()
    def lora_dora_V(self, name: str) -> torch.Tensor:
        """W + s·B·A of adapter `name` in the layout of `self.weight`, detached (fp32 for half-precision bases)."""
        D = self.lora_lowrank({name: 1.0})
        return dense(self.weight).to(D.dtype) + D

    def lora_norm(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """‖V‖ along the magnitude's axis: a vector with one entry per output (or input) channel."""
        d = self.lora_dora_dim(name)
        return torch.linalg.vector_norm(V, dim=[i for i in range(V.dim()) if i != d])

    def lora_gain(self, name: str, V: torch.Tensor | None = None, weight_layout: bool = False) -> torch.Tensor:
        """g = m / ‖W + s·B·A‖, the norm detached (DoRA §4.3, as PEFT): shaped to scale the weight along its axis,
        or the channels of an activation (the last dim; conv: dim 1)."""
        g = self.lora_magnitude[name] / self.lora_norm(name, self.lora_dora_V(name) if V is None else V)
        if weight_layout:
            shape = [1] * self.weight.dim()
            shape[self.lora_dora_dim(name)] = -1
            return g.view(shape)
        return g.view(-1, *[1] * (self.weight.dim() - 2)) if self.lora_kind == "conv" else g

    def lora_base(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The base layer's product of x with weight W, without bias (what DoRA rescales)."""
        if self.lora_kind == "linear":
            return F.linear(x, W)
        if self.lora_kind == "conv1d_t":
            return x @ W
        return self._conv_forward(x, W, None)

    def lora_dora_update(self, x: torch.Tensor, name: str, w: float, base: torch.Tensor | None = None) -> torch.Tensor:
        """What DoRA adapter `name` at weight w adds to base(x): w·(x·(g⊙(W + s·B·A))ᵀ − x·Wᵀ), computed as PEFT
        does, (g − 1)⊙(x·Wᵀ) + g⊙(s·B·A·x) (magnitude per output), or from g⊙x (per input), on dropout(x).
        `base`: the layer's output base(x), whose x·Wᵀ is reused when there is no dropout."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.lora_scale[name]
        p = self.lora_dropout[name] if self.training else 0.0
        if base is not None and not p and self.lora_dora_axis[name] == "out":
            xW = base if self.bias is None else base - (self.bias.view(-1, *[1] * (base.dim() - 2))
                                                         if self.lora_kind == "conv" else self.bias)
        else:
            xW = None
        if p:
            x = x * dropout_draw(x, p, True)[1] if self.lora_fast_dropout[name] else F.dropout(x, p, training=True)
        x = x.to(A.dtype) if x.is_floating_point() else x
        if torch.is_grad_enabled():
            g = self.lora_gain(name)
        else:  # inference (generation): g is kept while the factors, magnitude, scale and weight stay the same
            m = self.lora_magnitude[name]
            key = tuple(v for t in (A, B, m, self.weight) for v in (t._version, t.data_ptr())) + (s,)
            hit = self.lora_gain_cache.get(name)
            if hit is None or hit[0] != key:
                hit = self.lora_gain_cache[name] = (key, self.lora_gain(name))
            g = hit[1]
        if self.lora_dora_axis[name] == "out":
            xW = self.lora_base(x, dense(self.weight).to(A.dtype)) if xW is None else xW.to(A.dtype)
            u = (g - 1) * xW + g * self.lora_apply(x, A, B) * s
        else:
            u = self.lora_base((g - 1) * x, dense(self.weight).to(A.dtype)) + self.lora_apply(g * x, A, B) * s
        return u if w == 1 else u * w

    def lora_update(self, x: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
        """The output added to base(x) by the adapters in `weights`."""
        return self.lora_apply(x, *self.lora_factors(weights))

    def lora_apply(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """(x·Aᵀ)·Bᵀ for this layer's kind: the two products of every LoRA update."""
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.lora_kind in ("linear", "conv1d_t"):
            return F.linear(F.linear(x, A), B)
        if self.lora_kind == "embedding":
            h = F.embedding(x, A.T, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
            y = F.linear(h, B)
            return y * self.embed_scale.to(y.dtype) if hasattr(self, "embed_scale") else y
        conv = _CONV_FN[self.weight.dim() - 2]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        h = conv(x, A, None, self.stride, padding, self.dilation, self.groups)
        return conv(h, B, None, 1, 0, 1, self.groups)

    def forward(self, x, *args, **kwargs):
        if self.disabled or self.lora_merged:
            return super().forward(x, *args, **kwargs)
        if self.lora_rows is not None:
            return self.lora_rows_update(x, super().forward(x, *args, **kwargs))
        if is_hot(self):  # before reading lora_weights: no Python state that a swap changes, so a compiled graph holds
            A, B = self.lora_hot_A, self.lora_hot_B
            if not args and not kwargs and self.lora_fusable(x):
                return _LoraLinear.apply(x, self.weight, self.bias, A, B, 1.0, None, None, 0.0)
            y = super().forward(x, *args, **kwargs)
            return y + self.lora_apply(x, A, B).to(y.dtype)
        weights = self.lora_weights
        if self.lora_magnitude and (dora := [n for n in weights if n in self.lora_magnitude]):
            plain = {n: w for n, w in weights.items() if n not in dora}
            y = self.lora_forward(x, plain, *args, **kwargs)
            base = None if plain or args or kwargs else y  # x·Wᵀ + b, which DoRA can reuse (as PEFT does)
            for n in dora:
                y = y + self.lora_dora_update(x, n, weights[n], base).to(y.dtype)
            return y
        return self.lora_forward(x, weights, *args, **kwargs)

    def lora_forward(self, x, weights: dict[str, float], *args, **kwargs):
        """base(x) plus the plain (non-DoRA) adapters of `weights`: one fused node when it can, else the reference
        path (dropout, then two products per dropout rate)."""
        if not weights:
            return super().forward(x, *args, **kwargs)
        by_dropout: dict[tuple, dict[str, float]] = {}
        for n, w in weights.items():
            p = self.lora_dropout[n] if self.training else 0.0
            by_dropout.setdefault((p, p > 0 and self.lora_fast_dropout[n]), {})[n] = w
        if len(by_dropout) == 1 and not args and not kwargs and self.lora_fusable(x):
            (p, fast), group = next(iter(by_dropout.items()))
            if len(group) == 1 and self.lora_guarded is None:  # w·s applied to the product, not copied into B
                (n, w), = group.items()
                A, B, c = self.lora_A[n], self.lora_B[n], w * self.lora_scale[n]
            else:
                (A, B), c = self.lora_factors(group), 1.0
            keep, noise = dropout_draw(x, p, fast) if p else (None, None)
            return _LoraLinear.apply(x, self.weight, self.bias, A, B, c, keep, noise, drop_rate(p, fast))
        y = super().forward(x, *args, **kwargs)
        for (p, fast), group in by_dropout.items():
            xi = (x * dropout_draw(x, p, True)[1] if fast else F.dropout(x, p, training=True)) if p else x
            y = y + self.lora_update(xi, group).to(y.dtype)
        return y

    def lora_fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused path computes exactly what the reference path would: a plain nn.Linear base, floating
        input of the weight's dtype, no autocast (whose casts the reference path gets from F.linear)."""
        return (_FUSED and self.lora_kind == "linear" and type(self).__mro__[2].forward is nn.Linear.forward
                and x.dtype == self.weight.dtype and not torch.is_autocast_enabled(x.device.type))

    @torch.no_grad()
    def lora_hot_write(self, rank: int | None = None):
        """Write the active set's A and w·s·B into the hot-swap factors, zero-padded to their rank (created with
        `rank` when given): in place, so a compiled graph that reads them stays valid (prepare_hotswap)."""
        A, B = self.lora_factors(self.lora_weights) if self.lora_weights else (None, None)
        if rank is not None:
            a_shape, b_shape = factor_shapes(self, rank)
            dtype = next(iter(self.lora_A.values())).dtype if len(self.lora_A) else \
                torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
            kw = dict(device=self.weight.device, dtype=dtype)
            self.register_buffer("lora_hot_A", torch.zeros(a_shape, **kw), persistent=False)
            self.register_buffer("lora_hot_B", torch.zeros(b_shape, **kw), persistent=False)
        hot_A, hot_B = self.lora_hot_A, self.lora_hot_B
        r = 0 if A is None else A.shape[0]
        if r > hot_A.shape[0]:
            raise LoraError(f"the active adapters have rank {r} here, more than the {hot_A.shape[0]} prepare_hotswap "
                            "made room for; call prepare_hotswap with a larger max_rank before compiling")
        if r:
            hot_A[:r], hot_B[:, :r] = A, B
        hot_A[r:], hot_B[:, r:] = 0, 0

    def lora_route(self, n: int, groups: list[tuple[list[int], tuple]], shared: dict | None = None):
        """Give each group of a batch's n rows its adapter set (model.set_rows). Linear layers with several groups
        run them as one pair of batched products over slots holding each set's factors (kept while unchanged, as
        vLLM's LoRA slots, so a batch that changes by one request writes one slot); layers with the same groups
        share their index tensors through `shared`. A set is a sorted tuple of (name, weight)."""
        own = self.lora_A._parameters  # (a plain dict: module lookups are slow, and this runs at every batch change)
        here = [(rows, ws) for rows, key in groups if (ws := key if all(k in own for k, _ in key) else
                                                       tuple(kw for kw in key if kw[0] in own))]
        dev = self.weight.device
        if len(here) > 1 and self.lora_kind in ("linear", "conv1d_t"):
            shared = {} if shared is None else shared
            key = tuple(tuple(rows) for rows, _ in here)
            if key not in shared:
                size = max(len(rows) for rows in key)
                index = [r for rows in key for r in rows + rows[:1] * (size - len(rows))]  # spare slots repeat a row
                kept = [g * size + i for g, rows in enumerate(key) for i in range(len(rows))]
                shared[key] = (torch.tensor(index, device=dev),
                               torch.tensor(kept, device=dev) if len(kept) < len(index) else None,
                               torch.tensor([r for rows in key for r in rows], device=dev))
            if self.lora_slot_A is not None and (self.lora_slot_A.device != dev or (
                    self.lora_slot_A.is_inference() and not torch.is_inference_mode_enabled())):
                self.lora_slots, self.lora_slot_A, self.lora_slot_B = {}, None, None  # moved, or read-only here
            keep = {ws for _, ws in here}
            factors = (own, self.lora_B._parameters)
            used = torch.tensor([self.lora_slot(ws, keep, factors) for _, ws in here], device=dev)
            self.lora_rows = (n, [], (*shared[key], self.lora_slot_A.index_select(0, used),
                                      self.lora_slot_B.index_select(0, used)))
        else:
            self.lora_rows = (n, [(slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 else
                                   torch.tensor(rows, device=dev), *self.lora_factors(dict(ws))) for rows, ws in here],
                              None)

    def lora_slot(self, key: tuple, keep: set, factors: tuple[dict, dict] | None = None) -> int:
        """The slot holding this set's A and (w·s·B)ᵀ, written when the set is new or its factors changed; the least
        recently used slot outside `keep` is reused, and the slots grow (in number or rank) when none is free.
        `factors`: the A and B parameter dicts, when the caller has them at hand."""
        As, Bs = factors or (self.lora_A._parameters, self.lora_B._parameters)
        stamp = tuple(x for k, _ in key for x in (As[k]._version, Bs[k]._version, As[k].data_ptr(), Bs[k].data_ptr()))
        if self.lora_guarded is not None and dict(key) == self.lora_weights:
            stamp += (id(self.lora_guarded[0]),)
        hit = self.lora_slots.pop(key, None)
        if hit is not None and hit[1] == stamp:
            self.lora_slots[key] = hit  # now the most recent
            return hit[0]
        A, B = self.lora_factors(dict(key))
        slots, R = (0, 0) if self.lora_slot_A is None else self.lora_slot_A.shape[:2]
        if hit is not None:
            slot = hit[0]
        elif len(self.lora_slots) < slots:
            slot = min(set(range(slots)) - {s for s, _ in self.lora_slots.values()})
        elif old := next((k for k in self.lora_slots if k not in keep), None):
            slot = self.lora_slots.pop(old)[0]
        else:
            slot = slots
        if slot >= slots or A.shape[0] > R:  # grow: twice the slots, or the new rank
            grown = max(slots, 4) * (2 if slot >= slots else 1), max(R, A.shape[0])
            newA, newB = A.new_zeros(grown[0], grown[1], A.shape[1]), B.new_zeros(grown[0], grown[1], B.shape[0])
            if slots:
                newA[:slots, :R], newB[:slots, :R] = self.lora_slot_A, self.lora_slot_B
            self.lora_slot_A, self.lora_slot_B = newA, newB
        r = A.shape[0]
        self.lora_slot_A[slot, :r], self.lora_slot_B[slot, :r] = A, B.T
        self.lora_slot_A[slot, r:], self.lora_slot_B[slot, r:] = 0, 0
        self.lora_slots[key] = (slot, stamp)
        return slot

    def lora_rows_update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row adapter sets (serving): y, computed once for the whole batch, gets each group's update added in
        place without dropout: one pair of batched products for all groups of a linear layer (each group's rows
        gathered, as segmented gather kernels do), else one pair per group (a slice when its rows are contiguous)."""
        n, groups, stacked = self.lora_rows
        if x.shape[0] != n:
            raise LoraError(f"the batch has {x.shape[0]} rows but per-row adapter sets were given for {n}; give one "
                            "set per row (expanded batches such as beams or num_return_sequences included)")
        if stacked is not None:
            index, kept, rows, A, Bt = stacked
            G, d = A.shape[0], x.shape[-1]
            xs = x.reshape(n, -1, d).index_select(0, index).to(A.dtype)  # (G·size, T, in)
            u = torch.bmm(torch.bmm(xs.reshape(G, -1, d), A.transpose(1, 2)), Bt).reshape(len(index), -1, Bt.shape[-1])
            u = u if kept is None else u.index_select(0, kept)
            y.view(n, -1, y.shape[-1]).index_add_(0, rows, u.to(y.dtype))
            return y
        for rows, A, B in groups:
            if isinstance(rows, slice):
                y[rows] += self.lora_apply(x[rows], A, B).to(y.dtype)
            else:
                y.index_add_(0, rows, self.lora_apply(x.index_select(0, rows), A, B).to(y.dtype))
        return y

    # --- merging -------------------------------------------------------------------------------
    def lora_merged_weight(self) -> torch.Tensor:
        """What merge() would set the weight to: W + ΔW of the active adapters (W dequantized)."""
        W = dense(self.weight)
        return W + self.lora_delta(self.lora_weights).to(W.dtype)

    @torch.no_grad()
    def lora_merge(self, new_weight: torch.Tensor | None = None):
        """Set the weight to W + ΔW, keeping a copy of W (one weight's memory) so that unmerge is exact. A quantized
        W is replaced by a plain merged weight, and kept as it was for unmerge."""
        if self.lora_merged or not self.lora_weights:
            return
        new_weight = self.lora_merged_weight() if new_weight is None else new_weight
        if is_quantized(self.weight):
            self.lora_premerge = self.weight
            self.weight = nn.Parameter(new_weight.detach().clone(), requires_grad=False)
        else:
            self.lora_premerge = self.weight.detach().clone()
            self.weight.copy_(new_weight)
        self.lora_merged = dict(self.lora_weights)

    @torch.no_grad()
    def lora_unmerge(self):
        """Put back the weight merge() found, bit for bit: subtracting ΔW again would round (half precision) and
        would be wrong once the factors changed."""
        if self.lora_merged:
            if is_quantized(self.lora_premerge):
                self.weight = self.lora_premerge
            else:
                self.weight.copy_(self.lora_premerge)
            self.lora_merged, self.lora_premerge = {}, None

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.lora_A[n].shape[0]} s={self.lora_scale[n]:g}"
                             f"{' dora' if n in self.lora_magnitude else ''}" for n in self.lora_A)
        return f"{super().extra_repr()}, lora={{{adapters}}}, active={self.lora_weights}"


def dropout_draw(x: torch.Tensor, p: float, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A dropout draw for x: which elements it keeps (uint8 0/1, one byte each, what backward keeps) and the factor
    x is multiplied by (keep / (1 - p), in x's dtype). Exact: torch's own Bernoulli draw, so the factor equals
    F.dropout's from the same seed, bit for bit. Fast (LoraConfig.fast_dropout): 15-bit random numbers, four per
    64-bit draw (4 to 5 times cheaper on CPU), p rounded to a multiple of 1/32768."""
    if not fast:
        noise = torch.empty_like(x).bernoulli_(1 - p)
        return noise.bool().view(torch.uint8), noise.div_(1 - p)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
    keep = bits.bitwise_and_(0x7FFF).ge_(fast_drop_level(p)).to(torch.uint8).view(x.shape)
    return keep, dropout_noise(keep, drop_rate(p, True), x.dtype)


def fast_drop_level(p: float) -> int:
    """The 15-bit threshold of fast dropout: an element is dropped with probability level/32768 (≈ p)."""
    return round(p * 32768)


def drop_rate(p: float, fast: bool) -> float:
    """The probability with which an element is dropped: p, or p rounded to 1/32768 for fast dropout."""
    return fast_drop_level(p) / 32768 if fast else p


def dropout_noise(keep: torch.Tensor, q: float, dtype: torch.dtype) -> torch.Tensor:
    """What dropout multiplies x by, from what it kept: keep / (1 - q), as F.dropout computes it (bit for bit)."""
    return keep.to(dtype).div_(1 - q)


class _LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + c·(dropout(x)·Aᵀ)·Bᵀ as one autograd node, the fused path of a linear LoraLayer.

    Equal to the reference path (dropout, then two F.linear), but: the dropout keeps a one-byte mask per element and
    x itself, which sibling layers share, instead of two float copies (the noise and dropout(x)); a quantized W is
    kept packed for backward and dequantized where it is used (torchao's int8 linear keeps a float copy); the small
    products run in the layouts that are fast for rank-r operands (h is kept as hᵀ, r x N); the update is added to
    y and to the input's gradient in place; frozen parameters get no gradient work.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, c, keep, noise, p):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, dense(W), b)
        xd = x2 if keep is None else x2 * noise.reshape(x2.shape)
        hT = A @ xd.to(A.dtype).T  # (r, N)
        if y.dtype == A.dtype:
            y.addmm_(hT.T, B.T, alpha=c)
        else:
            y += (hT.T @ (B.T * c)).to(y.dtype)
        ctx.save_for_backward(x2, W, A, B, hT, keep)
        ctx.c, ctx.p, ctx.has_bias, ctx.x_shape = c, p, b is not None, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, W, A, B, hT, keep = ctx.saved_tensors
        c, p = ctx.c, ctx.p
        gy2 = gy.reshape(-1, gy.shape[-1])
        gyl = gy2.to(A.dtype)
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        noise = None if keep is None else dropout_noise(keep.reshape(x2.shape), p, x2.dtype)
        ghT = (B.T * c) @ gyl.T  # (r, N)
        gx = gW = gb = gA = gB = None
        if need_x:
            gx = gy2 @ dense(W)
            if noise is None and gx.dtype == A.dtype:
                gx.addmm_(ghT.T, A)
            else:
                glx = (ghT.T @ A).to(gx.dtype)
                gx += glx if noise is None else glx * noise
            gx = gx.view(ctx.x_shape)
        if need_W:
            gW = gy2.T @ x2
        if need_b and ctx.has_bias:
            gb = gy2.sum(0)
        if need_A:
            xd = x2 if noise is None else x2 * noise
            gA = ghT @ xd.to(A.dtype)
        if need_B:
            gB = (hT @ gyl).T * c
        return gx, gW, gb, gA, gB, None, None, None, None


class SavedModule(nn.Module):
    """A module trained in full for some adapters (PEFT's modules_to_save): each adapter owns a copy.

    With weights w_i the module runs on parameters P + Σ w_i (P_i - P), so weighting and negation
    mean the same thing as for LoRA updates; one adapter at weight 1 runs its copy directly.
    """

    lora_copies: nn.ModuleDict

    def lora_setup(self):
        self.lora_copies = nn.ModuleDict()
        self.lora_weights: dict[str, float] = {}
        self.lora_merged: dict[str, float] = {}
        self.disabled = False
        self._lora_hook = self.register_load_state_dict_post_hook(_adapter_keys_optional)

    def lora_add_copy(self, name: str, original: nn.Module):
        self.lora_copies[name] = original

    def lora_names(self) -> list[str]:
        return list(self.lora_copies)

    def lora_remove(self, name: str):
        del self.lora_copies[name]
        self.lora_weights.pop(name, None)

    def lora_params(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the active combination, keyed as in the base module."""
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if not k.startswith("lora_copies.")}
        active = {n: w for n, w in self.lora_weights.items() if n in self.lora_copies}
        if not active or self.disabled:
            return own
        copies = {n: self.lora_copies[n].state_dict(keep_vars=True) for n in active}
        first = copies[next(iter(active))]
        return {key: base + sum(w * (copies[n][key] - base) for n, w in active.items()) if base.is_floating_point()
                else first[key] for key, base in own.items()}

    def forward(self, *args, **kwargs):
        active = {n: w for n, w in self.lora_weights.items() if n in self.lora_copies}
        if self.disabled or not active:
            return super().forward(*args, **kwargs)
        if len(active) == 1 and next(iter(active.values())) == 1:
            return self.lora_copies[next(iter(active))](*args, **kwargs)
        template = self.lora_copies[next(iter(active))]
        return torch.func.functional_call(template, self.lora_params(), args, kwargs)


def _adapter_keys_optional(module, incompatible):
    """Let a base checkpoint load strictly into an injected model: adapter keys may be missing."""
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys
        if not any(p in k.split(".") for p in ("lora_A", "lora_B", "lora_magnitude", "lora_copies"))
    ]


_CLASSES: dict[tuple[type, type], type] = {}


def swap_in(module: nn.Module, mixin: type) -> nn.Module:
    """Turn `module` into a lorakit layer in place by swapping in a subclass of its own class."""
    module.__class__ = _class(mixin, type(module))
    module.lora_setup()
    return module


def _class(mixin: type, base: type) -> type:
    """The subclass of `base` with `mixin`, made once. It is not importable by name, so it pickles by its parts."""
    if (mixin, base) not in _CLASSES:
        _CLASSES[(mixin, base)] = type(f"{mixin.__name__}[{base.__name__}]", (mixin, base), {"__reduce_ex__": _reduce})
    return _CLASSES[(mixin, base)]


def _reduce(module: nn.Module, protocol: int):
    """pickle / torch.save / deepcopy of a lorakit layer: rebuild its class from (mixin, base), then its state."""
    mro = type(module).__mro__
    return _new, (mro[1], mro[2]), module.__getstate__()


def _new(mixin: type, base: type) -> nn.Module:
    cls = _class(mixin, base)
    return cls.__new__(cls)


def swap_out(module: nn.Module) -> nn.Module:
    """Undo swap_in: the module's own class back, every lorakit attribute gone."""
    module._lora_hook.remove()
    for attr in ("lora_A", "lora_B", "lora_magnitude", "lora_copies"):
        if attr in module._modules:
            del module._modules[attr]
    for attr in ("lora_hot_A", "lora_hot_B"):
        module._buffers.pop(attr, None)
    for attr in ("lora_kind", "lora_dora_axis", "lora_init", "lora_gain_cache", "lora_alpha", "lora_scale",
                 "lora_dropout", "lora_fast_dropout", "lora_weights", "lora_merged", "lora_premerge", "lora_guarded",
                 "lora_rows", "lora_slots", "lora_slot_A", "lora_slot_B", "disabled", "_lora_hook"):
        module.__dict__.pop(attr, None)
    module.__class__ = type(module).__mro__[2]
    return module


def is_hot(module: nn.Module) -> bool:
    """Whether prepare_hotswap gave this layer fixed-shape factors."""
    return "lora_hot_A" in module._buffers


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, (LoraLayer, SavedModule))


def fresh_copy(module: nn.Module) -> nn.Module:
    """A trainable deep copy of a plain module (for modules_to_save)."""
    c = copy.deepcopy(module)
    c.requires_grad_(True)
    return c
