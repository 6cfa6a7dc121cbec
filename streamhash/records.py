"""The image-message contract: the one place that turns Kafka bytes into a typed record or a rejection.

Key: item id, UTF-8, 1..256 bytes. Value: PNG, JPEG or ``.npy`` bytes. Headers: ``labels``
(comma-separated non-negative ints; absent = unlabeled) and ``content-type`` (``image/png``,
``image/jpeg``, ``application/x-npy``; when absent the type is sniffed from the magic bytes).

>>> spec = ImageSpec(height=2, width=2, channels=1)
>>> import numpy as np
>>> rec = parse_message(b"a", encode_npy(np.zeros((2, 2), np.uint8)), [("labels", b"3,1")], spec)
>>> rec.id, rec.labels, rec.image.shape
('a', (1, 3), (2, 2))
>>> parse_message(b"a", b"", [], spec)
Traceback (most recent call last):
...
streamhash.errors.RecordRejected: empty value
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from streamhash.errors import RecordRejected

MAX_KEY_BYTES = 256
CONTENT_TYPES = ("image/png", "image/jpeg", "application/x-npy")
_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"\x93NUMPY": "application/x-npy"}


@dataclass(frozen=True)
class ImageSpec:
    """The image shape the hash network accepts: (height, width) gray or (height, width, channels)."""

    height: int = 28
    width: int = 28
    channels: int = 1
    max_value_bytes: int = 10 * 1024 * 1024

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)


@dataclass(frozen=True)
class ImageRecord:
    id: str
    image: np.ndarray  # uint8, ImageSpec.shape
    labels: tuple[int, ...] | None
    content_type: str
    value: bytes  # the bytes as received, kept for re-encoding


def parse_key(key: bytes | None) -> str:
    if not key:
        raise RecordRejected("key", "missing key: the item id must be the message key")
    if len(key) > MAX_KEY_BYTES:
        raise RecordRejected("key", f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}")
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected("key", f"key is not UTF-8: {exc}") from None


def parse_labels(raw: bytes | None) -> tuple[int, ...] | None:
    """``b"3,1,3"`` -> ``(1, 3)``; None when absent."""
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace").strip()
    labels = set()
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():  # also rejects "", "-1", "1.5", "x"
            raise RecordRejected("headers", f"labels must be comma-separated non-negative integers, got {text!r}")
        labels.add(int(part))
    return tuple(sorted(labels))


def content_type_of(value: bytes, header: bytes | None) -> str:
    if header is not None:
        ctype = header.decode("utf-8", errors="replace").strip().lower()
        if ctype not in CONTENT_TYPES:
            raise RecordRejected("headers", f"unknown content-type {ctype!r}; expected one of {', '.join(CONTENT_TYPES)}")
        return ctype
    for magic, ctype in _MAGIC.items():
        if value.startswith(magic):
            return ctype
    raise RecordRejected("decode", "no content-type header and the bytes are not PNG, JPEG or .npy")


def decode_image(value: bytes, content_type: str, spec: ImageSpec) -> np.ndarray:
    """Decode bytes to a uint8 array of ``spec.shape``; RecordRejected on anything else."""
    if content_type == "application/x-npy":
        try:
            arr = np.load(io.BytesIO(value), allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError/OSError/EOFError for bad files
            raise RecordRejected("decode", f"undecodable .npy: {exc}") from None
        if arr.dtype != np.uint8:
            raise RecordRejected("shape", f".npy dtype must be uint8, got {arr.dtype}")
    else:
        try:
            with Image.open(io.BytesIO(value)) as img:
                if img.size != (spec.width, spec.height):
                    raise RecordRejected("shape", f"image is {img.size[0]}x{img.size[1]}, expected {spec.width}x{spec.height}")
                arr = _pil_to_array(img, spec.channels)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise RecordRejected("decode", f"undecodable {content_type}: {exc}") from None
    if arr.ndim == 3 and arr.shape[2] == 1 and spec.channels == 1:
        arr = arr[:, :, 0]
    if arr.shape != spec.shape:
        raise RecordRejected("shape", f"image shape {arr.shape}, expected {spec.shape}")
    return np.ascontiguousarray(arr)


def _pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
    bands = len(img.getbands())
    if channels == 1 and img.mode not in ("L", "P", "1", "I;16"):
        raise RecordRejected("shape", f"image has mode {img.mode} ({bands} channels), expected 1 channel")
    if channels == 3 and img.mode not in ("RGB", "P"):
        raise RecordRejected("shape", f"image has mode {img.mode} ({bands} channels), expected 3 (RGB)")
    return np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


def parse_message(key: bytes | None, value: bytes | None, headers, spec: ImageSpec) -> ImageRecord:
    """Kafka key, value and headers -> ImageRecord; RecordRejected (with its stage) otherwise."""
    item_id = parse_key(key)
    if not value:
        raise RecordRejected("value", "empty value")
    if len(value) > spec.max_value_bytes:
        raise RecordRejected("value", f"value of {len(value)} bytes exceeds the {spec.max_value_bytes}-byte limit")
    hdr = {k.lower(): v for k, v in (headers or [])}
    labels = parse_labels(hdr.get("labels"))
    ctype = content_type_of(value, hdr.get("content-type"))
    return ImageRecord(item_id, decode_image(value, ctype, spec), labels, ctype, value)


def encode_npy(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def message_headers(labels, content_type: str) -> list[tuple[str, bytes]]:
    """Headers for a producer: ``labels`` is an int, an iterable of ints, or None (unlabeled)."""
    headers = [("content-type", content_type.encode())]
    if labels is not None:
        labels = [labels] if isinstance(labels, (int, np.integer)) else list(labels)
        headers.append(("labels", ",".join(str(int(v)) for v in labels).encode()))
    return headers
