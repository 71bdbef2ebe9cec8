"""What the benchmark scripts share: each configuration runs in its own child process (so peak RSS is its own)
and hands back one JSON line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

MARK = "@@RESULT@@ "  # prefix of the child's JSON line


def report(result: dict):
    """Child side: print the result line, with this process's peak RSS added."""
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(MARK + json.dumps(result), flush=True)


def flags(args, names: list[str]) -> list[str]:
    """`--name value` for each of the parent's parsed arguments `names`, to hand them to a child run."""
    return [x for k in names for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def run_child(script: str, args: list[str]) -> dict:
    """Parent side: run `script args` in a fresh interpreter, pass its output through, return its result line."""
    cmd = [sys.executable, script, *args]
    print(f"\n== {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    found = None
    for line in proc.stdout:
        if line.startswith(MARK):
            found = json.loads(line[len(MARK):])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    found["process_wall_s"] = time.perf_counter() - t0
    return found


# --- named configurations, merged results -------------------------------------------------------------------------
def recipe(kw: dict) -> str:
    """A short, self-explanatory description of one run's settings (train kwargs, or a peft-loop's)."""
    if kw.get("full_finetune"):
        parts = ["all weights"]
    else:
        t = kw.get("targets")
        t = "all-linear" if t == "all-linear" else ",".join(t) if t else "?"
        parts = [f"r{kw.get('r')} α{kw.get('alpha'):g} {t} drop {kw.get('dropout'):g}"]
        if kw.get("use_rslora"):
            parts.append("rsLoRA")
        if kw.get("lora_plus_ratio"):
            parts.append(f"LoRA+ {kw['lora_plus_ratio']:g}")
        if kw.get("use_dora"):
            parts.append("DoRA")
        if kw.get("init") not in (None, True):
            parts.append(f"init {kw['init']}")
        if kw.get("quantize"):
            parts.append(f"{kw['quantize']} base")
    warm = kw.get("warmup", 0)
    parts.append(f"lr {kw.get('lr'):g} {kw.get('schedule')}" + (f" {100 * warm:g} % warmup" if warm else ""))
    parts.append(f"wd {kw.get('weight_decay', 0):g}")
    parts.append(f"clip {kw['max_grad_norm']:g}" if kw.get("max_grad_norm") else "no clip")
    if kw.get("max_length"):
        parts.append(f"max_len {kw['max_length']}")
    return ", ".join(parts)


def run_label() -> str:
    """When this run started (UTC), the mark each of its rows carries in the merged table."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def merge(path, results: list[dict], label: str, setup: dict, order) -> tuple[list[dict], dict]:
    """Merge this run's rows into the results JSON at `path`: a row replaces the earlier row of the same config name,
    the others are kept with the run they came from. Returns (all rows, {run label: that run's setup}), rows in
    `order` (the script's configuration order) first, then any others."""
    from pathlib import Path

    path = Path(path)
    rows, runs = {}, {}
    if path.exists():
        old = json.loads(path.read_text())
        runs = old.get("runs") or {}
        earlier = None
        if not runs:  # a file written before rows carried their run: label it by its last commit
            try:
                earlier = subprocess.run(["git", "log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%d %H:%M UTC",
                                          "--", path.name], cwd=path.parent, capture_output=True, text=True, check=False,
                                         env={**os.environ, "TZ": "UTC"}).stdout.strip() or "earlier"
            except OSError:
                earlier = "earlier"
            earlier = f"{earlier} (earlier run)"
            runs[earlier] = old.get("setup", {})
        for r in old.get("results", []):
            rows[r["config"]] = {"run": earlier, **r} if "run" not in r else r
    for r in results:
        rows[r["config"]] = {**r, "run": label}
    runs[label] = setup
    used = {r["run"] for r in rows.values()}
    runs = {k: v for k, v in runs.items() if k in used}
    rank = {name: i for i, name in enumerate(order)}
    merged = sorted(rows.values(), key=lambda r: rank.get(r["config"], len(rank)))
    return merged, runs


def run_notes(runs: dict, wall_key: str = "total_wall_s") -> str:
    """One footnote line per run: its label, a letter the table's `run` column uses, its wall time."""
    return " ".join(f"[{chr(97 + i)}] {label}" + (f", lorakit {v['lorakit']}" if v.get("lorakit") else "")
                    + (f", {v['threads']} torch thread{'s' if v['threads'] != 1 else ''}" if v.get("threads") else "")
                    + (f", {v[wall_key] / 60:.1f} min for its rows" if v.get(wall_key) else "") + "."
                    for i, (label, v) in enumerate(runs.items()))


def write_results(dest, stem: str, title: str, md: str, notes: str, merged: list[dict], runs: dict, order,
                  label: str, failed: list[str]) -> str:
    """Add to `notes` the configurations defined but not measured and the ones that failed in this run, print the
    table, write DEST/STEM.md and DEST/STEM.json; returns the notes."""
    from pathlib import Path

    dest = Path(dest)
    missing = [n for n in order if n not in {r["config"] for r in merged}]
    if missing:
        notes += f" Defined in the script but not measured: {', '.join(missing)}."
    if failed:
        notes += f" Failed in run [{run_mark(runs, label)}] (feature not available yet): {', '.join(failed)}."
    print("\n" + md + "\n\n" + notes)
    (dest / f"{stem}.md").write_text(f"# {title}\n\n{md}\n\n{notes}\n")
    (dest / f"{stem}.json").write_text(json.dumps({"runs": runs, "results": merged}, indent=2) + "\n")
    print(f"\nwrote {dest / (stem + '.md')} and {dest / (stem + '.json')}")
    return notes


def run_mark(runs: dict, label: str) -> str:
    return chr(97 + list(runs).index(label)) if label in runs else "?"


# --- the plain PEFT loop -----------------------------------------------------------------------------------------
def peft_loop(model, rows: list[dict], pad_id: int, *, steps: int, batch_size: int, seed: int, lr: float) -> dict:
    """A training loop as a PEFT user writes it: AdamW (torch's defaults but lr, i.e. weight decay 0.01) at a constant
    lr, no warmup, no clipping, loss = the model's own mean loss from HF `labels`. The batches are lorakit's
    (runner.step_indices over the same rows, data.collate): the same examples, order and batch size."""
    import statistics

    import torch

    from lorakit import runner
    from lorakit.llm import data as datalib

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    times, loss = [], None
    for step in range(steps):
        t0 = time.perf_counter()
        batch = datalib.collate([rows[i] for i in runner.step_indices(len(rows), seed, step, batch_size)], pad_id)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if step % 10 == 0 or step == steps - 1:
            print(f"peft-loop step {step + 1}/{steps} loss {loss.item():.4f} ({times[-1]:.2f} s)", flush=True)
    return {"steps": steps, "final_loss": loss.item(),
            "seconds_per_step": statistics.median(times[1:] or times)}
