"""What the benchmark scripts share: each configuration runs in its own child process (so peak RSS is its own)
and hands back one JSON line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

MARK = "@@RESULT@@ "  # prefix of the child's JSON line


def report(result: dict):
    """Child side: print the result line, with this process's peak RSS added."""
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(MARK + json.dumps(result), flush=True)


def flags(args, names: list[str]) -> list[str]:
    """`--name value` for each of the parent's parsed arguments `names`, to hand them to a child run."""
    return [x for k in names for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def run_child(script: str, args: list[str]) -> dict:
    """Parent side: run `script args` in a fresh interpreter, pass its output through, return its result line."""
    cmd = [sys.executable, script, *args]
    print(f"\n== {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    found = None
    for line in proc.stdout:
        if line.startswith(MARK):
            found = json.loads(line[len(MARK):])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    found["process_wall_s"] = time.perf_counter() - t0
    return found
