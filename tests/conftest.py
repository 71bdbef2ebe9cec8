"""Shared test fixtures: tiny models saved as ordinary transformers folders (no downloads)."""

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def _save_tiny(folder):
    """A tiny Llama and a word-level tokenizer, saved as an ordinary transformers folder."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, bos_token_id=1,
                                 eos_token_id=1)).save_pretrained(folder)  # </s> is id 1 below
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return folder


def launch_two(command: str, args: list[str]):
    """`accelerate launch --multi_gpu --num_processes 2 -m lorakit.cli COMMAND ARGS` (gloo DDP on a CPU machine)."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "-m", "lorakit.cli", command, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_adapter(path_a, path_b):
    """The two adapter files hold the same tensors, to float32 rounding."""
    from safetensors.torch import load_file

    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5 * max(1.0, a[k].abs().max().item()), k
    return a


def sd_workspace(pipe, tmp_path, height: int = 12, width: int = 10):
    """TMP/pipe (the pipeline saved) and TMP/images: 4 random height x width images captioned "a photo of a|b dog"
    in metadata.jsonl; returns TMP."""
    import json

    import numpy as np
    from PIL import Image

    pipe.save_pretrained(tmp_path / "pipe")
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a photo of {'ab'[i % 2]} dog"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def cache_repo(cache: Path, repo: str, files: dict, commit: str = "a" * 40, refs=("main",), kind: str = "models"):
    """A Hugging Face cache entry as huggingface_hub writes it (blobs, snapshots/<commit>/ links, refs/<name>):
    put `files` {path in repo: local file or folder, or text} into `cache` as repo `repo` at `commit`."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    for name, src in files.items():
        data = src.encode() if isinstance(src, str) else Path(src).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def save_tiny():
    """save_tiny(folder) writes a tiny Llama + word-level tokenizer (words: a b c) and returns the folder."""
    return _save_tiny


@contextlib.contextmanager
def killed_at(step: int):
    """Within the block, a training run (lorakit.runner) dies with KeyboardInterrupt as it records step `step`, like
    a kill; the block expects that."""
    from lorakit import runner as module

    real = module.append_metrics

    def die(out, record):
        if record["step"] == step:
            raise KeyboardInterrupt
        real(out, record)

    module.append_metrics = die
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        module.append_metrics = real


def tiny_unet(layers_per_block=2, linear_proj=False):
    """An SD-architecture UNet (real module names: down_blocks.N.attentions.M..., attn1/attn2, proj_in, ff) with
    tiny widths; `linear_proj` gives SD 2/XL's Linear proj_in/proj_out instead of SD 1.x's 1x1 convs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers_per_block, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, use_linear_projection=linear_proj)


def tiny_clip(cls_name="CLIPTextModel"):
    import transformers

    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                      bos_token_id=53, eos_token_id=54, pad_token_id=54)
    return getattr(transformers, cls_name)(cfg)


def clip_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters (ids < 64), written as vocab.json + merges.txt."""
    import json

    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["!", *letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.fixture
def tiny_sd(tmp_path):
    """A tiny StableDiffusionPipeline built from configs (random weights, real module names)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline

    torch.manual_seed(2)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    return StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip(), tokenizer=clip_tokenizer(tmp_path / "tok"),
                                   unet=tiny_unet(), scheduler=DPMSolverMultistepScheduler(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl_clip(cls_name: str, hidden: int, seed: int):
    """A tiny CLIP text model of width `hidden` over clip_tokenizer's ids (SDXL's two encoders differ in width)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                      projection_dim=hidden, bos_token_id=53, eos_token_id=54, pad_token_id=54)
    return getattr(transformers, cls_name)(cfg)


@pytest.fixture
def tiny_sdxl(tmp_path):
    """A tiny StableDiffusionXLPipeline built from configs (random weights, real module names): CLIP widths 16 and
    24 (hidden states concatenated to the UNet's 40-wide cross-attention), pooled text_encoder_2 output + 6 time
    ids into the UNet's text_time embedding, Linear proj_in/out, 1 and 2 transformer layers per block."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 24, attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 24)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    tokenizer_2 = clip_tokenizer(tmp_path / "tok2")
    tokenizer_2.pad_token = "!"  # as SDXL's OpenCLIP tokenizer pads
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=tiny_sdxl_clip("CLIPTextModel", 16, 4), tokenizer=clip_tokenizer(tmp_path / "tok"),
        text_encoder_2=tiny_sdxl_clip("CLIPTextModelWithProjection", 24, 5), tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading"))
