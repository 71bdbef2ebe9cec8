"""Run folders and checkpoints under faults: real `lorakit train` / `train-sd` processes are SIGKILLed at random
moments (one while a checkpoint is being written) and resumed to the end, giving the uninterrupted run's adapter;
a folder holding another run is refused unless resumed (same settings) or overwritten."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.llm.train import TrainConfig, train
from lorakit.options import build
from lorakit.sd.train import SDTrainConfig, train_sd

LLM = dict(targets="all-linear", r=4, alpha=8, lr=1e-2, max_steps=24, batch_size=4, dropout=0.1, seed=3)


def llm_setup(tmp, save_tiny):
    save_tiny(tmp / "m")
    lines = [{"text": " ".join("abc"[(i + k) % 3] for k in range(9))} for i in range(40)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return dict(model=str(tmp / "m"), data=str(tmp / "train.jsonl"), **LLM)


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def steps_done(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def writing_checkpoint(proc, out) -> bool:
    """True, with `proc` stopped, while it has a `.step-N.tmp` folder that is not yet renamed."""
    folder = out / "checkpoints"
    if not folder.exists() or not any(p.name.endswith(".tmp") for p in os.scandir(folder)):
        return False
    proc.send_signal(signal.SIGSTOP)  # frozen mid-write, or just after the rename
    if any(p.name.endswith(".tmp") for p in os.scandir(folder)):
        return True
    proc.send_signal(signal.SIGCONT)
    return False


def kill_when(command: str, args: list[str], out, when, tmp) -> bool:
    """Run `lorakit COMMAND ARGS` as a process and SIGKILL it once `when(proc)` holds; False if it ended first."""
    with open(tmp / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", command, *args], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if when(proc):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp / "log.txt").read_text()[-3000:]
    return False


def test_sigkilled_runs_resume_to_the_uninterrupted_adapter(tmp_path, save_tiny):
    settings = llm_setup(tmp_path, save_tiny)
    train(build(TrainConfig, {**settings, "out": str(tmp_path / "whole")}))
    want = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    out = tmp_path / "run"
    args = [*flags(settings), "--out", str(out), "--save-every", "1", "--keep", "2"]
    first = random.randint(2, 8)
    assert kill_when("train", args, out, lambda p: steps_done(out) >= first, tmp_path), "ended before its kill"
    # resumed, then killed while it writes a checkpoint (frozen with the temporary folder still there)
    caught = kill_when("train", [*args, "--resume"], out, lambda p: writing_checkpoint(p, out), tmp_path)
    assert caught, "the run ended before it was caught writing a checkpoint"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # the half-written one
    kill_when("train", [*args, "--resume"], out, lambda p: False, tmp_path)
    got = load_file(str(out / "adapter.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f"first kill at {first}"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 25))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_folder_holding_a_run_is_refused_unless_resumed_alike_or_overwritten(tmp_path, save_tiny, capsys):
    settings = llm_setup(tmp_path, save_tiny)
    args = ["train", *flags({**settings, "max_steps": 4}), "--out", str(tmp_path / "run"), "--save-every", "1",
            "--keep", "5"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume", "--r", "2"]) == 2  # another run's settings: refused, naming them
    assert "lora.r was 4, now 2" in capsys.readouterr().err
    assert main([*args, "--resume", "--overwrite"]) == 2
    (tmp_path / "run" / "run.json").write_text("{not json")
    assert main([*args, "--resume"]) == 2
    assert "run.json is not valid JSON" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--max-steps", "2"]) == 0  # the old run's files go first
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000001"]
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["max_steps"] == 2


def test_checkpoints_hold_every_rng(tmp_path, save_tiny):
    """numpy's and python's generators are restored too: a resumed run draws what an uninterrupted one would."""
    from lorakit import runner

    settings = llm_setup(tmp_path, save_tiny)
    train(build(TrainConfig, {**settings, "out": str(tmp_path / "run"), "max_steps": 3, "save_every": 2}))
    np.random.seed(1)
    random.seed(1)
    state = runner.rng_state(torch.device("cpu"))
    want = (np.random.rand(), random.random(), torch.rand(()).item())
    np.random.seed(2)
    random.seed(2)
    torch.save(state, tmp_path / "rng.pt")
    runner.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    assert (np.random.rand(), random.random(), torch.rand(()).item()) == want
    assert "numpy" in torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "rng-0.pt", weights_only=True)


def test_a_sigkilled_sd_run_resumes_to_the_uninterrupted_adapter(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "pipe")
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "images" / f"{i}.txt").write_text(f"a photo of {'ab'[i % 2]} dog")
    settings = dict(model=str(tmp_path / "pipe"), data=str(tmp_path / "images"), resolution=8, max_steps=8, lr=1e-2,
                    seed=1, save_every=2)
    train_sd(build(SDTrainConfig, {**settings, "out": str(tmp_path / "whole"), "random_flip": True}))
    out = tmp_path / "run"
    args = [*flags(settings), "--random-flip", "--out", str(out)]
    first = random.randint(3, 7)
    assert kill_when("train-sd", args, out, lambda p: steps_done(out) >= first, tmp_path), "ended before its kill"
    kill_when("train-sd", [*args, "--resume"], out, lambda p: False, tmp_path)
    a, b = load_file(str(tmp_path / "whole" / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at step {first}"


def test_fp16_sd_training_scales_the_loss_and_trains_finite_factors(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "pipe")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((12, 10, 3), 128, np.uint8)).save(tmp_path / "images" / "0.png")
    (tmp_path / "images" / "0.txt").write_text("a dog")
    settings = {"model": str(tmp_path / "pipe"), "data": str(tmp_path / "images"), "resolution": 8, "max_steps": 3,
                "lr": 1e-2, "save_every": 2}
    train_sd(build(SDTrainConfig, {**settings, "out": str(tmp_path / "r"), "precision": "fp16"}))
    train_sd(build(SDTrainConfig, {**settings, "out": str(tmp_path / "fp32")}))
    factors = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in factors.values())
    # it learns what fp32 does: B (zero at the start) points the same way (cosine measured 0.9994), the same size
    b16, b32 = (torch.cat([t.flatten() for k, t in load_file(str(tmp_path / run / "adapter.safetensors")).items()
                           if k.endswith(".B")]) for run in ("r", "fp32"))
    assert b32.norm() > 0.1 and torch.nn.functional.cosine_similarity(b16, b32, 0) > 0.99
    assert abs(b16.norm() / b32.norm() - 1) < 0.02
    state = torch.load(tmp_path / "r" / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # the gradient scaler ran and is checkpointed
