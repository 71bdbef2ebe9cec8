"""Images from a Stable Diffusion pipeline with stacked, weighted LoRAs: DPM-Solver++ by default, A1111 prompt
tags `<lora:NAME:W>` / `<lora:NAME:TE_W:UNET_W>`, negative weights, optional fusing for speed."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lorakit.core.components import as_module
from lorakit.core.errors import LoraError
from lorakit.core.guard import route
from lorakit.core.model import active, delete, lora_modules, merge, set_weights
from lorakit.formats.embeddings import keep_tokens
from lorakit.formats.hub import name_of
from lorakit.formats.io import base_model, load, parse_adapter
from lorakit.sd.pipeline import load_pipeline as load_base

TAG = re.compile(r"<lora:([^<>]*)>")
TEXT = {"text_encoder", "text_encoder_2", "text_encoder_3"}  # the parts a tag's TE weight applies to


def parse_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """(prompt without tags, [(name, text-encoder weight, unet weight)]) for A1111's `<lora:NAME[:TE[:UNET]]>`."""
    found = []
    for body in TAG.findall(prompt):
        name, *weights = body.split(":")
        if not name.strip() or len(weights) > 2:
            raise LoraError(f"prompt tag <lora:{body}> is malformed; write <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>")
        try:
            w = [float(x) for x in weights] or [1.0]
        except ValueError:
            raise LoraError(f"prompt tag <lora:{body}>: weights must be numbers") from None
        found.append((name.strip(), w[0], w[-1]))
    rest = TAG.sub("", prompt)
    if "<lora:" in rest:
        raise LoraError(f"prompt {prompt!r} has an unclosed <lora:...> tag")
    return " ".join(rest.split()), found


def find_lora(name: str, lora_dir: str | None) -> Path:
    """The file for a prompt tag's NAME in `lora_dir` (NAME.safetensors, or NAME as given)."""
    if not lora_dir:
        raise LoraError(f"prompt tag <lora:{name}> needs --lora-dir, the folder holding {name}.safetensors")
    for cand in (Path(lora_dir) / f"{name}.safetensors", Path(lora_dir) / name):
        if cand.is_file():
            return cand
    have = sorted(p.stem for p in Path(lora_dir).glob("*.safetensors"))
    raise LoraError(f"no LoRA named {name!r} in {lora_dir}; it has {have or 'none'}")


def carriers(pipe, name: str) -> set[str]:
    """The pipeline components ("unet", "text_encoder", ...) on which adapter `name` has layers."""
    return {path.split(".")[0] for path, m in lora_modules(as_module(pipe)).items() if name in m.lora_names()}


def load_pipeline(model: str | None, loras: list[str], prompt: str, lora_dir: str | None = None, fuse: bool = False,
                  device=None, guard: str | None = None, triggers: dict[str, list[str]] | None = None,
                  loaded: dict | None = None):
    """(pipeline with the LoRAs of `--lora FILE[:W]` and of the prompt's tags active, prompt without tags).
    Without `model`, the base recorded in the first LoRA is used; `guard` holds back burn-out (set_weights);
    `triggers` {file stem: words} routes: such a LoRA is used only when one of its words is in the prompt.
    `loaded`, if given, is filled with {file or hub id: the names of the adapters it became}."""
    prompt, tags = parse_tags(prompt)
    specs = [(path, w, w) for path, w in map(parse_adapter, loras)]
    specs += [(str(find_lora(name, lora_dir)), te, un) for name, te, un in tags]
    if triggers:
        stems = {name_of(p) for p, _, _ in specs}
        if unknown := sorted(set(triggers) - stems):
            raise LoraError(f"--trigger names {unknown[0]!r}, which is none of the LoRAs given ({sorted(stems)})")
        on = route(prompt, {name_of(p): 1.0 for p, _, _ in specs}, triggers)
        specs = [s for s in specs if name_of(s[0]) in on]
    pipe = load_base(base_model(model, [path for path, _, _ in specs]), device)
    weights = {}
    for k, (path, te, un) in enumerate(specs):
        name = load(pipe, path, name=f"lora{k}")  # any format; a LoRA that fits no component raises LoraError
        parts = carriers(pipe, name)
        if te == un or len({c in TEXT for c in parts}) < 2:
            if parts:  # (a file of token embeddings alone adds no adapter)
                weights[name] = te if parts <= TEXT else un
                if loaded is not None:
                    loaded.setdefault(path, []).append(name)
            continue
        # different weights for the text encoder and the UNet: each part becomes its own adapter
        keep_tokens(as_module(pipe), name)  # its learned tokens stay for the per-component loads below
        delete(pipe, name)
        for comp in sorted(parts):
            part = load(getattr(pipe, comp), path, name=f"lora{k}_{comp}", component=comp)
            weights[part] = te if comp in TEXT else un
            if loaded is not None:
                loaded.setdefault(path, []).append(part)
    if weights:
        set_weights(as_module(pipe), weights, guard=guard)
        if fuse:
            merge(pipe)
    return pipe, prompt


def sweep(pipe, names: list[str], weights: list[float], prompt: str, **generate_kw) -> tuple[list, list[float]]:
    """The picture people judge a LoRA by: the same prompt and seed with adapters `names` (one LoRA's) at each of
    `weights` (0: without it), every other adapter as it was. Returns (images weight by weight, `count` per weight
    in a column's order: image j of every weight shares its seed), the weight of each image."""
    before = dict(active(as_module(pipe)))
    images = []
    try:
        for w in weights:
            set_weights(as_module(pipe), {**before, **{n: w for n in names}})
            images.append(generate(pipe, prompt, **generate_kw))
    finally:
        set_weights(as_module(pipe), before)
    count = len(images[0])
    return [images[i][j] for j in range(count) for i in range(len(weights))], [w for _ in range(count) for w in weights]


@torch.no_grad()
def generate(pipe, prompt: str | list[str], negative_prompt: str | None = None, count: int = 4, steps: int = 25,
             guidance: float = 7.5, seed: int | torch.Generator = 0, size: int | None = None) -> list:
    """`count` PIL images per prompt with DPM-Solver++ multistep (the pipeline's own scheduler is put back after)."""
    from diffusers import DPMSolverMultistepScheduler

    old = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(old.config, algorithm_type="dpmsolver++")
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    try:
        return pipe(prompt, negative_prompt=negative_prompt, num_images_per_prompt=count, num_inference_steps=steps,
                    guidance_scale=guidance, generator=g, height=size, width=size).images
    except ValueError as e:  # the pipeline's own argument checks (a size it cannot take)
        raise LoraError(f"the pipeline refused: {' '.join(str(e).split())}") from None
    finally:
        pipe.scheduler = old
