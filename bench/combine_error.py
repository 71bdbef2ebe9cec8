"""How far each way of combining two LoRAs lands from their exact weighted sum: lorakit's combine vs PEFT's
add_weighted_adapter on the same inputs.

    .venv/bin/python bench/combine_error.py              # ~10 s on 2 cores
    .venv/bin/python bench/combine_error.py --seeds 20   # more draws for the random (DARE) methods

A tiny model of 4 nn.Linear(64, 64) modules gets two PEFT adapters with random A and B (init_lora_weights=False):
    r4-r4     r=4 alpha=8 and r=4 alpha=16
    rslora    the same with use_rslora=True (scale alpha/√r)
    r4-r8     r=4 alpha=8 and r=8 alpha=16 (PEFT's linear, ties, dare_linear and dare_ties need equal ranks)
The same tensors are read into lorakit's canonical form. For weights (0.7, -0.4) and (1, 1), each method's relative
Frobenius error over all 4 modules, ‖ΔW_result − Σ wᵢ sᵢ Bᵢ Aᵢ‖ / ‖Σ wᵢ sᵢ Bᵢ Aᵢ‖, is measured in float64 from
the ΔW each library's result applies (PEFT: get_delta_weight of the new adapter; lorakit: s·B·A of the combined
adapter). Methods with a density use 0.5; DARE methods are random, so their figure is the mean over --seeds draws
(lorakit: seed=i; PEFT: torch.manual_seed(i)). TIES and DARE are not meant to reproduce the sum; their error says
how much of it they change, not that they are wrong.

Writes bench/results/combine-error.md and bench/results/combine-error.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
MODULES = ["l0", "l1", "l2", "l3"]
CASES = {"r4-r4": dict(ranks=(4, 4), alphas=(8, 16), rslora=False),
         "rslora": dict(ranks=(4, 4), alphas=(8, 16), rslora=True),
         "r4-r8": dict(ranks=(4, 8), alphas=(8, 16), rslora=False)}
WEIGHTS = [(0.7, -0.4), (1.0, 1.0)]
DENSITY = 0.5
# (label, lorakit combine kwargs or None, PEFT add_weighted_adapter kwargs or None, random?)
ROWS = [
    ("cat", dict(method="cat"), dict(combination_type="cat"), False),
    ("svd, rank 4", dict(method="svd", rank=4), dict(combination_type="svd", svd_rank=4), False),
    ("svd, rank 8", dict(method="svd", rank=8), dict(combination_type="svd", svd_rank=8), False),
    ("linear", dict(method="linear"), dict(combination_type="linear"), False),
    ("ties / PEFT ties", dict(method="ties", density=DENSITY), dict(combination_type="ties", density=DENSITY), False),
    ("ties-svd / PEFT ties_svd", dict(method="ties-svd", density=DENSITY),
     dict(combination_type="ties_svd", density=DENSITY), False),
    ("dare / PEFT dare_linear", dict(method="dare", density=DENSITY),
     dict(combination_type="dare_linear", density=DENSITY), True),
    ("– / PEFT dare_ties", None, dict(combination_type="dare_ties", density=DENSITY), True),
    ("dare-svd / PEFT dare_ties_svd", dict(method="dare-svd", density=DENSITY),
     dict(combination_type="dare_ties_svd", density=DENSITY), True),
]
EQUAL_RANKS = {"linear", "ties", "dare_linear", "dare_ties"}  # PEFT refuses these for unequal ranks


class Net(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        for name in MODULES:
            setattr(self, name, nn.Linear(width, width))

    def forward(self, x):
        for name in MODULES:
            x = getattr(self, name)(x)
        return x


def build(case: dict, seed: int):
    """A PEFT model with adapters "one" and "two" (random A and B) for `case`."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(Net(), peft.LoraConfig(
        r=case["ranks"][0], lora_alpha=case["alphas"][0], target_modules=MODULES, init_lora_weights=False,
        use_rslora=case["rslora"]), adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(r=case["ranks"][1], lora_alpha=case["alphas"][1], target_modules=MODULES,
                                             init_lora_weights=False, use_rslora=case["rslora"]))
    return model


def canonical(model, name: str):
    """PEFT adapter `name` as a lorakit Adapter (the same tensors; PEFT's Linear layout is lorakit's)."""
    from lorakit import Adapter, ModuleLora

    a = Adapter({}, use_rslora=model.peft_config[name].use_rslora, base_model="bench/combine_error Net")
    for path in MODULES:
        m = getattr(model.base_model.model, path)
        a.modules[path] = ModuleLora(m.lora_A[name].weight.detach().clone(), m.lora_B[name].weight.detach().clone(),
                                     m.lora_alpha[name], "linear")
        a.fingerprint[path] = list(m.base_layer.weight.shape)
    return a


def exact(adapters, weights) -> dict[str, torch.Tensor]:
    from lorakit.core.config import scale

    return {p: sum(w * scale(a.modules[p].r, a.modules[p].alpha, a.use_rslora)
                   * (a.modules[p].B.double() @ a.modules[p].A.double()) for a, w in zip(adapters, weights))
            for p in MODULES}


def rel_error(got: dict, want: dict) -> float:
    num = sum(float((got[p].double() - want[p]).pow(2).sum()) for p in MODULES)
    den = sum(float(want[p].pow(2).sum()) for p in MODULES)
    return math.sqrt(num / den)


def lorakit_result(adapters, weights, kwargs, seed):
    """(ΔW per module, rank) of lorakit's combine."""
    from lorakit import LoraError
    from lorakit.algebra import combine
    from lorakit.core.config import scale

    try:
        out = combine(list(zip(adapters, weights)), seed=seed, **kwargs)
    except LoraError as e:
        return None, str(e)
    d = {p: scale(m.r, m.alpha, out.use_rslora) * (m.B.double() @ m.A.double()) for p, m in out.modules.items()}
    return d, max(m.r for m in out.modules.values())


def peft_result(model, weights, kwargs, seed, name):
    """(ΔW per module, rank) of PEFT's add_weighted_adapter, as the new adapter applies it."""
    torch.manual_seed(seed)
    model.add_weighted_adapter(["one", "two"], list(weights), name, **kwargs)
    d = {p: getattr(model.base_model.model, p).get_delta_weight(name).detach() for p in MODULES}
    r = model.peft_config[name].r
    model.delete_adapter(name)
    return d, r


def measure(args) -> dict:
    results = {}
    for case_name, case in CASES.items():
        model = build(case, args.seed)
        adapters = [canonical(model, "one"), canonical(model, "two")]
        results[case_name] = {}
        for weights in WEIGHTS:
            want = exact(adapters, weights)
            rows = {}
            for label, lk, pk, random in ROWS:
                seeds = range(args.seeds) if random else [0]
                row = {}
                if lk is not None:
                    runs = [lorakit_result(adapters, weights, lk, s) for s in seeds]
                    if runs[0][0] is None:
                        row["lorakit"], row["lorakit_error"] = None, runs[0][1]
                        row["lorakit_note"] = "refused (unequal ranks)" if "equal ranks" in runs[0][1] else "refused"
                    else:
                        errs = [rel_error(d, want) for d, _ in runs]
                        row.update(lorakit=sum(errs) / len(errs), lorakit_runs=errs, lorakit_rank=runs[0][1])
                if case["ranks"][0] != case["ranks"][1] and pk["combination_type"] in EQUAL_RANKS:
                    row["peft"], row["peft_note"] = None, "n/a (unequal ranks)"
                else:
                    runs = [peft_result(model, weights, pk, s, f"m{i}") for i, s in enumerate(seeds)]
                    errs = [rel_error(d, want) for d, _ in runs]
                    row.update(peft=sum(errs) / len(errs), peft_runs=errs, peft_rank=runs[0][1])
                rows[label] = row
            results[case_name][f"{weights[0]:g}, {weights[1]:g}"] = rows
    return results


def fmt(row: dict, who: str) -> str:
    v = row.get(who)
    if v is None:
        return "–" if who not in row and f"{who}_note" not in row else row.get(f"{who}_note", "–")
    return f"{v:.2e}" if v < 1e-3 else f"{v:.4f}"


def tables(results: dict, seeds: int) -> str:
    out = []
    for case_name, by_w in results.items():
        c = CASES[case_name]
        out.append(f"### {case_name}: r={c['ranks'][0]} α={c['alphas'][0]} and r={c['ranks'][1]} α={c['alphas'][1]}"
                   f"{', rsLoRA' if c['rslora'] else ''}\n")
        ws = list(by_w)
        head = "| method (lorakit / PEFT) | " + " | ".join(f"lorakit w=({w}) | PEFT w=({w})" for w in ws) + \
               " | rank lorakit / PEFT |"
        out += [head, "|---|" + "---:|" * (2 * len(ws)) + "---|"]
        for label, *_rest in ROWS:
            random = _rest[-1]
            cells = []
            for w in ws:
                row = by_w[w][label]
                cells += [fmt(row, "lorakit"), fmt(row, "peft")]
            row = by_w[ws[0]][label]
            ranks = f"{row.get('lorakit_rank', '–')} / {row.get('peft_rank', '–')}"
            out.append(f"| {label}{f' (mean of {seeds} seeds)' if random else ''} | " + " | ".join(cells) +
                       f" | {ranks} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="draws for the random (DARE) methods")
    p.add_argument("--seed", type=int, default=0, help="seed of the random adapters")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(HERE / "results"), help="where combine-error.md and .json go")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft

    t0 = time.perf_counter()
    results = measure(args)
    wall = time.perf_counter() - t0
    md = tables(results, args.seeds)
    notes = (f"Relative Frobenius error ‖ΔW_result − Σwᵢ·sᵢ·Bᵢ·Aᵢ‖ / ‖Σwᵢ·sᵢ·Bᵢ·Aᵢ‖ over 4 nn.Linear(64, 64) modules, "
             f"two random adapters (A and B random, seed {args.seed}); density {DENSITY} where a method has one. "
             "PEFT's figure is the ΔW its new adapter applies (get_delta_weight); lorakit's is s·B·A of the combined "
             "adapter. The svd rows pass svd_rank / --rank; ties, dare, ties-svd, dare-svd use each library's default "
             "rank (the larger input rank). '–': the library has no such method; 'n/a (unequal ranks)': PEFT "
             "refuses the method for unequal ranks, so it was not run. lorakit's and PEFT's DARE rows use different "
             "random draws. With rsLoRA inputs PEFT's new adapter keeps use_rslora with r = alpha = the new rank, so "
             "the ΔW it applies is √(new rank) times the combined one (cat: √8 − 1 = 1.8284). "
             f"torch {torch.__version__}, peft {peft.__version__}; {wall:.1f} s.")
    print(md)
    print(notes)
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "combine-error.md").write_text("# Combining two LoRAs: error against the exact weighted sum "
                                           f"(bench/combine_error.py)\n\n{md}\n{notes}\n")
    (dest / "combine-error.json").write_text(json.dumps({
        "setup": {"modules": MODULES, "width": 64, "cases": CASES, "weights": WEIGHTS, "density": DENSITY,
                  "seeds": args.seeds, "adapter_seed": args.seed, "torch": torch.__version__,
                  "peft": peft.__version__, "wall_s": wall},
        "results": results}, indent=2) + "\n")
    print(f"wrote {dest / 'combine-error.md'} and {dest / 'combine-error.json'}")


if __name__ == "__main__":
    main()
