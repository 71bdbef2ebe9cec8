"""Data sets through the `datasets` library, for both trainers: parquet, Arrow and JSON files, folders written by
`save_to_disk`, folders of data files, and hub data sets `owner/name[/config][:split]` (read from the hub cache when
offline). Every failure to find or read one is a LoraError naming the data and what to do."""

from __future__ import annotations

import re
from pathlib import Path

from lorakit.core.errors import LoraError

LOADERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}  # datasets' builders
DATA_SUFFIXES = {*LOADERS, ".csv", ".tsv", ".txt"}  # a missing path with one of these is a missing file, not an id
HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<config>[\w.-]+))?")  # owner/name[/config]


def locate(spec: str) -> tuple[str, str | None]:
    """(path or hub id, split or None): `where:split` names a split, unless the whole value is a path that exists."""
    head, sep, tail = spec.rpartition(":")
    if Path(spec).exists() or not sep or not head or not tail or "/" in tail:
        return spec, None
    return head, tail


def load(spec: str, where: str, split: str | None, eval: bool, streaming: bool):
    """The Dataset (IterableDataset when streaming) of one split of a file, folder or hub id."""
    try:
        import datasets
    except ImportError:
        raise LoraError(f"{spec}: reading it needs the `datasets` library; pip install 'lorakit[hub]'") from None
    path = Path(where)
    if path.is_file():
        builder = LOADERS.get(path.suffix.lower())
        if builder is None:
            raise LoraError(f"{spec}: unknown data format {path.suffix!r}; use .jsonl, .csv, .tsv, .txt, .json, "
                            ".parquet or .arrow, a save_to_disk folder or a hub dataset id (user/name[:split])")
        if split:
            raise LoraError(f"{spec}: a {path.suffix} file holds one split; leave out ':{split}'")
        return _call(spec, datasets.load_dataset, builder, data_files=str(path), split="train", streaming=streaming)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        saved = _call(spec, datasets.load_from_disk, str(path))
        if isinstance(saved, datasets.DatasetDict):
            saved = saved[_pick(spec, list(saved), split, eval)]
        elif split:
            raise LoraError(f"{spec}: {where} holds one Dataset, no splits; leave out ':{split}'")
        return saved.to_iterable_dataset() if streaming else saved
    config = None
    if not path.is_dir():
        m = HUB_ID.fullmatch(where)
        if path.suffix.lower() in DATA_SUFFIXES or not m:
            raise LoraError(f"{spec}: no such file or folder" + ("" if path.suffix else
                            ", and no hub dataset id (user/name[/config][:split])"))
        where, config = _hub(spec, m["repo"]), m["config"]
    splits = _call(spec, datasets.get_dataset_split_names, where, config)  # a folder of data files, or a hub data set
    return _call(spec, datasets.load_dataset, where, config, split=_pick(spec, splits, split, eval),
                 streaming=streaming)


def _hub(spec: str, repo_id: str) -> str:
    """What load_dataset reads for a hub id: the id itself, or offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) its
    snapshot in the hub cache (datasets alone reads only data sets it prepared itself while online)."""
    import datasets
    import huggingface_hub
    from huggingface_hub import constants

    if not (constants.is_offline_mode() or datasets.config.HF_HUB_OFFLINE):
        return repo_id
    try:
        return huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except (FileNotFoundError, huggingface_hub.errors.LocalEntryNotFoundError):
        raise LoraError(f"{spec}: not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE (or "
                        "HF_DATASETS_OFFLINE) is set; download it once online, or give a local file or folder") from None


def _call(spec: str, fn, *args, **kw):
    """fn(*args, **kw), its failures to find or read data as one-line LoraErrors naming the data."""
    try:
        return fn(*args, **kw)
    except LoraError:
        raise
    except (OSError, ValueError, ImportError) as e:  # FileNotFoundError, ConnectionError, datasets' own errors
        why = " ".join(str(e).split()) or type(e).__name__
        if "Config name is missing" in why:  # a hub data set of several configurations (GLUE's sst2, cola, ...)
            raise LoraError(f"{spec}: the data set has several configurations ({why[why.find('['):][:200]}); name one "
                            "as owner/name/CONFIG[:split]") from None
        raise LoraError(f"{spec}: cannot load it ({why[:300]}); check the path or hub id (and `hf auth login` for a "
                        "gated one), or set HF_HUB_OFFLINE=1 to read the hub cache") from None


def _pick(spec: str, splits: list[str], split: str | None, eval: bool) -> str:
    """The split to read: the one named, else train (--data) or validation, then test (--eval-data)."""
    want = [split] if split else ["validation", "test"] if eval else ["train"]
    for w in want:
        if w in splits:
            return w
    raise LoraError(f"{spec}: no split {' or '.join(map(repr, want))}; it has {', '.join(map(repr, splits))}; name "
                    f"one as {locate(spec)[0]}:SPLIT")
