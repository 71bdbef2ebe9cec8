"""lorakit's own format: one .safetensors file whose header says everything needed to load it.

Tensors: ``lora.<module>.A``, ``lora.<module>.B``, ``lora.<module>.m`` (DoRA's magnitude; the header's module entry
says its axis, ``dora``: "out" or "in"), ``saved.<module>.<param>`` (modules_to_save),
``bias.<module>`` (trained biases), ``embed.<token>`` (learned text-encoder token embeddings). Header
metadata (strings): ``format`` = "lorakit", ``format_version``, ``base_model``, ``config`` (the LoraConfig
as JSON), ``modules`` (per module kind, r and alpha), ``targets``, ``saved``, ``fingerprint`` (each
targeted base weight's shape), ``embeddings`` (the tokens, a JSON list; absent in older files: none) and
``history`` (how a combined, resized or extracted adapter was made: method, inputs and weights).
"""

from __future__ import annotations

import json

from lorakit.core.config import LoraConfig
from lorakit.core.errors import LoraError
from lorakit.formats.adapter import Adapter, ModuleLora

FORMAT_VERSION = "1"


def is_native(metadata: dict) -> bool:
    return metadata.get("format") == "lorakit"


def write(adapter: Adapter) -> tuple[dict, dict]:
    tensors, modules = {}, {}
    for path, m in adapter.modules.items():
        tensors[f"lora.{path}.A"], tensors[f"lora.{path}.B"] = m.A, m.B
        modules[path] = {"kind": m.kind, "r": m.r, "alpha": m.alpha}
        if m.magnitude is not None:
            tensors[f"lora.{path}.m"], modules[path]["dora"] = m.magnitude, m.dora_axis
    for path, sd in adapter.saved.items():
        tensors.update({f"saved.{path}.{k}": v for k, v in sd.items()})
    tensors.update({f"bias.{path}": b for path, b in adapter.biases.items()})
    tensors.update({f"embed.{token}": v for token, v in adapter.embeddings.items()})
    cfg = adapter.config.to_dict() if adapter.config else {}
    metadata = {
        "format": "lorakit",
        "format_version": FORMAT_VERSION,
        "base_model": adapter.base_model or "",
        "config": json.dumps(cfg),
        "use_rslora": json.dumps(adapter.use_rslora),
        "modules": json.dumps(modules),
        "targets": json.dumps(cfg.get("targets", list(modules))),
        "saved": json.dumps(list(adapter.saved)),
        "fingerprint": json.dumps(adapter.fingerprint),
    }
    if adapter.embeddings:
        metadata["embeddings"] = json.dumps(list(adapter.embeddings))
    if adapter.history:
        metadata["history"] = json.dumps(adapter.history)
    return tensors, metadata


def read(tensors: dict, metadata: dict, source: str) -> Adapter:
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise LoraError(f"{source} is lorakit format version {version!r}; this lorakit reads version "
                        f"{FORMAT_VERSION}. Upgrade lorakit to load it.")
    try:
        modules = json.loads(metadata["modules"])
        saved_paths = json.loads(metadata.get("saved", "[]"))
        fingerprint = json.loads(metadata.get("fingerprint", "{}"))
        cfg = json.loads(metadata.get("config", "{}"))
        use_rslora = json.loads(metadata.get("use_rslora", "false"))
        tokens = json.loads(metadata.get("embeddings", "[]"))
        history = json.loads(metadata.get("history", "null"))
    except (KeyError, json.JSONDecodeError) as e:
        raise LoraError(f"{source}: the lorakit header is damaged ({e}); re-save the adapter") from None
    if not isinstance(modules, dict) or not all(
            isinstance(i, dict) and isinstance(i.get("r"), int) and isinstance(i.get("alpha"), (int, float))
            for i in modules.values()):
        raise LoraError(f"{source}: the lorakit header is damaged (each module needs an integer r and a number "
                        "alpha); re-save the adapter")
    a = Adapter({}, use_rslora, config=LoraConfig.from_dict(cfg) if cfg else None,
                base_model=metadata.get("base_model") or None, fingerprint=fingerprint, history=history)
    used = set()
    for path, info in modules.items():
        ka, kb = f"lora.{path}.A", f"lora.{path}.B"
        for k in (ka, kb):
            if k not in tensors:
                raise LoraError(f"{source}: tensor {k!r} for module {path!r} is missing; the file is incomplete")
        if tensors[ka].shape[0] != info["r"]:
            raise LoraError(f"{source}: module {path!r} records rank {info['r']} but A has shape {list(tensors[ka].shape)}")
        a.modules[path] = ModuleLora(tensors[ka], tensors[kb], info["alpha"], info.get("kind"))
        used |= {ka, kb}
        if "dora" in info:
            km = f"lora.{path}.m"
            if km not in tensors or info["dora"] not in ("out", "in"):
                raise LoraError(f"{source}: module {path!r} is DoRA but {km!r} is missing or its axis "
                                f"{info['dora']!r} is unknown; the file is damaged")
            a.modules[path].magnitude, a.modules[path].dora_axis = tensors[km], info["dora"]
            used.add(km)
    for path in saved_paths:
        pre = f"saved.{path}."
        a.saved[path] = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        used |= {pre + k for k in a.saved[path]}
    for k, v in tensors.items():
        if k.startswith("bias."):
            a.biases[k[len("bias."):]] = v
            used.add(k)
    for token in tokens:
        key = f"embed.{token}"
        if key not in tensors:
            raise LoraError(f"{source}: tensor {key!r} for token {token!r} is missing; the file is incomplete")
        a.embeddings[token] = tensors[key]
        used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise LoraError(f"{source}: tensor {extra[0]!r} belongs to no module in the header; the file is damaged")
    return a
