"""QLoRA on CPU: SmolLM2-135M with its linear layers in fp32, int8 or 4-bit NF4 (lorakit.core.quant, torchao), LoRA r8
all-linear on top. One child process per base:

    weights   the bytes the model's parameters hold (quantized ones: their packed data and scales)
    memory    peak RSS of one training step (forward + backward + AdamW on a random batch of --batch x --seq tokens)
              after one warm-up step: VmHWM reset through /proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=65536 so that
              RSS follows the live tensors (as bench/perf.py does); and that step's time
    quality   held-out loss (mean over reference tokens) of the untouched base on --eval-lines E2E test lines
              (MR||reference, loss on the reference); with --steps N, again after N LoRA steps on E2E valid lines
              (--train-batch, --lr; the same lines and order for every base)

    OMP_NUM_THREADS=2 .venv/bin/python bench/quant.py            # a few minutes on 2 idle cores
Writes bench/results/quant.md and bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

from common import flags, report, run_child

HERE = Path(__file__).resolve().parent
DATA = (HERE.parent / ".." / "shared" / "data" / "e2e").resolve()
MODES = ("fp32", "fp32-reference", "int8", "nf4")  # fp32-reference: lorakit's reference path (use_fast(False)), as
# quantized layers took before they shared the fused path (which keeps W packed for backward)
PASS = ["batch", "seq", "threads", "eval_lines", "steps", "train_batch", "lr", "seed", "data_dir"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-lines", type=int, default=32, help="held-out E2E test lines (spread over the file)")
    p.add_argument("--steps", type=int, default=0, help="LoRA training steps, then a second held-out loss")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DATA), help="folder with valid.txt (training) and test.txt (held out)")
    p.add_argument("--results", default=str(HERE / "results"))
    return p.parse_args(argv)


def status_mib(key: str) -> float:
    """A /proc/self/status field (kB) in MiB."""
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(key + ":")) / 1024


def nbytes(t) -> int:
    """Bytes a parameter holds: a quantized one's inner tensors (packed values, scales), recursively."""
    from lorakit.core.quant import is_quantized

    if not is_quantized(t):
        return t.untyped_storage().nbytes()
    return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])


def child(args) -> dict:
    import torch

    import lorakit
    from lorakit.core.layers import use_fast
    from lorakit.core.quant import quantize
    from lorakit.llm import data as datalib
    from lorakit.llm import pretrained
    from lorakit.llm.train import evaluate

    use_fast(args.child != "fp32-reference")  # the fused path (quantized W dequantized where used) but for that row
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model, tok, _ = pretrained.load("smollm2-135m")
    if not args.child.startswith("fp32"):
        quantize(model, args.child)
    gc.collect()
    out = {"mode": args.child, "load_s": time.perf_counter() - t,
           "weights_mib": sum(nbytes(p) for p in {id(p): p for p in model.parameters()}.values()) / 2**20}

    test = datalib.read_examples(Path(args.data_dir) / "test.txt")[0]
    test = test[:: max(1, len(test) // args.eval_lines)][: args.eval_lines]
    held_out = datalib.tokenize_causal(test, tok, 128)[0]
    t = time.perf_counter()
    out["loss_before"] = evaluate(model, held_out, "causal-lm", tok.pad_token_id, 16)["eval_loss"]
    out["eval_s"] = time.perf_counter() - t

    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.05, targets="all-linear"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step(batch):
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    random_batch = {"input_ids": ids, "labels": ids}
    step(random_batch)  # the warm-up: AdamW's state exists from here on
    gc.collect()
    out["rss_before_step_mib"] = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    step(random_batch)
    out["step_s"] = time.perf_counter() - t
    out["step_peak_mib"] = status_mib("VmHWM")
    out["trainable_params"] = sum(p.numel() for p in trainable)

    if not args.steps:
        return out
    train = datalib.read_examples(Path(args.data_dir) / "valid.txt")[0]
    rows = datalib.tokenize_causal(random.Random(args.seed).sample(train, args.steps * args.train_batch), tok, 128)[0]
    t = time.perf_counter()
    for i in range(0, len(rows), args.train_batch):
        b = datalib.collate(rows[i: i + args.train_batch], tok.pad_token_id)
        step({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]})
    out["train_s"] = time.perf_counter() - t
    out["loss_after"] = evaluate(model, held_out, "causal-lm", tok.pad_token_id, 16)["eval_loss"]
    return out


def table(rows: dict, args) -> str:
    ref, slow, after = rows["fp32"], rows["fp32-reference"], args.steps > 0
    head = ("| base | weights MiB | RSS before step MiB | step peak RSS MiB | vs fp32 | vs fp32-reference | step s | "
            "held-out loss | Δ vs fp32 |" + (f" after {args.steps} LoRA steps | Δ vs fp32 |" if after else ""))
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for m, r in rows.items():
        peak = r["step_peak_mib"]
        lines.append(f"| {m} | {r['weights_mib']:.0f} | {r['rss_before_step_mib']:.0f} | {peak:.0f} | "
                     f"{peak / ref['step_peak_mib']:.2f} | {peak / slow['step_peak_mib']:.2f} | {r['step_s']:.2f} | {r['loss_before']:.4f} | {r['loss_before'] - ref['loss_before']:+.4f} |"
                     + (f" {r['loss_after']:.4f} | {r['loss_after'] - ref['loss_after']:+.4f} |" if after else ""))
    return "\n".join(lines)


def markdown(rows: dict, args, seconds: float) -> str:
    trained = (f", and after {args.steps} LoRA steps of {args.train_batch} E2E valid lines (lr {args.lr:g}, the same "
               "lines and order for every base)") if args.steps else ""
    return (f"# QLoRA: a quantized frozen base (bench/quant.py)\n\n"
            f"SmolLM2-135M, LoRA r8 α16 all-linear (dropout 0.05) on a base whose linear layers are fp32, int8 "
            f"(torchao Int8WeightOnlyConfig, per row) or NF4 (torchao NF4Tensor, blocks of 64); embeddings and the "
            f"tied output head stay fp32. Every base takes lorakit's fused path (a quantized W is dequantized where it "
            f"is used and kept packed for backward) but fp32-reference, fp32 on the reference path (F.linear, then the "
            f"LoRA update), the path quantized layers took before. CPU, "
            f"{args.threads} threads. Step: forward + backward + AdamW on a random {args.batch} x {args.seq} batch; "
            f"peak RSS of the second step (VmHWM reset first; MALLOC_MMAP_THRESHOLD_=65536). Held-out loss: mean over "
            f"reference tokens of {args.eval_lines} E2E test lines (MR||reference) on the untouched base{trained}.\n\n"
            f"{table(rows, args)}\n\n"
            "What a step holds besides the weights (activations, the 49k-vocabulary logits of a 4 x 128 batch, "
            "autograd's saved tensors) dwarfs a 135M model's linear weights, so the weight savings barely show in the "
            "peak. Both quantized bases dequantize each weight in forward and again in backward (slower steps: "
            "pure-PyTorch dequantization on CPU); on the reference path torchao's int8 F.linear let autograd keep the "
            "dequantized fp32 weight of every layer for backward, which the fused path does not. RSS before the step "
            "is not lower for the quantized bases despite their smaller weights; this benchmark does not say why. "
            "Step times vary with the machine's load; compare them within one run.\n\n"
            f"Run: `OMP_NUM_THREADS={args.threads} .venv/bin/python bench/quant.py` ({seconds:.0f} s).\n")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        report(child(args))
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # glibc hands freed blocks back: RSS follows the live tensors
    t0 = time.perf_counter()
    rows = {m: run_child(__file__, ["--child", m, *flags(args, PASS)]) for m in MODES}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "quant.json").write_text(json.dumps({"args": {k: getattr(args, k) for k in PASS}, "rows": rows},
                                               indent=1) + "\n")
    md = markdown(rows, args, time.perf_counter() - t0)
    (res / "quant.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    sys.exit(main())
