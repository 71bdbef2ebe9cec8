"""What a first-time user sees: images big enough to look at, grids without empty filler, captioned weight sweeps,
a loss plot with the held-out metric and the learning rate, and no notices about lorakit's own use of libraries."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import lorakit
from lorakit.cli import main
from lorakit.core.errors import silence_known_notices
from lorakit.runner import plot_loss
from lorakit.sd.generate import generate, load_pipeline
from lorakit.sd.images import grid


def cells(n, size=16):
    return [Image.new("RGB", (size, size), (20 * i, 0, 0)) for i in range(n)]


def test_small_images_are_scaled_up_to_viewable_cells_and_the_grid_has_no_empty_cell():
    g = grid(cells(8))
    assert g.size == (4 * 128, 2 * 128)  # 4 x 2, each 16 px image at 8x
    assert np.array_equal(np.asarray(g)[:128:8, 128:256:8], np.asarray(cells(8)[1]))  # nearest: pixels stay pixels
    assert grid(cells(8), min_cell=0).size == (64, 32)  # native size on request
    assert grid(cells(3, 512)).size == (3 * 512, 512)  # large images are left as they are
    odd = np.asarray(grid(cells(7)))  # 7 = 4 + 3: the one cell left is neutral gray, not white
    assert odd.shape == (256, 512, 3) and (odd[128:, 384:] == 128).all()


def test_captions_go_under_their_cells():
    plain, captioned = grid(cells(2)), grid(cells(2), captions=["style × 0", "style × 1"])
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1]
    strip = np.asarray(captioned)[128:, :128]
    assert (strip == 0).any() and (strip == 255).any()  # black text on white


@pytest.fixture
def sd_lora(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "pipe")
    lorakit.inject(tiny_sd.unet, lorakit.LoraConfig(r=2, alpha=2, targets=["to_q", "to_v"], init=False))
    lorakit.save(tiny_sd, tmp_path / "style.safetensors", base_model=str(tmp_path / "pipe"))
    return tmp_path


def test_generate_image_sweep_draws_one_lora_at_several_weights(sd_lora, capsys):
    out = sd_lora / "sweep.png"
    assert main(["generate-image", "--lora", str(sd_lora / "style.safetensors"), "--sweep", "style:0,0.5,1",
                 "--prompt", "a dog", "--steps", "2", "--count", "2", "--size", "8", "--out", str(out)]) == 0
    assert "3 weights of style x 2" in capsys.readouterr().out
    img = np.asarray(Image.open(out))
    assert img.shape[1] == 3 * 128 and img.shape[0] > 2 * 128  # 3 weights side by side, 2 seeds, captions
    pipe, _ = load_pipeline(str(sd_lora / "pipe"), [f"{sd_lora / 'style.safetensors'}:0.5"], "a dog")
    want = generate(pipe, "a dog", count=2, steps=2, seed=0, size=8)
    top_middle = img[:128, 128:256][::16, ::16]
    assert np.array_equal(top_middle, np.asarray(want[0]))  # the cell at weight 0.5 is the plain 0.5 image
    plain, _ = load_pipeline(str(sd_lora / "pipe"), [], "a dog")
    assert np.array_equal(img[:128, :128][::16, ::16], np.asarray(generate(plain, "a dog", count=2, steps=2, seed=0,
                                                                           size=8)[0]))  # weight 0: the base
    assert main(["generate-image", "--lora", str(sd_lora / "style.safetensors"), "--sweep", "style:a,b",
                 "--prompt", "a dog", "--out", str(out)]) == 2
    assert "--sweep 'style:a,b': write NAME:W1,W2" in capsys.readouterr().err


def test_loss_plot_has_the_metric_and_the_learning_rate(tmp_path):
    history = [{"step": i, "loss": 2 / i, "lr": 1e-3} for i in range(1, 21)]
    history[9]["eval_loss"], history[9]["eval_accuracy"] = 0.5, 0.7
    panels = plot_loss(history, tmp_path / "loss.png", {"eval_accuracy_before": 0.5, "eval_accuracy": 0.8,
                                                        "eval_loss_before": 1.0, "steps": 20})
    assert panels == ["loss", "held-out accuracy", "lr"]
    assert plot_loss(history[:3], tmp_path / "plain.png") == ["loss", "lr"]  # not evaluated: no metric panel
    causal = [{k: v for k, v in m.items() if k != "eval_accuracy"} for m in history]
    assert plot_loss(causal, tmp_path / "bleu.png", {"eval_bleu_before": 1.0, "eval_bleu": 40.0, "steps": 20}) == \
        ["loss", "BLEU", "lr"]
    assert Image.open(tmp_path / "loss.png").size[1] > Image.open(tmp_path / "plain.png").size[1]


def test_known_notices_are_silenced_and_other_warnings_stay(sd_lora):
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "generate-image", "--model", str(sd_lora / "pipe"),
                           "--prompt", "a dog", "--steps", "1", "--count", "1", "--size", "8", "--out",
                           str(sd_lora / "x.png")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and "torchao" not in proc.stderr, proc.stderr
    silence_known_notices()
    logger = logging.getLogger("transformers.utils.import_utils")
    kept = [f.filter(logging.LogRecord(logger.name, logging.WARNING, "", 0, "a real warning", (), None))
            for f in logger.filters]
    assert kept and all(kept)  # the filter drops its one message, nothing else


def test_the_adapter_header_names_a_local_base_relative_to_itself(tmp_path, save_tiny):
    import json
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lorakit.formats.io import base_model

    save_tiny(tmp_path / "work" / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "work" / "m")  # records its folder as name_or_path
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, targets=["q_proj"]))
    lorakit.save(model, tmp_path / "work" / "run" / "adapter.safetensors")
    with safe_open(str(tmp_path / "work" / "run" / "adapter.safetensors"), "pt") as f:
        header = f.metadata()
    assert str(tmp_path) not in json.dumps(header) and header["base_model"] == "../m"
    shutil.move(tmp_path / "work", tmp_path / "moved")  # the run and its base move together
    moved = tmp_path / "moved" / "run" / "adapter.safetensors"
    assert lorakit.read(moved)[0].base_model == str(tmp_path / "moved" / "m")
    assert base_model(None, [str(moved)]) == str(tmp_path / "moved" / "m")
