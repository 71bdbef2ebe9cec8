"""The same LLM training run through two checkouts of lorakit, interleaved, for a refactor's before/after record.

    git worktree add /tmp/old 99e4fe1      # the checkout to compare with
    .venv/bin/python bench/before_after.py --old /tmp/old/src --rounds 3

A random 4-layer Llama (hidden 256), all-linear r=8 LoRA, 30 steps of batch 8 x 64 tokens, 1 thread per run, each
run in its own process. Prints each run's median seconds per step and final loss, then the medians side by side; an
identical final loss means both checkouts trained the same adapter. Understands the flat layout (lorakit.train,
before issue 10) and the sub-packages (lorakit.llm.train).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NEW = Path(__file__).resolve().parents[1] / "src"


def one(work: Path, out: str):
    import torch

    torch.set_num_threads(1)
    if not (work / "m" / "config.json").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4, bos_token_id=1,
                                     eos_token_id=1)).save_pretrained(work / "m")
        vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + [f"w{i}" for i in range(62)])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(work / "m")
        lines = (json.dumps({"text": " ".join(f"w{(i * 7 + k) % 62}" for k in range(60))}) for i in range(200))
        (work / "d.jsonl").write_text("".join(x + "\n" for x in lines))
    kw = dict(model=str(work / "m"), data=str(work / "d.jsonl"), out=str(work / out), max_steps=30, batch_size=8,
              max_length=64, seed=0, dropout=0.0, lr=1e-3, r=8, alpha=16, targets="all-linear")
    try:
        from lorakit.llm.train import TrainConfig, train
        from lorakit.options import build

        cfg = build(TrainConfig, kw)
    except ImportError:  # the flat layout
        from lorakit.train import TrainConfig, train

        cfg = TrainConfig(**kw)
    r = train(cfg)
    print(json.dumps({"seconds_per_step": r["seconds_per_step"], "final_loss": r["final_loss"]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the src/ folder of the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("WORK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(Path(args.one[0]), args.one[1])
    work = Path(tempfile.mkdtemp(prefix="lorakit-before-after-"))
    got = {"old": [], "new": []}
    for k in range(args.rounds):
        for name, src in (("old", args.old), ("new", str(NEW))):
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, __file__, "--old", args.old, "--one", str(work), f"{name}-{k}"],
                                  capture_output=True, text=True, env=env, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            got[name].append(r)
            print(f"{name} round {k}: {r['seconds_per_step']:.4f} s/step, final loss {r['final_loss']!r}", flush=True)
    med = {n: statistics.median(r["seconds_per_step"] for r in rs) for n, rs in got.items()}
    same = {r["final_loss"] for rs in got.values() for r in rs}
    print(f"median s/step: old {med['old']:.4f}, new {med['new']:.4f} (new/old {med['new'] / med['old']:.3f}); "
          f"final losses {'identical' if len(same) == 1 else 'differ: ' + str(sorted(same))}")


if __name__ == "__main__":
    main()
