"""Measurements on the embedded "digits" text-to-image model (issue 5), each one command:

    .venv/bin/python bench/digits.py base        # 1. the base model draws the seen digits 0-7 (accuracy per class)
    .venv/bin/python bench/digits.py dreambooth  # 2. Dreambooth-LoRA teaches 8, then 9, from 20 images; prior preservation
    .venv/bin/python bench/digits.py pivotal     # 3. pivotal tuning vs plain LoRA, same budget
    .venv/bin/python bench/digits.py stack       # 4. the 8 and 9 LoRAs stacked at +1 and -1: burn-out of the seen digits
    .venv/bin/python bench/digits.py sd15        # peak RSS and s/step, LoRA vs full UNet fine-tuning, SD 1.5-shaped UNet

The first run builds and caches the digits pipeline (lorakit.digits). Accuracy = the share of --samples generated
images (DPM-Solver++, 20 steps, guidance 3, fixed seeds) that an SVM trained on scikit-learn's digits train split
reads as the intended digit. Results go to bench/results/digits-<name>.md/.json and sample grids to
bench/results/digits/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = Path("/tmp/lorakit-digits")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["base", "dreambooth", "pivotal", "stack", "sd15", "all"])
    p.add_argument("--samples", type=int, default=32, help="generated images per prompt")
    p.add_argument("--images", type=int, default=20, help="training images of the new digit")
    p.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # sd15 child: "lora" or "full"
    return p.parse_args(argv)


def seen_accuracy(pipe, clf, args) -> dict[int, float]:
    from lorakit import digits

    return {d: digits.accuracy(pipe, d, n=args.samples, seed=args.seed + d, clf=clf) for d in digits.SEEN}


def new_data(digit: int, args) -> Path:
    """The first --images train-split images of `digit`, as a Dreambooth instance folder."""
    from lorakit import digits

    x, y, _, _ = digits.split()
    idx = [i for i in range(len(y)) if y[i] == digit][: args.images]
    return digits.write_folder(WORK / f"data-{digit}", x[idx], y[idx], prompt=digits.caption(digit))


def train_new(digit: int, args, name: str, **kw) -> Path:
    """A Dreambooth LoRA for `digit` on the digits pipeline; returns the adapter file."""
    from lorakit import digits
    from lorakit.train_sd import SDTrainConfig, train_sd

    cfg = SDTrainConfig(model="digits", mode="dreambooth", data=str(new_data(digit, args)), out=str(WORK / name),
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
    from lorakit.train_sd import load_pipeline

    pipe = load_pipeline("digits")
    names = {lorakit.load(pipe, path): w for path, w in (adapters or {}).items()}
    if names:
        lorakit.set_weights(pipe, names)
    return pipe


def save_grid(pipe, prompts: list[str], path: Path, seed: int):
    from lorakit import digits
    from lorakit.generate_image import generate
    from lorakit.images import grid

    imgs = generate(pipe, prompts, None, 8, 20, 3.0, seed, digits.RESOLUTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid([im.resize((64, 64), 0) for im in imgs], 8).save(path)


def measure_base(args, clf) -> dict:
    from lorakit import digits

    pipe = fresh()
    acc = seen_accuracy(pipe, clf, args)
    unseen = {d: digits.accuracy(pipe, d, n=args.samples, seed=args.seed + d, clf=clf) for d in (8, 9)}
    save_grid(pipe, [digits.caption(d) for d in range(10)], Path(args.results) / "digits" / "base.png", args.seed)
    return {"seen": acc, "seen_mean": sum(acc.values()) / len(acc), "unseen": unseen}


def measure_dreambooth(args, clf) -> dict:
    from lorakit import digits

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
    from lorakit import digits

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
    from lorakit import digits

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


def sd15_one(kind: str) -> dict:
    """A few training steps of an SD 1.5-shaped UNet (random weights) at 256 px (32x32 latents), batch 1."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    import lorakit
    from lorakit.diffusion import denoising_loss

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
        loss = denoising_loss(unet, sched, torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g), g)
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
    todo = ["base", "dreambooth", "pivotal", "stack", "sd15"] if args.what == "all" else [args.what]
    for what in todo:
        t0 = time.perf_counter()
        if what == "sd15":
            result = measure_sd15(args)
        else:
            from lorakit import digits

            clf = digits.classifier()
            result = {"base": measure_base, "dreambooth": measure_dreambooth, "pivotal": measure_pivotal,
                      "stack": measure_stack}[what](args, clf)
        result["wall_s"] = time.perf_counter() - t0
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("one", "what")}
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"digits-{what}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
