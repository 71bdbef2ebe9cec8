"""Image training data and sample grids: captioned image folders read the diffusers way (`metadata.jsonl`) or the
kohya way (`image.png` + `image.txt`), or data sets with an image and a caption column (parquet, save_to_disk
folders, hub ids, through lorakit.dataset), turned into tensors in [-1, 1] at one resolution."""

from __future__ import annotations

import json
import math
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


IMAGE_COLUMNS, CAPTION_COLUMNS = ("image", "img"), ("text", "caption", "prompt")  # tried in this order


def read_data(spec: str, prompt: str | None = None, image_field: str | None = None,
              caption_field: str | None = None):
    """(image, caption) pairs of an image folder (read_folder), or of a data set with an image column (default:
    image) and a caption column (default: text, caption or prompt; `prompt` instead when given): a sequence that
    decodes each image only when it is read, so the images stay on disk, memory-mapped."""
    from lorakit import dataset

    path = Path(spec)
    if not path.exists() and not dataset.HUB_ID.fullmatch(dataset.locate(spec)[0]):
        raise LoraError(f"{spec}: no such image folder (nor a data set file or a hub id owner/name[:split])")
    if path.is_dir() and not any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        if image_field or caption_field:
            raise LoraError(f"{spec} is an image folder; --image-field and --caption-field name columns of a data set")
        return read_folder(path, prompt)
    ds = dataset.load(spec, *dataset.locate(spec), eval=False, streaming=False)
    image = _column(ds, spec, image_field, IMAGE_COLUMNS, "image")
    captions = [prompt] * len(ds) if prompt is not None else list(ds[_column(ds, spec, caption_field, CAPTION_COLUMNS,
                                                                            "caption")])
    if (bad := next((i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()), None)) is not None:
        raise LoraError(f"{spec} row {bad}: the caption is {captions[bad]!r}; give every image a caption")
    return DatasetImages(ds.select_columns([image]), image, captions, spec)


def _column(ds, spec: str, given: str | None, defaults: tuple[str, ...], what: str) -> str:
    if given is not None and given not in ds.column_names or given is None and not set(defaults) & set(ds.column_names):
        flag = f"--{what}-field {given}" if given else f"no {what} column ({', '.join(defaults)})"
        raise LoraError(f"{spec}: {flag} among its columns {', '.join(ds.column_names)}; name it with --{what}-field")
    return given or next(c for c in defaults if c in ds.column_names)


class DatasetImages:
    """(PIL image, caption) pairs of a data set, each image decoded when it is read."""

    def __init__(self, ds, image: str, captions: list[str], spec: str):
        self.ds, self.image, self.captions, self.spec = ds, image, captions, spec

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i: int):
        img = self.ds[i][self.image]
        if not hasattr(img, "convert"):
            raise LoraError(f"{self.spec} row {i}: the {self.image!r} column holds a {type(img).__name__}, not an "
                            "image; use a column of the datasets Image type")
        return img, self.captions[i]


def load_image(path: Path, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """The image as a (3, resolution, resolution) tensor in [-1, 1]: shorter side resized, then cropped."""
    return load_cropped(path, resolution, center_crop)[0]


def load_cropped(path, resolution: int, center_crop: bool = True,
                 flip: bool = False) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(image (a file or a PIL image) as load_image gives it, mirrored if `flip`; (original height, width, crop top,
    crop left)), the crop's corner in the resized (and mirrored) image: what SDXL's micro-conditioning time ids
    record."""
    from PIL import Image

    try:
        img = (path if isinstance(path, Image.Image) else Image.open(path)).convert("RGB")
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


def grid(images: list, cols: int | None = None, captions: list[str] | None = None, min_cell: int = 128):
    """PIL images laid out in a grid, as square as possible without empty cells (a neutral gray one where none fits),
    each image scaled up by a whole factor (nearest neighbour: pixels stay pixels) to at least `min_cell` px a side
    (0: native size), with `captions` (one per image) written under their cells."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    cols = cols or _columns_for(n)
    rows = -(-n // cols)
    w, h = images[0].size
    k = max(1, -(-min_cell // min(w, h))) if min_cell else 1
    cw, ch = w * k, h * k
    font = ImageFont.load_default(size=max(10, min(16, cw // 12))) if captions else None
    lines = [_wrap(c, font, cw - 4) for c in captions] if captions else []
    strip = (max(len(x) for x in lines) * (font.size + 2) + 4) if captions else 0
    out = Image.new("RGB", (cols * cw, rows * (ch + strip)), (128, 128, 128))
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        x, y = (i % cols) * cw, (i // cols) * (ch + strip)
        out.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (x, y))
        if captions:
            draw.rectangle((x, y + ch, x + cw - 1, y + ch + strip - 1), fill="white")
            draw.multiline_text((x + 2, y + ch + 2), "\n".join(lines[i]), fill="black", font=font, spacing=2)
    return out


def _columns_for(n: int) -> int:
    """Columns for n cells: the smallest divisor of n that is ≥ √n (a full grid) unless that is wider than 4:1; else
    as many rows as ⌊√n⌋ allows, the last row partly gray."""
    best = min(c for c in range(1, n + 1) if n % c == 0 and c * c >= n)
    return best if best <= 4 * (n // best) else -(-n // math.isqrt(n))


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` broken into lines of at most `width` pixels in `font` (a longer word stays whole on its own line)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines or [""]
