"""A diffusers pipeline seen as one module: its LoRA-capable components under their pipeline names, so adapter
paths read `unet.<path>`, `text_encoder.<path>` exactly as diffusers and kohya files name them."""

from __future__ import annotations

import functools

from torch import nn

from lorakit.core.errors import LoraError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def as_module(obj) -> nn.Module:
    """`obj` itself if it is a module; for a pipeline, an nn.ModuleDict view of its components (the same
    objects, so adapters put on the view are on the pipeline)."""
    if isinstance(obj, nn.Module):
        return obj
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        view = nn.ModuleDict({k: v for k, v in comps.items() if k in COMPONENTS and isinstance(v, nn.Module)})
        if len(view):
            view.lora_pipeline = True
            return view
    raise LoraError(f"expected a torch nn.Module or a diffusers pipeline, got a {type(obj).__name__}")


def is_pipeline_view(model: nn.Module) -> bool:
    return getattr(model, "lora_pipeline", False)


def component_of(model: nn.Module) -> str | None:
    """Which pipeline component a lone model plays, judged by its class (None when it is not one)."""
    name = type(model).__name__
    if name.startswith("UNet"):
        return "unet"
    if name == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    if name.startswith(("CLIPTextModel", "T5EncoderModel")):
        return "text_encoder"
    if "Transformer" in name and type(model).__module__.startswith("diffusers"):
        return "transformer"
    return None


def split_component(path: str) -> tuple[str | None, str]:
    """("unet", "down_blocks.0...") for "unet.down_blocks.0..."; (None, path) when it names no component."""
    head, _, rest = path.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (None, path)


def accepts_pipeline(fn):
    """Let `fn(model, ...)` take a diffusers pipeline too (it works on the components' view, and gives back
    the pipeline where it would have given back the model)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        view = as_module(model)
        out = fn(view, *args, **kwargs)
        return model if out is view else out
    return wrapper
