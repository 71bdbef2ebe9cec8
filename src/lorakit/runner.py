"""The one training runner both trainers use, and the run folder it keeps.

A trainer (lorakit.llm.train.Trainer, lorakit.sd.train.Trainer) is set up in its constructor and supplies the named
steps: `step(k)` (one optimisation step, returning its metrics), `evaluate(k)` and `finish(result)`. `run` drives
them the same way for both: resume, the step loop with a progress bar, metrics, checkpoints, the loss plot, the card.

RUN/ holds metrics.jsonl (one record per step), loss.png, README.md (model card) and checkpoints/step-N/ (trained
tensors, optimizer, schedule and every process's RNG state, so a resumed run ends where an uninterrupted one does).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Literal

import torch

from lorakit.core.errors import LoraError
from lorakit.formats.io import atomic_write

# transformers' get_scheduler names a run may choose
Schedule = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


def run(trainer) -> dict:
    """Drive `trainer` from its last checkpoint (if it resumes) to its last step; returns the run's result.

    The trainer has: acc (accelerate), out (run folder), total (steps), params (name -> trained tensor), opt, sched,
    resume, save_every, keep, eval_every; begin(start) -> dict, step(k) -> dict, evaluate(k) -> dict,
    checkpointed(k), finish(result) -> dict and card(result) -> (front matter, body, settings). Every process runs
    every named step (a sharded model's forward needs them all); files are written by the main process only."""
    from tqdm.auto import tqdm

    acc, out = trainer.acc, Path(trainer.out)
    start = 0
    if trainer.resume and checkpoints(out):
        start = load_checkpoint(checkpoints(out)[-1], trainer.params, trainer.opt, trainer.sched, acc.process_index)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_metrics(out, [m for m in read_metrics(out) if m["step"] <= start] if start else [])
    result = trainer.begin(start)
    bar = tqdm(total=trainer.total, initial=start, disable=not acc.is_main_process, desc=trainer.name)
    step_times = []
    for step in range(start, trainer.total):
        t0 = time.time()
        record = {"step": step + 1, **trainer.step(step)}
        step_times.append(time.time() - t0)
        record["step_s"] = step_times[-1]
        if trainer.eval_every and (step + 1) % trainer.eval_every == 0:
            record.update(trainer.evaluate(step + 1))
        if acc.is_main_process:
            append_metrics(out, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        bar.update(1)
        if trainer.save_every and (step + 1) % trainer.save_every == 0 and step + 1 < trainer.total:
            save_checkpoint(out, step + 1, trainer.params, trainer.opt, trainer.sched, acc, trainer.keep)
            trainer.checkpointed(step + 1)
    bar.close()

    warm = sorted(step_times[1:] or step_times)  # the first step pays one-off costs
    result = {"steps": trainer.total, **result, "seconds_per_step": warm[len(warm) // 2] if warm else None}
    history = read_metrics(out) if acc.is_main_process else []
    result["final_loss"] = history[-1]["loss"] if history else None
    result = trainer.finish(result)
    if acc.is_main_process:
        plot_loss(history, out / "loss.png")
        write_card(out, *trainer.card(result))
    acc.wait_for_everyone()
    return result


def step_indices(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The example indices of global step `step`: epochs are seeded permutations laid end to end."""
    out, start = [], step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset: offset + per_step - len(out)]
    return out


# --- checkpoints ------------------------------------------------------------------------------------------------
def checkpoints(out: Path) -> list[Path]:
    return sorted((Path(out) / "checkpoints").glob("step-*"))


def save_checkpoint(out: Path, step: int, params: dict, opt, sched, acc, keep: int):
    """Write RUN/checkpoints/step-N/ atomically: the trained tensors `params` (name -> tensor), optimizer, schedule
    and every process's RNG state; keep the last `keep`."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = out / "checkpoints" / f".step-{step:06d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().cpu().clone() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "state.pt")
    acc.wait_for_everyone()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def load_checkpoint(path: Path, params: dict, opt, sched, rank: int) -> int:
    """Restore a checkpoint into `params` (name -> tensor), the optimizer and schedule; returns its step."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    missing = [n for n in params if n not in tensors]
    if missing or any(n not in params for n in tensors):
        raise LoraError(f"{path} does not match this run's trainable parameters (e.g. {(missing or list(tensors))[0]!r}); "
                        "resume with the same model and LoRA settings")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state["step"]


# --- metrics, loss curve, model card ----------------------------------------------------------------------------
def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def write_metrics(out: Path, records: list[dict]):
    atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def append_metrics(out: Path, record: dict):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_loss(history: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in history], [m["loss"] for m in history], label="train loss")
    evals = [m for m in history if "eval_loss" in m]
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_card(out: Path, front: dict, body: str, settings: dict):
    """RUN/README.md: YAML front matter (the hub's model card metadata), a description, the run's settings."""
    import yaml

    text = (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {out.name}\n\n{body}\n\nTraining settings:\n\n"
            f"```yaml\n{yaml.safe_dump(settings, sort_keys=False)}```\n")
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(text))
