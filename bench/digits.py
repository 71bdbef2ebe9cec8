"""Measurements on the embedded "digits" text-to-image model (issue 5), each one command:

    .venv/bin/python bench/digits.py base        # 1. the base model draws the seen digits 0-7 (accuracy per class)
    .venv/bin/python bench/digits.py dreambooth  # 2. Dreambooth-LoRA teaches 8, then 9, from 20 images; prior preservation
    .venv/bin/python bench/digits.py pivotal     # 3. pivotal tuning vs plain LoRA, same budget
    .venv/bin/python bench/digits.py stack       # 4. the 8 and 9 LoRAs stacked at +1 and -1: burn-out of the seen digits
    .venv/bin/python bench/digits.py sd15        # peak RSS and s/step, LoRA vs full UNet fine-tuning, SD 1.5-shaped UNet
    .venv/bin/python bench/digits.py guard       # 5. stacking without burn-out: guards, combine methods, block weights,
                                                 #    LoRA Switch/Composite, token-scoped K/V, prompt routing; the pair
                                                 #    trained with prior preservation; 3 and 4 LoRAs (+ "two", "three")

The first run builds and caches the digits pipeline (lorakit.sd.digits). Accuracy = the share of --samples generated
images (DPM-Solver++, 20 steps, guidance 3, fixed seeds) that an SVM trained on scikit-learn's digits train split
reads as the intended digit. Results go to bench/results/digits-<name>.md/.json and sample grids to
bench/results/digits/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = Path("/tmp/lorakit-digits")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["base", "dreambooth", "pivotal", "stack", "sd15", "guard", "all"])
    p.add_argument("--samples", type=int, default=32, help="generated images per prompt")
    p.add_argument("--images", type=int, default=20, help="training images of the new digit")
    p.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--part", choices=["pair", "multi", "prior", "all"], default="all", help="guard: which part to measure")
    p.add_argument("--only", help="guard: measure only the setups whose name matches this regex (and the singles)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # sd15 child: "lora" or "full"
    return p.parse_args(argv)


def seen_accuracy(pipe, clf, args) -> dict[int, float]:
    from lorakit.sd import digits

    return {d: digits.accuracy(pipe, d, n=args.samples, seed=args.seed + d, clf=clf) for d in digits.SEEN}


def new_data(digit: int, args) -> Path:
    """The first --images train-split images of `digit`, as a Dreambooth instance folder."""
    from lorakit.sd import digits

    x, y, _, _ = digits.split()
    idx = [i for i in range(len(y)) if y[i] == digit][: args.images]
    return digits.write_folder(WORK / f"data-{digit}", x[idx], y[idx], prompt=digits.caption(digit))


def train_new(digit: int, args, name: str, **kw) -> Path:
    """A Dreambooth LoRA for `digit` on the digits pipeline; returns the adapter file."""
    from lorakit.options import build
    from lorakit.sd import digits
    from lorakit.sd.train import SDTrainConfig, train_sd

    cfg = build(SDTrainConfig, overwrite=True, model="digits", mode="dreambooth", data=str(new_data(digit, args)), out=str(WORK / name),
                        instance_prompt=digits.caption(digit), resolution=digits.RESOLUTION, batch_size=4,
                        max_steps=args.steps, r=args.r, alpha=args.r, lr=args.lr, seed=args.seed, cache_latents=True,
                        validation_prompts=[digits.caption(digit)], num_validation_images=8, guidance_scale=3.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    train_sd(cfg)
    return WORK / name / "adapter.safetensors"


def fresh(adapters: dict[str, float] | None = None):
    """The digits pipeline with these adapter files active at these weights."""
    import lorakit
    from lorakit.sd.pipeline import load_pipeline

    pipe = load_pipeline("digits")
    names = {lorakit.load(pipe, path): w for path, w in (adapters or {}).items()}
    if names:
        lorakit.set_weights(pipe, names)
    return pipe


def save_grid(pipe, prompts: list[str], path: Path, seed: int):
    from lorakit.sd import digits
    from lorakit.sd.generate import generate
    from lorakit.sd.images import grid

    imgs = generate(pipe, prompts, None, 8, 20, 3.0, seed, digits.RESOLUTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid([im.resize((64, 64), 0) for im in imgs], 8).save(path)


def measure_base(args, clf) -> dict:
    from lorakit.sd import digits

    pipe = fresh()
    acc = seen_accuracy(pipe, clf, args)
    unseen = {d: digits.accuracy(pipe, d, n=args.samples, seed=args.seed + d, clf=clf) for d in (8, 9)}
    save_grid(pipe, [digits.caption(d) for d in range(10)], Path(args.results) / "digits" / "base.png", args.seed)
    return {"seen": acc, "seen_mean": sum(acc.values()) / len(acc), "unseen": unseen}


def measure_dreambooth(args, clf) -> dict:
    from lorakit.sd import digits

    out = {}
    base = fresh()
    out["seen_base"] = sum(seen_accuracy(base, clf, args).values()) / 8
    for digit in (8, 9):
        before = digits.accuracy(base, digit, n=args.samples, seed=args.seed, clf=clf)
        for prior in (False, True):
            extra = dict(prior_preservation=True, class_prompt="a handwritten digit",
                         class_data=str(WORK / "class"), num_class_images=50) if prior else {}
            path = train_new(digit, args, f"db-{digit}-{'prior' if prior else 'plain'}", **extra)
            pipe = fresh({path: 1.0})
            after = digits.accuracy(pipe, digit, n=args.samples, seed=args.seed, clf=clf)
            seen = sum(seen_accuracy(pipe, clf, args).values()) / 8
            out[f"{digit}-{'prior' if prior else 'plain'}"] = {"before": before, "after": after, "seen_mean": seen}
            save_grid(pipe, [digits.caption(digit)], Path(args.results) / "digits" / f"db-{digit}-{prior}.png", args.seed)
            print(f"digit {digit}, prior={prior}: {before:.2f} -> {after:.2f}; seen digits {seen:.2f}", flush=True)
    return out


def measure_pivotal(args, clf) -> dict:
    from lorakit.sd import digits

    out = {}
    for digit in (8, 9):
        plain = train_new(digit, args, f"pv-plain-{digit}")
        token = f"<d{digit}>"
        ti = args.steps // 3
        piv = train_new(digit, args, f"pv-pivotal-{digit}", mode="pivotal", instance_prompt=f"a handwritten digit {token}",
                        placeholder_tokens=[token], initializer_token="digit", ti_steps=ti, max_steps=args.steps - ti,
                        ti_lr=5e-3, validation_prompts=[f"a handwritten digit {token}"])
        a = digits.accuracy(fresh({plain: 1.0}), digit, n=args.samples, seed=args.seed, clf=clf)
        b = digits.accuracy(fresh({piv: 1.0}), digit, prompt=f"a handwritten digit {token}", n=args.samples,
                            seed=args.seed, clf=clf)
        out[str(digit)] = {"plain_lora": a, "pivotal": b, "steps": args.steps, "ti_steps": ti}
        print(f"digit {digit}: plain LoRA {a:.2f}, pivotal {b:.2f}", flush=True)
    return out


def measure_stack(args, clf) -> dict:
    from lorakit.sd import digits

    l8 = WORK / "db-8-plain" / "adapter.safetensors"
    l9 = WORK / "db-9-plain" / "adapter.safetensors"
    if not (l8.exists() and l9.exists()):
        l8, l9 = train_new(8, args, "db-8-plain"), train_new(9, args, "db-9-plain")
    base_seen = seen_accuracy(fresh(), clf, args)
    out = {"seen_base": base_seen}
    for w in (1.0, -1.0):
        pipe = fresh({l8: w, l9: w})
        seen = seen_accuracy(pipe, clf, args)
        out[f"weight {w:+g}"] = {
            "eight": digits.accuracy(pipe, 8, n=args.samples, seed=args.seed, clf=clf),
            "nine": digits.accuracy(pipe, 9, n=args.samples, seed=args.seed, clf=clf),
            "seen": seen, "seen_mean": sum(seen.values()) / 8,
            "seen_drop": sum(base_seen.values()) / 8 - sum(seen.values()) / 8}
        save_grid(pipe, [digits.caption(d) for d in range(10)], Path(args.results) / "digits" / f"stack{w:+g}.png",
                  args.seed)
        print(f"weight {w:+g}: {out[f'weight {w:+g}']}", flush=True)
    return out


# --- 5. stacking without burn-out -----------------------------------------------------------------------------------
# Each way of running several adapters is a Setup: a pipeline with them on, plus (optionally) what happens before each
# prompt's samples (prompt routing, token scopes) and after each denoising step (LoRA Switch). Every setup draws the
# same samples as measure_stack: 32 per prompt, seed args.seed for "eight"/"nine", args.seed + d for seen digit d.

class Setup:
    def __init__(self, pipe, before=None, callback=None):
        self.pipe, self.before, self.callback = pipe, before, callback


def sample(pipe, prompt: str, n: int, seed: int, callback=None) -> list:
    """generate_image.generate's samples (DPM-Solver++, 20 steps, guidance 3) with an optional callback_on_step_end,
    which generate() does not pass on."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from lorakit.sd import digits

    old = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(old.config, algorithm_type="dpmsolver++")
    try:
        with torch.no_grad():
            return pipe(prompt, num_images_per_prompt=n, num_inference_steps=20, guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(seed), height=digits.RESOLUTION, width=digits.RESOLUTION,
                        **({"callback_on_step_end": callback} if callback else {})).images
    finally:
        pipe.scheduler = old


def evaluate(setup: Setup, args, clf, grid_path: Path | None = None) -> dict[int, float]:
    """Accuracy per digit 0-9; the first 8 samples of each prompt as one grid row."""
    import numpy as np

    from lorakit.sd import digits
    from lorakit.sd.images import grid

    acc, cells = {}, []
    for d in range(10):
        if setup.before:
            setup.before(d)
        imgs = sample(setup.pipe, digits.caption(d), args.samples, args.seed + d if d in digits.SEEN else args.seed,
                      setup.callback)
        acc[d] = float((clf.predict(np.stack([digits.from_pil(im) for im in imgs])) == d).mean())
        cells += imgs[:8]
    if grid_path:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid(cells, 8).save(grid_path)
    return acc


def stacked(adapters: dict, weights: dict[str, float] | None = None, guard: str | None = None):
    """A fresh digits pipeline with these canonical adapters (name -> Adapter) on, active at `weights` (default 1)."""
    import lorakit
    from lorakit.core.components import as_module
    from lorakit.formats.adapter import apply
    from lorakit.sd.pipeline import load_pipeline

    pipe = load_pipeline("digits")
    for name, a in adapters.items():
        apply(as_module(pipe), a, name)
    lorakit.set_weights(pipe, weights if weights is not None else {n: 1.0 for n in adapters}, guard=guard)
    return pipe


def block_of(path: str) -> str:
    """The UNet block of a module path: down_blocks.0, mid_block, up_blocks.1, ..."""
    m = re.search(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)", path)
    return m.group(1) if m else path.split(".")[0]


def per_module(a, weight):
    """Block weights: each module's update scaled by weight(path); modules at weight 0 dropped."""
    import dataclasses

    from lorakit.formats.adapter import ModuleLora

    mods = {p: ModuleLora(m.A, m.B * weight(p), m.alpha, m.kind) for p, m in a.modules.items() if weight(p) != 0}
    return dataclasses.replace(a, modules=mods, fingerprint={p: s for p, s in a.fingerprint.items() if p in mods})


def only(a, keep):
    return per_module(a, lambda p: 1.0 if keep(p) else 0.0)


def klora(adapters: dict, k: int = 16) -> dict:
    """K-LoRA without its time schedule: in each module only the adapter whose k largest |ΔW| entries sum highest."""
    from lorakit.core.config import scale
    from lorakit.core.layers import delta

    score = {}
    for n, a in adapters.items():
        for p, m in a.modules.items():
            d = delta(m.A.double().flatten(1), m.B.double().flatten(1)) * scale(m.r, m.alpha, a.use_rslora)
            score.setdefault(p, {})[n] = float(d.abs().flatten().topk(min(k, d.numel())).values.sum())
    win = {p: max(s, key=s.get) for p, s in score.items()}
    return {n: only(a, lambda p, n=n: win[p] == n) for n, a in adapters.items()}


def switch(adapters: dict) -> Setup:
    """LoRA Switch: one adapter active per denoising step, in turn (callback_on_step_end sets the next one)."""
    import lorakit

    pipe, names = stacked(adapters), list(adapters)

    def before(_d):
        lorakit.set_weights(pipe, {names[0]: 1.0})

    def callback(p, i, t, kw):
        lorakit.set_weights(p, {names[(i + 1) % len(names)]: 1.0})
        return {}

    return Setup(pipe, before, callback)


def composite(adapters: dict) -> Setup:
    """LoRA Composite: at every step the UNet's prediction is the mean of each adapter's alone (n UNet calls a step)."""
    import lorakit

    pipe, names = stacked(adapters), list(adapters)
    forward = pipe.unet.forward

    def mean_forward(*a, **kw):
        outs = []
        for n in names:
            lorakit.set_weights(pipe, {n: 1.0})
            outs.append(forward(*a, **{**kw, "return_dict": False})[0])
        return (sum(outs) / len(outs),)

    pipe.unet.forward = mean_forward
    return Setup(pipe)


def routed(adapters: dict, digit_of: dict[str, int]) -> Setup:
    """Prompt routing: for each prompt only the adapters whose trigger word (its digit's name) is in it."""
    import lorakit
    from lorakit.sd import digits

    pipe = stacked(adapters)

    def before(d):
        lorakit.set_weights(pipe, {n: 1.0 for n in adapters if digits.NAMES[digit_of[n]] in digits.caption(d).split()})

    return Setup(pipe, before)


KV = re.compile(r"attn2\.to_[kv]$")


def token_scoped(adapters: dict, digit_of: dict[str, int]) -> Setup:
    """Each adapter's cross-attention key/value update (attn2.to_k/to_v; its other modules dropped) added only at the
    text positions from its trigger word on (the word and the tokens after it, which the causal text encoder lets see
    it), so prompts without the word, and the unconditional half of guidance, get the base model's keys and values."""
    import torch

    import lorakit
    from lorakit.core.components import as_module
    from lorakit.core.model import lora_modules
    from lorakit.sd import digits

    kv = {n: only(a, lambda p: bool(KV.search(p))) for n, a in adapters.items()}
    pipe = stacked(kv)
    lorakit.set_weights(pipe, {})  # the hooks below add the updates, masked
    masks: dict[str, torch.Tensor] = {}
    tok = pipe.tokenizer

    def before(d):
        ids = tok(digits.caption(d), padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        for n in adapters:
            word = tok(digits.NAMES[digit_of[n]], add_special_tokens=False).input_ids[0]
            assert d != digit_of[n] or word in ids, f"trigger of {n} not found in its prompt"
            at = ids.index(word) if word in ids else len(ids)
            cond = (torch.arange(len(ids)) >= at).float()
            masks[n] = torch.stack([torch.zeros_like(cond), cond])  # [unconditional, conditional] rows

    def hook(module, inputs, out):
        x = inputs[0]
        for n in adapters:
            if n in module.lora_A:
                m = masks[n].repeat_interleave(x.shape[0] // 2, 0)[..., None].to(out.dtype)
                out = out + module.lora_update(x, {n: 1.0}).to(out.dtype) * m
        return out

    for path, m in lora_modules(as_module(pipe)).items():
        m.register_forward_hook(hook)
    return Setup(pipe, before)


def goal(r: dict, single: dict[str, dict], targets: dict[str, int]) -> dict:
    """The issue's goal: every adapter's digit keeps ≥ 90 % of its single-adapter accuracy, and the seen-digit mean is
    within 10 points of the best single adapter's."""
    best_seen = max(single[n]["seen_mean"] for n in targets)
    keeps = {n: r["acc"][d] >= 0.9 * single[n]["acc"][d] - 1e-9 for n, d in targets.items()}
    seen_ok = r["seen_mean"] >= best_seen - 0.10 - 1e-9
    return {"keeps": keeps, "seen_ok": seen_ok, "best_single_seen": best_seen, "pass": all(keeps.values()) and seen_ok}


def measure_guard(args, clf) -> dict:
    """Stacking without burn-out: the "eight" and "nine" LoRAs stacked by every method; the same pair trained with
    prior preservation; then 3 and 4 LoRAs ("two" and "three" added: seen digits, so their own gain is measurable)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from lorakit.algebra import combine
    from lorakit.formats.io import read
    from lorakit.sd import digits

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    prior = dict(prior_preservation=True, class_prompt="a handwritten digit", class_data=str(WORK / "class"),
                 num_class_images=50)  # as measure_dreambooth
    files = {"eight": (8, "db-8-plain", {}), "nine": (9, "db-9-plain", {}), "two": (2, "db-2-plain", {}),
             "three": (3, "db-3-plain", {}), "eight-prior": (8, "db-8-prior", prior), "nine-prior": (9, "db-9-prior", prior)}
    parts = ["pair", "multi", "prior"] if args.part == "all" else [args.part]
    names = list(dict.fromkeys(n for part in parts for n in {"pair": ["eight", "nine"], "multi": [
        "eight", "nine", "two", "three"], "prior": ["eight-prior", "nine-prior"]}[part]))
    A, digit_of = {}, {n: files[n][0] for n in names}
    for n in names:
        d, folder, extra = files[n]
        path = WORK / folder / "adapter.safetensors"
        if not path.exists():
            path = train_new(d, args, folder, **extra)
        A[n] = read(path)[0]
    grids = Path(args.results) / "digits" / "guard"
    out = {"single": {}, "pair": {}, "multi": {}, "prior": {}}

    def run(table: str, key: str, make, targets: dict[str, int]):
        if args.only and table != "single" and not re.search(args.only, key):
            return
        t0 = time.perf_counter()
        setup = make()
        setup = setup if isinstance(setup, Setup) else Setup(setup)
        acc = evaluate(setup, args, clf, grids / (re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-") + ".png"))
        r = {"acc": acc, "seen_mean": sum(acc[d] for d in digits.SEEN) / 8, "seconds": time.perf_counter() - t0}
        if table != "single":
            r["goal"] = goal(r, out["single"], targets)
        out[table][key] = r
        print(f"{key:<58} " + " ".join(f"{d}:{100 * a:3.0f}" for d, a in acc.items()) +
              f"  seen {100 * r['seen_mean']:.1f}  {'PASS' if r.get('goal', {}).get('pass') else ''} "
              f"({r['seconds']:.0f} s)", flush=True)
        dest = Path(args.results)  # after every setup, so a long run that stops keeps what it measured
        (dest / "digits-guard.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        write_guard_table(out, dest / "digits-guard.md", args)

    def stack_rows(P: dict, t: dict[str, int], full: bool) -> list:
        pair = [(a, 1.0) for a in P.values()]
        rows = [
            ("naive sum +1/+1", lambda: stacked(P)),
            ("uniform 0.7/0.7", lambda: stacked(P, {n: 0.7 for n in P})),
            ("uniform 0.5/0.5", lambda: stacked(P, {n: 0.5 for n in P})),
            *[(f"set_weights guard={g}", lambda g=g: stacked(P, guard=g)) for g in ("spectral", "shared", "norm")]]
        if full:
            rows += [
                *[(f"combine cat guard={g}", lambda g=g: stacked({"c": combine(pair, "cat", guard_method=g)}))
                  for g in ("spectral", "shared", "norm")],
                *[(f"combine svd rank {k}", lambda k=k: stacked({"c": combine(pair, "svd", rank=k)})) for k in (4, 8)],
                *[(f"combine {m} density {dd} rank 8", lambda m=m, dd=dd: stacked({"c": combine(pair, m, rank=8, density=dd)}))
                  for m in ("ties", "dare") for dd in (0.5, 0.2)],
                ("blocks: attn2 (cross-attention) only", lambda: stacked({n: only(a, lambda p: ".attn2." in p) for n, a in P.items()})),
                ("blocks: attn2.to_k/to_v only", lambda: stacked({n: only(a, lambda p: bool(KV.search(p))) for n, a in P.items()})),
                ("blocks: attn1 (self-attention) only", lambda: stacked({n: only(a, lambda p: ".attn1." in p) for n, a in P.items()})),
                *[(f"blocks: {b} only", lambda b=b: stacked({n: only(a, lambda p: block_of(p) == b) for n, a in P.items()}))
                  for b in sorted({block_of(p) for a in P.values() for p in a.modules})],
                ("K-LoRA (static: one adapter per module, top-16 |ΔW|)", lambda: stacked(klora(P))),
                ("LoRA Switch (one LoRA per step, in turn)", lambda: switch(P)),
                ("LoRA Composite (mean of each LoRA's prediction)", lambda: composite(P)),
                ("token-scoped attn2.to_k/to_v (trigger word on)", lambda: token_scoped(P, t))]
        else:
            rows += [("combine ties density 0.2 rank 8", lambda: stacked({"c": combine(pair, "ties", rank=8, density=0.2)})),
                     ("LoRA Switch (one LoRA per step, in turn)", lambda: switch(P))]
        return rows + [("prompt routing (trigger word -> its LoRA only)", lambda: routed(P, t))]

    run("single", "base (no LoRA)", lambda: stacked({}), {})
    for n in names:
        run("single", n, lambda n=n: stacked({n: A[n]}), {})

    if "pair" in parts:
        P = {n: A[n] for n in ("eight", "nine")}
        for key, make in stack_rows(P, {"eight": 8, "nine": 9}, True):
            run("pair", key, make, {"eight": 8, "nine": 9})
        # the restricted variants alone, to tell lost strength from interference
        run("single", "eight, attn2.to_k/to_v only", lambda: stacked({"eight": only(A["eight"], lambda p: bool(KV.search(p)))}), {})
        run("single", "eight, token-scoped attn2.to_k/to_v", lambda: token_scoped({"eight": A["eight"]}, digit_of), {})

    if "prior" in parts:  # LoRAs trained with prior preservation: is burn-out a stacking or a training problem?
        P = {n: A[n] for n in ("eight-prior", "nine-prior")}
        t = {"eight-prior": 8, "nine-prior": 9}
        for key, make in stack_rows(P, t, False):
            run("prior", f"prior-preserved: {key}", make, t)

    if "multi" in parts:
        for group in (["eight", "nine", "two"], ["eight", "nine", "two", "three"]):
            G, t = {n: A[n] for n in group}, {n: digit_of[n] for n in group}
            k = len(group)
            rows = [("naive sum +1 each", lambda: stacked(G)),
                    (f"uniform 1/{k} each", lambda: stacked(G, {n: 1 / k for n in G})),
                    ("uniform 0.5 each", lambda: stacked(G, {n: 0.5 for n in G})),
                    *[(f"set_weights guard={g}", lambda g=g: stacked(G, guard=g)) for g in ("spectral", "shared", "norm")],
                    ("LoRA Switch", lambda: switch(G)),
                    *([("LoRA Composite", lambda: composite(G))] if k == 3 else []),
                    ("prompt routing", lambda: routed(G, t))]
            for key, make in rows:
                run("multi", f"{'+'.join(group)}: {key}", make, t)
    write_guard_table(out, Path(args.results) / "digits-guard.md", args)
    return out


def write_guard_table(out: dict, path: Path, args):
    def pct(x):
        return f"{100 * x:.1f}"

    lines = ["# Stacking without burn-out on the digits model (`bench/digits.py guard`)", "",
             f"{args.samples} samples per prompt, DPM-Solver++ 20 steps, guidance 3, seeds as `stack`. Goal: each "
             "adapter's digit ≥ 90 % of its single-adapter accuracy and the seen-digit (0-7) mean within 10 points of "
             "the best single adapter's.", "",
             "| setup | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | eight | nine | seen mean | goal |", "|---" * 13 + "|"]
    for table in ("single", "pair", "prior", "multi"):
        for key, r in out[table].items():
            g = r.get("goal")
            verdict = "" if g is None else ("**pass**" if g["pass"] else "fail (" + ", ".join(
                [f"{n} < 90 %" for n, ok in g["keeps"].items() if not ok] + ([] if g["seen_ok"] else ["seen"])) + ")")
            lines.append(f"| {key} | " + " | ".join(pct(r["acc"][d]) for d in range(10)) +
                         f" | {pct(r['seen_mean'])} | {verdict} |")
    single = out["single"]
    for group in (["eight", "nine"], ["eight-prior", "nine-prior"], ["eight", "nine", "two"], ["eight", "nine", "two", "three"]):
        if all(n in single for n in group):
            digit = {n: {"eight": 8, "nine": 9, "two": 2, "three": 3}[n.split("-")[0]] for n in group}
            best = max(single[n]["seen_mean"] for n in group)
            lines.append(f"\nGoal for {' + '.join(group)}: " + ", ".join(
                f"{n} ≥ {pct(0.9 * single[n]['acc'][digit[n]])} % (digit {digit[n]})" for n in group) +
                f", seen mean ≥ {pct(best - 0.1)} % (best single adapter's {pct(best)} % − 10).")
    path.write_text("\n".join(lines) + "\n")


def sd15_one(kind: str) -> dict:
    """A few training steps of an SD 1.5-shaped UNet (random weights) at 256 px (32x32 latents), batch 1."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    import lorakit
    from lorakit.sd.diffusion import denoising_loss, draw

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)
    unet.requires_grad_(kind == "full")
    if kind == "lora":
        lorakit.inject(unet, lorakit.LoraConfig(r=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sched = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        x0, text = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
        loss = denoising_loss(unet, sched, x0, text, *draw(sched, x0, g))
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    warm = sorted(times[1:])
    return {"config": kind, "trainable_params": sum(p.numel() for p in params), "seconds_per_step": warm[len(warm) // 2]}


def measure_sd15(args) -> dict:
    from common import run_child

    return {kind: run_child(__file__, ["sd15", "--one", kind]) for kind in ("lora", "full")}


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        from common import report

        report(sd15_one(args.one))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    todo = ["base", "dreambooth", "pivotal", "stack", "guard", "sd15"] if args.what == "all" else [args.what]
    for what in todo:
        t0 = time.perf_counter()
        if what == "sd15":
            result = measure_sd15(args)
        else:
            from lorakit.sd import digits

            clf = digits.classifier()
            result = {"base": measure_base, "dreambooth": measure_dreambooth, "pivotal": measure_pivotal,
                      "stack": measure_stack, "guard": measure_guard}[what](args, clf)
        result["wall_s"] = time.perf_counter() - t0
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("one", "what")}
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"digits-{what}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
