"""The LoRA paper's §7 analyses of an adapter (Hu et al. 2021, arXiv 2106.09685): what rank the update really
uses, whether two adapters learned the same directions, and how ΔW relates to the base weight W.

Per module, on ΔW = s·B·A (out x in; conv kernels flattened), in float64:
- singular_values of ΔW (from the factors, never the full matrix), frobenius ‖ΔW‖_F;
- effective_rank: exp(H(p)), p = σ/Σσ (Roy & Vetterli 2007): r when all σ are equal, 1 when one direction holds
  everything; energy_90: the fewest directions that keep 90 % of Σσ².
- with `vs`, phi: the paper's subspace similarity (Eq. 4) φ(i, j) = ‖U_1^{i⊤} U_2^{j}‖²_F / min(i, j) ∈ [0, 1]
  for i ≤ r1, j ≤ r2, U the right-singular vectors of each adapter's A (its row space), U^i the top i of them;
  1: the top-i and top-j directions overlap completely, 0: they are orthogonal. phi_top = φ(1, 1).
- with `base`, Table 7 of §7.3: W projected onto ΔW's r-dimensional subspace, ‖UᵀWVᵀ‖_F with U, V ΔW's top-r
  left/right singular vectors (w_proj_dw), with W's own (w_proj_w), with random orthonormal ones (w_proj_random);
  amplification = ‖ΔW‖_F / w_proj_dw: how much ΔW amplifies directions W already has but does not emphasise.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import torch

from lorakit.algebra import choose_rank, lowrank_svd, oriented, svd
from lorakit.core.config import scale
from lorakit.core.errors import LoraError
from lorakit.core.layers import delta
from lorakit.formats.adapter import Adapter, resolve_paths


def spectrum(s: torch.Tensor) -> dict:
    """effective_rank (exp of the entropy of σ/Σσ), energy_90 (fewest σ with 90 % of Σσ²), frobenius; 0 for ΔW = 0."""
    s = s.double().clamp(min=0)
    if float(s.sum()) == 0:
        return {"effective_rank": 0.0, "energy_90": 0, "frobenius": 0.0}
    p = s / s.sum()
    p = p[p > 0]
    return {"effective_rank": math.exp(float(-(p * p.log()).sum())), "energy_90": choose_rank(s, None, ("energy", 0.9)),
            "frobenius": float(s.norm())}


def phi(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for all i ≤ r1, j ≤ r2 (row i-1, column j-1): with M = V1ᵀV2 (right-singular vectors of the A's,
    in order), ‖V1[:, :i]ᵀ V2[:, :j]‖²_F is the sum of M[:i, :j]², a 2-D cumulative sum."""
    V1 = torch.linalg.svd(A1.double().flatten(1), full_matrices=False)[2]
    V2 = torch.linalg.svd(A2.double().flatten(1), full_matrices=False)[2]
    if V1.shape[1] != V2.shape[1]:
        raise LoraError(f"the two A's have widths {V1.shape[1]} and {V2.shape[1]}: not the same module's input")
    overlap = (V1 @ V2.T).square().cumsum(0).cumsum(1)
    i, j = torch.arange(1, overlap.shape[0] + 1), torch.arange(1, overlap.shape[1] + 1)
    return overlap / torch.minimum(i[:, None], j[None, :]).double()


def projections(W: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor, seed: int = 0) -> dict:
    """Table 7's columns for one module: ‖UᵀWVᵀ‖_F with ΔW's top-r U, Vh, with W's own top-r, with random ones."""
    W, r = W.double(), U.shape[1]
    g = torch.Generator().manual_seed(seed)
    Ur = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, dtype=torch.float64))[0]
    Vr = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=torch.float64))[0]
    sw = torch.linalg.svdvals(W)
    return {"w_proj_dw": float((U.T @ W @ Vh.T).norm()), "w_proj_w": float(sw[:r].norm()),
            "w_proj_random": float((Ur.T @ W @ Vr).norm()), "w_frobenius": float(sw.norm())}


def analyze(adapter: Adapter, vs: Adapter | None = None, base=None) -> dict:
    """{"modules": {path: {r, singular_values, effective_rank, energy_90, frobenius, [phi, phi_top], [amplification,
    w_proj_dw, w_proj_w, w_proj_random, w_frobenius]}}}; `vs` another Adapter (φ for the modules both have), `base` the
    nn.Module or diffusers pipeline the adapter was trained on (Table 7)."""
    if not adapter.modules:
        raise LoraError("the adapter holds no LoRA modules to analyse")
    for a in (adapter, vs):
        if a is not None:
            a.plain("the rank analysis")
    weights = {}
    if base is not None:
        from lorakit.core.components import as_module
        from lorakit.core.targeting import plain_modules

        model = as_module(base)
        names, paths = plain_modules(model), resolve_paths(model, list(adapter.modules))
        weights = {p: oriented(names[q]) for p, q in paths.items()}
    out = {}
    for path, m in adapter.modules.items():
        m.check_finite(path)
        A, B = m.A.double().flatten(1), m.B.double().flatten(1) * scale(m.r, m.alpha, adapter.use_rslora)
        if B.shape[1] != A.shape[0]:  # a grouped conv: its block-diagonal ΔW, formed
            U, S, Vh = svd(delta(A, B, A.shape[0] // B.shape[1]))
        else:
            U, S, Vh = lowrank_svd(A, B)
        k = min(m.r, len(S))
        e = {"r": m.r, "singular_values": S[:k].tolist(), **spectrum(S)}
        if vs is not None and path in vs.modules:
            f = phi(m.A, vs.modules[path].A)
            e.update(phi=f.tolist(), phi_top=float(f[0, 0]))
        if path in weights:
            W = weights[path]
            if tuple(W.shape) != (U.shape[0], Vh.shape[1]):
                raise LoraError(f"module {path!r}: ΔW is {U.shape[0]}x{Vh.shape[1]} but the base weight is "
                                f"{W.shape[0]}x{W.shape[1]}; is this the base the adapter was trained on?")
            e.update(projections(W, U[:, :k], Vh[:k]))
            e["amplification"] = e["frobenius"] / e["w_proj_dw"] if e["w_proj_dw"] > 0 else None
        out[path] = e
    return {"modules": out}


def summary(result: dict) -> list[str]:
    """A few lines: modules, mean effective rank; mean φ(1,1) and the share above 0.5; mean/median amplification."""
    ms = list(result["modules"].values())
    lines = [f"modules: {len(ms)}; mean effective rank of ΔW {statistics.fmean(m['effective_rank'] for m in ms):.2f} "
             f"(mean r {statistics.fmean(m['r'] for m in ms):.1f})"]
    if top := [m["phi_top"] for m in ms if "phi_top" in m]:
        lines.append(f"φ(1,1) over {len(top)} shared modules: mean {statistics.fmean(top):.3f}, "
                     f"{100 * sum(x > 0.5 for x in top) / len(top):.0f} % above 0.5")
    if amp := [m["amplification"] for m in ms if m.get("amplification") is not None]:
        lines.append(f"amplification ‖ΔW‖_F/‖UᵀWVᵀ‖_F: mean {statistics.fmean(amp):.2f}, "
                     f"median {statistics.median(amp):.2f}")
    return lines


# --- plots ----------------------------------------------------------------------------------------
def _layer(path: str) -> int | None:
    """The first number in a module path (the layer or block index), or None."""
    m = re.search(r"\.(\d+)(\.|$)", path)
    return int(m.group(1)) if m else None


def _kind(path: str) -> str:
    """The module's type: the last part of its path (q_proj), two when that is a number (to_out.0)."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _phi_modules(modules: dict, most: int = 4) -> list[str]:
    """Up to `most` modules with φ for Figure 3: the query and value modules of the middle layer, else the first ones."""
    have = [p for p, m in modules.items() if "phi" in m]
    layers = sorted({n for p in have if (n := _layer(p)) is not None})
    mid = [p for p in have if layers and _layer(p) == layers[len(layers) // 2]]
    qv = [p for p in mid if re.search(r"(^|[._])(q|v|query|value|to_q|to_v)(_proj)?$", p.rsplit(".", 1)[-1])]
    return (qv or mid or have)[:most]


def write(result: dict, out_dir) -> list[Path]:
    """out_dir/analysis.json, spectra.png, and phi.png / amplification.png when the result has them; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.formats.io import atomic_write

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoraError(f"{out} is a file; give a folder for analysis.json and the plots")
    mods = result["modules"]
    written = [out / "analysis.json"]
    rows = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items() if k != "modules"]
    rows.append(' "modules": {\n' + ",\n".join(f"  {json.dumps(p)}: {json.dumps(m)}" for p, m in mods.items()) + "\n }")
    text = "{\n" + ",\n".join(rows) + "\n}\n"  # one line per module
    atomic_write(written[0], lambda tmp: Path(tmp).write_text(text))

    def save(fig, name):
        fig.tight_layout()
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        written.append(out / name)

    kinds = list(dict.fromkeys(_kind(p) for p in mods))
    kinds = kinds if len(kinds) <= 6 else ["all modules"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        group = [(p, m) for p, m in mods.items() if kind == "all modules" or _kind(p) == kind]
        cmap = plt.get_cmap("viridis")
        for n, (p, m) in enumerate(group):
            s = torch.tensor(m["singular_values"], dtype=torch.float64)
            if len(s) and s[0] > 0:
                ax.plot(range(1, len(s) + 1), (s / s[0]).clamp(min=1e-12).tolist(), lw=1, alpha=0.8,
                        color=cmap(n / max(len(group) - 1, 1)), label=p if len(group) <= 8 else None)
        ax.set_yscale("log")
        ax.set_title(f"{kind} ({len(group)} modules)", fontsize=9)
        ax.set_xlabel("singular value index i")
        if len(group) <= 8:
            ax.legend(fontsize=6)
        elif _layer(group[0][0]) is not None:
            ax.text(0.98, 0.98, "colour: first layer (dark) to last (yellow)", transform=ax.transAxes, fontsize=7,
                    ha="right", va="top")
    axes[0][0].set_ylabel("σ_i / σ_1 of ΔW")
    save(fig, "spectra.png")

    if chosen := _phi_modules(mods):
        zoom = any(len(mods[p]["phi"][0]) > 8 or len(mods[p]["phi"]) > 8 for p in chosen)
        fig, axes = plt.subplots(1 + zoom, len(chosen), figsize=(3.6 * len(chosen), 3.2 * (1 + zoom)), squeeze=False)
        for c, p in enumerate(chosen):
            f = torch.tensor(mods[p]["phi"])
            for row, part in enumerate([f, f[:8, :8]][: 1 + zoom]):
                ax = axes[row][c]
                im = ax.imshow(part.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                               extent=(0.5, part.shape[1] + 0.5, part.shape[0] + 0.5, 0.5))
                ax.set_title((p if len(p) <= 40 else "…" + p[-39:]) + (" (i, j ≤ 8)" if row else ""), fontsize=8)
                ax.set_xlabel("j (vs adapter)")
                ax.set_ylabel("i (this adapter)")
                fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("subspace similarity φ(i, j) of A's right-singular vectors (LoRA paper Eq. 4)", fontsize=9)
        save(fig, "phi.png")

    amp = {p: m["amplification"] for p, m in mods.items() if m.get("amplification") is not None}
    if amp:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        by_layer = all(_layer(p) is not None for p in amp)
        for kind in dict.fromkeys(_kind(p) for p in amp):
            ps = [p for p in amp if _kind(p) == kind]
            xs = [_layer(p) for p in ps] if by_layer else [list(amp).index(p) for p in ps]
            ax.plot(xs, [amp[p] for p in ps], "o-", ms=3, lw=1, label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("layer" if by_layer else "module (file order)")
        ax.set_ylabel("‖ΔW‖_F / ‖UᵀWVᵀ‖_F")
        ax.set_title("amplification factor (LoRA paper §7.3)", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "amplification.png")
    return written
