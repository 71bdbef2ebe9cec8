"""Saving and loading adapters: format detection, safe reading, atomic writing."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.core.components import as_module, component_of, is_pipeline_view
from lorakit.core.errors import LoraError, warn
from lorakit.core.model import active, adapter_infos, adapters
from lorakit.formats import adapter as canonical
from lorakit.formats import cloneofsimo, diffusers, hub, kohya, loralib, lycoris, native, peft
from lorakit.formats.embeddings import add_tokens, check_embeddings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FORMATS = ("lorakit", "peft", "diffusers", "kohya")
# single-file formats, in the order they are tried; each says how it is recognised
FILE_FORMATS = {"diffusers": diffusers, "kohya": kohya, "lycoris": lycoris, "cloneofsimo": cloneofsimo,
                "loralib": loralib}


# --- writing --------------------------------------------------------------------------------------
def atomic_write(path: Path, write):
    """Call write(tmp_path), then rename over `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (AttributeError, OSError):
        return False


def atomic_write_folder(path: Path, files: dict, replaces: tuple = ()):
    """Write a folder of files {name: write(tmp_path)} as a whole: readers see the old folder or the new one,
    never a mix. The files are written into a temporary folder beside `path`, which is then swapped in; other
    files of an existing folder (a README) are kept, the names in `replaces` dropped."""
    path = path.resolve() if path.is_symlink() else path  # write where the link points; the link stays
    if path.exists() and not path.is_dir():
        raise LoraError(f"{path} is a file; a PEFT adapter is a folder, give a folder path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes folders private; give the usual permissions
        for name, write_file in files.items():
            write_file(str(tmp / name))
            os.chmod(tmp / name, 0o666 & ~umask)
        if path.is_dir():
            for old in path.iterdir():
                if old.name not in files and old.name not in replaces:
                    (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
            if _exchange(str(tmp), str(path)):
                shutil.rmtree(tmp)  # now the old folder
                return
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, aside)  # no atomic swap here: a kill just now leaves the old folder in `aside`
            os.rename(tmp, path)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plain(tensors: dict) -> dict:
    """CPU copies that safetensors can write (contiguous, no shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _save_tensors(path: Path, tensors: dict, metadata: dict):
    tensors = _plain(tensors)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def base_model_id(model: nn.Module) -> str | None:
    """The hub id or folder the model was loaded from, if transformers/diffusers recorded it."""
    cfg = getattr(model, "config", None)
    for v in (getattr(model, "name_or_path", None), getattr(cfg, "_name_or_path", None)):
        if isinstance(v, str) and v:
            return v
    return None


def save(model: nn.Module, path, name: str | None = None, format: str = "lorakit",
         base_model: str | None = None, **options) -> Path:
    """Write adapter `name` (default: the only, or the only active, adapter) of a model or pipeline.

    format="lorakit": one .safetensors file recording r/alpha per module, targets, the base model id
    and a fingerprint of the base; "peft": a PEFT adapter folder; "diffusers": the file
    `pipe.load_lora_weights` reads; "kohya": the file A1111/ComfyUI/kohya read. Writes are atomic.
    """
    view = as_module(model)
    name = name or _default_adapter(view)
    a = canonical.from_model(view, name)
    a.base_model = base_model or a.base_model or base_model_id(model)
    comp = component_of(view)
    if format in ("diffusers", "kohya") and comp and not is_pipeline_view(view):  # name the component in the file
        a = dataclasses.replace(a, modules={f"{comp}.{p}": m for p, m in a.modules.items()},
                                fingerprint={f"{comp}.{p}": s for p, s in a.fingerprint.items()})
    return write(a, path, format, **options)


def write(a: canonical.Adapter, path, format: str = "lorakit", **options) -> Path:
    """Write an adapter in canonical form as `format` (see save()); returns the path written."""
    path = Path(path)
    if format not in FORMATS:
        raise LoraError(f"unknown format {format!r}; choose one of {FORMATS}")
    if format not in ("lorakit", "peft", "kohya"):
        a.plain(f"the {format} format")
    if format in ("diffusers", "kohya"):
        if path.suffix != ".safetensors":
            path = path / (diffusers.WEIGHTS_NAME if format == "diffusers" else "lora.safetensors")
        a = dataclasses.replace(a, base_model=portable_base(a.base_model, path))
        module = diffusers if format == "diffusers" else kohya
        tensors, metadata = module.write(a, **options)
        _save_tensors(path, tensors, {**metadata, **_history(a)})
        return path
    if format == "lorakit":
        if path.suffix != ".safetensors":
            raise LoraError(f"{path}: lorakit adapters are single .safetensors files; name it "
                            f"{path.with_suffix('.safetensors').name} or pass format='peft' for a PEFT folder")
        _save_tensors(path, *native.write(dataclasses.replace(a, base_model=portable_base(a.base_model, path))))
    else:
        if path.suffix == ".safetensors":
            raise LoraError(f"{path}: a PEFT adapter is a folder; give a folder path")
        config, tensors = peft.write(a)
        tensors, metadata = _plain(tensors), {"format": "pt", **_history(a)}
        atomic_write_folder(path, {peft.WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata=metadata),
                                   peft.CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2))},
                            replaces=(peft.PICKLE_WEIGHTS_NAME,))
    return path


def portable_base(base: str | None, file: Path) -> str | None:
    """What a single-file adapter records of its base: a hub id as it is; a local folder or file as a path relative to
    the adapter's folder ("../m", "./models/m"), so the file holds no absolute path of this machine and still finds
    its base when the two move together (read() turns it back into a full path)."""
    local = Path(base).expanduser() if base else None
    if local is None or not (local.is_absolute() or local.exists()):
        return base
    try:
        rel = os.path.relpath(local.resolve(), Path(file).parent.resolve())
    except ValueError:  # another drive (Windows): no relative path
        return base
    return rel if rel.startswith("..") else f"./{rel}"


def _history(a: canonical.Adapter) -> dict:
    """How a combined/resized/extracted adapter was made, as header metadata for the other formats."""
    return {"lorakit_history": json.dumps(a.history)} if a.history else {}


def _default_adapter(model: nn.Module) -> str:
    names, on = adapters(model), list(active(model))
    if len(names) == 1:
        return names[0]
    if len(on) == 1:
        return on[0]
    raise LoraError(f"the model has adapters {names}; say which to save with name=")


# --- reading --------------------------------------------------------------------------------------
def _read_tensors(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(tensors, header metadata) of a safetensors file, or of a pickle file when allowed."""
    if not path.exists():
        raise LoraError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraError(f"{path} is a pickle file, which can run code when loaded. If you trust it, pass "
                            "allow_pickle=True (it is then read with torch.load(weights_only=True)); better, "
                            "convert it to .safetensors")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoraError(f"{path}: cannot read it as a weights-only torch file ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LoraError(f"{path}: expected a dict of tensors (a state dict)")
        return sd, {}
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None


def read(path, allow_pickle: bool = False, alpha: float | None = None) -> tuple[canonical.Adapter, str]:
    """(adapter in canonical form, format name) for a lorakit file, PEFT folder, diffusers, kohya/A1111,
    LyCORIS or cloneofsimo file, or loralib state dict, local or by hub id (`owner/name[@REV][:FILE]`, formats/hub.py).
    Whatever is wrong with the file raises LoraError. A base model the file does not record is taken from the
    model card (README.md) beside it or in its hub repo."""
    return read_fetched(path, hub.fetch(path), allow_pickle, alpha)


def read_fetched(spec, path: Path, allow_pickle: bool = False,
                 alpha: float | None = None) -> tuple[canonical.Adapter, str]:
    """read() of the local file or folder `path` that `spec` (a path or hub id) was fetched as (hub.fetch)."""
    try:
        a, fmt = _read(path, allow_pickle, alpha)
    except (IndexError, KeyError, TypeError, AttributeError, ValueError, RuntimeError, ZeroDivisionError, re.error) as e:
        if isinstance(e, LoraError):
            raise
        raise LoraError(f"{path}: a malformed adapter ({type(e).__name__}: {e}); the file may be damaged") from None
    for p, m in a.modules.items():
        if isinstance(m.alpha, bool) or not isinstance(m.alpha, (int, float)) or not math.isfinite(m.alpha):
            raise LoraError(f"{path}: module {p!r} has alpha {m.alpha!r}; alpha must be a finite number")
    for what, t in [*((f"module {p!r} factor {k}", getattr(m, k)) for p, m in a.modules.items() for k in "AB"),
                    *((f"bias of {p!r}", b) for p, b in a.biases.items()),
                    *((f"embedding of token {k!r}", v) for k, v in a.embeddings.items())]:
        if not t.is_floating_point() or (t.dim() < 2 and what.startswith("module")):
            raise LoraError(f"{path}: {what} is a {t.dtype} tensor of shape {list(t.shape)}; LoRA factors are "
                            "floating-point matrices. The file is damaged or not a LoRA adapter")
    if fmt in ("lorakit", "kohya") and a.base_model and a.base_model.startswith(("./", "../")):
        # recorded relative to the file (portable_base); a copy fetched from the hub has no such neighbour
        a.base_model = None if hub.parse(spec) else str((path.parent / a.base_model).resolve())
    a.base_model = a.base_model or hub.card_base_model(spec, path)
    return a, fmt


def _read(path: Path, allow_pickle: bool, alpha: float | None) -> tuple[canonical.Adapter, str]:
    if path.is_dir():
        if not (path / peft.CONFIG_NAME).exists():
            raise LoraError(f"{path} is a folder without {peft.CONFIG_NAME}; lorakit reads PEFT adapter folders "
                            "or single adapter files")
        weights = path / peft.WEIGHTS_NAME
        if not weights.exists() and (path / peft.PICKLE_WEIGHTS_NAME).exists():
            weights = path / peft.PICKLE_WEIGHTS_NAME
        return _read_peft(path / peft.CONFIG_NAME, weights, allow_pickle), "peft"
    tensors, metadata = _read_tensors(path, allow_pickle)
    if native.is_native(metadata):
        return native.read(tensors, metadata, str(path)), "lorakit"
    if peft.looks_like(tensors, metadata) and (path.parent / peft.CONFIG_NAME).exists():
        return _read_peft(path.parent / peft.CONFIG_NAME, path, allow_pickle, tensors), "peft"
    for fmt, module in FILE_FORMATS.items():
        if module.looks_like(tensors, metadata):
            extra = {"alpha": alpha} if module is loralib else {}
            return module.read(tensors, metadata, str(path), **extra), fmt
    if peft.looks_like(tensors, metadata):
        raise LoraError(f"{path} holds PEFT-style keys but has no {peft.CONFIG_NAME} beside it, so its alpha "
                        "is unknown; load the PEFT folder")
    sample = ", ".join(repr(k) for k in list(tensors)[:3])
    raise LoraError(f"{path}: not a LoRA file lorakit knows. Its {len(tensors)} tensors ({sample}, ...) match none of: "
                    "lorakit (header format=lorakit); PEFT (<module>.lora_A.weight + adapter_config.json); "
                    f"{'; '.join(f'{k} ({m.LOOKS})' for k, m in FILE_FORMATS.items())}")


def _read_peft(config_path: Path, weights: Path, allow_pickle: bool, tensors: dict | None = None):
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise LoraError(f"{config_path}: not valid JSON ({e})") from None
    if tensors is None:
        tensors, _ = _read_tensors(weights, allow_pickle)
    return peft.read(tensors, config, str(weights))


def load(model: nn.Module, path, name: str | None = None, allow_pickle: bool = False,
         alpha: float | None = None, component: str | None = None) -> str:
    """Load an adapter file or folder onto the model or diffusers pipeline (format detected) and activate it alone.

    The LoRA layers are made from the file itself (its modules, ranks and alphas). Returns the adapter's name
    (default: from the file name). A bad file, a missing key, a wrong shape or a different base raises LoraError
    and leaves the model as it was. alpha= sets alpha for formats that do not record it (loralib);
    component= picks the part of a pipeline-wide file ("unet", "text_encoder", ...) for a lone component.
    """
    spec, path, target, model = str(path), hub.fetch(path), model, as_module(model)
    a, fmt = read_fetched(spec, path, allow_pickle, alpha)
    if fmt == "cloneofsimo":  # its modules are numbered in the model's traversal order
        a = cloneofsimo.bind(a, model, spec, component)
    tokenizer, encoder = getattr(target, "tokenizer", None), getattr(target, "text_encoder", None)
    if a.embeddings and tokenizer is not None and encoder is not None:
        check_embeddings(encoder, a.embeddings, str(path), tokenizer)  # before anything changes
    elif a.embeddings:
        warn(f"{path} also holds learned token embeddings {sorted(a.embeddings)}, which need the tokenizer; "
             "load the file onto the pipeline to get them")
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", hub.name_of(spec)) or "adapter"
        name = name if re.match(r"[A-Za-z_]", name) else f"a_{name}"
        taken, base = set(adapter_infos(model)), name
        i = 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
    owner = None  # a file of token embeddings alone adds no adapter, and its tokens stay
    if a.modules or a.saved or not a.embeddings:
        name = owner = canonical.apply(model, a, name, source=spec, component=component)
    if a.embeddings and tokenizer is not None and encoder is not None:
        add_tokens(tokenizer, encoder, a.embeddings, str(path), owner)  # delete(name) removes them
    return name


def convert(src, dest, to: str, base_model: str | None = None, allow_pickle: bool = False, **options) -> Path:
    """Rewrite an adapter file or folder in another format (no model needed); returns the path written."""
    a, fmt = read(src, allow_pickle)
    if fmt == "cloneofsimo":
        raise LoraError(f"{src} is a cloneofsimo file, whose modules are numbered by the model's traversal order; "
                        "load it onto its pipeline with lorakit.load, then lorakit.save in the format you want")
    a.base_model = base_model or a.base_model
    return write(a, dest, to, **options)


def parse_adapter(spec: str) -> tuple[str, float]:
    """"FILE" or "FILE:WEIGHT" -> (path, weight); the weight may be negative."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def base_model(model: str | None, files: list[str]) -> str:
    """`model`, or else the base model recorded in the first adapter file."""
    if model is not None:
        return model
    if not files:
        raise LoraError("give --model, or an adapter whose file records its base model")
    recorded = read(files[0])[0].base_model
    if not recorded:
        raise LoraError(f"{files[0]} does not record its base model; give --model")
    return recorded
