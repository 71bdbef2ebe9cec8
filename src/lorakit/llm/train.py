"""Training LoRA (or, for comparison, every weight) on causal-LM or classification data, on accelerate.

Deterministic by construction: the example order of every step is a function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would, and N processes each take a slice
of the same global batch. The loss is a sum over loss tokens (or examples) divided by their count
in the whole global batch, so the gradient does not depend on how the batch was split.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from lorakit import options, runner
from lorakit.core.config import LoraConfig
from lorakit.core.errors import LoraError
from lorakit.core.model import inject, summary
from lorakit.core.quant import quantize
from lorakit.core.targeting import classifier_head, keep_out
from lorakit.formats.io import save
from lorakit.llm import data as datalib
from lorakit.llm import fsdp, pretrained
from lorakit.llm.generate import bleu


@dataclass
class TrainConfig:
    """A `lorakit train` run; every field is a flag (--max-steps) and a YAML key (max_steps), LoRA's included."""

    model: str = "smollm2-135m"
    data: str = ""  # a .jsonl/.csv/.tsv/.txt/.json/.parquet/.arrow file, a save_to_disk folder, a hub id (user/name)
    task: Literal["causal-lm", "classify"] = "causal-lm"
    out: str = "run"
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=16, dropout=0.05))
    lr: float = 2e-3  # with the LoRA defaults above; 2e-4 left 100-step runs far behind (bench/e2e.py, bench/sst2.py)
    lora_plus_ratio: float | None = None  # LoRA+: B factors learn at lr x this ratio (the paper suggests 16)
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
    overwrite: bool = False  # replace the run already in `out` (else it is refused)
    seed: int = 0
    gradient_checkpointing: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    full_finetune: bool = False
    quantize: Literal["nf4", "int8"] | None = None  # QLoRA: the frozen base's linear layers in 4-bit NF4 or int8
    schedule: runner.Schedule = "cosine"
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    skip_bad: bool = False
    strict_fields: bool = False  # refuse data fields outside the example shapes (else ignored with a notice)
    eval_bleu: bool = False  # also generate for each eval prompt and score BLEU (before and after)
    num_beams: int = 1
    text_field: str | None = None  # the data's column (or field) that is lorakit's `text` (e.g. sentence)
    prompt_field: str | None = None  # ... `prompt` (e.g. instruction)
    completion_field: str | None = None  # ... `completion` (e.g. output)
    messages_field: str | None = None  # ... `messages` (e.g. conversations)
    label_field: str | None = None  # ... `label`
    streaming: bool = False  # read the training data as a stream (needs max_steps); eval data is read whole
    shuffle_buffer: int = 0  # with streaming: shuffle through a buffer of this many examples (0: in order)

    def __post_init__(self):
        options.check(self)
        if self.quantize and self.full_finetune:
            raise LoraError("--quantize freezes the base in low precision, which --full-finetune would train; "
                            "choose one")
        if self.streaming and not self.max_steps:
            raise LoraError("--streaming needs --max-steps: a stream has no length to count epochs in")
        if self.shuffle_buffer and not self.streaming:
            raise LoraError("--shuffle-buffer shuffles a stream; it needs --streaming (other data is shuffled anyway)")
        if self.shuffle_buffer < 0:
            raise LoraError(f"--shuffle-buffer must be 0 or more, got {self.shuffle_buffer}")


# the settings a resumed run may change (the rest must match the run it continues: lorakit.runner.open_folder)
FREE = {"out", "resume", "overwrite", "save_every", "keep", "eval_data", "eval_every", "eval_bleu", "num_beams",
        "gradient_checkpointing"}


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
        batch = datalib.collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))], pad_id)
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


def train(cfg: TrainConfig, adapt=None) -> dict:
    """Train per `cfg`. Writes RUN/adapter.safetensors (or RUN/model/ for a full fine-tune),
    RUN/metrics.jsonl, RUN/loss.png, RUN/README.md (model card) and RUN/checkpoints/step-N/.

    `adapt(model) -> model`, if given, replaces lorakit's injection (e.g. PEFT's `get_peft_model`, to compare
    both through the same loop); what it returns is trained as is and saved with its `save_pretrained` in RUN/adapter/."""
    return runner.run(Trainer(cfg, adapt))


class Trainer:
    """One LLM run in named steps for lorakit.runner: set-up (here), step, evaluate, finish."""

    name, free = "train", FREE

    def __init__(self, cfg: TrainConfig, adapt=None):
        from transformers import get_scheduler

        on_cpu = runner.setup(self, cfg)  # bf16 is plain autocast, so runs in one process may differ in precision
        acc, self.adapt, self.stateful = self.acc, adapt, {}
        self.fsdp = fsdp.setup(acc, cfg, adapt, on_cpu)

        fields = datalib.field_map(cfg)
        examples, self.skipped = datalib.read_data(cfg.data, fields, cfg.skip_bad, cfg.strict_fields,
                                                   streaming=cfg.streaming, seed=cfg.seed,
                                                   shuffle_buffer=cfg.shuffle_buffer)
        self.labels = datalib.labels_of(examples, cfg.data) if cfg.task == "classify" else None
        model, self.tokenizer, self.base = pretrained.load(cfg.model, cfg.task, num_labels=len(self.labels or [0, 1]))
        self.rows, skipped = self.encode(examples, cfg.data)  # a list, a memory-mapped datasets.Dataset or a Stream
        self.skipped += skipped
        if isinstance(self.rows, datalib.Stream):
            self.stateful["stream"] = self.rows  # where it stands goes into checkpoints
        self.eval_examples = (datalib.read_data(cfg.eval_data, fields, cfg.skip_bad, cfg.strict_fields, eval=True)[0]
                              if cfg.eval_data else [])
        self.eval_rows = self.encode(self.eval_examples, cfg.eval_data)[0] if len(self.eval_examples) else []
        self.eval_every = cfg.eval_every if self.eval_rows else 0
        self.pad_id = self.tokenizer.pad_token_id

        saved = [*cfg.lora.modules_to_save, *(classifier_head(model) if cfg.task == "classify" else [])]
        if cfg.quantize:
            quantize(model, cfg.quantize, skip=saved)  # the modules trained in full stay as they are
        if cfg.full_finetune:
            model.requires_grad_(True)
        elif adapt is not None:
            model = adapt(model)
        else:
            inject(model, replace(cfg.lora, modules_to_save=saved, exclude=keep_out(model, cfg.lora.exclude, saved)))
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}  # reentrant checkpointing would leave LoRA untrained (peft#1142)
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trained)
        self.n_total = sum(p.numel() for p in model.parameters())

        self.per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.rows) / self.per_step))
        groups = runner.lora_plus([{"params": self.trained, "lr": cfg.lr}], [model], cfg.lora_plus_ratio)
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=round(cfg.warmup * self.total),
                                   num_training_steps=self.total)
        self.model, self.opt = acc.prepare(model, opt)
        self.plain = acc.unwrap_model(self.model)
        self.trained = [p for p in self.model.parameters() if p.requires_grad]  # FSDP swaps in sharded ones
        self.params = {n: p for n, p in self.plain.named_parameters() if p.requires_grad}  # what checkpoints hold
        self.tokens, self.t0 = 0, time.time()

    def encode(self, examples, spec: str) -> tuple:
        """(token rows for the task, bad rows skipped): causal LM rows whose loss tokens were all truncated are
        dropped; a data set's rows come from datalib.encode_dataset (its bad rows are found there, not by read_data)."""
        if not isinstance(examples, list):
            with self.acc.main_process_first():  # the others read the token rows it caches
                return datalib.encode_dataset(examples, spec, self.cfg.task, self.tokenizer, self.cfg.max_length,
                                              self.labels, self.cfg.skip_bad)
        if self.cfg.task == "causal-lm":
            return datalib.tokenize_causal(examples, self.tokenizer, self.cfg.max_length)[0], 0
        return datalib.tokenize_classify(examples, self.tokenizer, self.cfg.max_length, self.labels)[0], 0

    def begin(self, start: int) -> dict:
        """Say what trains; evaluate the untouched model once (a fresh run); returns those "before" metrics."""
        cfg, main = self.cfg, self.acc.is_main_process
        if self.fsdp:
            print(f"FSDP: process {self.acc.process_index} holds {fsdp.local_numel(self.plain):,} of "
                  f"{self.n_total:,} parameters", flush=True)
        if main:
            print(f"{self.n_trainable:,} of {self.n_total:,} params trainable" if cfg.full_finetune or self.adapt
                  else summary(self.plain))
            if self.skipped:
                print(f"skipped {self.skipped} bad lines in {cfg.data}")
        before = {}
        if self.eval_rows and not start:
            before = {f"{k}_before": v for k, v in self.evaluate(0).items()}
            if cfg.eval_bleu:
                before["eval_bleu_before"] = self.bleu()
            if main:
                print("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
        return {"trainable_params": self.n_trainable, "total_params": self.n_total, "skipped": self.skipped, **before}

    def step(self, step: int) -> dict:
        """One optimisation step on this process's slice of global batch `step`."""
        cfg, acc = self.cfg, self.acc
        world, rank = acc.num_processes, acc.process_index
        if isinstance(self.rows, datalib.Stream):  # the stream's next rows, in order
            rows, idx = self.rows.batch(step, self.per_step), list(range(self.per_step))
        else:
            rows, idx = self.rows, runner.step_indices(len(self.rows), cfg.seed, step, self.per_step)
        size = cfg.batch_size * world
        micro = [idx[k * size + rank * cfg.batch_size:k * size + (rank + 1) * cfg.batch_size]
                 for k in range(cfg.grad_accum)]
        batches = [datalib.collate([rows[i] for i in m], self.pad_id) for m in micro]
        count = acc.reduce(torch.tensor(float(sum(n_targets(b, cfg.task) for b in batches)), device=acc.device),
                           "sum").item()  # on the device: NCCL reduces no CPU tensors
        running = 0.0
        for k, b in enumerate(batches):
            sync = acc.no_sync(self.model) if k < len(batches) - 1 else contextlib.nullcontext()
            with sync, torch.autocast(acc.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, _, _ = loss_sum(self.model, b, cfg.task)
                acc.backward(loss * world / max(count, 1))
            running += loss.item()
            self.tokens += int(b["attention_mask"].sum())
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.trained, cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": acc.reduce(torch.tensor(running, device=acc.device), "sum").item() / max(count, 1),
                "lr": self.sched.get_last_lr()[0], "tokens_per_s": self.tokens * world / max(time.time() - self.t0, 1e-9)}

    def evaluate(self, step: int) -> dict:
        return evaluate(self.plain, self.eval_rows, self.cfg.task, self.pad_id, self.cfg.batch_size)

    def bleu(self) -> float:
        """BLEU of greedy/beam generations for the eval prompts against all their references."""
        was_training = self.plain.training
        self.plain.eval()
        score = bleu(self.plain, self.tokenizer, self.eval_examples, max_new_tokens=self.cfg.max_length,
                     num_beams=self.cfg.num_beams)["bleu"]
        self.plain.train(was_training)
        return score

    def checkpointed(self, step: int):
        pass

    def finish(self, result: dict) -> dict:
        """Final evaluation, then the adapter (or model) into the run folder, by the main process."""
        cfg, out = self.cfg, self.out
        if isinstance(self.rows, datalib.Stream):
            self.rows.close()
            result["skipped"] = self.skipped + self.rows.skipped  # bad rows it met as it read
        if self.eval_rows:
            result.update(self.evaluate(self.total))
            if cfg.eval_bleu:
                result["eval_bleu"] = self.bleu()
        whole = fsdp.gather(self.params) if self.fsdp else {}  # sharded tensors gathered by every process
        if not self.acc.is_main_process:
            return result
        if cfg.full_finetune:
            self.plain.save_pretrained(out / "model")
            self.tokenizer.save_pretrained(out / "model")
        elif self.adapt is not None:
            self.plain.save_pretrained(out / "adapter")
        else:
            with fsdp.whole(self.plain, whole):
                result["adapter"] = str(save(self.plain, out / "adapter.safetensors", base_model=self.base))
            result["adapter_bytes"] = (out / "adapter.safetensors").stat().st_size
        return result

    def card(self, result: dict) -> tuple[dict, str, dict]:
        """The run's model card (runner.write_card): hub metadata (base model id, text-generation or
        text-classification, eval results), the data by name/size/SHA-256, never a local path."""
        cfg, full = self.cfg, self.cfg.full_finetune
        pipeline_tag = {"causal-lm": "text-generation", "classify": "text-classification"}[cfg.task]
        tags = ["lorakit", pipeline_tag] if full else ["lora", "lorakit", pipeline_tag]
        front = {**runner.card_front(self.base, cfg.data, cfg.eval_data, pipeline_tag, tags, result,
                                     relation="finetune" if full else "adapter"),
                 "task": cfg.task, "r": None if full else cfg.lora.r, "alpha": None if full else cfg.lora.alpha,
                 "targets": "all weights" if full else cfg.lora.targets, "steps": result["steps"],
                 "trainable_params": result["trainable_params"], "labels": list(self.labels or []) or None}
        body = (f"A {'full fine-tune' if full else 'LoRA adapter'} of `{runner.public_name(self.base)}` trained with "
                f"lorakit on `{runner.public_name(cfg.data)}` for {result['steps']} steps.\n\n"
                + runner.results_table(result))
        return {k: v for k, v in front.items() if v is not None}, body.strip(), asdict(cfg)
