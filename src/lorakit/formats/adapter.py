"""The canonical, format-independent form of one adapter, taken from a model or put onto one.

Every file format only maps its keys and scales onto this: per module A (r x in), B (out x r) in
nn.Linear orientation and alpha (scale = alpha/r, or alpha/sqrt(r) with use_rslora), and for DoRA a magnitude
vector along the output ("out", PEFT) or input ("in", LyCORIS's dora_scale) channels. Module paths of a
diffusers pipeline's adapter start with the component: `unet.down_blocks.0...`, `text_encoder.encoder...`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.components import component_of, is_pipeline_view, split_component
from lorakit.core.config import LoraConfig, moves_base
from lorakit.core.errors import LoraError, warn
from lorakit.core.layers import LoraLayer, SavedModule, factor_shapes, is_hot, kind_of
from lorakit.core.model import adapter_biases, adapter_infos, add_adapter, check_name, lora_modules
from lorakit.core.targeting import closest, plain_modules


@dataclass
class ModuleLora:
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    kind: str | None = None  # "linear", "conv1d_t", "embedding", "conv"; None when a format cannot tell
    magnitude: torch.Tensor | None = None  # DoRA's m, one entry per channel of `dora_axis`
    dora_axis: str = "out"

    @property
    def r(self) -> int:
        return self.A.shape[0]

    def check_finite(self, path: str, source: str | None = None):
        """Raise LoraError naming the module and factor if A, B or the DoRA magnitude holds NaN or Inf."""
        for t, key in ((self.A, "A"), (self.B, "B"), (self.magnitude, "magnitude")):
            if t is not None and not torch.isfinite(t).all():
                raise LoraError(f"{source + ': ' if source else ''}module {path!r} factor {key} contains NaN or Inf values")


@dataclass
class Adapter:
    modules: dict[str, ModuleLora]
    use_rslora: bool = False
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save state dicts
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # trained biases (bias modes), by module
    config: LoraConfig | None = None  # training settings, when the format records them
    base_model: str | None = None
    fingerprint: dict[str, list[int]] = field(default_factory=dict)  # module -> base weight shape
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # learned token -> text-encoder embedding row
    history: dict | None = None  # how it was made when not by training: combine/resize/extract, inputs and weights

    def common(self) -> tuple[int, float]:
        """The most common rank and alpha (what formats with one global r/alpha record)."""
        r = Counter(m.r for m in self.modules.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in self.modules.values()).most_common(1)[0][0]
        return r, alpha

    def plain(self, what: str):
        """Refuse `what` (an operation or a format that holds B·A products only) for a DoRA adapter, whose
        magnitudes it would drop."""
        if dora := next((p for p, m in self.modules.items() if m.magnitude is not None), None):
            raise LoraError(f"module {dora!r} is DoRA: {what} holds low-rank B·A updates only and would drop its "
                            "magnitude. Merge it into the base (lorakit merge-into), or save it as lorakit, PEFT or kohya")

    def num_params(self) -> int:
        lora = sum(m.A.numel() + m.B.numel() + (0 if m.magnitude is None else m.magnitude.numel())
                   for m in self.modules.values())
        return lora + sum(t.numel() for sd in self.saved.values() for t in sd.values()) + sum(
            b.numel() for b in self.biases.values())


def from_model(model: nn.Module, name: str) -> Adapter:
    """The adapter `name` of the model, in canonical form (tensors detached, on CPU). A PiSSA/OLoRA adapter, trained
    on a residual base W − s·B0·A0, comes out as the plain LoRA [B, −B0]·[A; A0] of rank 2r and the same scale, which
    gives the trained model on the untouched base (PEFT's path_initial_model_for_weight_conversion)."""
    info = adapter_infos(model).get(name)
    if info is None:
        raise LoraError(f"no adapter named {name!r} on this model; it has {list(adapter_infos(model)) or 'none'}")
    cfg: LoraConfig = info["config"]
    cpu = lambda t: t.detach().to("cpu").contiguous()  # noqa: E731
    a = Adapter({}, cfg.use_rslora, config=cfg, base_model=info["base_model"])
    for path, m in lora_modules(model).items():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            a.modules[path] = ModuleLora(cpu(m.lora_A[name]), cpu(m.lora_B[name]), m.lora_alpha[name], m.lora_kind)
            if name in m.lora_init:
                A0, B0 = m.lora_init[name]
                alpha = m.lora_alpha[name] * (2 ** 0.5 if cfg.use_rslora else 2)
                a.modules[path] = ModuleLora(torch.cat([a.modules[path].A, cpu(A0)]),
                                             torch.cat([a.modules[path].B, -cpu(B0)], 1), alpha, m.lora_kind)
            if name in m.lora_magnitude:
                a.modules[path].magnitude = cpu(m.lora_magnitude[name])
                a.modules[path].dora_axis = m.lora_dora_axis[name]
            a.fingerprint[path] = list(m.weight.shape)
        elif isinstance(m, SavedModule) and name in m.lora_copies:
            a.saved[path] = {k: cpu(v) for k, v in m.lora_copies[name].state_dict().items()}
    if cfg.bias != "none":
        a.biases = {path: cpu(b) for path, b in adapter_biases(model, name, cfg.bias).items()}
    return a


def resolve_paths(model: nn.Module, paths: list[str]) -> dict[str, str]:
    """Map the adapter's module paths onto the model's. Paths are grouped by their first component and each
    group may carry a different leading part than the model (an adapter saved on LlamaForCausalLM loads onto
    LlamaModel and back; `text_encoder.text_model.encoder...` loads onto transformers 5's flattened CLIP)."""
    names = plain_modules(model)
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(p.split(".")[0], []).append(p)
    mapping = {}
    for group in groups.values():
        mapping.update(_resolve_group(names, group))
    return mapping


def _resolve_group(names: dict, paths: list[str]) -> dict[str, str]:
    if all(p in names for p in paths):
        return {p: p for p in paths}
    parts = paths[0].split(".")
    for k in range(len(parts)):  # the longest common tail first: drop k leading parts of the file's path ...
        tail, file_pre = ".".join(parts[k:]), ".".join(parts[:k] + [""]) if k else ""
        for n in names:  # ... and put the model's own leading part in their place
            if n == tail or n.endswith("." + tail):
                model_pre = n[: len(n) - len(tail)]
                mapping = {p: model_pre + p[len(file_pre):] for p in paths if p.startswith(file_pre)}
                if len(mapping) == len(paths) and all(v in names for v in mapping.values()):
                    return mapping
    missing = next(p for p in paths if p not in names)
    raise LoraError(f"the adapter targets module {missing!r}, which this model does not have. {closest(names, missing)}")


def for_component(adapter: Adapter, model: nn.Module, component: str | None, source: str) -> Adapter:
    """The part of a pipeline-wide adapter (paths `unet.…`, `text_encoder.…`) that belongs on `model`, a lone
    component: `component`, or the one the model's class says it is. Other adapters pass through unchanged."""
    paths = [*adapter.modules, *adapter.saved, *adapter.biases]
    comps = {split_component(p)[0] for p in paths}
    if is_pipeline_view(model) or not comps or None in comps:
        return adapter
    with contextlib.suppress(LoraError):  # it fits as it is (GPT-2's `transformer.` is no pipeline component)
        resolve_paths(model, paths)
        return adapter
    want = component or component_of(model)
    if want is None or want not in comps:
        raise LoraError(f"{source} holds LoRA for the pipeline components {sorted(comps)}; this {type(model).__name__} "
                        f"is {'not one of them' if want else 'none that lorakit recognises'}. Load it onto the "
                        "pipeline, or say which part to load with component=")
    keep = lambda d: {p: v for p, v in d.items() if split_component(p)[0] == want}  # noqa: E731
    if (left := sorted(comps - {want})) and component is None:
        warn(f"{source}: loading only its {want} part onto this {type(model).__name__}; its {left} part is left "
             "out (load the file onto the pipeline to get both)")
    return dataclasses.replace(adapter, modules=keep(adapter.modules), saved=keep(adapter.saved),
                               biases=keep(adapter.biases), fingerprint=keep(adapter.fingerprint))


def fit_factors(ml: ModuleLora, module: nn.Module) -> ModuleLora:
    """A and B reshaped between a Linear and a conv: 2-D factors whose A width is in·kh·kw (SD 1.x's 1x1 proj_in,
    which SD 2/XL make a Linear; LyCORIS's flat conv kernels), and 1x1-conv factors onto a Linear. Anything else is
    returned as is for the shape check."""
    kind, w = kind_of(module), module.weight
    if kind == "conv" and ml.A.dim() == 2 and ml.A.shape[1] == w[0].numel():
        ones = [1] * (w.dim() - 2)
        return dataclasses.replace(ml, A=ml.A.reshape(ml.A.shape[0], *w.shape[1:]), B=ml.B.reshape(*ml.B.shape, *ones),
                                   kind="conv")
    if kind == "linear" and ml.A.dim() > 2 and all(k == 1 for t in (ml.A, ml.B) for k in t.shape[2:]):
        return dataclasses.replace(ml, A=ml.A.flatten(1), B=ml.B.flatten(1), kind="linear")
    return ml


def apply(model: nn.Module, adapter: Adapter, name: str, source: str = "adapter", component: str | None = None) -> str:
    """Put `adapter` onto the model as `name`, active alone. Everything is checked before anything
    changes, so a bad adapter leaves the model exactly as it was."""
    check_name(model, name)
    adapter = for_component(adapter, model, component, source)
    if not adapter.modules and not adapter.saved:
        raise LoraError(f"{source} holds no LoRA tensors")
    paths = resolve_paths(model, list(adapter.modules) + list(adapter.saved) + list(adapter.biases))
    names = plain_modules(model)
    for path, want in adapter.fingerprint.items():
        m = names.get(paths.get(path, path))
        have = list(m.weight.shape) if m is not None and hasattr(m, "weight") else None
        if have != list(want):
            raise LoraError(
                f"{source} was made for base model {adapter.base_model or '(unrecorded)'} whose module {path!r} has "
                f"weight shape {list(want)}; this model's is {have}. Load it onto the base it was trained on.")
    modules = {}
    for path, ml in adapter.modules.items():
        m = names[paths[path]]
        kind = kind_of(m)
        if kind is None:
            raise LoraError(f"{source}: module {path!r} is a {type(m).__name__}, which lorakit cannot adapt")
        modules[path] = ml = fit_factors(ml, m)
        if ml.kind is not None and ml.kind != kind and {ml.kind, kind} != {"linear", "conv1d_t"}:
            raise LoraError(f"{source}: module {path!r} holds a {ml.kind} adapter but the model's module is {kind}")
        if isinstance(m, LoraLayer) and m.lora_merged:
            raise LoraError(f"module {path!r} has merged adapters; unmerge(model) before loading another")
        want_a, want_b = factor_shapes(m, ml.r)
        for t, want, key in ((ml.A, want_a, "A"), (ml.B, want_b, "B")):
            if tuple(t.shape) != tuple(want):
                raise LoraError(f"{source}: module {path!r} factor {key} has shape {list(t.shape)}, "
                                f"expected {list(want)} for rank {ml.r} on this model")
        if ml.magnitude is not None:
            if kind == "embedding" or getattr(m, "groups", 1) > 1:
                what = "an embedding" if kind == "embedding" else "a grouped conv"
                raise LoraError(f"{source}: module {path!r} is DoRA on {what}, which lorakit does not support")
            channels = want_b[0] if ml.dora_axis == "out" else want_a[1]
            if ml.magnitude.numel() != channels:
                raise LoraError(f"{source}: module {path!r} has a DoRA magnitude of {ml.magnitude.numel()} entries; "
                                f"its {ml.dora_axis}put has {channels} channels on this model")
        ml.check_finite(path, source)
    for path, sd in adapter.saved.items():
        m = names[paths[path]]
        own = {k: v for k, v in m.state_dict().items() if not k.startswith("lora_copies.")}
        if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in sd):
            raise LoraError(f"{source}: saved module {path!r} has tensors {sorted((k, list(v.shape)) for k, v in sd.items())}, "
                            f"the model's has {sorted((k, list(v.shape)) for k, v in own.items())}")
        if not all(torch.isfinite(v).all() for v in sd.values()):
            raise LoraError(f"{source}: saved module {path!r} contains NaN or Inf values")
    for path, b in adapter.biases.items():
        bias = getattr(names[paths[path]], "bias", None)
        if not isinstance(bias, torch.Tensor) or bias.shape != b.shape:
            raise LoraError(f"{source}: bias of module {path!r} does not fit the model's")
        if not torch.isfinite(b).all():
            raise LoraError(f"{source}: bias of module {path!r} contains NaN or Inf values")

    dora = {paths[p]: ml.dora_axis for p, ml in modules.items() if ml.magnitude is not None}
    if dora and len(dora) < len(modules):
        raise LoraError(f"{source}: some modules have DoRA magnitudes and others not "
                        f"({next(p for p, ml in modules.items() if ml.magnitude is None)!r}); the file is incomplete")
    if adapter.config is not None:  # (the factors are loaded, so no init that changes the base runs again)
        cfg = dataclasses.replace(adapter.config, use_rslora=adapter.use_rslora, use_dora=bool(dora),
                                  init=True if moves_base(adapter.config.init) else adapter.config.init)
    else:
        r, alpha = adapter.common() if adapter.modules else (8, 8)
        cfg = LoraConfig(r=r, alpha=alpha, targets=[paths[p] for p in [*adapter.modules, *adapter.saved]],
                         use_rslora=adapter.use_rslora, bias="all" if adapter.biases else "none", use_dora=bool(dora))
    ranks = {paths[p]: (ml.r, ml.alpha) for p, ml in modules.items()}
    add_adapter(model, name, ranks, cfg, [paths[p] for p in adapter.saved], adapter.base_model, dora)
    with torch.no_grad():
        for path, ml in modules.items():
            m = names[paths[path]]
            m.lora_A[name].copy_(ml.A)
            m.lora_B[name].copy_(ml.B)
            if ml.magnitude is not None:
                m.lora_magnitude[name].copy_(ml.magnitude.reshape(-1))
            if is_hot(m):  # prepare_hotswap: the active set now has its loaded factors
                m.lora_hot_write()
        for path, sd in adapter.saved.items():
            names[paths[path]].lora_copies[name].load_state_dict(sd)
        for path, b in adapter.biases.items():
            names[paths[path]].bias.copy_(b)
    return name
