"""Targeting: which modules of a model a LoraConfig adapts (PEFT's matching rules, but loud on no match)."""

from __future__ import annotations

import difflib
import re

from torch import nn

from lorakit.core.errors import LoraError
from lorakit.core.layers import is_lora, kind_of

HEAD_NAMES = ("lm_head", "score", "classifier")


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules of the model (as named_modules: depth first, a shared module once), leaving out lorakit's own
    parts (adapter factors and copies)."""
    out, seen = {}, {id(model)}

    def walk(module: nn.Module, prefix: str):
        own = is_lora(module)
        for name, child in module._modules.items():
            if child is None or id(child) in seen or (own and name in ("lora_A", "lora_B", "lora_copies")):
                continue
            seen.add(id(child))
            out[path := f"{prefix}{name}"] = child
            walk(child, path + ".")

    walk(model, "")
    return out


def matches(pattern: list[str] | str, name: str) -> bool:
    """PEFT's rule: a string is a regex on the full name; a list item is the name or a suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def output_heads(model: nn.Module) -> set[str]:
    """Names of the model's output layers, which "all-linear" leaves out."""
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for name, m in model.named_modules():
        if (out is not None and m is out) or name in HEAD_NAMES:
            heads.add(name)
    return heads


def classifier_head(model: nn.Module) -> list[str]:
    """What a classification fine-tune trains in full: the output layer, plus BERT's pooler dense layer, which feeds
    it and plays the part of the dense layer inside RoBERTa's `classifier` (the paper trains that head in full)."""
    poolers = [n for n, m in model.named_modules() if n.endswith("pooler.dense") and kind_of(m) == "linear"]
    return sorted(output_heads(model)) + poolers


def keep_out(model: nn.Module, exclude, saved: list[str]):
    """`exclude` widened to leave out the modules `saved` names (modules_to_save entries: a name or suffix) and all
    inside them, as one regex; `exclude`'s own entries keep their meaning and must each match. So a module trained in
    full is never also a LoRA target (all-linear would pick BERT's pooler, which classification trains in full)."""
    if exclude:
        _check_each_matches(plain_modules(model), exclude, "exclude")
    if not saved:
        return exclude
    theirs = [f"(?:{exclude})"] if isinstance(exclude, str) else [rf"(?:.*\.)?{re.escape(p)}" for p in exclude or []]
    return "|".join([*theirs, *(rf"(?:.*\.)?{re.escape(n)}(?:\..+)?" for n in saved)])


def find_targets(model: nn.Module, targets, exclude=None) -> list[str]:
    """Names of the modules that `targets` selects and `exclude` does not; every pattern must match."""
    modules = plain_modules(model)
    if targets == "all-linear":
        heads = output_heads(model)
        chosen = [n for n, m in modules.items() if kind_of(m) in ("linear", "conv1d_t") and n not in heads]
        if not chosen:
            raise LoraError("targets='all-linear' found no nn.Linear or Conv1D module in this model")
    else:
        _check_each_matches(modules, targets, "targets")
        chosen = [n for n in modules if matches(targets, n)]
    if exclude:
        _check_each_matches(modules, exclude, "exclude")
        chosen = [n for n in chosen if not matches(exclude, n)]
        if not chosen:
            raise LoraError(f"exclude={exclude!r} removes every module that targets={targets!r} selects")
    for n in chosen:
        if kind_of(modules[n]) is None:
            children = [c for c, m in modules.items() if c.startswith(n + ".") and kind_of(m)]
            hint = f"; target its layers instead, e.g. {sorted({c.rsplit('.', 1)[-1] for c in children})[:6]}" if children else ""
            raise LoraError(
                f"module {n!r} is a {type(modules[n]).__name__}, which lorakit cannot adapt "
                f"(it adapts nn.Linear, Conv1D, nn.Embedding, nn.Conv1d/2d/3d){hint}"
            )
    return chosen


def _check_each_matches(modules: dict, pattern, what: str):
    for item in [pattern] if isinstance(pattern, str) else pattern:
        probe = item if isinstance(pattern, str) else [item]
        if not any(matches(probe, n) for n in modules):
            raise LoraError(f"{what} entry {item!r} matches no module of this model. {closest(modules, item)}")


def check_patterns(modules: list[str], patterns: dict, what: str):
    """rank_pattern/alpha_pattern keys must each match a targeted module (PEFT ignores them silently)."""
    for key in patterns:
        if not any(re.match(rf"(.*\.)?({key})$", n) for n in modules):
            raise LoraError(f"{what} key {key!r} matches none of the targeted modules. {closest(modules, key)}")


def closest(names, wanted: str) -> str:
    """A hint listing the module names closest to `wanted`."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    near = difflib.get_close_matches(wanted.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.5)
    near += difflib.get_close_matches(wanted, list(names), n=3, cutoff=0.6)
    if near:
        return f"Closest module names: {', '.join(dict.fromkeys(near))}"
    return f"Module names here include: {', '.join(leaves[:12])}"
