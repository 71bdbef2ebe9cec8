"""Continuous batching over many adapters on one base model: requests join and leave the running batch between
decoding steps, each row with its own adapter set (lorakit.set_rows), sharing one KV cache.

Why not transformers' continuous batching (``generate_batch``, ``transformers serve``): it packs every request's
tokens into one ragged row for paged attention, so a per-request adapter would need its private per-token layout,
and its sampling settings are per manager rather than per request (no per-request seed or stop strings). Here the
batch stays a padded [rows x tokens] batch: joiners are prefilled together, their cache rows are left-padded onto
the running cache, and finished rows are dropped (with the padding every row no longer needs).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import itertools
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lorakit.core.errors import LoraError
from lorakit.core.model import set_rows


class QueueFull(LoraError):
    """The waiting queue holds --max-queue requests already."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: prompt token ids, the row's adapter set ({} = base) and its sampling settings.

    on_event(delta, finish_reason) is called from the engine's thread with each new piece of text, then once with the
    finish reason ("stop", "length", "cancelled" or "error: ...")."""

    ids: list[int]
    adapters: dict[str, float] = dataclasses.field(default_factory=dict)
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    on_event: Callable[[str, str | None], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already handed to on_event
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None  # from seed; None: torch's global generator
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def key(self) -> tuple:
        return tuple(sorted(self.adapters.items()))


class Engine:
    """Runs requests on `model` in a background thread, up to max_batch at once, max_queue more waiting."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = getattr(model.config, "max_position_embeddings", None) or 2**31
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.cache = self.mask = None
        self.routed: list[tuple] | None = None  # the adapter sets the model's rows are set to
        self.lock = threading.Lock()  # held while the model runs; runtime loading takes it too
        self.wake = threading.Condition()
        self.stopped = False
        self.steps = 0
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)

    # --- the outside ------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self):
        with self.wake:
            self.stopped = True
            self.wake.notify_all()
        self.thread.join(timeout=10)

    def submit(self, requests: list[Request]):
        """Queue requests (all or none); QueueFull when the queue cannot take them all."""
        with self.wake:
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests wait already (--max-queue "
                                f"{self.max_queue}); retry later")
            self.waiting.extend(requests)
            self.wake.notify_all()

    def cancel(self, requests: list[Request]):
        """Stop these requests; their rows leave the batch before the next step."""
        with self.wake:
            for r in requests:
                r.cancelled = True
            self.wake.notify_all()

    def in_use(self, name: str) -> int:
        """How many queued or running requests use adapter `name`."""
        with self.wake:
            return sum(name in r.adapters for r in itertools.chain(self.waiting, self.running))

    def changed(self):
        """Call (holding self.lock) after adding or removing adapters: the rows' factors are read again."""
        self.routed = None

    # --- the loop ---------------------------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self.wake:
                while not self.stopped and not self.waiting and not self.running:
                    self.wake.wait()
                if self.stopped:
                    return
                for r in [r for r in self.waiting if r.cancelled]:
                    self.waiting.remove(r)
                    self._finish(r, "cancelled")
                joiners = [self.waiting.popleft() for _ in range(min(len(self.waiting),
                                                                     self.max_batch - len(self.running)))]
            with self.lock, torch.inference_mode():
                batch = joiners or self.running
                try:
                    self._prefill(joiners) if joiners else self._decode()
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                    for r in batch:
                        self._finish(r, f"error: {type(e).__name__}: {e}")
                    if not joiners:
                        self.running, self.cache, self.mask = [], None, None
                    self.routed = None
                self._leave()
                self.steps += 1

    def _route(self, rows: list[Request]):
        keys = [r.key() for r in rows]
        if keys != self.routed:
            set_rows(self.model, [dict(k) for k in keys])
            self.routed = keys

    def _prefill(self, joiners: list[Request]):
        joiners.sort(key=Request.key)  # rows with the same adapters side by side (single-group layers: a slice)
        width = max(len(r.ids) for r in joiners)
        ids = torch.full((len(joiners), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(joiners), width), dtype=torch.long)
        for i, r in enumerate(joiners):
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self._route(joiners)
        dev = self.model.device
        logits = self._forward(ids.to(dev), mask.to(dev), (mask.cumsum(-1) - 1).clamp(min=0).to(dev), cache)
        for r in joiners:
            if r.seed is not None:
                r.generator = torch.Generator().manual_seed(r.seed)
        self._join(cache, mask.to(dev), joiners)
        self._advance(joiners, logits)

    def _decode(self):
        rows = self.running
        self._route(rows)
        dev = self.model.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], 1)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=dev)
        self._advance(rows, self._forward(ids, self.mask, self.mask.sum(-1, keepdim=True) - 1, self.cache))

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """The last position's logits; `cache` (a DynamicCache) grows in place."""
        kw = {self.cache_arg: cache}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **kw).logits[:, -1]

    def _advance(self, rows: list[Request], logits: torch.Tensor):
        """Pick each row's next token, extend its text, finish it on EOS, a stop string, max_tokens or the context."""
        logits = logits.float().cpu()
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            token = greedy[i] if r.temperature == 0 else self._sample(r, logits[i])
            r.tokens.append(token)
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            finish = None
            if token in self.eos and not r.ignore_eos:
                finish = "stop"
            found = [at for s in r.stop if (at := text.find(s, max(0, r.sent - len(s)))) >= 0]
            if found:
                text, finish = text[: min(found)], "stop"
            elif finish is None and (len(r.tokens) >= r.max_tokens or len(r.ids) + len(r.tokens) >= self.context):
                finish = "length"
            r.text = text
            hold = 0 if finish else max([len(s) - 1 for s in r.stop] + [0])  # a stop string may still be forming
            end = len(text) - hold
            while end > r.sent and text[end - 1] == "\ufffd":  # a character whose bytes are not all there yet
                end -= 1
            if end > r.sent:
                self._emit(r, text[r.sent: end], None)
                r.sent = end
            if finish:
                self._finish(r, finish)

    @staticmethod
    def _sample(r: Request, logits: torch.Tensor) -> int:
        probs = F.softmax(logits / r.temperature, -1)
        if r.top_p < 1:
            p, order = probs.sort(descending=True)
            keep = p.cumsum(-1) - p < r.top_p  # the smallest prefix whose mass reaches top_p (at least one token)
            probs = torch.zeros_like(probs).scatter(0, order[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _finish(self, r: Request, reason: str):
        if r.finish_reason is None:
            r.finish_reason = reason
            self._emit(r, "", reason)

    @staticmethod
    def _emit(r: Request, text: str, finish: str | None):
        """Hand text to the request's listener; one that fails (its client gone) cancels the request, not the batch."""
        if r.on_event:
            try:
                r.on_event(text, finish)
            except Exception:  # noqa: BLE001
                r.cancelled = True

    def _join(self, cache, mask: torch.Tensor, joiners: list[Request]):
        """Add the joiners' cache rows to the running cache, left-padding the shorter one (all layers built before
        any is replaced, so a failure leaves the running rows as they were)."""
        if not self.running:
            self.cache, self.mask, self.running = cache, mask, list(joiners)
            return
        width = max(mask.shape[1], self.mask.shape[1])

        def stack(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(a.shape)
            shape[0], shape[dim] = a.shape[0] + b.shape[0], width
            out = a.new_zeros(shape)
            out[: a.shape[0]].narrow(dim, width - a.shape[dim], a.shape[dim]).copy_(a)
            out[a.shape[0]:].narrow(dim, width - b.shape[dim], b.shape[dim]).copy_(b)
            return out

        built = [(stack(old.keys, new.keys, 2), stack(old.values, new.values, 2))
                 for old, new in zip(self.cache.layers, cache.layers)]
        self.mask = stack(self.mask, mask, 1)
        for layer, (k, v) in zip(self.cache.layers, built):
            layer.keys, layer.values = k, v
        self.running += joiners

    def _leave(self):
        """Drop finished and cancelled rows, and the left padding no remaining row needs."""
        for r in self.running:
            if r.cancelled:
                self._finish(r, "cancelled")
        keep = [i for i, r in enumerate(self.running) if r.finish_reason is None]
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.mask = [], None, None
            return
        self._keep(keep)
        first = int(self.mask.any(0).nonzero()[0])
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def _keep(self, rows: list[int]):
        idx = torch.tensor(rows, device=self.mask.device)
        kept = [(layer.keys.index_select(0, idx), layer.values.index_select(0, idx)) for layer in self.cache.layers]
        for layer, (k, v) in zip(self.cache.layers, kept):
            layer.keys, layer.values = k, v
        self.mask = self.mask.index_select(0, idx)
        self.running = [self.running[i] for i in rows]
