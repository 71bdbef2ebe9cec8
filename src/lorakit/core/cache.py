"""Where lorakit keeps what it builds or converts once (embedded models)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorakit"
