"""Training LoRA (or, for comparison, every weight) on causal-LM or classification data, on accelerate.

Deterministic by construction: the example order of every step is a function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would, and N processes each take a slice
of the same global batch. The loss is a sum over loss tokens (or examples) divided by their count
in the whole global batch, so the gradient does not depend on how the batch was split.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as datalib
from . import pretrained
from .config import LoraConfig
from .errors import LoraError
from .io import atomic_write, save
from .model import inject, summary
from .targeting import classifier_head


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    data: str = ""
    task: str = "causal-lm"  # or "classify"
    out: str = "run"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8  # examples per process per micro-step
    grad_accum: int = 1
    max_length: int = 256
    eval_data: str | None = None
    eval_every: int = 0
    save_every: int = 0
    keep: int = 2  # checkpoints kept
    resume: bool = False
    seed: int = 0
    gradient_checkpointing: bool = False
    precision: str = "fp32"  # or "bf16"
    full_finetune: bool = False
    schedule: str = "cosine"  # or "linear", "constant"
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    skip_bad: bool = False
    eval_bleu: bool = False  # also generate for each eval prompt and score BLEU (before and after)
    num_beams: int = 1


def trainable_params(model) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (what a checkpoint must hold)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step_indices(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The example indices of global step `step`: epochs are seeded permutations laid end to end."""
    out, start = [], step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset: offset + per_step - len(out)]
    return out


def loss_sum(model, batch: dict, task: str) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(sum of per-token or per-example losses, how many, logits) for one micro-batch."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task == "causal-lm":
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum")
        return loss, int((labels != -100).sum()), logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(batch["labels"]), logits


@torch.no_grad()
def evaluate(model, rows: list[dict], task: str, pad_id: int, batch_size: int) -> dict:
    """Mean loss and perplexity (causal LM) or accuracy (classification) over `rows`."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        batch = datalib.collate(rows[i: i + batch_size], pad_id)
        loss, n, logits = loss_sum(model, batch, task)
        total, count = total + loss.item(), count + n
        if task == "classify":
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    out = {"eval_loss": total / max(count, 1)}
    if task == "causal-lm":
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50))
    else:
        out["eval_accuracy"] = correct / max(count, 1)
    return out


def n_targets(batch: dict, task: str) -> int:
    """How many loss terms a micro-batch contributes (loss tokens, or examples)."""
    return int((batch["labels"][:, 1:] != -100).sum()) if task == "causal-lm" else len(batch["labels"])


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def train(cfg: TrainConfig, adapt=None) -> dict:
    """Train per `cfg`. Writes RUN/adapter.safetensors (or RUN/model/ for a full fine-tune),
    RUN/metrics.jsonl, RUN/loss.png, RUN/README.md (model card) and RUN/checkpoints/step-N/.

    `adapt(model) -> model`, if given, replaces lorakit's injection (e.g. PEFT's `get_peft_model`, to compare
    both through the same loop); what it returns is trained as is and saved with its `save_pretrained` in RUN/adapter/."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # a multi-process launch on a machine without GPUs runs DDP on the CPU (gloo)
    on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    acc = Accelerator(cpu=on_cpu)  # bf16 is plain autocast below, so runs in one process may differ in precision
    if cfg.precision not in ("fp32", "bf16"):
        raise LoraError(f"precision {cfg.precision!r} is not one of 'fp32', 'bf16'")
    autocast = lambda: torch.autocast(acc.device.type, torch.bfloat16, enabled=cfg.precision == "bf16")  # noqa: E731
    world, rank = acc.num_processes, acc.process_index
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    examples, skipped = datalib.read_examples(cfg.data, skip_bad=cfg.skip_bad)
    labels = datalib.label_names(examples) if cfg.task == "classify" else None
    model, tokenizer, base = pretrained.load(cfg.model, cfg.task, num_labels=len(labels or [0, 1]))
    rows = encode(examples, tokenizer, cfg, labels)
    eval_examples = datalib.read_examples(cfg.eval_data, skip_bad=cfg.skip_bad)[0] if cfg.eval_data else []
    eval_rows = encode(eval_examples, tokenizer, cfg, labels) if eval_examples else []
    pad_id = tokenizer.pad_token_id

    if cfg.full_finetune:
        model.requires_grad_(True)
    elif adapt is not None:
        model = adapt(model)
    else:
        heads = classifier_head(model) if cfg.task == "classify" else []
        inject(model, LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                                 modules_to_save=heads))
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # reentrant checkpointing would leave LoRA untrained (peft#1142)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())

    per_step = cfg.batch_size * cfg.grad_accum * world
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(rows) / per_step))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=round(cfg.warmup * total), num_training_steps=total)
    model, opt = acc.prepare(model, opt)
    plain = acc.unwrap_model(model)

    start = 0
    if cfg.resume and checkpoints(out):
        start = load_checkpoint(checkpoints(out)[-1], trainable_params(plain), opt, sched, rank)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        history = [m for m in read_metrics(out) if m["step"] <= start] if start else []
        write_metrics(out, history)
        print(f"{n_trainable:,} of {n_total:,} params trainable" if cfg.full_finetune or adapt else summary(plain))
        if skipped:
            print(f"skipped {skipped} bad lines in {cfg.data}")

    before = {}
    if eval_rows and acc.is_main_process and not start:
        before = {f"{k}_before": v for k, v in evaluate(plain, eval_rows, cfg.task, pad_id, cfg.batch_size).items()}
        if cfg.eval_bleu:
            before["eval_bleu_before"] = eval_bleu(plain, tokenizer, eval_examples, cfg)
        print("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    bar = tqdm(total=total, initial=start, disable=not acc.is_main_process, desc="train")
    t0, tokens, step_times = time.time(), 0, []
    for step in range(start, total):
        t_step = time.time()
        idx = step_indices(len(rows), cfg.seed, step, per_step)
        size = cfg.batch_size * world
        micro = [idx[k * size + rank * cfg.batch_size:k * size + (rank + 1) * cfg.batch_size]
                 for k in range(cfg.grad_accum)]
        batches = [datalib.collate([rows[i] for i in m], pad_id) for m in micro]
        count = acc.reduce(torch.tensor(float(sum(n_targets(b, cfg.task) for b in batches))), "sum").item()
        running = 0.0
        for k, b in enumerate(batches):
            sync = acc.no_sync(model) if k < len(batches) - 1 else contextlib.nullcontext()
            with sync, autocast():
                loss, _, _ = loss_sum(model, b, cfg.task)
                acc.backward(loss * world / max(count, 1))
            running += loss.item()
            tokens += int(b["attention_mask"].sum())
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_loss = acc.reduce(torch.tensor(running), "sum").item() / max(count, 1)
        rate = tokens * world / max(time.time() - t0, 1e-9)
        step_times.append(time.time() - t_step)
        record = {"step": step + 1, "loss": step_loss, "lr": sched.get_last_lr()[0], "tokens_per_s": rate,
                  "step_s": step_times[-1]}
        if cfg.eval_every and eval_rows and (step + 1) % cfg.eval_every == 0 and acc.is_main_process:
            record.update(evaluate(plain, eval_rows, cfg.task, pad_id, cfg.batch_size))
        if acc.is_main_process:
            append_metrics(out, record)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(out, step + 1, trainable_params(plain), opt, sched, acc, cfg.keep)
    bar.close()

    warm = sorted(step_times[1:] or step_times)  # the first step pays one-off costs
    result = {"steps": total, "trainable_params": n_trainable, "total_params": n_total, "skipped": skipped,
              "seconds_per_step": warm[len(warm) // 2] if warm else None, **before}
    if acc.is_main_process:
        if eval_rows:
            result.update(evaluate(plain, eval_rows, cfg.task, pad_id, cfg.batch_size))
            if cfg.eval_bleu:
                result["eval_bleu"] = eval_bleu(plain, tokenizer, eval_examples, cfg)
        history = read_metrics(out)
        result["final_loss"] = history[-1]["loss"] if history else None
        if cfg.full_finetune:
            plain.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
        elif adapt is not None:
            plain.save_pretrained(out / "adapter")
        else:
            result["adapter"] = str(save(plain, out / "adapter.safetensors", base_model=base))
            result["adapter_bytes"] = (out / "adapter.safetensors").stat().st_size
        plot_loss(history, out / "loss.png")
        write_card(out, cfg, result, labels)
    acc.wait_for_everyone()
    return result


def eval_bleu(model, tokenizer, examples: list[dict], cfg: TrainConfig) -> float:
    """BLEU of greedy/beam generations for the eval prompts against all their references."""
    from .generate import bleu

    was_training = model.training
    model.eval()
    score = bleu(model, tokenizer, examples, max_new_tokens=cfg.max_length, num_beams=cfg.num_beams)["bleu"]
    model.train(was_training)
    return score


def encode(examples: list[dict], tokenizer, cfg: TrainConfig, labels) -> list[dict]:
    """Token rows for the task (causal LM rows whose loss tokens were all truncated are dropped)."""
    if cfg.task == "causal-lm":
        return datalib.tokenize_causal(examples, tokenizer, cfg.max_length)[0]
    return datalib.tokenize_classify(examples, tokenizer, cfg.max_length, labels)[0]


# --- checkpoints: trainable tensors, optimizer, schedule and every process's RNG state -------------
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
    own = params
    missing = [n for n in own if n not in tensors]
    if missing or any(n not in own for n in tensors):
        raise LoraError(f"{path} does not match this run's trainable parameters (e.g. {(missing or list(tensors))[0]!r}); "
                        "resume with the same model and LoRA settings")
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t)
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state["step"]


# --- metrics, loss curve, model card --------------------------------------------------------------
def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
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


def write_card(out: Path, cfg: TrainConfig, result: dict, labels):
    import yaml

    front = {"base_model": cfg.model, "library_name": "lorakit", "task": cfg.task,
             "r": None if cfg.full_finetune else cfg.r, "alpha": None if cfg.full_finetune else cfg.alpha,
             "targets": "all weights" if cfg.full_finetune else cfg.targets, "data": cfg.data,
             "steps": result["steps"], "trainable_params": result["trainable_params"],
             "metrics": {k: v for k, v in result.items() if k.startswith(("eval_", "final_"))}}
    if labels:
        front["labels"] = list(labels)
    body = (f"# {out.name}\n\nA {'full fine-tune' if cfg.full_finetune else 'LoRA adapter'} of `{cfg.model}` trained with "
            f"lorakit on `{cfg.data}` for {result['steps']} steps.\n\nTraining settings:\n\n```yaml\n"
            f"{yaml.safe_dump(asdict(cfg), sort_keys=False)}```\n")
    text = f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{body}"
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(text))
