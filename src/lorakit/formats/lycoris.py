"""LyCORIS LoHa and LoKr files (kohya module names, read only).

Keys are ``<kohya name>.<tensor>`` with kohya's prefixes and an optional 0-dim ``.alpha``.
LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·kh·kw), ``hada_w2_a``, ``hada_w2_b``;
ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b).
Tucker convs store ``hada_w1_a`` (r, out), ``hada_w1_b`` (r, in) and cores ``hada_t1``/``hada_t2`` (r, r, kh, kw).
LoKr: ``lokr_w1`` or ``lokr_w1_a``·``lokr_w1_b``, and ``lokr_w2`` or ``lokr_w2_a``·``lokr_w2_b`` (Tucker: core
``lokr_t2``); ΔW = w1 ⊗ w2. Scale = alpha/r with r the rank of w1_b (LoHa; LoKr: of w1_b, else of w2_b); a LoKr with
both w1 and w2 full ignores alpha (scale 1); a missing or 0 alpha means alpha = r. Modules with lora_down/lora_up
(LoCon) in the same file are read as kohya.py reads them.

Neither product is a low-rank B·A, so each LoHa/LoKr module is materialised exactly: ΔW·scale becomes one factor and
an identity the other (rank min(out, in·kh·kw), alpha = rank, scale 1). A flat (out, in·kh·kw) ΔW of a conv keeps
A 2-D and lorakit reshapes it onto the model's kernel.
"""

from __future__ import annotations

import torch

from lorakit.core.errors import LoraError, warn
from lorakit.formats import kohya
from lorakit.formats.adapter import Adapter, ModuleLora

LOOKS = "LyCORIS hada_/lokr_ keys"
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SUFFIXES = (*kohya.SUFFIXES, *LOHA, *LOKR)


def looks_like(tensors: dict, metadata: dict) -> bool:
    """kohya-named keys with LyCORIS LoHa/LoKr tensors."""
    return any(n.startswith("lora_") and s.startswith(kohya.LYCORIS_PARTS) for n, _, s in
               (k.partition(".") for k in tensors))


def _compute(t: torch.Tensor) -> torch.Tensor:
    """`t` in the precision ΔW is computed in (at least float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def loha_delta(p: dict, name: str, source: str) -> tuple[torch.Tensor, int]:
    """(ΔW before scaling, r) of a LoHa module: (w1_a·w1_b) ⊙ (w2_a·w2_b), or the Tucker rebuild for convs."""
    missing = [k for k in LOHA[:4] if k not in p]
    if missing or ("hada_t1" in p) != ("hada_t2" in p):
        raise LoraError(f"{source}: LoHa module {name!r} lacks {name}.{(missing or ['hada_t1/hada_t2'])[0]}; the "
                        "file is incomplete")
    w1a, w1b, w2a, w2b = (_compute(p[k]) for k in LOHA[:4])
    try:
        if "hada_t1" in p:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, kh, kw)
            t1, t2 = _compute(p["hada_t1"]), _compute(p["hada_t2"])
            dw = (torch.einsum("ij...,jr,ip->pr...", t1, w1b, w1a) * torch.einsum("ij...,jr,ip->pr...", t2, w2b, w2a))
        else:
            dw = (w1a @ w1b.flatten(1)) * (w2a @ w2b.flatten(1))
    except RuntimeError as e:
        raise LoraError(f"{source}: LoHa module {name!r} has factors whose shapes do not fit together ({e})") from None
    return dw, w1b.shape[0]


def lokr_delta(p: dict, name: str, source: str) -> tuple[torch.Tensor, int | None]:
    """(ΔW before scaling, r or None when both Kronecker factors are full) of a LoKr module: w1 ⊗ w2."""
    for full, a, b in (("lokr_w1", "lokr_w1_a", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b")):
        if full not in p and not (a in p and b in p):
            raise LoraError(f"{source}: LoKr module {name!r} has neither {name}.{full} nor both {name}.{a} and "
                            f"{name}.{b}; the file is incomplete")
    try:
        w1 = _compute(p["lokr_w1"]) if "lokr_w1" in p else _compute(p["lokr_w1_a"]) @ _compute(p["lokr_w1_b"])
        if "lokr_w2" in p:
            w2 = _compute(p["lokr_w2"])
        elif "lokr_t2" in p:  # Tucker: w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw)
            w2 = torch.einsum("ij...,ip,jr->pr...", _compute(p["lokr_t2"]), _compute(p["lokr_w2_a"]),
                              _compute(p["lokr_w2_b"]))
        else:
            w2a, w2b = _compute(p["lokr_w2_a"]), _compute(p["lokr_w2_b"])
            w2 = (w2a @ w2b.flatten(1)).reshape(w2a.shape[0], *w2b.shape[1:])
        dw = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2)
    except RuntimeError as e:
        raise LoraError(f"{source}: LoKr module {name!r} has factors whose shapes do not fit together ({e})") from None
    r = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None
    return dw, r


def materialise(dw: torch.Tensor) -> ModuleLora:
    """An exact LoRA for the full update ΔW (out, in) or (out, in, kh, kw): ΔW as one factor, the identity as the
    other (for a conv, A = ΔW as the kernel, or A = the identity "im2col" kernel and B = ΔW as a 1x1 conv)."""
    if dw.dim() > 2 and all(k == 1 for k in dw.shape[2:]):
        dw = dw.flatten(1)
    out, n, ones = dw.shape[0], dw[0].numel(), [1] * (dw.dim() - 2)
    if out <= n:
        A, B = dw, torch.eye(out, dtype=dw.dtype).reshape(out, out, *ones)
    else:
        A, B = torch.eye(n, dtype=dw.dtype).reshape(n, *dw.shape[1:]), dw.reshape(out, n, *ones)
    return ModuleLora(A.contiguous(), B.contiguous(), float(min(out, n)), "conv" if dw.dim() > 2 else None)


def read(tensors: dict, metadata: dict, source: str, layers_per_block: int = 2) -> Adapter:
    """The canonical adapter of a LyCORIS file: LoHa/LoKr modules materialised (with a warning), LoCon as is."""
    a = Adapter({}, base_model=metadata.get("ss_sd_model_name") or None)
    seen: dict[str, str] = {}
    materialised = 0
    for name, parts in kohya.group(tensors, source, SUFFIXES).items():
        key = f"{name}.{next(iter(parts))}"
        algos = {s.split("_")[0] for s in parts if s.startswith(kohya.LYCORIS_PARTS + ("lora_",))}
        if len(algos) > 1:
            raise LoraError(f"{source}: module {name!r} mixes {' and '.join(sorted(algos))} tensors; one module holds "
                            "one LyCORIS algorithm")
        if "lora" in algos or not algos:
            ml = kohya.lora_module(name, parts, source)
        else:
            dw, r = loha_delta(parts, name, source) if "hada" in algos else lokr_delta(parts, name, source)
            alpha = kohya.alpha_of(parts, name, r or 1, source)  # checked even where it is ignored
            scale = 1.0 if r is None else alpha / r
            ml = materialise(dw * scale)
            materialised += 1
        kohya.add_module(a, seen, name, ml, key, source, layers_per_block)
    if materialised:
        warn(f"{source}: its {materialised} LoHa/LoKr module(s) are not low-rank B·A products, so lorakit holds each "
             "as an exact full-rank update. They run and merge correctly but take the memory and compute of a full "
             "weight; merge() them for inference")
    return a
