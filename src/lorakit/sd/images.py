"""Image training data and sample grids: captioned image folders read the diffusers way (`metadata.jsonl`) or the
kohya way (`image.png` + `image.txt`), turned into tensors in [-1, 1] at one resolution."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lorakit.core.errors import LoraError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_folder(folder, prompt: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) pairs: captions from `metadata.jsonl` ({"file_name", "text"}), else from each image's
    `.txt` twin, else `prompt` for every image (Dreambooth's instance prompt)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraError(f"{folder}: no such image folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    meta = folder / "metadata.jsonl"
    if meta.exists() and prompt is None:
        pairs = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path, text = folder / row["file_name"], row.get("text", row.get("caption"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LoraError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}} ({e})") from None
            if not isinstance(text, str) or not path.exists():
                raise LoraError(f"{meta}:{n}: {'no caption (text)' if not isinstance(text, str) else f'no image {path.name}'}")
            pairs.append((path, text))
        return pairs
    if not images:
        raise LoraError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if prompt is not None:
        return [(p, prompt) for p in images]
    missing = [p.name for p in images if not p.with_suffix(".txt").exists()]
    if missing:
        raise LoraError(f"{folder}: {missing[0]} has no caption: add {Path(missing[0]).stem}.txt beside it, or a "
                        "metadata.jsonl, or give an instance prompt")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def load_image(path: Path, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """The image as a (3, resolution, resolution) tensor in [-1, 1]: shorter side resized, then cropped."""
    return load_cropped(path, resolution, center_crop)[0]


def load_cropped(path: Path, resolution: int, center_crop: bool = True,
                 flip: bool = False) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(image as load_image gives it, mirrored if `flip`; (original height, width, crop top, crop left)), the
    crop's corner in the resized (and mirrored) image: what SDXL's micro-conditioning time ids record."""
    from PIL import Image

    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        raise LoraError(f"{path}: not a readable image ({e})") from None
    w0, h0 = img.size
    s = resolution / min(w0, h0)
    img = img.resize((max(resolution, round(w0 * s)), max(resolution, round(h0 * s))), Image.BICUBIC)
    w, h = img.size
    left = (w - resolution) // 2 if center_crop else random.randint(0, w - resolution)
    top = (h - resolution) // 2 if center_crop else random.randint(0, h - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    t = t.permute(2, 0, 1).float() / 127.5 - 1
    if flip:  # the same crop, seen in the mirrored image
        t, left = t.flip(-1), w - resolution - left
    return t, (h0, w0, top, left)


def grid(images: list, cols: int | None = None):
    """PIL images laid out in a grid (as square as possible)."""
    from PIL import Image

    cols = cols or max(1, round(len(images) ** 0.5))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out
