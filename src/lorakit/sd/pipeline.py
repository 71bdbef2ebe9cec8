"""Stable Diffusion pipelines: loading one by folder, hub id or embedded name, and its text conditioning."""

from __future__ import annotations

from typing import Callable

import torch

from lorakit.core.errors import LoraError, silence_known_notices

EMBEDDED: dict[str, Callable[[], str]] = {}  # name -> its folder, built on first use (lorakit.sd.digits adds "digits")


def load_pipeline(model: str, device=None):
    """A diffusers pipeline from a folder, hub id or embedded name, in fp32, on `device`."""
    import inspect

    silence_known_notices()  # before diffusers imports transformers' image processors
    import diffusers
    from diffusers import DiffusionPipeline

    model = EMBEDDED[model]() if model in EMBEDDED else model
    try:
        cls = getattr(diffusers, DiffusionPipeline.load_config(model).get("_class_name", ""), None)
        takes = inspect.signature(cls.__init__).parameters if isinstance(cls, type) else {}
        no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in takes else {}
        pipe = DiffusionPipeline.from_pretrained(model, **no_checker)  # SD 1.x without its safety checker
    except (OSError, ValueError) as e:
        raise LoraError(f"cannot load the pipeline {model!r} ({e})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def text_encoders(pipe) -> list:
    """The pipeline's text encoders present: [text_encoder] for SD 1.x/2.x, [text_encoder, text_encoder_2] for SDXL."""
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


def is_sdxl(pipe) -> bool:
    """Whether the UNet is conditioned SDXL's way: pooled text embedding + time ids (addition_embed_type text_time)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def encode_prompts(pipe, prompts: list[str], sizes: list[tuple[int, int, int, int]] | None = None,
                   resolution: int | None = None) -> tuple[torch.Tensor, dict]:
    """(text hidden states, extra UNet inputs) for `prompts`, each tokenizer padding to its max length.

    SD 1.x/2.x: CLIP's last hidden states, no extra inputs. SDXL (as its pipeline and diffusers' SDXL scripts): both
    encoders' penultimate hidden states concatenated, and added_cond_kwargs = text_embeds (text_encoder_2's pooled,
    projected output) and time_ids (original height, width, crop top, left, target height, width) per prompt, from
    `sizes` (original h, w, crop top, left; load_cropped's) and `resolution` (default: the pipeline's image size;
    without sizes, an uncropped image of that size)."""
    if not is_sdxl(pipe):
        tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0], {}
    hidden, pooled = [], None
    for tokenizer, encoder in ((getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                               (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))):
        if encoder is None:
            continue
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: the projected pooled output, the last encoder's
    if pooled is None or pooled.dim() != 2:
        raise LoraError("this SDXL-style UNet needs a pooled text embedding, but the pipeline's last text encoder "
                        f"({type(getattr(pipe, 'text_encoder_2', None)).__name__}) gives none; expected a "
                        "CLIPTextModelWithProjection as text_encoder_2")
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sizes = sizes or [(res, res, 0, 0)] * len(prompts)
    time_ids = torch.tensor([[*s, res, res] for s in sizes], dtype=pooled.dtype, device=pooled.device)
    unet = pipe.unet
    want = unet.add_embedding.linear_1.in_features
    got = unet.config.addition_time_embed_dim * time_ids.shape[1] + pooled.shape[1]
    if want != got:
        raise LoraError(f"the UNet's added embedding takes {want} features, but {time_ids.shape[1]} time ids and a "
                        f"{pooled.shape[1]}-wide pooled text embedding make {got}; train-sd supports SDXL base "
                        "pipelines (the refiner's aesthetic-score ids are not supported)")
    return torch.cat(hidden, dim=-1), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
