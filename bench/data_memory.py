"""Peak memory of reading and tokenizing training data: a .jsonl file (read whole, a Python list) against the same
rows as parquet through `datasets` (Dataset.map into memory-mapped rows) and streamed (--streaming).

    .venv/bin/python bench/data_memory.py [--rows 400000]

Each reading runs in its own process (peak RSS is per process); the script prints MiB and the ratio to the jsonl
reading, and the time each took. The tokenizer is a word-level one built here (no download)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [f"w{i}" for i in range(2000)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def child(kind: str, folder: Path):
    from lorakit.llm import data as datalib

    os.environ["LORAKIT_CACHE"] = str(folder / f"cache-{kind}")
    tok = tokenizer()
    t0 = time.time()
    spec = str(folder / ("train.jsonl" if kind == "jsonl" else "train.parquet"))
    examples, _ = datalib.read_data(spec, streaming=kind == "stream")
    if kind == "jsonl":
        rows = datalib.tokenize_causal(examples, tok, 256)[0]
        n = len(rows)
    else:
        rows, _ = datalib.encode_dataset(examples, spec, "causal-lm", tok, 256)
        n = len(rows.batch(0, 1000)) if kind == "stream" else len(rows)
        if kind == "stream":
            rows.close()
    print(json.dumps({"kind": kind, "rows": n, "seconds": time.time() - t0,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--child")
    p.add_argument("--folder")
    args = p.parse_args()
    if args.child:
        return child(args.child, Path(args.folder))
    import random

    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = random.Random(0)
        rows = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))} for _ in range(args.rows)]
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
        size = (folder / "train.jsonl").stat().st_size / 2**20
        del rows
        print(f"{args.rows:,} rows, {size:.0f} MiB of jsonl")
        results = {}
        for kind in ("jsonl", "parquet", "stream"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", tmp], capture_output=True,
                                 text=True, check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["jsonl"]["peak_mib"]
        print(f"{'reading':<40} {'peak RSS MiB':>12} {'× jsonl':>8} {'seconds':>8}")
        for kind, what in (("jsonl", "jsonl, read whole (list)"), ("parquet", "parquet, Dataset.map (memory-mapped)"),
                           ("stream", "parquet, --streaming (first 1000 rows)")):
            r = results[kind]
            print(f"{what:<40} {r['peak_mib']:>12.0f} {r['peak_mib'] / base:>8.2f} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
