"""Adapters by Hugging Face hub id: `owner/name`, `owner/name:FILE`, `owner/name@REVISION` (both: `@REV:FILE`),
fetched through huggingface_hub, so its cache, HF_HUB_OFFLINE and login token apply. A path that exists locally
always wins over the hub reading of the same text.

Which file a repo's adapter is: a PEFT repo (adapter_config.json at the top) is a folder; otherwise diffusers' rule
(`load_lora_weights`): the .safetensors files (.bin only when there are none) whose names hold none of
"scheduler", "optimizer", "checkpoint", pytorch_lora_weights.safetensors first; lorakit says which it took.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.core.errors import LoraError

ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<revision>[^:]+))?(?::(?P<file>.+))?")
LOCAL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")  # `out/x.safetensors` is a path
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
NOT_WEIGHTS = ("scheduler", "optimizer", "checkpoint")  # diffusers' _best_guess_weight_name skips these
GENERIC = {"adapter_model", "pytorch_lora_weights"}  # file names that say nothing about the adapter


@dataclass(frozen=True)
class Ref:
    """An adapter on the hub: a repo, a revision (branch, tag or commit; None = main) and a file or folder in it."""

    repo: str
    revision: str | None = None
    file: str | None = None

    def __str__(self):
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.file}" if self.file else "")


def parse(spec) -> Ref | None:
    """The hub adapter `spec` names, or None when it is a local path (one that exists, or has a file's suffix)."""
    text = str(spec)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return None
    m = ID.fullmatch(text)
    if m is None or (m["file"] is None and text.endswith(LOCAL_SUFFIXES)):
        return None
    return Ref(m["repo"], m["revision"], m["file"].strip("/") if m["file"] else None)


def name_of(spec) -> str:
    """A short name for an adapter: a hub repo's name (or its file's, when that says more), else the file name."""
    ref = parse(spec)
    if ref is None:
        p = Path(spec)
        stem = p.name if p.is_dir() else p.stem
        return p.parent.name if stem == "adapter_model" else stem
    stem = Path(ref.file).stem if ref.file else ""
    return stem if stem and stem not in GENERIC else ref.repo.split("/")[1]


def fetch(spec) -> Path:
    """The local file or folder of an adapter: `spec` itself when it is a path, else the hub files it names,
    downloaded into (or found in) the Hugging Face cache. Whatever fails is one LoraError naming `spec`."""
    ref = parse(spec)
    if ref is None:
        return Path(spec)
    files = _files(ref)
    if ref.file:
        if ref.file in files:
            return _download(ref, ref.file)
        inside = [f for f in files if f.startswith(ref.file + "/")]
        if not inside:
            raise LoraError(f"{ref}: the repo has no file or folder {ref.file!r}; it has {_listing(files)}")
        names = {f.rsplit("/", 1)[-1] for f in inside}
        if PEFT_CONFIG not in names:
            raise LoraError(f"{ref}: {ref.file!r} is a folder without {PEFT_CONFIG}; name one adapter file in it "
                            f"({_listing(inside)})")
        return _peft_folder(ref, files, f"{ref.file}/")
    if PEFT_CONFIG in files:
        return _peft_folder(ref, files, "")
    chosen = choose(files)
    if chosen is None:
        raise LoraError(f"{ref}: no adapter in the repo (no {PEFT_CONFIG}, no .safetensors or .bin weights); it has "
                        f"{_listing(files)}")
    others = [f for f in files if f.endswith((".safetensors", ".bin")) and f != chosen]
    if others:
        print(f"lorakit: {ref}: using {chosen} (also there: {_listing(others)}; pick one with {ref.repo}:FILE)",
              file=sys.stderr)
    return _download(ref, chosen)


def choose(files: list[str]) -> str | None:
    """The adapter file among a repo's files, by diffusers' rule (see the module docstring); None if none."""
    for suffix in (".safetensors", ".bin"):
        found = sorted((f for f in files if f.endswith(suffix) and not any(s in f for s in NOT_WEIGHTS)),
                       key=lambda f: (f.count("/"), f))  # top-level files first
        best = [f for f in found if f.rsplit("/", 1)[-1] in (DIFFUSERS_WEIGHTS, "pytorch_lora_weights.bin")]
        if best or found:
            return (best or found)[0]
    return None


def card_base_model(spec, local: Path) -> str | None:
    """The base model a model card names (`base_model` in README.md's front matter): the hub repo's card, or a
    README.md beside a local adapter file (in a PEFT folder). None when there is no card or it names none."""
    ref = parse(spec)
    readme = None
    if ref is not None:
        try:
            readme = _download(ref, "README.md")
        except LoraError:
            return None
    else:
        for cand in (local / "README.md", local.parent / "README.md") if local.is_dir() else (local.parent / "README.md",):
            if cand.is_file():
                readme = cand
                break
    if readme is None:
        return None
    from huggingface_hub import ModelCard

    try:
        base = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict().get("base_model")
    except Exception:  # a card that is not one (plain README): no base from it
        return None
    base = base[0] if isinstance(base, list) and base else base
    return base if isinstance(base, str) and base else None


# --- huggingface_hub calls --------------------------------------------------------------------------------------
def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise LoraError("adapters by hub id need huggingface_hub: pip install 'lorakit[hub]'") from None
    return huggingface_hub


def _offline() -> bool:
    _hub()
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _files(ref: Ref) -> list[str]:
    """The repo's files at the revision: listed by the hub, or (offline, or the hub unreachable) those in the cache."""
    hf = _hub()
    if not _offline():
        try:
            return hf.HfApi().list_repo_files(ref.repo, revision=ref.revision)
        except Exception as e:
            if not _unreachable(e):
                raise _error(ref, e) from None
    try:
        snapshot = Path(hf.snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
    except Exception as e:
        raise _error(ref, e) from None
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def _download(ref: Ref, file: str) -> Path:
    try:
        return Path(_hub().hf_hub_download(ref.repo, file, revision=ref.revision, local_files_only=_offline()))
    except Exception as e:
        raise _error(ref, e, file) from None


def _peft_folder(ref: Ref, files: list[str], prefix: str) -> Path:
    """A PEFT adapter folder in the cache: its config and its weights (safetensors, else the pickle file)."""
    weights = next((prefix + w for w in PEFT_WEIGHTS if prefix + w in files), None)
    if weights is None:
        raise LoraError(f"{ref}: {prefix + PEFT_CONFIG} has no {PEFT_WEIGHTS[0]} beside it; it has {_listing(files)}")
    _download(ref, weights)
    return _download(ref, prefix + PEFT_CONFIG).parent


def _unreachable(e: Exception) -> bool:
    """Whether an exception says the hub could not be reached (no network), rather than answering no."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectionError", "TimeoutException", "Timeout", "NetworkError",
                         "TransportError", "OfflineModeIsEnabled", "ProxyError"})


def _error(ref: Ref, e: Exception, file: str | None = None) -> LoraError:
    """One line for what huggingface_hub raised, saying what to do."""
    kind = type(e).__name__
    what = f"{ref}" + (f" ({file})" if file and file != ref.file else "")
    if kind == "GatedRepoError":
        return LoraError(f"{what}: the repo is gated; accept its terms on huggingface.co/{ref.repo} and log in "
                         "(`hf auth login` or HF_TOKEN)")
    if kind == "RepositoryNotFoundError":
        return LoraError(f"{what}: no such repo on the hub (if it is private, log in with `hf auth login` or set "
                         "HF_TOKEN); if you meant a local file, check the path")
    if kind == "RevisionNotFoundError":
        return LoraError(f"{what}: the repo has no revision {ref.revision!r}; give a branch, tag or commit it has")
    if kind == "HFValidationError":
        return LoraError(f"{what}: not a valid hub id ({' '.join(str(e).split())[:200]}); write owner/name")
    if "EntryNotFound" in kind or _unreachable(e):
        if _offline():
            return LoraError(f"{what}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it once "
                             "online, or unset HF_HUB_OFFLINE; if you meant a local file, check the path")
        if "Remote" in kind:
            return LoraError(f"{what}: the repo has no file {file or ref.file!r}")
        return LoraError(f"{what}: the hub could not be reached and it is not in the Hugging Face cache; check the "
                         "network, or the path if you meant a local file")
    return LoraError(f"{what}: the hub refused ({kind}: {' '.join(str(e).split())[:200]})")


def _listing(files: list[str], n: int = 8) -> str:
    return ", ".join(files[:n]) + (f", ... ({len(files)} files)" if len(files) > n else "") if files else "no files"
