"""cloneofsimo/lora (`lora_diffusion`) safetensors files.

Tensors `unet:{i}:up` (out x r), `unet:{i}:down` (r x in), likewise `text_encoder:{i}:…`; conv modules (its
"extended" mode, ResnetBlock2D) hold 4-d factors: down (r, in, kh, kw), up (out, r, 1, 1). Header metadata: `unet`,
`text_encoder` = JSON list of the target class names, `unet:{i}:rank`, and `"<s1>": "<embed>"` for each learned
token embedding stored as a tensor named by the token. y = W·x + up(down(x)): no alpha, so alpha = rank (scale 1).

A module is named only by its index i: the i-th layer in cloneofsimo's traversal of the component (for each module,
in model.modules() order, whose class name is a target: each nn.Linear, and in extended mode nn.Conv2d, among its
named_modules(), in order). `read` therefore gives placeholder paths `unet:{i}`; `bind` maps them onto a model.
"""

from __future__ import annotations

import dataclasses
import json
import re

from torch import nn

from lorakit.core.components import component_of, is_pipeline_view
from lorakit.core.errors import LoraError, warn
from lorakit.core.layers import is_lora
from lorakit.core.targeting import plain_modules
from lorakit.formats.adapter import Adapter, ModuleLora

LOOKS = "unet:0:up / text_encoder:0:down keys"
EMBED_FLAG = "<embed>"
UNET_TARGETS = ["CrossAttention", "Attention", "GEGLU"]
UNET_EXTENDED_TARGETS = ["ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"]
TEXT_TARGETS = ["CLIPAttention"]
_KEY = re.compile(r"([A-Za-z_]\w*):(\d+):(up|down)")
_PLACEHOLDER = re.compile(r"([A-Za-z_]\w*):(\d+)")


def looks_like(tensors: dict, metadata: dict) -> bool:
    return bool(tensors) and all(_KEY.fullmatch(k) or metadata.get(k) == EMBED_FLAG for k in tensors)


def targets_of(adapter: Adapter) -> dict[str, list[str]]:
    """The target class names per component that `read` recorded on the adapter (the file's header)."""
    return getattr(adapter, "cloneofsimo_targets", {})


def read(tensors: dict, metadata: dict, source: str) -> Adapter:
    """The file's modules under placeholder paths `<component>:<i>` (see bind) and its token embeddings."""
    factors: dict[str, dict[int, dict[str, object]]] = {}
    embeddings = {}
    for key, t in tensors.items():
        if m := _KEY.fullmatch(key):
            factors.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
        elif metadata.get(key) == EMBED_FLAG:
            vec = t.flatten() if t.dim() == 2 and t.shape[0] == 1 else t
            if vec.dim() != 1:
                raise LoraError(f"{source}: embedding {key!r} has shape {list(t.shape)}; cloneofsimo embeddings are "
                                "one vector per token")
            embeddings[key] = vec
        else:
            raise LoraError(f"{source}: tensor {key!r} is neither a '<component>:<i>:up/down' factor nor a token "
                            f"embedding marked {EMBED_FLAG!r} in the header; the file is damaged")
    a = Adapter({}, embeddings=embeddings)
    targets = {}
    for comp, by_index in factors.items():
        targets[comp] = _targets(comp, metadata, by_index, source)
        for i in range(len(by_index)):
            pair = by_index.get(i)
            if pair is None or len(pair) != 2:
                missing = f"{comp}:{i}:{'up' if pair and 'down' in pair else 'down'}"
                raise LoraError(f"{source}: tensor {missing!r} is missing; cloneofsimo numbers its modules "
                                f"0..{len(by_index) - 1} without gaps, so the file is incomplete")
            up, down = pair["up"], pair["down"]
            ok = up.dim() == down.dim() and up.dim() in (2, 4) and up.shape[1] == down.shape[0]
            if ok and up.dim() == 4:
                ok = tuple(up.shape[2:]) == (1, 1)
            if not ok:
                raise LoraError(f"{source}: module {comp}:{i} has up {list(up.shape)} and down {list(down.shape)}, "
                                "which are not the factors of one low-rank update (up (out, r), down (r, in); "
                                "convs: up (out, r, 1, 1), down (r, in, kh, kw))")
            r = down.shape[0]
            a.modules[f"{comp}:{i}"] = ModuleLora(down, up, float(r), "linear" if up.dim() == 2 else "conv")
    a.cloneofsimo_targets = targets
    return a


def _targets(comp: str, metadata: dict, by_index: dict, source: str) -> list[str]:
    raw = metadata.get(comp)
    if raw is None:  # header stripped by some tool: cloneofsimo's defaults (the count check in bind catches misses)
        if comp.startswith("text_encoder"):
            return TEXT_TARGETS
        has_conv = any(t.dim() == 4 for pair in by_index.values() for t in pair.values())
        return UNET_EXTENDED_TARGETS if has_conv else UNET_TARGETS
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LoraError(f"{source}: header entry {comp!r} should be a JSON list of class names, got {raw!r}")
    return names


def _class_name(m: nn.Module) -> str:
    """The module's own class name (lorakit swaps in a subclass named `LoraLayer[Linear]`)."""
    return type(m).__mro__[2].__name__ if is_lora(m) else type(m).__name__


def _lorakit_parts(name: str, m: nn.Module) -> list[str]:
    return [f"{name}.{p}" if name else p for p in ("lora_A", "lora_B", "lora_copies")] if is_lora(m) else []


def traversal(model: nn.Module, targets, conv: bool = False) -> list[tuple[str, str]]:
    """(path, "linear" or "conv") of the layers cloneofsimo numbers in `model`, in its order: for each module (in
    model.modules() order) whose class name is in `targets`, each nn.Linear (and nn.Conv2d when `conv`) among its
    named_modules(). lorakit's own adapter parts are not seen; a layer under two targets is listed twice, as there."""
    targets, plain = set(targets), plain_modules(model)
    canonical = {id(m): n for n, m in plain.items()}
    ancestors = [(n, m) for n, m in [("", model), *plain.items()] if _class_name(m) in targets]
    out = []
    for prefix, ancestor in ancestors:
        skip: list[str] = []
        for name, m in ancestor.named_modules(prefix=prefix):
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            skip += _lorakit_parts(name, m)
            if isinstance(m, nn.Linear):
                out.append((canonical.get(id(m), name), "linear"))
            elif conv and isinstance(m, nn.Conv2d):
                out.append((canonical.get(id(m), name), "conv"))
    return out


def bind(adapter: Adapter, model: nn.Module, source: str, component: str | None = None) -> Adapter:
    """The adapter with its placeholder paths `<component>:<i>` replaced by the real modules of `model`: paths
    `unet.<path>` on a pipeline view, the model's own paths on a lone component (`component`, or the one its
    class says; the file's other parts are left out with a warning). Raises LoraError when the file's module count
    or shapes do not fit the model (cloneofsimo files only load into the model and diffusers version that made them)."""
    parts: dict[str, dict[int, ModuleLora]] = {}
    for path, ml in adapter.modules.items():
        m = _PLACEHOLDER.fullmatch(path)
        if m is None:
            raise LoraError(f"{source}: module {path!r} is not a cloneofsimo placeholder '<component>:<i>'")
        parts.setdefault(m[1], {})[int(m[2])] = ml
    targets = targets_of(adapter)
    if not parts:  # token embeddings only
        return adapter
    if is_pipeline_view(model):
        missing = [c for c in parts if c not in model]
        if missing:
            raise LoraError(f"{source} holds LoRA for {missing}, which this pipeline does not have "
                            f"(it has {sorted(model.keys())})")
        places = {c: (model[c], f"{c}.") for c in parts}
    else:
        want = component or component_of(model)
        if want is None and len(parts) == 1:
            want = next(iter(parts))
        if want not in parts:
            what = "not one of them" if want else "none that lorakit recognises"
            raise LoraError(f"{source} holds LoRA for the pipeline components {sorted(parts)}; this "
                            f"{type(model).__name__} is {what}. Load it onto the pipeline, or say which part to "
                            "load with component=")
        if left := sorted(set(parts) - {want}):
            warn(f"{source}: loading only its {want} part onto this {type(model).__name__}; its {left} part is left "
                 "out (load the file onto the pipeline to get both)")
        places = {want: (model, "")}
    modules = {}
    for comp, (sub, prefix) in places.items():
        by_index = parts[comp]
        if sorted(by_index) != list(range(len(by_index))):
            gap = min(set(range(len(by_index))) - set(by_index))
            raise LoraError(f"{source}: module {comp}:{gap} is missing; cloneofsimo numbers its modules without gaps")
        has_conv = any(ml.kind == "conv" for ml in by_index.values())
        default = TEXT_TARGETS if comp.startswith("text_encoder") else (
            UNET_EXTENDED_TARGETS if has_conv else UNET_TARGETS)
        modules.update({prefix + p: ml for p, ml in _bind_part(
            comp, by_index, sub, targets.get(comp, default), has_conv, source).items()})
    return dataclasses.replace(adapter, modules=modules, saved={}, biases={}, fingerprint={})


def _bind_part(comp: str, by_index: dict[int, ModuleLora], model: nn.Module, targets, conv: bool,
               source: str) -> dict[str, ModuleLora]:
    """Index -> module the way cloneofsimo's loader pairs them: walk the traversal and give each layer the next
    factor pair of its kind (linear 2-d, conv 4-d), skipping layers of the other kind."""
    layers = traversal(model, targets, conv)
    n, bound, i = len(by_index), {}, 0
    names = dict(model.named_modules())
    hint = ("the file was made for a different model or diffusers version (cloneofsimo names modules only by "
            "their position)")
    for path, kind in layers:
        if i == n:
            raise LoraError(f"{source}: its {comp} part holds {n} modules, but this model's {comp} has {len(layers)} "
                            f"layers under {sorted(targets)}; {hint}")
        ml = by_index[i]
        if ml.kind != kind:
            continue
        m = names[path]
        if kind == "conv" and m.groups != 1:
            raise LoraError(f"{source}: {comp}:{i} falls on {path}, a grouped conv (groups={m.groups}), which "
                            "lorakit does not read from cloneofsimo files")
        w = m.weight.shape
        want_a, want_b = ((ml.r, *w[1:]), (w[0], ml.r, *[1] * (len(w) - 2)))
        if tuple(ml.A.shape) != tuple(want_a) or tuple(ml.B.shape) != tuple(want_b):
            raise LoraError(f"{source}: {comp}:{i} (down {list(ml.A.shape)}, up {list(ml.B.shape)}) falls on {path}, "
                            f"whose weight is {list(w)}; {hint}")
        bound[path] = ml  # a layer listed twice keeps the later pair, as cloneofsimo's loader does
        i += 1
    if i < n:
        raise LoraError(f"{source}: its {comp} part holds {n} modules, but this model's {comp} has only {i} matching "
                        f"layers under {sorted(targets)}; {hint}")
    return bound
