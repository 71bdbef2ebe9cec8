"""Stable Diffusion pipelines: loading one by folder, hub id or embedded name, and its text conditioning."""

from __future__ import annotations

from typing import Callable

import torch

from lorakit.core.errors import LoraError

EMBEDDED: dict[str, Callable[[], str]] = {}  # name -> its folder, built on first use (lorakit.sd.digits adds "digits")


def load_pipeline(model: str, device=None):
    """A diffusers pipeline from a folder, hub id or embedded name, in fp32, on `device`."""
    from diffusers import DiffusionPipeline

    model = EMBEDDED[model]() if model in EMBEDDED else model
    try:
        pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise LoraError(f"cannot load the pipeline {model!r} ({e})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """(text hidden states, extra UNet inputs) for `prompts`: CLIP's last hidden states, padded to the tokenizer's
    max length as SD conditions, and no extra inputs."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0], {}
