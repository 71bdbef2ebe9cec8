"""Text generation with weighted adapters on a base model, and BLEU of generations against references."""

from __future__ import annotations

import torch

from lorakit.core.errors import LoraError
from lorakit.core.model import merge as merge_adapters
from lorakit.core.model import set_weights
from lorakit.formats.io import base_model, load, parse_adapter
from lorakit.llm import pretrained


def load_model(model: str | None, adapters: list[str], merge: bool = False, guard: str | None = None, device=None):
    """(model, tokenizer) on `device` with `adapters` ("FILE[:WEIGHT]") loaded and active with their weights (`guard`:
    see set_weights). Without `model`, the base model recorded in the first adapter is used."""
    specs = [parse_adapter(a) for a in adapters]
    m, tokenizer, _ = pretrained.load(base_model(model, [path for path, _ in specs]))
    m = m.to(device) if device is not None else m
    weights = {load(m, path): w for path, w in specs}
    if weights:
        set_weights(m, weights, guard=guard)
        if merge:
            merge_adapters(m)
    return m.eval(), tokenizer


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, num_beams: int = 1,
             chat: bool = False, batch_size: int = 8) -> list[str]:
    """Greedy (or beam) continuations of `prompts`, raw or as user turns of the chat template."""
    outs = []
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        if chat:
            chunk = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in chunk]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outs += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in outs]


def bleu(model, tokenizer, examples: list[dict], max_new_tokens: int = 64, num_beams: int = 1,
         chat: bool = False) -> dict:
    """Corpus BLEU (sacrebleu) of generations for each distinct prompt (raw, or as a chat user turn),
    against all its references."""
    import sacrebleu

    refs: dict[str, list[str]] = {}
    for ex in examples:
        if "prompt" not in ex:
            raise LoraError("BLEU needs prompt/completion examples (or E2E 'MR||reference' lines)")
        refs.setdefault(ex["prompt"], []).append(ex["completion"])
    prompts = list(refs)
    hyps = complete(model, tokenizer, prompts, max_new_tokens, num_beams, chat)
    n = max(len(r) for r in refs.values())
    streams = [[refs[p][k] if k < len(refs[p]) else refs[p][0] for p in prompts] for k in range(n)]
    score = sacrebleu.corpus_bleu(hyps, streams)
    return {"bleu": score.score, "prompts": len(prompts), "samples": list(zip(prompts[:3], hyps[:3]))}
