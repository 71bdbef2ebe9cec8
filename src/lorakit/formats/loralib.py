"""microsoft/LoRA (loralib) state dicts: ``<module>.lora_A`` (r x in) and ``<module>.lora_B``
(out x r), no prefix and no alpha (loralib's default alpha is 1, i.e. scale 1/r)."""

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
    a, parts = Adapter({}), {}
    for key, t in tensors.items():
        path, _, role = key.rpartition(".")
        if role in ("lora_A", "lora_B"):
            parts.setdefault(path, {})[role] = t
        elif role == "bias":
            a.biases[path] = t
        else:
            raise LoraError(f"{source}: tensor {key!r} is not a loralib LoRA tensor (<module>.lora_A/lora_B or a bias)")
    for path, p in parts.items():
        if len(p) != 2:
            raise LoraError(f"{source}: module {path!r} has only {list(p)}; lora_A and lora_B come in pairs")
        a.modules[path] = ModuleLora(p["lora_A"], p["lora_B"], alpha)
    return a
