"""Photo-like test images made offline, any size: colour noise with a natural image's spectrum (coarse
structure strong, fine detail weak), a few solid shapes, a slight blur.

A pretrained ImageNet backbone is made for such statistics: on them, a photo re-saved as JPEG at
another size keeps nearly its features while two photos differ. Uniform noise or flat shapes on a
gradient sit where the features are weak, and a ranking test on them would prove nothing.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OCTAVES = ((2, 1.0), (4, 0.6), (8, 0.35), (16, 0.2), (32, 0.1))  # (noise cells across, amplitude)


def photo(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    field = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in OCTAVES:
        noise = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        field += amplitude * np.stack([np.asarray(Image.fromarray(noise[..., c], "F").resize(
            (width, height), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    field = (field - field.mean()) / (field.std() + 1e-6) * 55 + rng.uniform(80, 170, 3)
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, x1 = sorted(rng.uniform(0, width, 2))
        y0, y1 = sorted(rng.uniform(0, height, 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(1))


def saved(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()
