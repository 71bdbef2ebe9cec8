"""The one training runner both trainers use, and the run folder it keeps.

A trainer (lorakit.llm.train.Trainer, lorakit.sd.train.Trainer) is set up in its constructor and supplies the named
steps: `step(k)` (one optimisation step, returning its metrics), `evaluate(k)` and `finish(result)`. `run` drives
them the same way for both: resume, the step loop with a progress bar, metrics, checkpoints, the loss plot, the card.

RUN/ holds run.json (the settings a resume must share), metrics.jsonl (one record per step), loss.png, README.md
(model card) and checkpoints/step-N/ (trained tensors, optimizer, schedule, gradient scaler and every process's RNG
states, so a resumed run ends where an uninterrupted one does). A folder holding another run is refused unless the
run resumes it (same settings) or overwrites it.
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

    The trainer has what `setup` gives it (acc, cfg with out/resume/overwrite/save_every/keep, out), free (the
    settings a resume may change), total (steps), params (name -> trained tensor), opt, sched, stateful (name -> more
    objects with state_dict/load_state_dict to checkpoint, e.g. a gradient scaler), eval_every; begin(start) -> dict,
    step(k) -> dict, evaluate(k) -> dict, checkpointed(k), finish(result) -> dict and card(result) -> (front matter,
    body, settings). Every process runs every named step (a sharded model's forward needs them all); files are
    written by the main process only."""
    from tqdm.auto import tqdm

    acc, cfg, out = trainer.acc, trainer.cfg, trainer.out
    open_folder(out, settings(cfg, trainer.free, acc.num_processes), cfg.resume, cfg.overwrite, acc)
    start = 0
    if cfg.resume and checkpoints(out):
        start = load_checkpoint(checkpoints(out)[-1], trainer)
    if acc.is_main_process:
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
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < trainer.total:
            save_checkpoint(out, step + 1, trainer)
            trainer.checkpointed(step + 1)
    bar.close()

    warm = sorted(step_times[1:] or step_times)  # the first step pays one-off costs
    result = {"steps": trainer.total, **result, "seconds_per_step": warm[len(warm) // 2] if warm else None}
    history = read_metrics(out) if acc.is_main_process else []
    result["final_loss"] = history[-1]["loss"] if history else None
    result = trainer.finish(result)
    if acc.is_main_process:
        plot_loss(history, out / "loss.png", result)
        write_card(out, *trainer.card(result))
    acc.wait_for_everyone()
    return result


def setup(trainer, cfg) -> bool:
    """The set-up both trainers share: accelerate (DDP over gloo when several processes run without GPUs), the config
    and its run folder, the seeds. Returns whether the processes run on the CPU."""
    from accelerate import Accelerator

    on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    trainer.acc = Accelerator(cpu=on_cpu)
    trainer.cfg, trainer.out = cfg, Path(cfg.out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return on_cpu


def lora_plus(groups: list[dict], models, ratio: float | None) -> list[dict]:
    """LoRA+ (Hayou et al. 2024), as PEFT's create_loraplus_optimizer: in each optimizer group, the B factors and the
    trained 1-D parameters (biases) learn at `ratio` times the group's rate; None leaves the groups as they are."""
    if ratio is None:
        return groups
    factors = {id(p) for m in models for n, p in m.named_parameters() if "lora_B" in n.split(".")}
    fast = factors | {id(p) for m in models for p in m.parameters() if p.ndim == 1}
    if not any(id(p) in factors for g in groups for p in g["params"]):
        raise LoraError("lora_plus_ratio needs LoRA factors to train; this run trains none (full fine-tuning?)")
    out = []
    for g in groups:
        slow = [p for p in g["params"] if id(p) not in fast]
        quick = [p for p in g["params"] if id(p) in fast]
        out += [{**g, "params": ps, "lr": lr} for ps, lr in [(slow, g["lr"]), (quick, g["lr"] * ratio)] if ps]
    return out


def step_indices(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The example indices of global step `step`: epochs are seeded permutations laid end to end."""
    out, start = [], step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset: offset + per_step - len(out)]
    return out


# --- run folder -------------------------------------------------------------------------------------------------
HOLDS = ("run.json", "metrics.jsonl", "checkpoints", "adapter.safetensors", "adapter", "model", "pipeline")
# what a run (and push --dry-run) writes, which --overwrite clears
RUN_FILES = (*HOLDS, "loss.png", "README.md", "samples", "adapter-*", "hub-upload")


def settings(cfg, free: set, processes: int) -> dict:
    """The settings of a run that a resume must share (all of `cfg` but the `free` fields), flattened to dotted
    names ("lora.r") as run.json holds them; existing paths are made absolute."""
    from dataclasses import asdict

    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items() if prefix or k not in free
                for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}).items()}

    out = {**flat(asdict(cfg)), "processes": processes}
    for k in ("model", "data", "class_data"):
        if isinstance(out.get(k), str) and out[k] and Path(out[k]).exists():
            out[k] = str(Path(out[k]).resolve())
    return json.loads(json.dumps(out, default=str))  # as read back from run.json


def open_folder(out: Path, current: dict, resume: bool, overwrite: bool, acc):
    """Make RUN/ ready for this run: a folder that holds a run is refused unless `resume` (and its run.json has the
    same settings) or `overwrite` (its run's files are deleted first). Stale temporary checkpoints are removed."""
    if resume and overwrite:
        raise LoraError("--resume and --overwrite contradict each other: give one of them")
    held = [n for n in HOLDS if (out / n).exists()]
    if held and not overwrite:
        if not resume:
            raise LoraError(f"{out} already holds a run ({held[0]}); pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")
        if not (out / "run.json").exists():
            raise LoraError(f"{out} holds a run without run.json (an older lorakit's?), so --resume cannot check that "
                            "it is this run; pass --overwrite to replace it, or choose another --out")
        try:
            old = json.loads((out / "run.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise LoraError(f"{out / 'run.json'} is not valid JSON ({e}); pass --overwrite to replace the run") from None
        if diff := [k for k in sorted(old.keys() | current.keys()) if old.get(k) != current.get(k)]:
            raise LoraError(f"{out} holds a different run, so --resume would mix the two: " + "; ".join(
                f"{k} was {old.get(k)!r}, now {current.get(k)!r}" for k in diff[:4]) +
                "; resume with that run's settings, or pass --overwrite, or choose another --out")
    acc.wait_for_everyone()  # every process has checked before the main one changes anything
    if acc.is_main_process:
        for pattern in RUN_FILES if overwrite else ():
            for path in out.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for tmp in (out / "checkpoints").glob(".step-*.tmp"):  # left by a kill mid-checkpoint; never resumed from
            shutil.rmtree(tmp)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(current, indent=1) + "\n"))
    acc.wait_for_everyone()


# --- checkpoints ------------------------------------------------------------------------------------------------
def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints, oldest first (a `.step-N.tmp` folder being written is not one)."""
    return sorted((Path(out) / "checkpoints").glob("step-*"))


def rng_state(device: torch.device) -> dict:
    """This process's random generators: torch's CPU one, its CUDA device's, python's and numpy's."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _fsync(folder: Path):
    """Flush a folder's files and the folder itself to disk, so a rename after it never publishes lost data."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, trainer):
    """Write RUN/checkpoints/step-N/ atomically (written as .step-N.tmp, then renamed): the trained tensors, the
    optimizer, schedule and `trainer.stateful`, and every process's RNG states; keep the last `cfg.keep`."""
    from safetensors.torch import save_file

    acc, keep = trainer.acc, trainer.cfg.keep
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = out / "checkpoints" / f".step-{step:06d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().cpu().clone() for n, p in trainer.params.items()}, str(tmp / "trainable.safetensors"))
        extra = {k: v.state_dict() for k, v in getattr(trainer, "stateful", {}).items()}
        torch.save({"step": step, "optimizer": trainer.opt.state_dict(), "scheduler": trainer.sched.state_dict(),
                    **extra}, tmp / "state.pt")
    acc.wait_for_everyone()
    torch.save(rng_state(acc.device), tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _fsync(tmp)
        if final.exists():  # a stale one of the same step: the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def load_checkpoint(path: Path, trainer) -> int:
    """Restore a checkpoint into the trainer's params, optimizer, schedule, `stateful` and this process's RNGs;
    returns its step."""
    from safetensors.torch import load_file

    params, acc = trainer.params, trainer.acc
    tensors = load_file(str(path / "trainable.safetensors"))
    missing = [n for n in params if n not in tensors]
    if missing or any(n not in params for n in tensors):
        raise LoraError(f"{path} does not match this run's trainable parameters (e.g. {(missing or list(tensors))[0]!r}); "
                        "resume with the same model and LoRA settings")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    state = torch.load(path / "state.pt", weights_only=True)
    trainer.opt.load_state_dict(state["optimizer"])
    trainer.sched.load_state_dict(state["scheduler"])
    for k, v in getattr(trainer, "stateful", {}).items():
        if k in state:
            v.load_state_dict(state[k])
    set_rng_state(torch.load(path / f"rng-{acc.process_index}.pt", weights_only=True), acc.device)
    return state["step"]


# --- metrics, loss curve, model card ----------------------------------------------------------------------------
def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line] if path.exists() else []
    if lines:  # a kill while a record was appended may leave a partial last line: drop it
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines]


def write_metrics(out: Path, records: list[dict]):
    atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def append_metrics(out: Path, record: dict):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


METRIC_LABELS = {"eval_accuracy": "held-out accuracy", "eval_bleu": "BLEU", "eval_ppl": "held-out perplexity"}


def plot_loss(history: list[dict], path: Path, result: dict | None = None) -> list[str]:
    """RUN/loss.png: the training loss (raw and smoothed; SD's prior-preservation loss too) with the held-out loss;
    a panel of the task metric (accuracy or perplexity at each evaluation, BLEU before and after) when evaluated;
    a thin panel of the learning rate. Returns the panels' labels, top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = result or {}
    steps = [m["step"] for m in history]
    metric = next((k for k in METRIC_LABELS if any(k in m for m in history) or f"{k}_before" in result), None)
    heights = [3, *([1.6] if metric else []), 0.8]
    fig, axes = plt.subplots(len(heights), 1, figsize=(7, 1.4 * sum(heights)), sharex=True,
                             gridspec_kw={"height_ratios": heights})
    ax = axes[0]
    for key, label, color in (("loss", "train loss", "C0"), ("prior_loss", "prior loss", "C2")):
        values = [m.get(key) for m in history]
        if any(v is not None for v in values):
            xs, ys = zip(*[(x, v) for x, v in zip(steps, values) if v is not None])
            ax.plot(xs, ys, color=color, alpha=0.3, lw=0.8, label=label)
            ax.plot(xs, smooth(list(ys)), color=color, lw=1.6, label=f"{label}, smoothed")
    points = _evaluated(history, result, "eval_loss")
    if points:
        ax.plot(*zip(*points), "o:", color="C3", label="held-out loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    if metric:
        axes[1].plot(*zip(*_evaluated(history, result, metric)), "s:", color="C1")
        axes[1].set_ylabel(METRIC_LABELS[metric], fontsize=8)
    lr = axes[-1]
    lr.plot(steps, [m.get("lr") for m in history], color="gray", lw=1)
    lr.set_ylabel("lr", fontsize=8)
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr.set_xlabel("step")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return [a.get_ylabel() for a in axes]


def _evaluated(history: list[dict], result: dict, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` at each evaluation: before training (result's KEY_before), during, and the final one."""
    points = ([(0, result[f"{key}_before"])] if f"{key}_before" in result else []) + \
        [(m["step"], m[key]) for m in history if key in m]
    last = result.get("steps", history[-1]["step"] if history else 0)
    if key in result and (not points or points[-1][0] != last):
        points.append((last, result[key]))
    return points


def smooth(values: list[float]) -> list[float]:
    """A centred moving average over about a twentieth of the run (no lag behind a fast drop)."""
    h = len(values) // 40
    windows = (values[max(0, i - h): i + h + 1] for i in range(len(values)))
    return [sum(w) / len(w) for w in windows]


def write_card(out: Path, front: dict, body: str, settings: dict):
    """RUN/README.md, a model card in the hub's conventions written by huggingface_hub: `front` (ModelCardData
    fields, see card_front), the description `body`, the loss curve and the settings, local paths by name only."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(model_name=out.name, **front)
    text = (f"---\n{data.to_yaml()}\n---\n\n# {out.name}\n\n{body}\n\n![loss curve](loss.png)\n\n"
            f"## Training settings\n\n```yaml\n{yaml.safe_dump(public_settings(settings), sort_keys=False)}```\n")
    atomic_write(out / "README.md", lambda tmp: ModelCard(text).save(tmp))


PATH_KEYS = ("model", "data", "eval_data", "class_data", "out")  # the settings that may hold local paths
METRICS = {"eval_loss": "loss", "eval_ppl": "perplexity", "eval_accuracy": "accuracy", "eval_bleu": "bleu"}


def is_local(spec) -> bool:
    """Whether `spec` is a local path (absolute, or there) rather than a hub id: its path means nothing elsewhere."""
    return isinstance(spec, str) and bool(spec) and (os.path.isabs(os.path.expanduser(spec)) or
                                                     Path(spec).expanduser().exists())


def hub_model_id(spec) -> str | None:
    """`spec` if it can name a model on the hub ("user/name"), else None (a local folder or file, nothing)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(spec, str) or not spec or is_local(spec):
        return None
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return None
    return spec


def public_name(spec: str) -> str:
    """What a card may say of a model or data `spec`: its hub id, or a local path's last name."""
    return Path(spec).name if is_local(spec) else spec


def public_settings(settings: dict) -> dict:
    """The run's settings as a card shows them: local paths (model, data, out, ...) by their names only."""
    return {k: public_name(v) if k in PATH_KEYS and isinstance(v, str) else v for k, v in settings.items()}


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_data(spec: str | None) -> dict | None:
    """Data as a card records it, never by its local path: a file by name, size in bytes and SHA-256; a folder (an
    image set) by name, file count, total size and the SHA-256 of its `sha256sum`-style listing (sorted relative
    paths); anything else (a hub dataset "user/ds[:split]") by its id."""
    import hashlib

    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        listing = "".join(f"{sha256_file(f)}  {f.relative_to(path).as_posix()}\n" for f in files)
        return {"name": path.name, "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return {"dataset": spec}


def card_front(base: str, data: str, eval_data: str | None, pipeline_tag: str, tags: list[str], result: dict,
               relation: str = "adapter") -> dict:
    """The ModelCardData fields both trainers' cards share: the base model's hub id (none for a local folder), the
    pipeline tag, tags, the data by name/size/SHA-256 (or hub dataset id), and the eval metrics as model-index
    results."""
    from huggingface_hub import EvalResult

    base_id, evals = hub_model_id(base), describe_data(eval_data) or {}
    datasets = [d.split(":")[0] for d in (data, eval_data) if d and not is_local(d)]
    where = evals.get("dataset", evals.get("name", ""))
    results = [EvalResult(task_type=pipeline_tag, dataset_type=where.split(":")[0], dataset_name=where,
                          metric_type=name, metric_value=result[k]) for k, name in METRICS.items() if k in result]
    front = {"base_model": base_id, "base_model_relation": relation if base_id else None, "library_name": "lorakit",
             "pipeline_tag": pipeline_tag, "tags": tags, "datasets": list(dict.fromkeys(datasets)) or None,
             "training_data": describe_data(data), "eval_data": evals or None,
             "metrics": [r.metric_type for r in results] or None, "eval_results": results or None}
    return {k: v for k, v in front.items() if v is not None}


def results_table(result: dict) -> str:
    """A markdown table of the run's final and eval metrics ("" when there are none)."""
    rows = [(k, v) for k, v in result.items() if k.startswith(("eval_", "final_")) and isinstance(v, (int, float))]
    return "" if not rows else "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.6g} |\n" for k, v in rows)
