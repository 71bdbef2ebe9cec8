"""microsoft/LoRA (loralib) state dicts: ``<module>.lora_A`` (r x in) and ``<module>.lora_B``
(out x r), no prefix and no alpha (loralib's default alpha is 1, i.e. scale 1/r).

Checkpoints often hold fully trained tensors too (a classifier head next to the factors): a module with
a weight of its own is loaded as trained in full (modules_to_save), a lone bias as a trained bias; the
frozen base weight of a LoRA module (a whole state dict) is kept as its shape only, the fingerprint."""

from __future__ import annotations

from lorakit.core.errors import LoraError, warn
from lorakit.formats.adapter import Adapter, ModuleLora

DEFAULT_ALPHA = 1.0


LOOKS = "<module>.lora_A / .lora_B, no prefix"


def looks_like(tensors: dict, metadata: dict) -> bool:
    return any(k.endswith((".lora_A", ".lora_B")) for k in tensors)


def read(tensors: dict, metadata: dict, source: str, alpha: float | None = None) -> Adapter:
    if alpha is None:
        warn(f"{source}: loralib files carry no alpha; using loralib's default alpha=1 (scale 1/r). "
             "Pass alpha= to load() to match the value used in training.")
        alpha = DEFAULT_ALPHA
    a, parts, full = Adapter({}), {}, {}
    for key, t in tensors.items():
        path, _, role = key.rpartition(".")
        if not path:
            raise LoraError(f"{source}: tensor {key!r} belongs to no module; a loralib state dict holds "
                            "<module>.lora_A/lora_B and <module>.<param> tensors")
        if role in ("lora_A", "lora_B"):
            parts.setdefault(path, {})[role] = t
        else:
            full.setdefault(path, {})[role] = t
    for path, p in parts.items():
        if len(p) != 2:
            raise LoraError(f"{source}: module {path!r} has only {list(p)}; lora_A and lora_B come in pairs")
        a.modules[path] = ModuleLora(p["lora_A"], p["lora_B"], alpha)
    for path, sd in full.items():
        if path in parts:  # the LoRA module's own tensors: its frozen base weight, and a trained bias
            if set(sd) - {"weight", "bias"}:
                raise LoraError(f"{source}: tensor {path}.{sorted(set(sd) - {'weight', 'bias'})[0]!r} sits on "
                                f"LoRA module {path!r}, which lorakit cannot load")
            if "weight" in sd:
                a.fingerprint[path] = list(sd["weight"].shape)
            if "bias" in sd:
                a.biases[path] = sd["bias"]
        elif set(sd) == {"bias"}:
            a.biases[path] = sd["bias"]
        else:
            a.saved[path] = sd
    return a
