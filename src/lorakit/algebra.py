"""Adapter algebra on the canonical form: combine several adapters into one, resize one, extract one from two
models, and the burn-out guard for stacks.

Every method works per module on ΔW = s·B·A (out x in; conv kernels flattened), computed in float64:
- cat:  exact. A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]; rank Σ r_i.
- svd:  the best rank-k approximation of Σ w_i ΔW_i (Eckart-Young), from the SVD of the stacked factors, never of
        the full matrix.
- ties, dare: TIES (trim to `density`, elect a sign, disjoint mean) or DARE (drop with probability 1 - density,
        rescale by 1/density, sum) on each module's full w_i ΔW_i, then SVD to rank k.
- ties-svd, dare-svd: PEFT's `ties_svd` and `dare_ties_svd` (PEFT trims and elects on the unweighted ΔW_i and
        weights afterwards), to reproduce PEFT merges with correct scales.
- linear: PEFT's `linear` (A = Σ sign·√|w s| A_i, B = Σ √|w s| B_i): cross terms make it approximate.
Results are written with alpha = rank (scale 1) and no rsLoRA, so every tool reads the same ΔW.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from lorakit.core.components import as_module
from lorakit.core.config import scale
from lorakit.core.errors import LoraError, warn
from lorakit.core.guard import GUARDS, Part, guard, lowrank_svd
from lorakit.core.layers import delta, kind_of
from lorakit.core.targeting import find_targets, plain_modules
from lorakit.formats.adapter import Adapter, ModuleLora

METHODS = ("cat", "svd", "linear", "ties", "dare", "ties-svd", "dare-svd")
DYNAMIC = ("energy", "fro", "ratio", "cumulative")


@dataclass
class Report:
    """Per module: rank kept and the share of ΔW's Frobenius energy (Σσ²) it keeps; overall energy."""

    modules: dict[str, dict] = field(default_factory=dict)

    @property
    def energy(self) -> float:
        total = sum(m["total"] for m in self.modules.values())
        return 1.0 if total == 0 else sum(m["kept"] for m in self.modules.values()) / total

    def add(self, path: str, rank: int, s: torch.Tensor, k: int):
        e = s.double() ** 2
        self.modules[path] = {"rank": k, "from_rank": rank, "kept": float(e[:k].sum()), "total": float(e.sum())}

    def lines(self) -> list[str]:
        rows = [f"{'module':<64} {'rank':>9} {'energy kept':>12}"]
        for p, m in self.modules.items():
            share = 1.0 if m["total"] == 0 else m["kept"] / m["total"]
            rows.append(f"{p:<64} {m['from_rank']:>4} -> {m['rank']:<3} {100 * share:>11.4f}%")
        rows.append(f"overall energy kept: {100 * self.energy:.4f}%")
        return rows


# --- SVD and rank rules ---------------------------------------------------------------------------
def svd(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(D.double(), full_matrices=False)


def parse_dynamic(rule: str | None) -> tuple[str, float] | None:
    """"energy=0.9" -> ("energy", 0.9); rules: energy (kept Σσ² share), fro (kept Frobenius-norm share, kohya's
    sv_fro), ratio (keep σ ≥ σ_max/R, kohya's sv_ratio), cumulative (kept Σσ share, kohya's sv_cumulative)."""
    if rule is None:
        return None
    m = re.fullmatch(r"(\w+)=([0-9.eE+-]+)", rule.strip())
    if not m or m.group(1) not in DYNAMIC:
        raise LoraError(f"dynamic rank rule {rule!r}: write one of {', '.join(d + '=X' for d in DYNAMIC)}")
    kind, value = m.group(1), float(m.group(2))
    if kind == "ratio" and value < 1 or kind != "ratio" and not 0 < value <= 1:
        raise LoraError(f"dynamic rank rule {rule!r}: {'ratio must be >= 1' if kind == 'ratio' else kind + ' must be in (0, 1]'}")
    return kind, value


def choose_rank(s: torch.Tensor, rank: int | None, dynamic: tuple[str, float] | None) -> int:
    """How many singular values to keep: `rank`, or the dynamic rule's count capped at `rank`; at least 1."""
    n = len(s)
    if dynamic is None:
        return max(1, min(rank or n, n))
    kind, v = dynamic
    s = s.double()
    if float(s[0]) == 0:
        return 1
    if kind == "ratio":
        k = int((s >= s[0] / v).sum())
    else:
        x = s if kind == "cumulative" else s ** 2
        share = torch.cumsum(x, 0) / x.sum()
        target = v ** 2 if kind == "fro" else v
        k = int((share < target - 1e-12).sum()) + 1
    return max(1, min(k, rank or n, n))


def clamp_quantile(B: torch.Tensor, A: torch.Tensor, q: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's --clamp_quantile: clip both factors' entries to the q-quantile of their absolute values."""
    if q is None:
        return B, A
    if not 0 < q <= 1:
        raise LoraError(f"clamp quantile must be in (0, 1], got {q}")
    hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]).abs().float(), q).double()
    return B.clamp(-hi, hi), A.clamp(-hi, hi)


# --- combine --------------------------------------------------------------------------------------
def _parts(inputs: list[tuple[Adapter, float, str]]) -> tuple[dict[str, list[Part]], dict[str, ModuleLora]]:
    """Per module, each input's weighted part, after checking the inputs fit one base; and one input's module
    (for the shapes and kind of the result)."""
    parts: dict[str, list[Part]] = {}
    first: dict[str, tuple[ModuleLora, str]] = {}
    shapes: dict[str, tuple[list[int], str]] = {}
    for a, w, label in inputs:
        a.plain(f"{label}: combine")
        if not math.isfinite(w):
            raise LoraError(f"{label}: weight {w} is not a finite number")
        for path, shape in a.fingerprint.items():
            have = shapes.setdefault(path, (list(shape), label))
            if have[0] != list(shape):
                raise LoraError(f"{label} and {have[1]} were made for different base models: module {path!r} has "
                                f"weight shape {list(shape)} in one and {have[0]} in the other")
        for path, m in a.modules.items():
            m.check_finite(path, label)
            if path in first:
                o, olabel = first[path]
                if m.kind and o.kind and m.kind != o.kind and {m.kind, o.kind} != {"linear", "conv1d_t"}:
                    raise LoraError(f"module {path!r} is a {o.kind} adapter in {olabel} but a {m.kind} in {label}")
                if m.A.shape[1:] != o.A.shape[1:] or m.B.shape[0] != o.B.shape[0] or m.B.shape[2:] != o.B.shape[2:]:
                    raise LoraError(f"module {path!r} has factors A {list(o.A.shape)}, B {list(o.B.shape)} in {olabel} "
                                    f"but A {list(m.A.shape)}, B {list(m.B.shape)} in {label}: made for different bases")
            else:
                first[path] = (m, label)
            parts.setdefault(path, []).append(
                Part(m.A.double().flatten(1), m.B.double().flatten(1), scale(m.r, m.alpha, a.use_rslora), w))
    return parts, {p: m for p, (m, _) in first.items()}


def _grouped(m: ModuleLora) -> bool:
    return m.kind == "conv" and m.B.shape[1] != m.r


def _module(template: ModuleLora, A: torch.Tensor, B: torch.Tensor, alpha: float, dtype) -> ModuleLora:
    """Factors (2-D, float64) back in the template's layout (conv kernels) and dtype."""
    return _shaped(A, B, template.A.shape[1:], template.B.shape[2:], alpha, template.kind, dtype)


def _shaped(A, B, a_tail, b_tail, alpha: float, kind: str | None, dtype) -> ModuleLora:
    A = A.reshape(A.shape[0], *a_tail).to(dtype).contiguous()
    B = B.reshape(*B.shape[:2], *b_tail).to(dtype).contiguous()
    return ModuleLora(A, B, alpha, kind)


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim on stacked task tensors (input x ...): keep each one's top-`density` entries by magnitude."""
    flat = t.flatten(1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k := int(density * flat.shape[1]):
        keep.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(t.shape)


def _disjoint(t: torch.Tensor, majority: str, w: torch.Tensor | None = None) -> torch.Tensor:
    """TIES' elect and disjoint mean: a sign per entry (by total mass or by count of t), then the mean of the entries
    that agree with it, weighted by `w` afterwards when given (PEFT's order)."""
    mass = t.sum(0) if majority == "total" else t.sign().sum(0)
    agree = t.sign() == torch.where(mass >= 0, 1.0, -1.0)
    if w is not None:
        t = t * w.reshape(-1, *[1] * (t.dim() - 1))
    return (t * agree).sum(0) / agree.sum(0).clamp(min=1)


def _dare(deltas: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density and rescale the kept ones by 1/density."""
    keep = torch.rand(deltas.shape, generator=g, dtype=torch.float64) < density
    return torch.where(keep, deltas / density, torch.zeros_like(deltas))


def combine(inputs: list[tuple[Adapter, float] | tuple[Adapter, float, str]], method: str = "cat",
            rank: int | None = None, density: float | None = None, majority: str = "total", seed: int = 0,
            clamp: float | None = None, dynamic: str | None = None, guard_method: str | None = None) -> Adapter:
    """One adapter from several weighted ones (see the module docstring for the methods). Modules only some inputs
    have are combined from those; `rank` (default: the largest input rank of the module) and `dynamic` apply to the
    SVD methods; `guard_method` (cat, svd) holds back burn-out first. Refuses (LoraError) adapters made for different
    bases, different kinds for one module, NaN/Inf, and tensors that have no weighted meaning without the base."""
    inputs = [(x[0], float(x[1]), x[2] if len(x) > 2 else f"input {i + 1}") for i, x in enumerate(inputs)]
    if not inputs:
        raise LoraError("combine needs at least one adapter")
    if method not in METHODS:
        raise LoraError(f"unknown method {method!r}; choose one of {METHODS}")
    if method in ("ties", "dare", "ties-svd", "dare-svd"):
        if density is None or not 0 < density <= 1:
            raise LoraError(f"--method {method} needs --density in (0, 1] (the share of each ΔW kept), got {density}")
    if majority not in ("total", "frequency"):
        raise LoraError(f"--majority must be 'total' or 'frequency', got {majority!r}")
    if guard_method is not None and guard_method not in GUARDS:
        raise LoraError(f"unknown guard {guard_method!r}; choose one of {GUARDS}")
    if guard_method is not None and method not in ("cat", "svd"):
        raise LoraError(f"a guard applies to the exact sum (cat, svd), not to {method}")
    if rank is not None and rank < 1:
        raise LoraError(f"--rank must be a positive integer, got {rank}")
    dyn = parse_dynamic(dynamic)
    if method in ("cat", "linear") and (dyn or rank or clamp):
        raise LoraError(f"--method {method} keeps the inputs' ranks; --rank, --dynamic and --clamp-quantile are for "
                        "svd, ties, dare, ties-svd and dare-svd")
    parts, templates = _parts(inputs)
    dtype = next(m.A.dtype for a, _, _ in inputs for m in a.modules.values()) if parts else torch.float32
    g = torch.Generator().manual_seed(seed)
    out = Adapter({})
    for path, ps in parts.items():
        t = templates[path]
        if _grouped(t) and method != "cat" or _grouped(t) and guard_method:
            raise LoraError(f"module {path!r} is a grouped conv; only --method cat (no guard) combines those exactly")
        if method == "linear":
            if len({p.r for p in ps}) > 1:
                raise LoraError(f"--method linear (PEFT's) needs equal ranks; module {path!r} has {[p.r for p in ps]}. "
                                "Use cat (exact) or svd")
            A = sum(p.A * math.copysign(math.sqrt(abs(p.w * p.s)), p.w * p.s) for p in ps)
            B = sum(p.Braw * math.sqrt(abs(p.w * p.s)) for p in ps)
            out.modules[path] = _module(t, A, B, A.shape[0], dtype)
            continue
        if method == "cat":
            if guard_method:
                p = guard(ps, guard_method)
                A, B = p.A, p.B
            elif _grouped(t):  # keep each group's rank rows together, as the layer does
                A, B = _cat_grouped(ps, t)
            else:
                A, B = torch.cat([p.A for p in ps], 0), torch.cat([p.B for p in ps], 1)
            out.modules[path] = _module(t, A, B, A.shape[0], dtype)
            continue
        k_max = rank or max(p.r for p in ps)
        if method == "svd":
            stacked = guard(ps, guard_method) if guard_method else Part(torch.cat([p.A for p in ps], 0),
                                                                          torch.cat([p.B for p in ps], 1))
            U, S, Vh = lowrank_svd(stacked.A, stacked.B)
        else:
            D = torch.stack([p.delta() for p in ps])
            if method == "ties":
                D = _disjoint(_trim(D, density), majority)
            elif method == "dare":
                D = _dare(D, density, g).sum(0)
            else:  # PEFT: trim/drop and elect on the unweighted ΔW_i, weight afterwards
                raw = torch.stack([delta(p.A, p.Braw * p.s) for p in ps])
                raw = _dare(raw, density, g) if method == "dare-svd" else _trim(raw, density)
                D = _disjoint(raw, majority, torch.tensor([p.w for p in ps], dtype=torch.float64))
            U, S, Vh = svd(D)
        k = choose_rank(S, k_max, dyn)
        B, A = clamp_quantile(U[:, :k] * S[:k], Vh[:k], clamp)
        out.modules[path] = _module(t, A, B, k, dtype)
    _carry(out, inputs)
    out.history = {"method": method, "inputs": [{"source": label, "weight": w, "base_model": a.base_model}
                                                for a, w, label in inputs],
                   **{k: v for k, v in dict(rank=rank, density=density, majority=majority if density else None,
                                            seed=seed if method in ("dare", "dare-svd") else None, clamp_quantile=clamp,
                                            dynamic=dynamic, guard=guard_method).items() if v is not None}}
    return out


def _cat_grouped(ps: list[Part], t: ModuleLora) -> tuple[torch.Tensor, torch.Tensor]:
    g = t.r // t.B.shape[1]
    A = torch.cat([p.A.reshape(g, p.r // g, -1) for p in ps], 1).flatten(0, 1)
    return A, torch.cat([p.B for p in ps], 1)


def _carry(out: Adapter, inputs):
    """What rides along unchanged: base model, fingerprint, learned tokens; saved modules and trained biases only
    when a single input at weight 1 has them (a weighted copy of full weights needs the base weights)."""
    for a, w, label in inputs:
        out.base_model = out.base_model or a.base_model
        out.fingerprint.update(a.fingerprint)
        if (a.saved or a.biases) and (w != 1 or any(b.saved or b.biases for b, _, _ in inputs if b is not a)):
            raise LoraError(f"{label} holds {'modules_to_save' if a.saved else 'trained biases'}, full tensors whose "
                            "weighted combination needs the base model; combine them with weight 1 alongside "
                            "adapters without any, or merge-into the model instead")
        out.saved.update(a.saved)
        out.biases.update(a.biases)
        for tok, v in a.embeddings.items():
            if tok in out.embeddings and not torch.equal(out.embeddings[tok], v):
                raise LoraError(f"two inputs define the learned token {tok!r} differently; rename one")
            out.embeddings[tok] = v
    bases = {a.base_model for a, _, _ in inputs if a.base_model}
    if len(bases) > 1:
        warn(f"the inputs record different base models {sorted(bases)}; their module shapes agree, so they were "
             f"combined, recording {out.base_model!r}")


# --- resize ---------------------------------------------------------------------------------------
def resize(a: Adapter, rank: int | None = None, dynamic: str | None = None,
           clamp: float | None = None) -> tuple[Adapter, Report]:
    """Each module truncated to `rank` (or by a dynamic rule, capped at `rank`) by SVD, keeping its scale
    (alpha becomes s·k, or s·√k with rsLoRA); a module whose rank is already ≤ the target is kept exactly."""
    if rank is None and dynamic is None:
        raise LoraError("resize needs --rank K or --dynamic RULE")
    if rank is not None and rank < 1:
        raise LoraError(f"--rank must be a positive integer, got {rank}")
    dyn = parse_dynamic(dynamic)
    a.plain("resize")
    out = Adapter({}, a.use_rslora, saved=a.saved, biases=a.biases, config=None, base_model=a.base_model,
                  fingerprint=a.fingerprint, embeddings=a.embeddings, history=a.history)
    report = Report()
    for path, m in a.modules.items():
        m.check_finite(path)
        if _grouped(m):
            raise LoraError(f"module {path!r} is a grouped conv, which resize cannot factor; leave it out")
        s = scale(m.r, m.alpha, a.use_rslora)
        U, S, Vh = lowrank_svd(m.A.flatten(1), m.B.flatten(1) * s)
        k = choose_rank(S, rank, dyn)
        report.add(path, m.r, S, k)
        if k >= m.r and clamp is None:
            out.modules[path] = m
            continue
        B, A = clamp_quantile(U[:, :k] * S[:k], Vh[:k], clamp)
        alpha = s * (math.sqrt(k) if a.use_rslora else k)
        out.modules[path] = _module(m, A, B / s, alpha, m.A.dtype)
    out.history = {"method": "resize", "rank": rank, "dynamic": dynamic, "from": a.history}
    return out, report


# --- extract --------------------------------------------------------------------------------------
def oriented(module) -> torch.Tensor:
    """A module's weight as an (out x in·k) matrix, the orientation of B·A (Conv1D and Embedding transposed)."""
    w = module.weight.detach()
    return w.T if kind_of(module) in ("conv1d_t", "embedding") else w.flatten(1)


def extract(base, tuned, rank: int | None = None, dynamic: str | None = None, targets=None,
            clamp: float | None = None, min_diff: float = 0.0, base_model: str | None = None) -> tuple[Adapter, Report]:
    """A LoRA of W_tuned − W_base for each adaptable module (or `targets`) whose weight changed by more than
    `min_diff`: the best rank-`rank` approximation (or a dynamic rule's rank). A difference of rank ≤ k comes back
    exactly. Other changed tensors (norms, biases, heads) are named in a warning: a LoRA cannot hold them."""
    if rank is None and dynamic is None:
        raise LoraError("extract needs --rank K or --dynamic RULE")
    if rank is not None and rank < 1:
        raise LoraError(f"--rank must be a positive integer, got {rank}")
    dyn = parse_dynamic(dynamic)
    base, tuned = as_module(base), as_module(tuned)
    have, other = plain_modules(base), plain_modules(tuned)
    names = find_targets(base, targets, None) if targets else [n for n, m in have.items() if kind_of(m)]
    out, report = Adapter({}, base_model=base_model), Report()
    for path in names:
        m, t = have[path], other.get(path)
        kind = kind_of(m)
        if kind is None:
            raise LoraError(f"module {path!r} is a {type(m).__name__}, which a LoRA cannot adapt")
        if t is None or kind_of(t) != kind or t.weight.shape != m.weight.shape:
            raise LoraError(f"the tuned model has no {kind} module {path!r} of weight shape {list(m.weight.shape)}; "
                            "extract needs two models of the same architecture")
        if getattr(m, "groups", 1) > 1:
            warn(f"module {path!r} is a grouped conv; it is left out")
            continue
        D = oriented(t).double() - oriented(m).double()
        if not torch.isfinite(D).all():
            raise LoraError(f"module {path!r}: the weights contain NaN or Inf values")
        if D.numel() == 0 or float(D.abs().max()) <= min_diff:
            continue
        U, S, Vh = svd(D)
        k = choose_rank(S, rank, dyn)
        report.add(path, min(D.shape), S, k)
        B, A = clamp_quantile(U[:, :k] * S[:k], Vh[:k], clamp)
        conv = kind == "conv"
        out.modules[path] = _shaped(A, B, m.weight.shape[1:] if conv else A.shape[1:], (1,) * (m.weight.dim() - 2) if conv else (),
                                    k, kind, m.weight.dtype)
        out.fingerprint[path] = list(m.weight.shape)
    targeted = {f"{p}.weight" for p in names}  # adapted, or left out above by min_diff or as grouped convs
    tp = dict(tuned.named_parameters())
    changed = [n for n, p in base.named_parameters() if n not in targeted and n in tp and tp[n].shape == p.shape
               and not torch.equal(tp[n], p) and float((tp[n].detach().double() - p.detach().double()).abs().max()) > min_diff]
    if changed:
        warn(f"{len(changed)} other tensors differ between the models and are not in the LoRA: "
             f"{', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}")
    if not out.modules:
        raise LoraError("the two models' adaptable weights are identical (within min_diff); nothing to extract")
    out.history = {"method": "extract", "rank": rank, "dynamic": dynamic}
    return out, report
