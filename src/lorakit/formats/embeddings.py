"""Learned token embeddings (textual inversion, pivotal tuning): new tokenizer tokens and their encoder rows."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lorakit.core.errors import LoraError


def check_embeddings(text_encoder: nn.Module, embeddings: dict, source: str = "embeddings") -> None:
    """Raise LoraError naming the token unless every embedding is one finite vector of the encoder's width."""
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    for token, vec in embeddings.items():
        if not isinstance(token, str) or not token or token != token.strip():
            raise LoraError(f"{source}: token {token!r} is not a usable token string (non-empty, no outer spaces)")
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.shape[0] != dim:
            shape = list(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise LoraError(f"{source}: embedding for token {token!r} has shape {shape}; this text encoder "
                            f"needs one vector of {dim} (it was made for a different text encoder)")
        if not vec.is_floating_point() or not torch.isfinite(vec).all():
            raise LoraError(f"{source}: embedding for token {token!r} contains NaN or Inf values (or is not float)")


@torch.no_grad()
def add_tokens(tokenizer, text_encoder: nn.Module, embeddings: dict, source: str = "embeddings") -> list[int]:
    """Add the tokens (a known one keeps its id), grow the encoder's embedding table, set the rows; returns the ids."""
    check_embeddings(text_encoder, embeddings, source)
    vocab = tokenizer.get_vocab()
    new = [t for t in embeddings if t not in vocab]
    if new:
        tokenizer.add_tokens(new)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in embeddings]
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if ids and max(ids) >= rows:  # only ever grow: CLIP's table may be larger than the tokenizer
        kw = {"mean_resizing": False} if "mean_resizing" in inspect.signature(
            text_encoder.resize_token_embeddings).parameters else {}  # the rows are set below (transformers >= 4.46)
        text_encoder.resize_token_embeddings(max(ids) + 1, **kw)
    weight = text_encoder.get_input_embeddings().weight
    for i, vec in zip(ids, embeddings.values()):
        weight[i] = vec.to(device=weight.device, dtype=weight.dtype)
    return ids
