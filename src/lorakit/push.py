"""`lorakit push RUN --repo user/name`: a training run's adapter as a Hugging Face hub repo that lorakit, PEFT and
diffusers each load by its id, with a model card in the hub's conventions.

The exact folder to upload is staged first (`--dry-run DIR` writes it and uploads nothing), because the run folder
holds things that must not leave the machine (run.json's absolute paths, checkpoints/ with optimizer state) and
the hub's loaders pick files by name: a top-level adapter_config.json makes a PEFT repo, and among several
.safetensors files diffusers (and lorakit.formats.hub) take pytorch_lora_weights.safetensors first. Staged:

- lorakit: adapter.safetensors (everything the run trained, learned token embeddings included)
- peft: adapter_config.json + adapter_model.safetensors, so `PeftModel.from_pretrained(base, "user/name")` works
- diffusers: pytorch_lora_weights.safetensors, what `pipe.load_lora_weights("user/name")` takes
- kohya: NAME.safetensors (NAME the repo's name), for AUTOMATIC1111 / ComfyUI
- loss.png, metrics.jsonl, samples/*.png, and README.md (the run's card plus usage, files, the hub id of the base)

Default formats: an LLM run gets lorakit + peft, a Stable Diffusion run lorakit + diffusers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from lorakit import runner
from lorakit.core.errors import LoraError
from lorakit.formats.io import FORMATS, atomic_write_folder, read, write

DEFAULTS = {"llm": ("lorakit", "peft"), "sd": ("lorakit", "diffusers")}
NAMES = {"lorakit": "adapter.safetensors", "peft": "adapter_model.safetensors",
         "diffusers": "pytorch_lora_weights.safetensors"}
SD_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")
DELETE = ["*.safetensors", "adapter_config.json", "samples/*"]  # stale files a re-push must not leave beside the new


def push(run_dir, repo: str, private: bool = False, formats=None, dry_run=None, token: str | None = None,
         revision: str | None = None, base_model: str | None = None) -> str:
    """Stage RUN_DIR's adapter for hub repo `repo` (see the module docstring) and upload it with one commit; returns
    the repo's URL. With `dry_run` (a folder, "" for RUN_DIR/hub-upload) the staged folder is written there instead
    and its path returned. `base_model` records the base's hub id when the run used a local folder."""
    run, repo = Path(run_dir), check_repo(repo)
    if base_model is not None and not runner.hub_model_id(base_model):
        raise LoraError(f"--base-model {base_model!r} is not a hub model id; write owner/name")
    source = find_adapter(run)
    dest = None if dry_run is None else Path(dry_run) if dry_run else run / "hub-upload"
    if dest is not None:
        check_dest(dest)
    else:
        token = login(token)  # offline, or not logged in: said before any work
    a = read(source)[0]
    kind = "sd" if any(p.split(".")[0] in SD_COMPONENTS for p in a.modules) else "llm"
    formats = check_formats(formats or DEFAULTS[kind])
    recorded, a.base_model = a.base_model, base_model or runner.hub_model_id(a.base_model)
    with tempfile.TemporaryDirectory(prefix="lorakit-push-") as tmp:
        stage = Path(tmp) / "repo"
        stage.mkdir()
        stage_folder(run, stage, repo, a, kind, formats)
        check_no_local_paths(stage, local_paths(run, source))
        out = str(write_dry_run(stage, dest)) if dest is not None else \
            upload(stage, repo, private, token, revision, f"lorakit push of {run.name}")
    if not a.base_model:
        print(f"lorakit: note: the run's base model {runner.public_name(recorded or '(not recorded)')!r} is no hub "
              "id, so the repo records none; pass --base-model OWNER/NAME to record it", file=sys.stderr)
    return out


def check_repo(repo: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if REPO_ID.fullmatch(repo or ""):
            validate_repo_id(repo)
            return repo
    except HFValidationError:
        pass
    raise LoraError(f"--repo {repo!r} is not a hub repo id; write owner/name (letters, digits, '-', '_', '.')")


def check_formats(formats) -> tuple[str, ...]:
    """The export formats, once each, in the order given; unknown ones refused."""
    out = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
    if bad := [f for f in out if f not in FORMATS]:
        raise LoraError(f"--format {bad[0]!r}: choose from {', '.join(FORMATS)}")
    return out or ("lorakit",)


def find_adapter(run: Path) -> Path:
    """RUN/adapter.safetensors (a lorakit run) or RUN/adapter/ (a PEFT-loop run); anything else refused, naming what
    the folder holds."""
    if not run.is_dir():
        raise LoraError(f"{run}: no such run folder; give the --out folder of a lorakit train or train-sd run")
    for name in ("adapter.safetensors", "adapter"):
        if (run / name).exists():
            return run / name
    for name, what in (("model", "a full fine-tune"), ("pipeline", "a full fine-tune")):
        if (run / name).is_dir():
            raise LoraError(f"{run} holds {what} ({name}/), not an adapter; push that folder with "
                            f"`hf upload OWNER/NAME {run / name}`")
    held = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir())) or "nothing"
    raise LoraError(f"{run} holds no adapter (adapter.safetensors); it holds {held}. Push the --out folder of a "
                    "finished lorakit train or train-sd run")


def stage_folder(run: Path, stage: Path, repo: str, a, kind: str, formats: tuple[str, ...]):
    """Write the repo's files into `stage`: the adapter in each format, the run's curve, metrics, sample grids and
    the model card."""
    name = repo.split("/")[1]
    if "peft" in formats:
        write(a, stage, "peft")  # adapter_config.json + adapter_model.safetensors at the top: a PEFT repo
    for fmt in formats:
        if fmt != "peft":
            write(a, stage / file_name(fmt, name), fmt)
    weights = sorted(p.name for p in stage.glob("*.safetensors"))
    if len(weights) > 1 and NAMES["diffusers"] not in weights and "peft" not in formats:
        raise LoraError(f"a repo holding {' and '.join(weights)} is ambiguous: diffusers and lorakit would pick one "
                        "of them by name; add --format diffusers (its pytorch_lora_weights.safetensors is taken first) "
                        "or push a single format")
    for extra in ("loss.png", "metrics.jsonl"):
        if (run / extra).is_file():
            shutil.copy2(run / extra, stage / extra)
    grids = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
    for grid in grids:
        (stage / "samples").mkdir(exist_ok=True)
        shutil.copy2(grid, stage / "samples" / grid.name)
    card = model_card(run, repo, a, kind, formats, sorted(str(p.relative_to(stage)) for p in stage.rglob("*")
                                                          if p.is_file()))
    text = scrub(str(card), local_paths(run, run))
    (stage / "README.md").write_text(text, encoding="utf-8")


def file_name(fmt: str, name: str) -> str:
    """The repo file of a single-file format; kohya's is named after the repo (A1111 lists LoRAs by file name)."""
    if fmt != "kohya":
        return NAMES[fmt]
    return f"{name}-kohya.safetensors" if f"{name}.safetensors" in NAMES.values() else f"{name}.safetensors"


# --- the model card ---------------------------------------------------------------------------------------------
def model_card(run: Path, repo: str, a, kind: str, formats: tuple[str, ...], files: list[str]):
    """The run's own card (runner.write_card) for the repo: its name, the base's hub id, format tags, a widget only
    where its image is uploaded, and sections on how to use it and what each file is."""
    from huggingface_hub import ModelCard, ModelCardData

    if (run / "README.md").is_file():
        card = ModelCard.load(run / "README.md", ignore_metadata_errors=True)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='lorakit').to_yaml()}\n---\n\n# {run.name}\n\n"
                         "A LoRA adapter trained with lorakit.\n")
    data, name = card.data, repo.split("/")[1]
    data.model_name, data.library_name = name, "lorakit"
    data.base_model = a.base_model
    data.base_model_relation = "adapter" if a.base_model else None
    tags = ["lora", "lorakit", *(data.tags or [])]
    if kind == "sd":
        tags += ["stable-diffusion", "text-to-image", "template:sd-lora"]
        data.pipeline_tag = data.pipeline_tag or "text-to-image"
    tags += [t for t, fmt in (("peft", "peft"), ("diffusers", "diffusers")) if fmt in formats]
    data.tags = list(dict.fromkeys(tags))
    if not (isinstance(data.metrics, list) and all(isinstance(m, str) for m in data.metrics)):
        data.metrics = None  # an older lorakit's card kept a dict of values here, which the hub refuses
    widget = getattr(data, "widget", None)
    if isinstance(widget, list):
        data.widget = [w for w in widget if isinstance(w, dict) and w.get("output", {}).get("url") in files] or None
    text = re.sub(r"^\s*# .*$", f"# {name}", card.text, count=1, flags=re.M)
    if "loss.png" not in files:
        text = text.replace("![loss curve](loss.png)", "")
    usage = usage_section(repo, a, kind, formats, getattr(data, "instance_prompt", None),
                          getattr(data, "task", None)) + "\n\n" + files_section(files)
    at = next((text.index(m) for m in ("![loss curve]", "## Training settings") if m in text), len(text))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text[:at].strip()}\n\n{usage}\n\n{text[at:].lstrip()}")


def usage_section(repo: str, a, kind: str, formats: tuple[str, ...], prompt: str | None, task: str | None) -> str:
    """## Use it: code for each way the repo loads (lorakit by id, PEFT, diffusers, kohya's file)."""
    base = a.base_model or "BASE_MODEL"
    note = "" if a.base_model else ("\n\nThe run trained on a local copy of its base model, so BASE_MODEL stands for "
                                    "that model's hub id.")
    fence = "```"
    if kind == "sd":
        prompt = json.dumps(prompt or "a photo of ...")  # a Python string literal, quotes escaped
        parts = [f"## Use it{note}"]
        if "diffusers" in formats:
            parts.append(f"With diffusers:\n\n{fence}python\nfrom diffusers import AutoPipelineForText2Image\n\n"
                         f"pipe = AutoPipelineForText2Image.from_pretrained(\"{base}\")\n"
                         f"pipe.load_lora_weights(\"{repo}\")\nimage = pipe({prompt}).images[0]\n{fence}")
        parts.append(f"With lorakit:\n\n{fence}python\nimport lorakit\n"
                     f"from diffusers import AutoPipelineForText2Image\n\n"
                     f"pipe = AutoPipelineForText2Image.from_pretrained(\"{base}\")\nlorakit.load(pipe, \"{repo}\")\n"
                     f"{fence}\n\nor `lorakit generate-image --lora {repo} --prompt {prompt}`.")
        if a.embeddings:
            parts.append(f"The learned token embeddings ({', '.join(sorted(a.embeddings))}) are in "
                         "adapter.safetensors (lorakit's format).")
    else:
        auto = "AutoModelForSequenceClassification" if task == "classify" else "AutoModelForCausalLM"
        parts = [f"## Use it{note}",
                 f"With lorakit:\n\n{fence}python\nimport lorakit\nfrom transformers import {auto}\n\n"
                 f"model = {auto}.from_pretrained(\"{base}\")\nlorakit.load(model, \"{repo}\")\n{fence}"
                 + ("" if task == "classify" else
                    f"\n\nor `lorakit generate{'' if a.base_model else ' --model BASE_MODEL'} --adapter {repo} "
                    "--prompt \"...\"`.")]
        if "peft" in formats:
            parts.append(f"With PEFT:\n\n{fence}python\nfrom peft import PeftModel\nfrom transformers import {auto}\n\n"
                         f"model = PeftModel.from_pretrained({auto}.from_pretrained(\"{base}\"), \"{repo}\")\n{fence}")
    if "kohya" in formats:
        parts.append(f"`{file_name('kohya', repo.split('/')[1])}` is the same LoRA in kohya's format, for "
                     "AUTOMATIC1111 and ComfyUI (put it in models/Lora).")
    return "\n\n".join(parts)


FILES = {"adapter.safetensors": "the adapter in lorakit's format", "adapter_config.json": "PEFT adapter config",
         "adapter_model.safetensors": "the adapter in PEFT's format", "loss.png": "the training loss curve",
         "pytorch_lora_weights.safetensors": "the adapter in diffusers' format (`load_lora_weights`)",
         "metrics.jsonl": "the training metrics, one record per step", "README.md": "this card"}


def files_section(files: list[str]) -> str:
    """## Files: a table of the repo's files and what each is."""
    def what(f: str) -> str:
        if f in FILES:
            return FILES[f]
        return "a sample grid of the validation prompts" if f.startswith("samples/") else \
            "the adapter in kohya's format (AUTOMATIC1111, ComfyUI)"

    rows = "".join(f"| `{f}` | {what(f)} |\n" for f in [*files, "README.md"])
    return f"## Files\n\n| file | what |\n|---|---|\n{rows}".rstrip()


# --- no local path leaves the machine ---------------------------------------------------------------------------
def local_paths(run: Path, source: Path) -> list[str]:
    """The local paths a run may have written into its files (its folder, the settings' paths), longest first."""
    paths = {str(run.resolve()), str(source.resolve()), str(run.absolute())}
    try:
        settings = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        settings = {}
    paths |= {v for v in settings.values() if isinstance(v, str) and os.path.isabs(v)}
    return sorted((p for p in paths if len(p) > 1), key=len, reverse=True)


ABSOLUTE = re.compile(r"(?<![\w.:/~-])~?/[^\s'\"`<>|,;()\[\]{}]+")  # /a/b or ~/a, not a URL's // or a/b


def paths_in(text: str) -> list[str]:
    """The absolute paths in `text` that name something on this machine (it exists, or its folder does)."""
    found = []
    for m in ABSOLUTE.finditer(text):
        p = Path(m.group().rstrip(".:")).expanduser()
        if p.exists() or (len(p.parts) > 2 and p.parent.exists()):
            found.append(m.group().rstrip(".:"))
    return found


def scrub(text: str, paths: list[str]) -> str:
    """`text` with each local path replaced by its last name: the run's known paths, and any other absolute path of
    this machine (an older lorakit's card recorded data, and settings a resume may change, by path)."""
    for p in [*paths, *sorted(set(paths_in(text)), key=len, reverse=True)]:
        text = text.replace(p, Path(p).name)
    return text


def check_no_local_paths(stage: Path, paths: list[str]):
    """Refuse a staged folder whose text files or safetensors headers hold one of `paths`."""
    from safetensors import safe_open

    for f in sorted(p for p in stage.rglob("*") if p.is_file()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as sf:
                text = " ".join((sf.metadata() or {}).values())
        elif f.suffix in (".md", ".json", ".jsonl", ".txt", ".yaml"):
            text = f.read_text(encoding="utf-8", errors="replace")
        else:
            continue
        if hit := next((p for p in paths if p in text), None) or next(iter(paths_in(text)), None):
            raise LoraError(f"{f.relative_to(stage)} would upload the local path {hit}; nothing was pushed "
                            "(please report this as a lorakit bug)")


# --- writing or uploading ---------------------------------------------------------------------------------------
def check_dest(dest: Path):
    """A dry run writes a new or empty folder, or replaces what an earlier dry run wrote; nothing else."""
    if dest.exists() and not dest.is_dir():
        raise LoraError(f"--dry-run {dest} is a file; give a folder to write the repo's files to")
    if dest.is_dir() and any(dest.iterdir()) and not is_push_output(dest):
        raise LoraError(f"--dry-run {dest} is a folder that holds other files; give a new or empty folder")


def write_dry_run(stage: Path, dest: Path) -> Path:
    """Write the staged folder to `dest` as a whole (atomic_write_folder), replacing an earlier dry run's files."""
    check_dest(dest)
    files = {str(p.relative_to(stage)): copier(p) for p in sorted(stage.rglob("*")) if p.is_file()}
    atomic_write_folder(dest, files, replaces=tuple(p.name for p in dest.iterdir()) if dest.is_dir() else ())
    return dest


def copier(src: Path):
    def copy(tmp: str):
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp)
    return copy


def is_push_output(folder: Path) -> bool:
    """Whether `folder` is what a dry run wrote: a lorakit card beside files of the kinds push stages only."""
    from huggingface_hub import ModelCard

    if not (folder / "README.md").is_file():
        return False
    try:
        data = ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data
    except Exception:  # not a model card
        return False
    kinds = (".safetensors", ".json", ".jsonl", ".png", ".md")
    return data.library_name == "lorakit" and all(
        p.suffix in kinds if p.is_file() else p.name == "samples" for p in folder.iterdir())


def login(token: str | None) -> str:
    """The token to push with (given, else `hf auth login`'s or HF_TOKEN); refused offline or when there is none."""
    import huggingface_hub as hf
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true"):
        raise LoraError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push, or pass --dry-run DIR "
                        "to write the repo's files only")
    token = token or hf.get_token()
    if not token:
        raise LoraError("not logged in to the Hugging Face hub: run `hf auth login`, set HF_TOKEN, or pass --token")
    return token


def upload(stage: Path, repo: str, private: bool, token: str, revision: str | None, message: str) -> str:
    """create_repo + upload_folder (one commit, stale adapter files deleted); every failure one LoraError line."""
    import huggingface_hub as hf

    try:
        url = hf.create_repo(repo, private=private, exist_ok=True, token=token)
        if revision:
            hf.create_branch(repo, branch=revision, token=token, exist_ok=True)
        hf.upload_folder(repo_id=repo, folder_path=stage, commit_message=message, revision=revision, token=token,
                         delete_patterns=DELETE)
    except Exception as e:
        raise hub_error(repo, e) from None
    return str(url)


def hub_error(repo: str, e: Exception) -> Exception:
    """One line for what huggingface_hub raised while pushing (LoraError), or `e` itself when it is no hub error."""
    names = {c.__name__ for c in type(e).__mro__}
    why = " ".join(str(e).split())[:300]
    if "OfflineModeIsEnabled" in names:
        return LoraError(f"{repo}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push")
    if "HfHubHTTPError" in names:
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", "?")
        hint = " (log in with `hf auth login` or set HF_TOKEN, with write access)" if status in (401, 403) else ""
        return LoraError(f"{repo}: the hub answered HTTP {status}: {why}{hint}")
    if names & {"ConnectError", "TransportError", "TimeoutException", "NetworkError", "ConnectionError"}:
        return LoraError(f"{repo}: the hub could not be reached ({why}); check the network")
    return e


def cli(args) -> int:
    """`lorakit push`: print the staged files (dry run) or the repo's URL."""
    formats = [f for spec in args.format or [] for f in spec.split(",")] or None
    out = push(args.run_dir, args.repo, args.private, formats, args.dry_run, args.token, args.revision,
               args.base_model)
    if args.dry_run is None:
        print(f"pushed {args.run_dir} to {out}")
        return 0
    folder = Path(out)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    print(f"dry run: nothing uploaded; the repo's files are in {folder}")
    for f in files:
        print(f"  {f.stat().st_size:>12,}  {f.relative_to(folder)}")
    return 0
