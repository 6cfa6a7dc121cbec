"""Decoded pixels -> the hash network's input: bit depth, transparency, colour mode and size.

The rules are a :class:`Conversion` (``STREAMHASH_IMAGE__*``, carried by ``records.ImageSpec``); the
worker, the learner's re-encode and the query server all reach this module through
``records.decode_image``, so one image becomes the same array in every process. In order:

1. bit depth: 16-bit gray keeps its high byte (``v >> 8``: 65535 -> 255, 256 -> 1, 255 -> 0);
2. transparency (RGBA, LA, PA, a palette with a transparent entry): composited over the opaque
   ``background``, ``(c * a + bg * (255 - a) + 127) // 255`` per channel;
3. colour: to gray by PIL's ``convert("L")``, the ITU-R 601-2 luma ``L = R*299/1000 + G*587/1000 +
   B*114/1000``; gray to RGB by replicating the band; 1-bit to 0/255; CMYK by PIL's ``convert("RGB")``;
4. size, by ``resize``: ``exact`` refuses any other size, ``stretch`` resamples to the size,
   ``fill`` resamples the largest centred region of the network's aspect ratio (centre crop), ``fit``
   resamples the whole image to fit inside and centres it on ``background`` (letterbox).

With ``mode=None`` nothing changes colour mode: an image must already have the network's channels
(a palette image counts as either), which is the contract the 28x28 gray default was built on.

>>> img = Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 255, 0]]], np.uint8))  # opaque red, clear blue
>>> network_input(img, (1, 2), Conversion(mode="gray", background="white")).tolist()
[[76, 255]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from streamhash.errors import ConfigError, RecordRejected

MODES = ("gray", "rgb")
RESIZES = ("exact", "fit", "fill", "stretch")
RESAMPLES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
BACKGROUNDS = {"black": 0, "white": 255}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": how some PNG readers hand 16-bit gray over
_ONE_BAND = {"L", "1", "P", *_SIXTEEN_BIT}
_THREE_BANDS = {"RGB", "P"}


@dataclass(frozen=True)
class Conversion:
    """How a decoded image becomes the network's input; each field is ``STREAMHASH_IMAGE__<FIELD>``
    (``config.ImageSettings`` documents them)."""

    mode: str | None = None
    resize: str = "exact"
    resample: str = "bilinear"
    background: str = "black"

    def __post_init__(self) -> None:
        for name, allowed in (("mode", (None, *MODES)), ("resize", RESIZES), ("resample", RESAMPLES),
                              ("background", tuple(BACKGROUNDS))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"image {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def check_channels(self, channels: int) -> None:
        if self.mode == "rgb" and channels != 3:
            raise ConfigError(f"STREAMHASH_IMAGE__MODE=rgb needs a 3-channel network, got channels={channels} "
                              "(STREAMHASH_MODEL__CHANNELS)")
        if self.mode is not None and channels not in (1, 3):
            raise ConfigError(f"image conversion makes 1- or 3-channel input, the network has {channels}")


def high_byte(values: np.ndarray) -> np.ndarray:
    """16-bit samples to 8-bit: the top byte, so the full 16-bit range maps onto the full 8-bit range."""
    return (np.clip(values, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)


def network_input(img: Image.Image, shape: tuple[int, ...], conv: Conversion) -> np.ndarray:
    """``img`` (any PIL mode; opened, pixels possibly not yet decoded) -> uint8 array of ``shape``
    ((H, W) or (H, W, C)), or RecordRejected with stage ``shape``. The refusals look at the header only."""
    height, width = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    if conv.mode is None and img.mode not in (_ONE_BAND if channels == 1 else _THREE_BANDS):
        bands = len(img.getbands())
        want = "1 channel" if channels == 1 else "3 (RGB)"
        raise RecordRejected("shape", f"image has mode {img.mode} ({bands} channels), expected {want} "
                                      "(STREAMHASH_IMAGE__MODE converts colour modes)")
    if conv.resize == "exact" and img.size != (width, height):
        raise RecordRejected("shape", f"image is {img.width}x{img.height}, expected {width}x{height} "
                                      "(STREAMHASH_IMAGE__RESIZE=fill or fit accepts any size)")
    target = conv.mode or ("gray" if channels == 1 else "rgb")
    # colour before size: resampling one gray band is a third of the work of three
    img = _opaque(img, BACKGROUNDS[conv.background]).convert("L" if target == "gray" else "RGB")
    arr = np.asarray(_resize(img, (width, height), conv))
    if channels == 3 and arr.ndim == 2:  # mode=gray on a 3-channel network (a pretrained RGB backbone)
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def _opaque(img: Image.Image, background: int) -> Image.Image:
    """Any mode -> "L" or "RGB", 8 bits, no alpha."""
    if img.mode in _SIXTEEN_BIT:
        return Image.fromarray(high_byte(np.asarray(img)))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("L", "RGB"):
        return img
    if "A" in img.getbands() or "a" in img.getbands():
        gray = img.mode in ("LA", "La")
        arr = np.asarray(img.convert("LA" if gray else "RGBA")).astype(np.uint16)  # 255 * 255 + 127 fits
        colour, alpha = arr[..., :-1], arr[..., -1:]
        out = ((colour * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)
        return Image.fromarray(out[..., 0] if gray else out)
    return img.convert("L" if len(img.getbands()) == 1 else "RGB")  # 1-bit, CMYK, YCbCr, LAB, HSV


def _resize(img: Image.Image, size: tuple[int, int], conv: Conversion) -> Image.Image:
    if img.size == size:
        return img
    (w, h), (width, height) = img.size, size
    resample = Image.Resampling[conv.resample.upper()]
    if conv.resize == "stretch":
        return img.resize(size, resample)
    if conv.resize == "fill":
        # the crop as resize's source box: one resampling pass, fractional edges kept, no cropped copy
        # one side is the whole source side, exactly: a product like 224 * (358 / 224) lands a hair
        # past 358, and PIL refuses a box poking out of the image
        cw, ch = min(w, h * width / height), min(h, w * height / width)
        return img.resize(size, resample, box=((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))
    scale = min(width / w, height / h)  # fit
    inner = (max(1, round(w * scale)), max(1, round(h * scale)))  # a 4096x1 strip still keeps one row
    bg = BACKGROUNDS[conv.background]
    canvas = Image.new(img.mode, size, bg if img.mode == "L" else (bg, bg, bg))
    canvas.paste(img.resize(inner, resample), ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas
