"""diffusers LoRA files (`pytorch_lora_weights.safetensors`), which `pipe.load_lora_weights` reads.

Keys start with the pipeline component (`unet.`, `text_encoder.`, `text_encoder_2.`, `transformer.`). Three layouts:
PEFT (`<path>.lora_A.weight` / `.lora_B.weight`, what lorakit writes), old (`<path>.lora.down.weight` / `.lora.up.weight`;
text encoders `<path>.lora_linear_layer.down.weight`) and attention-processor (`<attn>.processor.to_q_lora.down.weight`,
`to_out_lora` meaning `to_out.0`). Alphas come from the `lora_adapter_metadata` header (PEFT LoraConfig kwargs per
component: `unet.lora_alpha`, `unet.alpha_pattern`, ...), else from `<path>.alpha` tensors, else alpha = rank (scale 1,
diffusers' rule for files without alphas).
"""

from __future__ import annotations

import json
import re

from lorakit.core.components import COMPONENTS, split_component
from lorakit.core.config import pattern_key
from lorakit.core.errors import LoraError
from lorakit.formats.adapter import Adapter, ModuleLora

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
LOOKS = "unet./text_encoder./transformer. keys with lora_A/lora_B or lora.down/lora.up"
_FACTOR = re.compile(r"(.+?)\.(?:lora_A|lora\.down|lora_linear_layer\.down)\.weight"
                     r"|(.+?)\.(?:lora_B|lora\.up|lora_linear_layer\.up)\.weight"
                     r"|(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def looks_like(tensors: dict, metadata: dict) -> bool:
    return METADATA_KEY in metadata or any(
        split_component(k)[0] and _FACTOR.fullmatch(k) for k in tensors)


def _factor(key: str) -> tuple[str, str] | None:
    """(module path, "A" or "B") of a factor key in any of the three layouts, else None."""
    m = _FACTOR.fullmatch(key)
    if not m:
        return None
    if m.group(1):
        return m.group(1), "A"
    if m.group(2):
        return m.group(2), "B"
    proj = "to_out.0" if m.group(4) == "to_out" else m.group(4)
    return f"{m.group(3)}.{proj}", "A" if m.group(5) == "down" else "B"


def read(tensors: dict, metadata: dict, source: str) -> Adapter:
    try:
        meta = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    except json.JSONDecodeError as e:
        raise LoraError(f"{source}: header {METADATA_KEY!r} is not valid JSON ({e})") from None
    parts: dict[str, dict] = {}
    alphas: dict[str, float] = {}
    for key, t in tensors.items():
        if split_component(key)[0] is None:
            raise LoraError(f"{source}: tensor {key!r} names no pipeline component; diffusers keys start with one of "
                            f"{', '.join(c + '.' for c in COMPONENTS)}")
        found = _factor(key)
        if found:
            parts.setdefault(found[0], {})[found[1]] = t
        elif key.endswith(".alpha") and t.numel() == 1:
            alphas[key[: -len(".alpha")]] = float(t)
        else:
            raise LoraError(f"{source}: tensor {key!r} is not a LoRA factor lorakit reads (DoRA magnitudes and LoRA "
                            "biases are not supported)")
    a = Adapter({})
    for path, p in parts.items():
        if "A" not in p or "B" not in p:
            raise LoraError(f"{source}: module {path!r} has only its {'down/A' if 'A' in p else 'up/B'} factor; "
                            "the file is incomplete")
        A, B = p["A"], p["B"]
        if A.shape[0] != B.shape[1]:
            raise LoraError(f"{source}: module {path!r} has down/A of rank {A.shape[0]} but up/B of rank {B.shape[1]}")
        alpha = _alpha(meta, path, alphas, A.shape[0], source)
        a.modules[path] = ModuleLora(A, B, alpha, "conv" if A.dim() == 4 else None)
    if meta:
        a.use_rslora = any(v for k, v in meta.items() if k.endswith(".use_rslora"))
    return a


def _alpha(meta: dict | None, path: str, alphas: dict, r: int, source: str) -> float:
    if meta is None:
        return alphas.get(path, float(r))
    comp, rel = split_component(path)
    pattern = meta.get(f"{comp}.alpha_pattern") or {}
    k = pattern_key(pattern, rel)
    if k is not None:
        return pattern[k]
    if f"{comp}.lora_alpha" not in meta:
        raise LoraError(f"{source}: header {METADATA_KEY!r} has no {comp}.lora_alpha for module {path!r}")
    return meta[f"{comp}.lora_alpha"]


def write(adapter: Adapter) -> tuple[dict, dict]:
    """(tensors, header) in the PEFT layout, with per-component LoraConfig kwargs that give every module its exact
    rank and alpha."""
    tensors, by_comp = {}, {}
    if adapter.saved or adapter.biases or adapter.embeddings:
        raise LoraError("diffusers LoRA files hold LoRA factors only; this adapter also has "
                        f"{'modules_to_save' if adapter.saved else 'trained biases' if adapter.biases else 'token embeddings'}")
    for path, m in adapter.modules.items():
        comp, rel = split_component(path)
        if comp is None:
            raise LoraError(f"module {path!r} names no pipeline component (unet., text_encoder., ...); save the adapter "
                            "from the pipeline, or from the UNet/text encoder itself")
        if m.kind == "embedding" or (m.kind == "conv" and m.B.shape[1] != m.r):
            raise LoraError(f"module {path!r} is a{'n embedding' if m.kind == 'embedding' else ' grouped conv'}, "
                            "which diffusers LoRA files cannot hold")
        tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = m.A, m.B
        by_comp.setdefault(comp, {})[rel] = m
    meta = {}
    for comp, mods in by_comp.items():
        r = max(set(m.r for m in mods.values()), key=[m.r for m in mods.values()].count)
        alpha = max(set(m.alpha for m in mods.values()), key=[m.alpha for m in mods.values()].count)
        meta.update({
            f"{comp}.r": r, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": sorted(mods),
            f"{comp}.rank_pattern": {re.escape(p): m.r for p, m in mods.items() if m.r != r},
            f"{comp}.alpha_pattern": {re.escape(p): m.alpha for p, m in mods.items() if m.alpha != alpha},
            f"{comp}.use_rslora": adapter.use_rslora, f"{comp}.init_lora_weights": True})
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
