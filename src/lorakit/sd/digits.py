"""The embedded text-to-image model "digits": a tiny Stable Diffusion pipeline (the real diffusers classes:
UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIP tokenizer, DPM-Solver++) pretrained by lorakit's own
`train_sd` on scikit-learn's bundled handwritten digits (real data), captioned "a handwritten digit seven", using
only the digits 0-7, so 8 and 9 are left for LoRA to teach. Built once, deterministically, and cached; a
scikit-learn classifier trained on the digits' train split judges generated samples.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lorakit.core.cache import cache_dir
from lorakit.core.errors import LoraError
from lorakit.sd.generate import generate
from lorakit.sd.images import load_image
from lorakit.sd.pipeline import EMBEDDED
from lorakit.sd.train import SDTrainConfig, train_sd

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SEEN = range(8)
RESOLUTION = 16  # pixels; the VAE halves it
VERSION = "1"
WORDS = ["a", "handwritten", "digit", "photo", "of", "sks", *NAMES]


def caption(d: int) -> str:
    return f"a handwritten digit {NAMES[d]}"


def split():
    """scikit-learn's 1,797 8x8 digits as (train images, train labels, test images, test labels): the first half is
    train, as in scikit-learn's own example. Images are float arrays 0..16 (ink high)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    n = len(d.images) // 2
    return d.images[:n], d.target[:n], d.images[n:], d.target[n:]


def to_pil(img8):
    """An 8x8 digit (0..16, ink high) as a RESOLUTION x RESOLUTION RGB image, white ink on black."""
    import numpy as np
    from PIL import Image

    g = Image.fromarray((np.asarray(img8) / 16 * 255).clip(0, 255).astype("uint8"), "L")
    return g.resize((RESOLUTION, RESOLUTION), Image.BILINEAR).convert("RGB")


def from_pil(img):
    """A generated image back as the classifier's 64 features (8x8, 0..16)."""
    import numpy as np
    from PIL import Image

    g = img.convert("L").resize((8, 8), Image.BILINEAR)
    return np.asarray(g, dtype="float64").reshape(-1) / 255 * 16


def classifier():
    """An SVM on the train split's 8x8 digits (scikit-learn's example setting); ~97 % on the test split."""
    from sklearn.svm import SVC

    x, y, _, _ = split()
    return SVC(gamma=0.001).fit(x.reshape(len(x), -1), y)


def write_folder(folder: Path, images, labels, prompt: str | None = None) -> Path:
    """Digits as a training image folder: PNGs plus metadata.jsonl with their captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, d) in enumerate(zip(images, labels)):
        name = f"{i:04d}-{d}.png"
        to_pil(img).save(folder / name)
        rows.append({"file_name": name, "text": prompt or caption(int(d))})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose vocabulary holds the caption words whole (and single letters for the rest)."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["!", "<", ">", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for w in WORDS:  # a merge chain building each word from its letters
        piece = w[0]
        for k, c in enumerate(w[1:], 1):
            nxt = c + ("</w>" if k == len(w) - 1 else "")
            merges.append(f"{piece} {nxt}")
            piece += nxt
            if piece not in vocab:
                vocab.append(piece)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def untrained(tmp: Path):
    """The pipeline with random weights (the VAE trained separately, see train_vae)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = tokenizer(tmp / "tokenizer-src")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, projection_dim=64,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION)
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        algorithm_type="dpmsolver++", steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def train_vae(vae, images, steps: int = 400, seed: int = 0):
    """Fit the tiny VAE to the digit images (reconstruction + a small KL), then set its latent scaling factor so
    latents have unit variance, as SD's 0.18215 does."""
    from tqdm.auto import tqdm

    x = torch.stack([load_image(p, RESOLUTION) for p in images])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    for _ in tqdm(range(steps), desc="vae"):
        batch = x[torch.randint(0, len(x), (32,), generator=g)]
        dist = vae.encode(batch).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = 0.5 * (dist.mean ** 2 + dist.var - 1 - dist.logvar).mean()
        loss = ((rec - batch) ** 2).mean() + 1e-4 * kl
        loss.backward()
        opt.step()
        opt.zero_grad()
    vae.eval()
    with torch.no_grad():
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1 / std)
    vae.requires_grad_(False)
    return vae


def build(dest: Path, steps: int = 3000, vae_steps: int = 400, seed: int = 0) -> Path:
    """Build and pretrain the digits pipeline into `dest` (written atomically: a temp folder renamed at the end)."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    x, y, _, _ = split()
    keep = [i for i in range(len(y)) if y[i] in SEEN]
    data = write_folder(tmp / "data", x[keep], y[keep])
    pipe = untrained(tmp)
    train_vae(pipe.vae, sorted(data.glob("*.png")), vae_steps, seed)
    pipe.save_pretrained(tmp / "init")
    train_sd(SDTrainConfig(model=str(tmp / "init"), data=str(data), out=str(tmp / "pretrain"), full_finetune=True,
                           text_encoder=True, resolution=RESOLUTION, batch_size=32, max_steps=steps, lr=1e-3,
                           text_lr=1e-4, schedule="cosine", warmup=0.02, weight_decay=0.0, seed=seed,
                           cache_latents=True, validation_prompts=[caption(d) for d in SEEN],
                           num_validation_images=8, validation_steps=20, guidance_scale=3.0))
    final = tmp / "pretrain" / "pipeline"
    shutil.copy(tmp / "pretrain" / "loss.png", final / "loss.png")
    shutil.copy(sorted((tmp / "pretrain" / "samples").glob("*.png"))[-1], final / "samples.png")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(final, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure() -> Path:
    """The cached digits pipeline folder, built on first use (minutes on 2 CPU cores)."""
    dest = cache_dir() / f"digits-v{VERSION}"
    if not (dest / "model_index.json").exists():
        print(f"building the digits pipeline into {dest} (once)")
        build(dest)
    return dest


@torch.no_grad()
def accuracy(pipe, digit: int, prompt: str | None = None, n: int = 32, seed: int = 0, clf=None,
             steps: int = 20, guidance: float = 3.0) -> float:
    """The share of `n` samples for `prompt` (default: the digit's caption) the classifier reads as `digit`."""
    clf = clf or classifier()
    imgs = generate(pipe, prompt or caption(digit), None, n, steps, guidance, seed, RESOLUTION)
    import numpy as np

    pred = clf.predict(np.stack([from_pil(im) for im in imgs]))
    return float((pred == digit).mean())


def folder() -> str:
    """The folder behind the embedded name "digits" (built on first use)."""
    try:
        return str(ensure())
    except ImportError as e:
        raise LoraError(f"the digits model needs scikit-learn ({e}); pip install scikit-learn") from None


EMBEDDED["digits"] = folder
