"""Image conversions and captioned PNG grids shared by every stage that shows pictures."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .storage import atomic_path


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on pixels in [0, 1]."""
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    tensor = torch.as_tensor(images)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8."""
    return images.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    scale: int = 4,
    label_width: int = 220,
) -> Path:
    """Save a PNG grid: one row per list of HxWx3 uint8 images, each row optionally captioned on its left."""
    if not rows or not rows[0]:
        raise ValueError("save_grid needs at least one image")
    height, width = rows[0][0].shape[:2]
    cell_h, cell_w, pad = height * scale, width * scale, 2
    label_w = label_width if row_labels else 0
    columns = max(len(row) for row in rows)
    canvas = Image.new(
        "RGB", (label_w + columns * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        top = pad + r * (cell_h + pad)
        if row_labels:
            text = "\n".join(textwrap.wrap(row_labels[r], width=34)[:5])
            draw.multiline_text((4, top + 4), text, fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (cell_w + pad), top))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited over white, 16-bit and float greys scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" else max(1.0, float(pixels.max()))
        image = Image.fromarray(np.clip(pixels / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resized(image: Image.Image, size: int, mode: str) -> Image.Image:
    """`image` fitted to `size` by img2dataset's resize mode (`no`, `border`, `keep_ratio`, `center_crop`)."""
    width, height = image.size
    if mode == "no":
        return image
    if mode == "border":  # the longer side to `size`, white borders to a square
        scale = size / max(width, height)
        inner = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
        square = Image.new("RGB", (size, size), (255, 255, 255))
        square.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return square
    scale = size / min(width, height)  # keep_ratio and center_crop: the shorter side to `size`
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.LANCZOS)
    if mode == "keep_ratio":
        return image
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))
