"""Plain models with adapters baked in (`lorakit merge-into`), and loading any base lorakit knows by name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lorakit.core.errors import LoraError, warn
from lorakit.core.model import merge, set_weights, unload
from lorakit.formats.io import load


def load_base(spec: str, tokenizer: bool = True):
    """(model or pipeline, tokenizer or None) for a transformers model (folder, hub id, .gguf, embedded default),
    a diffusers pipeline folder or `digits`, or a lone diffusers model folder (a UNet)."""
    p = Path(spec).expanduser()
    if spec == "digits" or (p / "model_index.json").exists():
        from lorakit.sd.pipeline import load_pipeline

        return load_pipeline(spec), None
    try:
        name = json.loads((p / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        name = None
    if name:  # a diffusers model folder
        import diffusers

        if not hasattr(diffusers, name):
            raise LoraError(f"{spec}: diffusers has no model class {name!r}")
        return getattr(diffusers, name).from_pretrained(p), None
    return _load_transformers(spec, tokenizer)


def _load_transformers(spec: str, tokenizer: bool):
    """A transformers model as the class its config names (so a classifier keeps its head), and its tokenizer
    when asked for and present."""
    import transformers

    from lorakit.llm.pretrained import resolve

    where = resolve(spec)
    try:
        arch = (transformers.AutoConfig.from_pretrained(where).architectures or [None])[0]
        model = getattr(transformers, arch or "", transformers.AutoModelForCausalLM).from_pretrained(where)
    except (OSError, ValueError) as e:
        raise LoraError(f"cannot load the model {spec!r} ({e})") from None
    if not tokenizer:
        return model, None
    try:
        return model, transformers.AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError):
        warn(f"{spec} has no tokenizer lorakit can load; the merged folder will hold the model only")
        return model, None


def merge_into(model: str, adapters: list[tuple[str, float]], out, guard: str | None = None,
               allow_pickle: bool = False) -> Path:
    """Write a plain model folder (`save_pretrained`; a whole pipeline for Stable Diffusion) of `model` with the
    weighted adapters merged in and no lorakit module or key left. Refuses NaN/Inf weights and an `out` that
    exists and is not empty; the folder appears whole or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"{out} exists; give a new folder for the merged model")
    if not adapters:
        raise LoraError("give at least one --adapter FILE[:WEIGHT] to merge")
    base, tokenizer = load_base(model)
    names = {load(base, path, allow_pickle=allow_pickle): w for path, w in adapters}
    set_weights(base, names, guard=guard)
    merge(base, safe=True)
    unload(base, merge=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        base.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
