"""PEFT's adapter folder: adapter_config.json + adapter_model.safetensors (peft 0.21 layout).

Keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``_B``, no ``.weight``; DoRA: ``.lora_magnitude_vector``, (out,) or (1, out, 1, 1) for a
conv); modules_to_save and trained biases are stored
under their module's own key. r comes from the tensors; alpha from ``lora_alpha`` unless an
``alpha_pattern`` key matches the module (PEFT's suffix-regex rule). A targeted embedding's frozen
``<module>.base_layer.weight``, which PEFT saves by default, is base-model state: only its shape is
kept, as the module's fingerprint.
"""

from __future__ import annotations

import re

from lorakit.core.config import LoraConfig, pattern_key
from lorakit.core.errors import LoraError
from lorakit.core.targeting import matches
from lorakit.formats.adapter import Adapter, ModuleLora

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
_UNSUPPORTED = {"lora_bias": "lora_bias", "layer_replication": "layer_replication",
                "target_parameters": "target_parameters", "trainable_token_indices": "trainable tokens"}


def looks_like(tensors: dict, metadata: dict) -> bool:
    return any(k.startswith(PREFIX) or ".lora_A.weight" in k or ".lora_embedding_A" in k for k in tensors)


def read(tensors: dict, config: dict, source: str) -> Adapter:
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{source} is a PEFT {config['peft_type']} adapter; lorakit reads LoRA adapters only")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise LoraError(f"{source} uses PEFT's {what} ({key}={config[key]!r}), which lorakit does not support yet")
    alpha, alpha_pattern = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict) or not all(isinstance(k, str) for k in alpha_pattern):
        raise LoraError(f"{source}: alpha_pattern in {CONFIG_NAME} must map module patterns to alphas, "
                        f"not {alpha_pattern!r}")
    bias = config.get("bias", "none")
    saved_names = config.get("modules_to_save") or []
    a = Adapter({}, bool(config.get("use_rslora", False)), base_model=config.get("base_model_name_or_path"))
    parts: dict[str, dict] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", k)
        if (mag := re.fullmatch(r"(.+)\.lora_magnitude_vector(\.weight)?", k)) and config.get("use_dora"):
            parts.setdefault(mag.group(1), {"kind": None})["m"] = t
            continue
        if m:
            path = m.group(1) or m.group(3)
            role = (m.group(2) or m.group(4))[-1]
            parts.setdefault(path, {"kind": "embedding" if m.group(3) else None})[role] = t
            continue
        if base := re.fullmatch(r"(.+)\.base_layer\.weight", k):  # save_embedding_layers: check the base
            a.fingerprint[base.group(1)] = list(t.shape)
            continue
        if ".lora_" in k:
            raise LoraError(f"{source}: tensor {key!r} is a PEFT LoRA feature lorakit does not support (lora_bias "
                            f"or similar), or a DoRA magnitude in a file whose {CONFIG_NAME} lacks use_dora")
        module, _, param = k.rpartition(".")
        owner = _saved_owner(k, saved_names)
        if owner:
            a.saved.setdefault(owner, {})[k[len(owner) + 1:]] = t
        elif bias != "none" and param == "bias":
            a.biases[module] = t
        else:
            raise LoraError(f"{source}: tensor {key!r} is neither a LoRA factor nor part of modules_to_save "
                            f"{saved_names}; the file does not match its {CONFIG_NAME}")
    for path, p in parts.items():
        if "A" not in p and "B" not in p:
            raise LoraError(f"{source}: module {path!r} has a lora_magnitude_vector but no LoRA factors; the file is "
                            "incomplete")
        if "A" not in p or "B" not in p:
            raise LoraError(f"{source}: module {path!r} has lora_{'B' if 'A' in p else 'A'} but no "
                            f"lora_{'A' if 'A' not in p else 'B'}; the file is incomplete")
        if config.get("use_dora") and "m" not in p:
            raise LoraError(f"{source}: {CONFIG_NAME} says use_dora but module {path!r} has no lora_magnitude_vector; "
                            "the file is incomplete")
        k = pattern_key(alpha_pattern, path)
        a.modules[path] = ModuleLora(p["A"], p["B"], alpha if k is None else alpha_pattern[k], p["kind"],
                                     None if "m" not in p else p["m"].reshape(-1))
    if stray := sorted(set(a.fingerprint) - set(parts)):
        raise LoraError(f"{source}: tensor {PREFIX}{stray[0]}.base_layer.weight belongs to no LoRA module; the "
                        "file is incomplete")
    r = a.common()[0] if a.modules else config.get("r", 8)
    targets = config.get("target_modules") or list(a.modules) or saved_names
    a.config = LoraConfig(r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0) or 0.0,
                          targets=targets if isinstance(targets, str) else list(targets),
                          exclude=config.get("exclude_modules"), use_rslora=a.use_rslora, bias=bias,
                          modules_to_save=list(saved_names), use_dora=bool(config.get("use_dora")))
    return a


def _saved_owner(key: str, saved_names: list[str]) -> str | None:
    """The modules_to_save module that tensor `key` belongs to (PEFT's suffix rule), if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if matches(list(saved_names), ".".join(parts[:i])):
            return ".".join(parts[:i])
    return None


def write(adapter: Adapter) -> tuple[dict, dict]:
    """(adapter_config.json contents, tensors) for PEFT's LoraModel."""
    tensors = {}
    for path, m in adapter.modules.items():
        if m.kind == "conv" and m.B.shape[1] != m.r:
            raise LoraError(f"module {path!r} is a grouped conv; PEFT's grouped-conv LoRA has a different, "
                            "unmergeable layout, so it cannot be exported to PEFT")
        if m.kind == "embedding":
            tensors[f"{PREFIX}{path}.lora_embedding_A"], tensors[f"{PREFIX}{path}.lora_embedding_B"] = m.A, m.B
        else:
            tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = m.A, m.B
        if m.magnitude is not None:
            if m.dora_axis != "out":
                raise LoraError(f"module {path!r} has a DoRA magnitude per input channel (LyCORIS's dora_scale); "
                                "PEFT's is per output channel and the two do not convert. Export it as lorakit or kohya")
            mag = m.magnitude if m.A.dim() == 2 else m.magnitude.reshape(1, -1, *[1] * (m.A.dim() - 2))
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = mag
    for path, sd in adapter.saved.items():
        tensors.update({f"{PREFIX}{path}.{k}": v for k, v in sd.items()})
    tensors.update({f"{PREFIX}{path}.bias": b for path, b in adapter.biases.items()})
    r, alpha = adapter.common() if adapter.modules else (8, 8)
    cfg = adapter.config or LoraConfig()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(adapter.modules),
        "rank_pattern": {re.escape(p): m.r for p, m in adapter.modules.items() if m.r != r},
        "alpha_pattern": {re.escape(p): m.alpha for p, m in adapter.modules.items() if m.alpha != alpha},
        "use_rslora": adapter.use_rslora,
        "lora_dropout": cfg.dropout,
        "bias": cfg.bias,
        "modules_to_save": list(adapter.saved) or None,
        "fan_in_fan_out": any(m.kind == "conv1d_t" for m in adapter.modules.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": any(m.magnitude is not None for m in adapter.modules.values()),
        "lora_bias": False,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return config, tensors
