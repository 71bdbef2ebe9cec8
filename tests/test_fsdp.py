"""`lorakit train` under FSDP (examples/fsdp.yaml): 2 processes shard the frozen base on the CPU (torch's FSDP2 over
gloo), train the LoRA factors and save the adapter whole, the adapter of 1 process with the same global batch."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import config, setup  # noqa: F401  (the fixture)

from lorakit import LoraError
from lorakit.llm import fsdp
from lorakit.llm.train import train

EXAMPLE = Path(__file__).parents[1] / "examples" / "fsdp.yaml"


def test_two_fsdp_processes_shard_the_base_and_save_the_adapter_of_one(setup):  # noqa: F811
    evals = dict(eval_data=str(setup / "train.jsonl"), eval_every=6)
    one = config(setup, out=str(setup / "one"), batch_size=4, dropout=0.0, **evals)
    train(one)
    args = ["--model", one.model, "--data", one.data, "--out", str(setup / "two"), "--targets", "all-linear",
            "--r", "4", "--alpha", "8", "--lr", "0.01", "--max-steps", "12", "--batch-size", "2", "--dropout", "0",
            "--seed", "3", "--eval-data", evals["eval_data"], "--eval-every", "6"]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLE),
                           "--num_processes", "2", "-m", "lorakit.cli", "train", *args],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # sharded: each process holds its half of every weight. Unsharded frozen weights alone (3/4 of this model) would
    # put a process above 0.6 of the total.
    held = {int(r): (int(n.replace(",", "")), int(t.replace(",", "")))
            for r, n, t in re.findall(r"FSDP: process (\d) holds ([\d,]+) of ([\d,]+) parameters", proc.stdout)}
    assert sorted(held) == [0, 1], proc.stdout[-2000:]
    total = held[0][1]
    assert sum(n for n, _ in held.values()) == total and all(n < 0.6 * total for n, _ in held.values())

    # the same file: keys, shapes, metadata (r/alpha, targets, base fingerprint) ...
    a, b = (load_file(str(setup / run / "adapter.safetensors")) for run in ("one", "two"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    meta = [safe_open(str(setup / run / "adapter.safetensors"), "pt").metadata() for run in ("one", "two")]
    assert meta[0] == meta[1]
    # ... and the same values up to float rounding: not bitwise, since the global batch's gradient is summed in another
    # order (each process sums its half, then the reduce-scatter adds the halves) and float addition does not
    # associate. Measured: 6e-8 of the tensor's scale (about one fp32 ulp) after 12 Adam steps.
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6 * max(1.0, a[k].abs().max().item()), k
    # the evaluations every process ran together (a sharded forward needs them all) match one process's
    m1, m2 = ([json.loads(x) for x in (setup / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two"))
    assert [m["step"] for m in m2 if "eval_loss" in m] == [6, 12]
    for x, y in zip(m1, m2):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x.get("eval_loss", 0) - y.get("eval_loss", 0)) <= 1e-5


@pytest.mark.parametrize("change, message", [
    (dict(is_fsdp2=False), "FSDP2"),
    (dict(full_finetune=True), "LoRA adapters only"),
    (dict(save_every=5), "checkpoints"),
])
def test_what_is_not_done_sharded_is_refused_up_front(setup, change, message):  # noqa: F811
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=change.pop("is_fsdp2", True))
    with pytest.raises(LoraError, match=message):
        fsdp.setup(acc, config(setup, **change), None, on_cpu=False)
