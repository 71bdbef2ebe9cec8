"""The command line under bad input: every mistake ends in one `lorakit: error:` line naming the problem (exit code
2, no traceback); generate-image's <lora:NAME:TE:UNET> tags for every format; --device for both generate commands."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.core.errors import LoraError
from lorakit.sd.generate import load_pipeline


@pytest.fixture
def sd_loras(tiny_sd, tmp_path):
    """A saved tiny SD pipeline and, in loras/, one LoRA on its text encoder and UNet in several formats, plus
    `unet_only` and `te_only` saved from the lone components (module paths without a component prefix)."""
    tiny_sd.save_pretrained(tmp_path / "pipe")
    lorakit.inject(tiny_sd, lorakit.LoraConfig(r=2, alpha=2, targets=["to_q", "to_k", "q_proj"], init=False), name="x")
    for fmt in ("kohya", "diffusers", "lorakit"):
        lorakit.save(tiny_sd, tmp_path / "loras" / f"{fmt}.safetensors", format=fmt, base_model=str(tmp_path / "pipe"))
    lorakit.save(tiny_sd.unet, tmp_path / "loras" / "unet_only.safetensors", base_model=str(tmp_path / "pipe"))
    lorakit.save(tiny_sd.text_encoder, tmp_path / "loras" / "te_only.safetensors", base_model=str(tmp_path / "pipe"))
    return tmp_path


def images(pipe, prompt="a dog"):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=8, width=8,
                output_type="np").images


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_tag_with_two_weights_equals_the_two_parts_loaded_with_those_weights(sd_loras, fmt):
    pipe, prompt = load_pipeline(str(sd_loras / "pipe"), [], f"a dog <lora:{fmt}:0.3:-0.8>", str(sd_loras / "loras"))
    assert lorakit.active(pipe) == {"lora0_text_encoder": 0.3, "lora0_unet": -0.8}
    ref, _ = load_pipeline(str(sd_loras / "pipe"), [], "a dog")
    path = sd_loras / "loras" / f"{fmt}.safetensors"
    te = lorakit.load(ref.text_encoder, path, name="te", component="text_encoder")
    un = lorakit.load(ref.unet, path, name="un", component="unet")
    lorakit.set_weights(ref, {te: 0.3, un: -0.8})
    plain, _ = load_pipeline(str(sd_loras / "pipe"), [], "a dog")
    ours = images(pipe, prompt)
    assert np.abs(ours - images(ref)).max() < 1e-5
    assert np.abs(ours - images(plain)).max() > 1e-3


def test_tag_weights_reach_a_file_whose_modules_name_no_component(sd_loras):
    pipe, _ = load_pipeline(str(sd_loras / "pipe"), [], "a <lora:unet_only:0.3:-0.8> <lora:te_only:0.5:2>",
                            str(sd_loras / "loras"))
    assert lorakit.active(pipe) == {"lora0": -0.8, "lora1": 0.5}  # the UNet weight, the text-encoder weight
    ref, _ = load_pipeline(str(sd_loras / "pipe"), [], "a dog")
    lorakit.set_weights(ref, {lorakit.load(ref.unet, sd_loras / "loras" / "unet_only.safetensors"): -0.8,
                              lorakit.load(ref.text_encoder, sd_loras / "loras" / "te_only.safetensors"): 0.5})
    assert np.abs(images(pipe) - images(ref)).max() < 1e-5


def test_a_lora_that_fits_no_component_is_an_error(sd_loras):
    m = torch.nn.ModuleDict({"nowhere": torch.nn.Linear(4, 4)})
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=2, targets=["nowhere"], init=False), name="x")
    lorakit.save(m, sd_loras / "loras" / "stray.safetensors")
    for tag in ("<lora:stray:0.3:1>", "<lora:stray:1>"):
        with pytest.raises(LoraError, match="'nowhere'"):
            load_pipeline(str(sd_loras / "pipe"), [], f"a {tag}", str(sd_loras / "loras"))


def test_device_cpu_works_and_a_bogus_device_is_one_line(sd_loras, save_tiny, capsys):
    llm = str(save_tiny(sd_loras / "llm"))
    assert main(["generate", "--model", llm, "--prompt", "a b", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert main(["generate-image", "--lora", str(sd_loras / "loras" / "kohya.safetensors"), "--prompt", "a dog",
                 "--steps", "1", "--count", "1", "--size", "8", "--device", "cpu", "--out",
                 str(sd_loras / "g.png")]) == 0
    capsys.readouterr()
    for cmd in (["generate", "--model", llm, "--prompt", "a"], ["generate-image", "--model", str(sd_loras / "pipe"),
                                                                "--prompt", "a"]):
        for bogus in ("gpu7", "cuda:99" if torch.cuda.is_available() else "cuda"):
            assert main([*cmd, "--device", bogus]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("lorakit: error: --device") and bogus in err, err
