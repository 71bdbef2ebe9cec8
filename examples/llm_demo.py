"""The main job: teach SmolLM2-135M-Instruct a task with LoRA on a CPU in a few minutes.

The task, with data this script makes itself: rewrite a date written in words as ISO 8601
("Date: March 5, 2021" -> "2021-03-05"). The base model does not do it from the raw prompt; a
rank-8 LoRA (~0.5 % of the weights) learns it. Prints held-out exact-match accuracy before and
after, a few generations, and the adapter's size.
"""

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from lorakit import load
from lorakit.llm import pretrained
from lorakit.llm.generate import complete
from lorakit.llm.train import TrainConfig, train
from lorakit.options import build

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def make_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        words = rng.choice(["{M} {d}, {y}", "{d} {M} {y}", "the {d} of {M}, {y}"]).format(M=MONTHS[m - 1], d=d, y=y)
        out.append({"prompt": f"Date: {words}\nISO:", "completion": f" {y:04d}-{m:02d}-{d:02d}"})
    return out


def accuracy(model, tokenizer, examples) -> tuple[float, list[str]]:
    outs = complete(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens=16)
    return sum(o == e["completion"].strip() for o, e in zip(outs, examples)) / len(examples), outs


def main(steps: int = 80):
    run = Path(tempfile.mkdtemp(prefix="lorakit-demo-"))
    train_rows, held_out = make_examples(600, seed=0), make_examples(60, seed=1)
    for name, rows in (("train", train_rows), ("eval", held_out)):
        (run / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    base, tok, _ = pretrained.load("smollm2-135m")
    before, base_outs = accuracy(base, tok, held_out)
    print(f"base model, held-out exact match: {before:.0%}")

    t0 = time.time()
    result = train(build(TrainConfig, model="smollm2-135m", data=str(run / "train.jsonl"), eval_data=str(run / "eval.jsonl"),
                               out=str(run / "out"), targets="all-linear", r=8, alpha=16, dropout=0.0, lr=2e-3,
                               max_steps=steps, batch_size=8, max_length=32, seed=0))
    minutes = (time.time() - t0) / 60

    load(base, run / "out" / "adapter.safetensors", name="dates")
    after, outs = accuracy(base, tok, held_out)
    print(f"\ntrained {steps} steps in {minutes:.1f} min; {result['trainable_params']:,} trainable params "
          f"({100 * result['trainable_params'] / result['total_params']:.2f} %)")
    print(f"held-out loss {result['eval_loss_before']:.3f} -> {result['eval_loss']:.3f}")
    print(f"held-out exact match {before:.0%} -> {after:.0%}")
    print(f"adapter: {run / 'out' / 'adapter.safetensors'} ({result['adapter_bytes'] / 2**20:.1f} MiB), "
          f"loss curve: {run / 'out' / 'loss.png'}\n")
    print(f"  {'held-out prompt':<34} {'base model':<28} with the LoRA")
    for e, b, o in list(zip(held_out, base_outs, outs))[:5]:
        print(f"  {e['prompt'].splitlines()[0]:<34} {b.splitlines()[0][:26] if b else '':<28} {o}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
