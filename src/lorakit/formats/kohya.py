"""kohya sd-scripts / AUTOMATIC1111 LoRA files (also LoCon: the same keys on 3x3 convs).

One module per name ``<prefix>_<module path with every . as _>``; prefixes ``lora_unet`` (unet), ``lora_te`` or
``lora_te1`` (text_encoder) and ``lora_te2`` (text_encoder_2). Tensors ``<name>.lora_down.weight`` = A, (r, in) or
(r, in, kh, kw); ``<name>.lora_up.weight`` = B, (out, r) or (out, r, 1, 1); ``<name>.alpha`` = a 0-dim tensor,
scale = alpha/r (a missing, None or 0 alpha means alpha = r); LyCORIS's Tucker LoCon adds ``<name>.lora_mid.weight``.
Names are turned back into dotted paths without a model, by splitting them into known diffusers/CLIP module names;
SDXL files use the SGM UNet's names (``input_blocks_4_1_…``), mapped with layers_per_block. Header metadata is all
strings (``ss_*`` training record, ``modelspec.*``, ``sshs_*`` hashes).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time

import torch
from safetensors.torch import save as safetensors_bytes

from lorakit.core.components import split_component
from lorakit.core.errors import LoraError
from lorakit.formats.adapter import Adapter, ModuleLora

LOOKS = "lora_unet_… / lora_te_… keys with .lora_down/.lora_up/.alpha"
PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")
LYCORIS_PARTS = ("hada_", "lokr_")
SD_VERSIONS = {  # ss_base_model_version -> (modelspec architecture, resolution, prediction type)
    "sd_v1": ("stable-diffusion-v1", "512x512", "epsilon"),
    "sd_v2": ("stable-diffusion-v2-512", "512x512", "epsilon"),
    "sd_v2_v": ("stable-diffusion-v2-768-v", "768x768", "v"),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base", "1024x1024", "epsilon"),
}
# module names of diffusers' SD/SDXL UNet and transformers' CLIP text models; digits are segments of their own
WORDS = frozenset("""
    down_blocks up_blocks mid_block attentions resnets transformer_blocks attn1 attn2 attn to_q to_k to_v to_out
    add_q_proj add_k_proj add_v_proj to_add_out norm_q norm_k norm_cross ff net proj proj_in proj_out norm norm1
    norm2 norm3 conv1 conv2 conv_shortcut time_emb_proj downsamplers upsamplers conv conv_in conv_out conv_norm_out
    time_embedding linear_1 linear_2 add_embedding class_embedding encoder_hid_proj
    text_model embeddings token_embedding position_embedding encoder layers self_attn q_proj k_proj v_proj out_proj
    mlp fc1 fc2 layer_norm1 layer_norm2 final_layer_norm text_projection
""".split())
_LONGEST = max(w.count("_") + 1 for w in WORDS)
# SGM (SDXL) UNet names -> diffusers paths
_SGM_FIXED = {"input_blocks_0_0": "conv_in", "time_embed_0": "time_embedding.linear_1",
              "time_embed_2": "time_embedding.linear_2", "label_emb_0_0": "add_embedding.linear_1",
              "label_emb_0_2": "add_embedding.linear_2", "out_0": "conv_norm_out", "out_2": "conv_out"}
_SGM_RESNET = {"in_layers_0": "norm1", "in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_0": "norm2",
               "out_layers_3": "conv2", "skip_connection": "conv_shortcut"}
_SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)|middle_block_([012])_(.+)")


def looks_like(tensors: dict, metadata: dict) -> bool:
    """kohya-named LoRA factors, and no LyCORIS LoHa/LoKr keys (lycoris.py reads those)."""
    parts = [k.partition(".") for k in tensors]
    return (any(n.startswith("lora_") and s in SUFFIXES[:3] for n, _, s in parts)
            and not any(s.startswith(LYCORIS_PARTS) for _, _, s in parts))


# --- names ----------------------------------------------------------------------------------------
def _segment(name: str) -> tuple[list[str] | None, str]:
    """The fewest known words and digit runs that spell `name` (None, and the first unknown part, if none do)."""
    toks = name.split("_")
    best: list[list[str] | None] = [[]] + [None] * len(toks)
    for i in range(len(toks)):
        if best[i] is None:
            continue
        for j in range(i + 1, min(len(toks), i + _LONGEST) + 1):
            word = "_".join(toks[i:j])
            if (word in WORDS or (j == i + 1 and word.isdigit())) and (
                    best[j] is None or len(best[i]) + 1 < len(best[j])):
                best[j] = best[i] + [word]
    if best[-1] is not None:
        return best[-1], ""
    return None, toks[max(i for i, b in enumerate(best) if b is not None)]


def _words(name: str, key: str, source: str) -> str:
    """The dotted path spelled by underscore-joined module names."""
    words, unknown = _segment(name)
    if words is None:
        raise LoraError(f"{source}: tensor {key!r}: {unknown!r} is not a Stable Diffusion UNet or CLIP module name "
                        "lorakit knows, so the key cannot be mapped to a module (kohya files for Flux, SD3 and other "
                        "non-SD models are not supported)")
    return ".".join(words)


def _sgm(name: str, lpb: int, key: str, source: str) -> str | None:
    """The diffusers path of an SGM UNet name (SDXL kohya files); None when `name` is not one."""
    if name in _SGM_FIXED:
        return _SGM_FIXED[name]
    m = _SGM_BLOCK.fullmatch(name)
    if not m:
        return None
    if m[5] is not None:
        block, rest = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")[int(m[5])], m[6]
        role = "attention" if m[5] == "1" else "resnet"
    elif m[1] == "input_blocks":
        n, k, rest = int(m[2]), int(m[3]), m[4]
        i, j = divmod(n - 1, lpb + 1)
        role = "sampler" if j == lpb else ("resnet", "attention", None)[min(k, 2)]
        block = (None if n == 0 or role is None else f"down_blocks.{i}.downsamplers.0" if role == "sampler"
                 else f"down_blocks.{i}.{role}s.{j}")
    else:
        n, k, rest = int(m[2]), int(m[3]), m[4]
        i, j = divmod(n, lpb + 1)
        role = "sampler" if k == 2 or (k == 1 and rest == "conv") else ("resnet", "attention", None)[min(k, 2)]
        block = (None if role is None else f"up_blocks.{i}.upsamplers.0" if role == "sampler"
                 else f"up_blocks.{i}.{role}s.{j}")
    tails = {"resnet": lambda: _SGM_RESNET.get(rest), "sampler": lambda: "conv" if rest in ("op", "conv") else None,
             "attention": lambda: _words(rest, key, source)}
    tail = tails[role]() if block is not None else None
    if tail is None:
        raise LoraError(f"{source}: tensor {key!r} names SDXL UNet module {name!r}, which has no diffusers "
                        f"counterpart (with layers_per_block={lpb})")
    return f"{block}.{tail}"


def module_path(name: str, key: str, source: str, layers_per_block: int = 2) -> str:
    """The canonical dotted path (`unet.down_blocks.0…`) of kohya module name `name` (from tensor `key`)."""
    prefix = next((p for p in sorted(PREFIXES, key=len, reverse=True) if name.startswith(p + "_")), None)
    if prefix is None:
        raise LoraError(f"{source}: tensor {key!r} has an unknown prefix; kohya Stable Diffusion files name modules "
                        f"{', '.join(p + '_…' for p in PREFIXES)}")
    rest = name[len(prefix) + 1:]
    path = _sgm(rest, layers_per_block, key, source) if prefix == "lora_unet" else None
    return f"{PREFIXES[prefix]}.{path or _words(rest, key, source)}"


def kohya_name(path: str, sdxl: bool) -> tuple[str, str]:
    """(kohya module name, the path it reads back as) for canonical path `path`; text-encoder paths get CLIP's
    `text_model` segment back (transformers 5 dropped it; A1111 expects it)."""
    comp, rel = split_component(path)
    if comp not in ("unet", "text_encoder", "text_encoder_2"):
        raise LoraError(f"module {path!r} is not in a Stable Diffusion unet or text encoder; kohya files hold only "
                        "those. Save the adapter from the pipeline (or its UNet/text encoder), or write it in "
                        "lorakit, PEFT or diffusers format")
    if comp != "unet" and rel.split(".")[0] in ("encoder", "embeddings", "final_layer_norm"):
        rel = "text_model." + rel  # transformers 5 flattened CLIPTextModel
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    return f"{prefix[comp]}_{rel.replace('.', '_')}", f"{comp}.{rel}"


# --- reading --------------------------------------------------------------------------------------
def group(tensors: dict, source: str, suffixes=SUFFIXES) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}}; a key of any other form is an error. Every tensor must be finite."""
    mods: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in suffixes:
            raise LoraError(f"{source}: tensor {key!r} is not a key lorakit reads: expected <name>."
                            f"{', .'.join(suffixes)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoraError(f"{source}: tensor {key!r} contains NaN or Inf values; the file is damaged")
        mods.setdefault(name, {})[suffix] = t
    return mods


def scalar(t: torch.Tensor, key: str, source: str) -> float:
    """A one-element tensor as a float: the shortest decimal that the stored float16/32 value rounds to
    (so an alpha of 0.1 written as float32 reads back as 0.1)."""
    if t.numel() != 1:
        raise LoraError(f"{source}: tensor {key!r} should be a scalar (a 0-dim tensor) but has shape {list(t.shape)}")
    x = t.reshape(()).item()
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        for digits in range(1, 10):
            short = float(f"{x:.{digits}g}")
            if torch.tensor(short, dtype=t.dtype).item() == x:
                return short
    return float(x)


def alpha_of(parts: dict, name: str, r: int, source: str) -> float:
    """The module's alpha; a missing, None or 0 alpha means alpha = r (kohya's rule)."""
    if "alpha" not in parts:
        return float(r)
    alpha = scalar(parts["alpha"], f"{name}.alpha", source)
    return alpha if alpha != 0 else float(r)


def lora_module(name: str, parts: dict, source: str) -> ModuleLora:
    """One module's down/up(/mid) factors and alpha as canonical A, B, alpha."""
    for a, b in (("lora_down.weight", "lora_up.weight"), ("lora_up.weight", "lora_down.weight")):
        if a in parts and b not in parts:
            raise LoraError(f"{source}: tensor {name}.{a} has no matching {name}.{b}; the file is incomplete")
    if "lora_down.weight" not in parts:
        raise LoraError(f"{source}: {name}.alpha belongs to no LoRA factors (no {name}.lora_down.weight)")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if down.dim() < 2 or up.dim() != down.dim() or any(k != 1 for k in up.shape[2:]):
        raise LoraError(f"{source}: module {name!r} has lora_down of shape {list(down.shape)} and lora_up of shape "
                        f"{list(up.shape)}; expected (r, in[, kh, kw]) and (out, r[, 1, 1])")
    if "lora_mid.weight" in parts:  # Tucker LoCon: ΔW = up · mid · down, i.e. A = mid applied to down
        mid = parts["lora_mid.weight"]
        if mid.dim() != down.dim() or mid.shape[1] != down.shape[0] or any(k != 1 for k in down.shape[2:]):
            raise LoraError(f"{source}: module {name!r} has lora_mid of shape {list(mid.shape)}, which does not fit "
                            f"lora_down {list(down.shape)}")
        down = torch.einsum("rs...,si->ri...", mid, down.flatten(1))
    if up.shape[1] != down.shape[0]:
        raise LoraError(f"{source}: module {name!r} has lora_down of rank {down.shape[0]} but lora_up of rank "
                        f"{up.shape[1]}; the factors do not belong together")
    kind = "conv" if any(k > 1 for k in down.shape[2:]) else None
    ml = ModuleLora(down, up, alpha_of(parts, name, down.shape[0], source), kind)
    if "dora_scale" in parts:  # LyCORIS: (1, in, 1…) scales each input column, (out, 1, 1…) each output row
        ds = parts["dora_scale"]
        axis = "in" if ds.shape[:2] == (1, down.shape[1]) else "out" if ds.shape[:2] == (up.shape[0], 1) else None
        if axis is None or ds.numel() != ds.shape[0] * ds.shape[1]:
            raise LoraError(f"{source}: {name}.dora_scale has shape {list(ds.shape)}; expected (1, {down.shape[1]}) "
                            f"(per input channel) or ({up.shape[0]}, 1) (per output channel)")
        ml.magnitude, ml.dora_axis = ds.reshape(-1), axis
    return ml


def add_module(a: Adapter, seen: dict, name: str, ml: ModuleLora, key: str, source: str, layers_per_block: int):
    """Put module `name` (first seen in tensor `key`) into the adapter under its canonical path; two names for one
    module are an error."""
    path = module_path(name, key, source, layers_per_block)
    if path in seen:
        raise LoraError(f"{source}: modules {seen[path]!r} and {name!r} both map to {path!r}; keep one of them")
    seen[path] = name
    a.modules[path] = ml


def read(tensors: dict, metadata: dict, source: str, layers_per_block: int = 2) -> Adapter:
    """The canonical adapter of a kohya/A1111 file (SDXL SGM names mapped with `layers_per_block`)."""
    a = Adapter({}, base_model=metadata.get("ss_sd_model_name") or None)
    seen: dict[str, str] = {}
    for name, parts in group(tensors, source).items():
        key = f"{name}.{next(iter(parts))}"
        add_module(a, seen, name, lora_module(name, parts, source), key, source, layers_per_block)
    if not a.modules:
        raise LoraError(f"{source} holds no LoRA factors (no .lora_down.weight / .lora_up.weight tensors)")
    return a


# --- writing --------------------------------------------------------------------------------------
def _num(x: float) -> str:
    """A number as kohya writes it in metadata: 4, 0.5."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _dim_alpha(mods: list[tuple[int, float]]) -> tuple[str, str]:
    """ss_network_dim/alpha for modules' (r, alpha): one value each, or both "Dynamic" when they vary."""
    if len(set(mods)) == 1:
        return _num(mods[0][0]), _num(mods[0][1])
    return "Dynamic", "Dynamic"


def hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precalculates them: the sha256 of the file body after the header,
    and the old A1111 hash (first 8 hex of the sha256 of the 0x10000 bytes at offset 0x100000) of the file written
    with only the ss_* metadata."""
    data = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def write(adapter: Adapter, sd_version: str | None = None, title: str | None = None) -> tuple[dict, dict]:
    """(tensors, header) as sd-scripts writes them. sd_version: ss_base_model_version (default "sdxl_base_v1-0" when
    the adapter has text_encoder_2, else "sd_v1"). UNet names are diffusers paths for SD and SDXL alike (A1111,
    ComfyUI and diffusers map them). Alphas are float32 0-dim tensors; with use_rslora the file gets alpha·√r, which
    gives the same scale under kohya's alpha/r."""
    if adapter.saved or adapter.biases or adapter.embeddings:
        what = "modules_to_save" if adapter.saved else "trained biases" if adapter.biases else "token embeddings"
        raise LoraError(f"kohya LoRA files hold LoRA factors only; this adapter also has {what}. Save it in lorakit "
                        "format to keep everything")
    if not adapter.modules:
        raise LoraError("the adapter has no LoRA modules to write")
    comps = {split_component(p)[0] for p in adapter.modules}
    sdxl = "text_encoder_2" in comps or (sd_version or "").startswith("sdxl")
    sd_version = sd_version or ("sdxl_base_v1-0" if sdxl else "sd_v1")
    if sd_version not in SD_VERSIONS:
        raise LoraError(f"unknown sd_version {sd_version!r}; choose one of {list(SD_VERSIONS)}")
    tensors, linear, conv, names = {}, [], [], {}
    for path, m in adapter.modules.items():
        name, expect = kohya_name(path, sdxl)
        try:
            back = module_path(name, name, "adapter")
        except LoraError:
            back = None
        if back != expect:
            raise LoraError(f"module {path!r} would be written as {name!r}, which does not read back as the same "
                            "module; kohya files are for the modules of Stable Diffusion UNets and CLIP text encoders")
        if name in names:
            raise LoraError(f"modules {names[name]!r} and {path!r} both get the kohya name {name!r}")
        names[name] = path
        if m.kind == "embedding" or (m.kind == "conv" and m.B.shape[1] != m.r):
            raise LoraError(f"module {path!r} is a{'n embedding' if m.kind == 'embedding' else ' grouped conv'}, "
                            "which kohya LoRA files cannot hold")
        alpha = m.alpha * math.sqrt(m.r) if adapter.use_rslora else m.alpha
        tensors[f"{name}.lora_down.weight"] = m.A.detach().cpu().contiguous()
        tensors[f"{name}.lora_up.weight"] = m.B.detach().cpu().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if m.magnitude is not None:  # LyCORIS's layout: (1, in, 1…) or (out, 1, 1…)
            ones = [1] * (m.A.dim() - 2)
            tensors[f"{name}.dora_scale"] = m.magnitude.reshape(
                (1, -1, *ones) if m.dora_axis == "in" else (-1, 1, *ones)).detach().cpu().contiguous()
        (conv if any(k > 1 for k in m.A.shape[2:]) else linear).append((m.r, alpha))
    dim, alpha = _dim_alpha(linear or conv)
    args = dict(zip(("conv_dim", "conv_alpha"), _dim_alpha(conv))) if conv else {}
    arch, resolution, prediction = SD_VERSIONS[sd_version]
    now = time.time()
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(args),
        "ss_v2": str(sd_version.startswith("sd_v2")),
        "ss_base_model_version": sd_version,
        **({"ss_sd_model_name": adapter.base_model} if adapter.base_model else {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",  # the UNet keys are diffusers names, also for SDXL
        "modelspec.title": title or f"LoRA@{now}",
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": prediction,
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
    }
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = hashes(tensors, metadata)
    return tensors, metadata

