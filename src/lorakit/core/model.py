"""Operations on a model: inject adapters, choose the active weighted set, merge, unmerge, unload."""

from __future__ import annotations

import contextlib
import copy
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.components import accepts_pipeline, as_module, is_pipeline_view
from lorakit.core.config import LoraConfig, moves_base, scale
from lorakit.core.errors import LoraError
from lorakit.core.guard import GUARDS, Part
from lorakit.core.guard import guard as guarded
from lorakit.core.layers import (LoraLayer, SavedModule, fresh_copy, is_hot, is_lora, is_quantized, kind_of, swap_in,
                                 swap_out)
from lorakit.core.targeting import check_patterns, closest, find_targets, matches, plain_modules


# --- bookkeeping ----------------------------------------------------------------------------------
def adapter_infos(model: nn.Module) -> dict[str, dict]:
    """name -> {"config": LoraConfig, "base_model": str | None} for every adapter on the model."""
    infos = {}
    for m in model.modules():
        infos.update(getattr(m, "lora_adapters", {}))
    return infos


@accepts_pipeline
def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were added."""
    return list(adapter_infos(model))


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The lorakit layers of the model by name (LoRA layers and modules_to_save)."""
    return {n: m for n, m in plain_modules(model).items() if is_lora(m)}


def check_name(model: nn.Module, name: str):
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise LoraError(f"adapter name {name!r} must be a word of letters, digits, '_' or '-' (no dots)")
    if name in adapter_infos(model):
        raise LoraError(f"the model already has an adapter named {name!r}; pick another name or delete() it first")


def adapter_biases(model: nn.Module, name: str, mode: str) -> dict[str, nn.Parameter]:
    """module path -> its own `bias` parameter, for the modules whose bias adapter `name` trains
    ("all": every module; "lora_only": the modules it adapts). Never a factor or a copy."""
    out = {}
    for path, m in plain_modules(model).items():
        bias = m._parameters.get("bias")
        if bias is not None and (mode == "all" or (isinstance(m, LoraLayer) and name in m.lora_A)):
            out[path] = bias
    return out


def _freeze_for(model: nn.Module):
    """Base frozen; the factors, copies and (bias-mode) biases of the active adapters trainable."""
    infos = adapter_infos(model)
    layers = lora_modules(model)
    active = set()
    for m in layers.values():
        active |= set(m.lora_weights)
    train_bias = set()
    for name in active:
        cfg = infos[name]["config"]
        if cfg.bias != "none":
            train_bias |= {f"{p}.bias" for p in adapter_biases(model, name, cfg.bias)}
    for pname, p in model.named_parameters():
        parts = pname.split(".")
        if own := [k for k in ("lora_A", "lora_B", "lora_magnitude", "lora_copies") if k in parts]:
            i = max(parts.index(k) for k in own)
            p.requires_grad_(parts[i + 1] in active)
        else:
            p.requires_grad_(pname in train_bias)


# --- inject ---------------------------------------------------------------------------------------
@accepts_pipeline
def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add a new adapter to `model` in place and make it the one active (and trainable) adapter.

    The base weights are frozen. Raises LoraError (model unchanged) when a target or pattern matches
    nothing, a module cannot be adapted, or the name is taken.
    """
    check_name(model, name)
    targets = find_targets(model, config.targets, config.exclude)
    check_patterns(targets, config.rank_pattern, "rank_pattern")
    check_patterns(targets, config.alpha_pattern, "alpha_pattern")
    ranks = {t: config.rank_alpha(t) for t in targets}
    saved = find_saved(model, config.modules_to_save, targets)
    add_adapter(model, name, ranks, config, saved)
    return model


def find_saved(model: nn.Module, names: list[str], targets: list[str]) -> list[str]:
    """The modules named by modules_to_save; each must exist and must not overlap a LoRA target."""
    modules = plain_modules(model)
    found = []
    for item in names:
        hits = [n for n in modules if matches([item], n)]
        if not hits:
            raise LoraError(f"modules_to_save entry {item!r} matches no module of this model. {closest(modules, item)}")
        found += hits
    for s in found:
        for t in targets:
            if t == s or t.startswith(s + ".") or s.startswith(t + "."):
                raise LoraError(f"module {s!r} is both in modules_to_save and LoRA-targeted ({t!r}); choose one")
    return list(dict.fromkeys(found))


def add_adapter(model: nn.Module, name: str, ranks: dict[str, tuple[int, float]], config: LoraConfig,
                saved: list[str], base_model: str | None = None, dora_axes: dict[str, str] | None = None):
    """Create adapter `name` with the given per-module (r, alpha), activate it alone; all or nothing. With
    config.use_dora its magnitudes run along each module's output (or the axis `dora_axes` gives it)."""
    dora_axes = dora_axes or {}
    if any(m.lora_merged for m in lora_modules(model).values()):  # activating it would need an unmerge
        raise LoraError("the model has merged adapters; unmerge(model) before adding another")
    modules = plain_modules(model)
    if any(is_hot(m) for m in modules.values()):  # after prepare_hotswap
        if cold := [p for p in ranks if not is_hot(modules[p])]:
            raise LoraError(f"adapter {name!r} adapts {cold[0]!r}, which prepare_hotswap did not prepare (a compiled "
                            "model would recompile); prepare_hotswap with target_modules covering it, before compiling")
        if saved or config.use_dora:
            raise LoraError(f"adapter {name!r} has {'modules_to_save' if saved else 'DoRA magnitudes'}, which a "
                            "hot-swapped model cannot take")
        if too := [p for p, (r, _) in ranks.items() if r > modules[p].lora_hot_A.shape[0]]:
            raise LoraError(f"adapter {name!r} has rank {ranks[too[0]][0]} at {too[0]!r}, more than the "
                            f"{modules[too[0]].lora_hot_A.shape[0]} prepare_hotswap made room for")
    if moves_base(config.init):  # checked before any weight changes
        for path in ranks:
            w = modules[path].weight
            if kind_of(modules[path]) not in ("linear", "conv1d_t") or is_quantized(w):
                raise LoraError(f"init={config.init!r} needs plain Linear or Conv1D weights (it moves part of W into "
                                f"the adapter); {path!r} is {'quantized' if is_quantized(w) else kind_of(modules[path])}")
    try:
        for path, (r, alpha) in ranks.items():
            m = modules[path]
            if not isinstance(m, LoraLayer):
                swap_in(m, LoraLayer)
            m.lora_add(name, r, alpha, scale(r, alpha, config.use_rslora), config.dropout, config.init,
                       config.factor_dtype, config.fast_dropout, dora_axes.get(path, "out") if config.use_dora else None)
        for path in saved:
            m = modules[path]
            original = swap_out(copy.deepcopy(m)) if isinstance(m, SavedModule) else m
            c = fresh_copy(original)
            if not isinstance(m, SavedModule):
                swap_in(m, SavedModule)
            m.lora_add_copy(name, c)
        # the record lives on the model; on a pipeline's view (rebuilt at each call) on the components it touches
        hosts = [model[c] for c in dict.fromkeys(p.split(".")[0] for p in [*ranks, *saved])] \
            if is_pipeline_view(model) else [model]
        for host in hosts:
            host.__dict__.setdefault("lora_adapters", {})[name] = {"config": config, "base_model": base_model}
    except Exception:
        _remove(model, name)
        raise
    set_weights(model, {name: 1.0})


def _remove(model: nn.Module, name: str):
    for m in lora_modules(model).values():
        if name in m.lora_names():
            m.lora_remove(name)
            if is_hot(m):
                m.lora_hot_write()
        if not m.lora_names() and not is_hot(m):  # a hot layer stays, with zero factors
            swap_out(m)
    for m in model.modules():
        getattr(m, "lora_adapters", {}).pop(name, None)
        if undo := m.__dict__.get("lora_undo", {}).pop(name, None):  # what loading it added: learned tokens
            undo()


@accepts_pipeline
def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` from the model (modules left with no adapter become plain again)."""
    _known(model, [name])
    if any(name in m.lora_merged for m in lora_modules(model).values()):
        raise LoraError(f"adapter {name!r} is merged into the weights; unmerge(model) before deleting it")
    _remove(model, name)
    _freeze_for(model)
    return model


def _known(model: nn.Module, names):
    have = adapters(model)
    for n in names:
        if n not in have:
            raise LoraError(f"no adapter named {n!r} on this model; it has {have or 'none'}")


# --- the active set -------------------------------------------------------------------------------
@accepts_pipeline
def set_weights(model: nn.Module, weights: dict[str, float] | list[str] | str, guard: str | None = None) -> nn.Module:
    """Activate exactly these adapters with these weights (any real numbers, negative included).

    The model then computes W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ; a name alone means weight 1; {} means the base model.
    Only the active adapters are trainable. guard="spectral"|"shared"|"norm" holds back burn-out where several
    adapters meet in a layer (lorakit.guard); guarded stacks are for inference, so nothing is left trainable.
    """
    if isinstance(weights, str):
        weights = [weights]
    if not isinstance(weights, dict):
        weights = {n: 1.0 for n in weights}
    _known(model, weights)
    layers = lora_modules(model)
    if any(m.lora_merged for m in layers.values()):
        raise LoraError("the model has merged adapters; unmerge(model) before changing the active set")
    if guard is not None and guard not in GUARDS:
        raise LoraError(f"unknown guard {guard!r}; choose one of {GUARDS}")
    on = {path: {n: float(w) for n, w in weights.items() if n in m.lora_names()} for path, m in layers.items()}
    guards = {}
    for path, m in layers.items():
        if guard and isinstance(m, LoraLayer) and len(on[path]) > 1:
            if dora := [n for n in on[path] if n in m.lora_magnitude]:
                raise LoraError(f"adapter {dora[0]!r} is DoRA, whose update is not low-rank; the guard cannot factor "
                                f"it at {path!r}. Stack it without a guard, or merge it first")
            if getattr(m, "groups", 1) > 1:
                raise LoraError(f"module {path!r} is a grouped conv; the guard cannot factor its update")
            with torch.no_grad():
                p = guarded([Part(m.lora_A[n].double().flatten(1), m.lora_B[n].double().flatten(1), m.lora_scale[n], w)
                             for n, w in on[path].items()], guard)
            A0, B0 = m.lora_A[next(iter(on[path]))], m.lora_B[next(iter(on[path]))]
            guards[path] = (p.A.reshape(-1, *A0.shape[1:]).to(A0.dtype), p.B.reshape(*p.B.shape, *B0.shape[2:]).to(B0.dtype))
    for path, m in layers.items():  # every hot layer's rank checked before any layer changes
        if is_hot(m):
            r = guards[path][0].shape[0] if path in guards else sum(m.lora_A[n].shape[0] for n in on[path])
            if r > m.lora_hot_A.shape[0]:
                raise LoraError(f"these adapters have rank {r} together at {path!r}, more than the "
                                f"{m.lora_hot_A.shape[0]} prepare_hotswap made room for; stack fewer, or prepare a "
                                "larger max_rank before compiling")
    for path, m in layers.items():  # every layer's guard computed (or refused) before any layer changes
        m.lora_weights = on[path]
        if isinstance(m, LoraLayer):
            m.lora_guarded = guards.get(path)
            if is_hot(m):
                m.lora_hot_write()
    _freeze_for(model)
    if guard:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


@accepts_pipeline
def active(model: nn.Module) -> dict[str, float]:
    """The active adapters and their weights."""
    out = {}
    for m in lora_modules(model).values():
        out.update(m.lora_weights)
    return {n: out[n] for n in adapters(model) if n in out}


@accepts_pipeline
def set_rows(model: nn.Module, sets: list | None) -> nn.Module:
    """Give row i of every batch its own adapter set sets[i]: None or {} (the base), a name, or {name: weight} (a
    weighted stack, negative weights allowed); None instead of a list goes back to the active set.

    For serving many adapters from one base: the base output is computed once for the whole batch; rows with the same
    set form a group, and a layer runs one pair of batched products for all its groups (LoraLayer.lora_rows_update).
    Inference only: no dropout, and the factors are read now (set the rows again after changing them).
    """
    layers = lora_modules(model)
    if sets is None:
        for m in layers.values():
            if isinstance(m, LoraLayer):
                m.lora_rows = None
        return model
    if any(m.lora_merged for m in layers.values()):
        raise LoraError("the model has merged adapters; unmerge(model) before giving rows their own adapters")
    wanted = [_as_weights(s) for s in sets]
    _known(model, {n for w in wanted for n in w})
    for path, m in layers.items():
        if isinstance(m, LoraLayer) and (hit := {n for w in wanted for n in w} & set(m.lora_magnitude)):
            raise LoraError(f"adapter {sorted(hit)[0]!r} is DoRA, which per-row sets do not take (as in PEFT): serve "
                            "it alone (set_weights) or merge it")
        if isinstance(m, SavedModule) and (hit := {n for w in wanted for n in w} & set(m.lora_names())):
            raise LoraError(f"adapter {sorted(hit)[0]!r} replaces module {path!r} whole (modules_to_save); per-row "
                            "sets take LoRA layers only: serve it alone (set_weights) or merge it")
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(wanted):
        groups.setdefault(tuple(sorted(w.items())), []).append(i)
    shared = {}  # index tensors, the same for every layer with the same groups
    with torch.no_grad():
        for m in layers.values():
            if isinstance(m, LoraLayer):
                m.lora_route(len(wanted), [(rows, key) for key, rows in groups.items()], shared)
    return model


@accepts_pipeline
def prepare_hotswap(model: nn.Module, max_rank: int, target_modules: list[str] | str | None = None) -> nn.Module:
    """Make room for adapters up to rank `max_rank` (a stack: the sum of its ranks) before torch.compile(model):
    every LoRA layer (and the modules `target_modules` names, made LoRA layers with no adapter) then reads the active
    set from fixed-shape factors that load/set_weights/delete overwrite in place, so later swaps and weight changes
    never recompile. Inference: hot layers apply no dropout, and their factors are not trained."""
    if not isinstance(max_rank, int) or max_rank <= 0:
        raise LoraError(f"prepare_hotswap: max_rank must be a positive integer, got {max_rank!r}")
    if any(m.lora_merged for m in lora_modules(model).values()):
        raise LoraError("the model has merged adapters; unmerge(model) before prepare_hotswap")
    if saved := [n for n, m in lora_modules(model).items() if isinstance(m, SavedModule)]:
        raise LoraError(f"module {saved[0]!r} is replaced whole by an adapter (modules_to_save), which hot-swap "
                        "cannot pad; merge that adapter, or delete it before prepare_hotswap")
    modules = plain_modules(model)
    extra = find_targets(model, target_modules, None) if target_modules is not None else []
    layers = {n: m for n, m in modules.items() if isinstance(m, LoraLayer) or n in extra}
    if not layers:
        raise LoraError("prepare_hotswap: the model has no LoRA layer; load or inject an adapter, or name "
                        "target_modules")
    for n, m in layers.items():
        if getattr(m, "groups", 1) > 1:
            raise LoraError(f"module {n!r} is a grouped conv; hot-swap cannot pad its rank")
        if isinstance(m, LoraLayer) and m.lora_magnitude:
            raise LoraError(f"module {n!r} has a DoRA adapter, which hot-swap cannot hold in fixed low-rank factors; "
                            "merge it, or delete it before prepare_hotswap")
        if isinstance(m, LoraLayer) and (r := sum(m.lora_A[a].shape[0] for a in m.lora_weights)) > max_rank:
            raise LoraError(f"the active adapters have rank {r} at {n!r}, more than max_rank={max_rank}")
    for m in layers.values():
        if not isinstance(m, LoraLayer):
            swap_in(m, LoraLayer)
        m.lora_hot_write(max_rank)
    return model


def _as_weights(s) -> dict[str, float]:
    if s is None or isinstance(s, str):
        return {s: 1.0} if s else {}
    if not isinstance(s, dict):
        s = {n: 1.0 for n in s}
    return {n: float(w) for n, w in s.items()}


@contextlib.contextmanager
def per_row(model: nn.Module, sets: list):
    """Within the block, row i of every batch gets adapter set sets[i] (see set_rows)."""
    set_rows(model, sets)
    try:
        yield model
    finally:
        set_rows(model, None)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block the model computes its base function (merged layers are unmerged meanwhile)."""
    layers = lora_modules(as_module(model)).values()
    merged = [m for m in layers if m.lora_merged]
    for m in merged:
        m.lora_unmerge()
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False
        for m in merged:
            m.lora_merge()


# --- merge ----------------------------------------------------------------------------------------
@accepts_pipeline
def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Add the active adapters' ΔW into the base weights: no extra latency, undone by unmerge().

    Each merged layer keeps a copy of its weight as merge found it (as much memory again as the merged weights;
    unload(merge=True) keeps none), so that unmerge() and disabled() give it back bit for bit.
    safe=True computes every merged weight first and refuses (changing nothing) if one is not finite.
    """
    layers = {n: m for n, m in lora_modules(model).items() if isinstance(m, LoraLayer) and not m.lora_merged}
    _check_untied(model, {n for n, m in layers.items() if m.lora_weights})
    if safe:
        with torch.no_grad():
            new = {n: m.lora_merged_weight() for n, m in layers.items() if m.lora_weights}
        for n, w in new.items():
            if not torch.isfinite(w).all():
                raise LoraError(f"merging into {n!r} would give NaN/Inf weights; nothing was merged")
        for n, w in new.items():
            layers[n].lora_merge(w)
    else:
        for m in layers.values():
            m.lora_merge()
    return model


def _check_untied(model: nn.Module, names: set[str]):
    """Refuse to merge into a weight another module shares (tied embeddings): it would change both."""
    users: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(pname)
    for n in names:
        shared = users.get(id(getattr(model.get_submodule(n), "weight")), [])
        if len(shared) > 1:
            raise LoraError(f"the weight of {n!r} is tied to {[s for s in shared if s != n + '.weight']}; merging "
                            "would change those too. Keep it unmerged, or untie the weights first")


@accepts_pipeline
def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge(): each merged weight is restored exactly as merge() found it (even if factors changed since)."""
    for m in lora_modules(model).values():
        if isinstance(m, LoraLayer):
            m.lora_unmerge()
    return model


@accepts_pipeline
def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """A plain model with no lorakit module left: the active adapters baked in (merge=True) or dropped.
    Learned tokens stay with the adapters baked in and go with the others."""
    baked = set(active(model)) if merge else set()
    if merge:
        _check_untied(model, {n for n, m in lora_modules(model).items()
                              if isinstance(m, LoraLayer) and m.lora_weights and not m.lora_merged})
    else:
        unmerge(model)
    for m in lora_modules(model).values():  # PiSSA/OLoRA bases get back what was moved out of them, unless baked
        for n in list(getattr(m, "lora_init", {})):
            if n not in baked:
                m.lora_unresidual(n)
    for m in lora_modules(model).values():
        if merge and isinstance(m, LoraLayer):
            m.lora_merge()  # one layer at a time: its pre-merge copy goes with swap_out below
        if merge and isinstance(m, SavedModule):
            with torch.no_grad():
                new = {k: v.detach().clone() for k, v in m.lora_params().items()}
                for k, v in m.state_dict(keep_vars=True).items():
                    if not k.startswith("lora_copies."):
                        v.data.copy_(new[k])
        swap_out(m)
    for m in model.modules():
        m.__dict__.pop("lora_adapters", None)
        for name, undo in m.__dict__.pop("lora_undo", {}).items():
            if name not in baked:
                undo()
    return model


# --- summary --------------------------------------------------------------------------------------
@dataclass
class Summary:
    """Trainable and total parameter counts, and per-adapter modules, parameters, ranks and alphas."""

    trainable: int
    total: int
    adapters: dict[str, dict] = field(default_factory=dict)

    def __str__(self):
        rows = [f"{'adapter':<16}{'weight':>8}{'modules':>9}{'params':>12}  ranks / alphas"]
        for n, a in self.adapters.items():
            w = "-" if a["weight"] is None else f"{a['weight']:g}"
            rows.append(f"{n:<16}{w:>8}{a['modules']:>9}{a['params']:>12,}  {a['ranks']} / {a['alphas']}")
        pct = 100 * self.trainable / max(self.total, 1)
        rows.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {pct:.4f}")
        return "\n".join(rows)

    __repr__ = __str__


@accepts_pipeline
def summary(model: nn.Module) -> Summary:
    """Count trainable/total parameters and describe each adapter."""
    params = {id(p): p for p in model.parameters()}.values()
    s = Summary(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    weights = active(model)
    for name in adapters(model):
        ranks, alphas, count, n = Counter(), Counter(), 0, 0
        for m in lora_modules(model).values():
            if isinstance(m, LoraLayer) and name in m.lora_A:
                ranks[m.lora_A[name].shape[0]] += 1
                alphas[m.lora_alpha[name]] += 1
                count += m.lora_A[name].numel() + m.lora_B[name].numel()
                count += m.lora_magnitude[name].numel() if name in m.lora_magnitude else 0
                n += 1
            elif isinstance(m, SavedModule) and name in m.lora_copies:
                count += sum(p.numel() for p in m.lora_copies[name].parameters())
                n += 1
        s.adapters[name] = {"weight": weights.get(name), "modules": n, "params": count,
                            "ranks": dict(ranks), "alphas": dict(alphas)}
    return s
