"""Learned token embeddings (textual inversion, pivotal tuning): new tokenizer tokens and their encoder rows.

Tokens are only ever added as new tokens with new rows (a token the tokenizer knows is refused), so the base
model's own tokens keep their rows. Tokens loaded with an adapter go away with it: delete() and unload(merge=False)
remove them from the tokenizer and the encoder; unload(merge=True) keeps them, baked in like the LoRA."""

from __future__ import annotations

import functools
import inspect
import json

import torch
from torch import nn

from lorakit.core.errors import LoraError, warn


def check_embeddings(text_encoder: nn.Module, embeddings: dict, source: str = "embeddings", tokenizer=None) -> None:
    """Raise LoraError naming the token unless every embedding is one finite vector of the encoder's width (and,
    given the tokenizer, a token it does not know yet)."""
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    for token, vec in embeddings.items():
        if not isinstance(token, str) or not token or token != token.strip():
            raise LoraError(f"{source}: token {token!r} is not a usable token string (non-empty, no outer spaces)")
        if token in vocab:
            raise LoraError(f"{source}: token {token!r} is already in the tokenizer (id {vocab[token]}); learned "
                            "tokens are added as new tokens and never replace a known one. Delete the adapter that "
                            "added it, or load onto a fresh pipeline")
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.shape[0] != dim:
            shape = list(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise LoraError(f"{source}: embedding for token {token!r} has shape {shape}; this text encoder "
                            f"needs one vector of {dim} (it was made for a different text encoder)")
        if not vec.is_floating_point() or not torch.isfinite(vec).all():
            raise LoraError(f"{source}: embedding for token {token!r} contains NaN or Inf values (or is not float)")


def _resize(text_encoder: nn.Module, rows: int):
    kw = {"mean_resizing": False} if "mean_resizing" in inspect.signature(
        text_encoder.resize_token_embeddings).parameters else {}  # rows are set by the caller (transformers >= 4.46)
    text_encoder.resize_token_embeddings(rows, **kw)


@torch.no_grad()
def add_tokens(tokenizer, text_encoder: nn.Module, embeddings: dict, source: str = "embeddings",
               owner: str | None = None) -> list[int]:
    """Add the tokens as new tokens, grow the encoder's embedding table if needed, set their rows; returns the ids.
    With `owner` (an adapter name) deleting that adapter removes them again."""
    check_embeddings(text_encoder, embeddings, source, tokenizer)
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens(list(embeddings))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in embeddings]
    if ids and max(ids) >= rows:  # only ever grow: CLIP's table may be larger than the tokenizer
        _resize(text_encoder, max(ids) + 1)
    weight = text_encoder.get_input_embeddings().weight
    old = {i: weight[i].clone() for i in ids if i < rows}  # unused rows of the table, put back on removal
    for i, vec in zip(ids, embeddings.values()):
        weight[i] = vec.to(device=weight.device, dtype=weight.dtype)
    if owner is not None:
        text_encoder.__dict__.setdefault("lora_undo", {})[owner] = functools.partial(
            remove_tokens, tokenizer, text_encoder, list(embeddings), rows, old)
    return ids


@torch.no_grad()
def remove_tokens(tokenizer, text_encoder: nn.Module, tokens: list[str], rows: int, old: dict):
    """Take added `tokens` out of the tokenizer and their rows out of the encoder (tokens added after them move
    down, rows too; the table shrinks back to `rows` entries when nothing else needs it)."""
    if not hasattr(tokenizer, "_tokenizer"):  # a pure-Python tokenizer has no serialisable added-token list
        warn(f"cannot remove the learned tokens {tokens} from a {type(tokenizer).__name__}; they stay")
        return
    from tokenizers import Tokenizer

    vocab = tokenizer.get_vocab()
    gone = {vocab[t] for t in tokens if t in vocab}
    if not gone:
        return
    state, moves, kept, free = json.loads(tokenizer._tokenizer.to_str()), {}, [], min(gone)
    for tok in sorted(state["added_tokens"], key=lambda t: t["id"]):
        if tok["id"] in gone:
            continue
        if tok["id"] > free:  # a token added later: renumbered down, as if ours had never been added
            moves[tok["id"]], tok["id"], free = free, free, free + 1
        kept.append(tok)
    state["added_tokens"] = kept
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    weight = text_encoder.get_input_embeddings().weight
    for src, dst in moves.items():
        weight[dst] = weight[src]
    size = max(rows, len(tokenizer))
    for i, row in old.items():
        if len(tokenizer) <= i < size:
            weight[i] = row
    if weight.shape[0] > size:
        _resize(text_encoder, size)


def keep_tokens(model: nn.Module, name: str):
    """Make the tokens that adapter `name` added permanent: deleting the adapter no longer removes them."""
    for m in model.modules():
        m.__dict__.get("lora_undo", {}).pop(name, None)
