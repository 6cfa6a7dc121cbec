"""The image-message contract: the one place that turns Kafka bytes into a typed record or a rejection.

Key: item id, UTF-8, 1..256 bytes. Value: PNG, JPEG or ``.npy`` (uint8 or uint16; H x W, or
H x W x 1, 3 or 4) bytes, turned into the network's input by the spec's :class:`Conversion`
(``streamhash.imaging``: colour mode, size policy); the record keeps the bytes as received. Headers: ``labels``
(comma-separated non-negative ints up to ``ImageSpec.max_label``, at most ``ImageSpec.max_labels``
of them; absent = unlabeled), ``label-names`` (the class name of each label of ``labels``, in the same order,
comma-separated: ``labels: 3`` with ``label-names: cat``; optional, see :func:`parse_label_names`) and
``content-type`` (``image/png``, ``image/jpeg``, ``application/x-npy``; when absent the type is sniffed from the
magic bytes), each at most once; every header is bounded (count, name and value sizes, ``labels`` to what its
bounds allow) before any is parsed.

Values come from anyone who can produce to the topic, so nothing here trusts them: an image's
declared size is checked against ``ImageSpec.max_pixels`` before a single pixel is decoded, and
any exception a decoder raises on one record becomes a :class:`RecordRejected` for that record.

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
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from streamhash.errors import ConfigError, RecordRejected
from streamhash.imaging import Conversion, high_byte, network_input

MAX_KEY_BYTES = 256
CONTENT_TYPES = ("image/png", "image/jpeg", "application/x-npy")
# Headers come from anyone who can produce to the topic: bounded before any is parsed (read_headers).
CONTRACT_HEADERS = ("labels", "label-names", "content-type")  # the headers the contract reads: each at most once
MAX_HEADERS = 64
MAX_HEADER_NAME_BYTES = 256
MAX_HEADER_VALUE_BYTES = 4096  # any header; `labels` has its own, tighter bound (labels_header_limit)
MAX_LABEL_NAME_CHARS = 64  # a class name is a caption on the search page, not a document
_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"\x93NUMPY": "application/x-npy"}
# Only the decoder the content type names: PIL would otherwise identify any of its ~40 formats
# (TIFF, PSD, ...) behind an image/png header, each one more decoder exposed to the topic.
_PIL_FORMATS = {"image/png": ["PNG"], "image/jpeg": ["JPEG"]}
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class RecordUndecodable(RecordRejected):
    """A rejection caused by an exception a decoder raised; ``cause`` is that exception's class name.

    The dead-letter writer reports ``getattr(error, "cause", type(error).__name__)`` as
    ``error.class``, so operators see which decoder failure it was without the payload.
    """

    def __init__(self, message: str, cause: BaseException):
        super().__init__("decode", message)
        self.cause = type(cause).__name__


@dataclass(frozen=True)
class ImageSpec:
    """What a message must be to be indexed: the image shape the hash network accepts ((height, width)
    gray or (height, width, channels)) and the bounds on everything else a producer controls.

    Plain values: the processes build theirs from the settings (``streamhash.services.spec.image_spec``).
    """

    height: int = 28
    width: int = 28
    channels: int = 1
    max_value_bytes: int = 10 * 1024 * 1024
    # Declared width x height above this is refused before any pixel is decoded (decompression bombs).
    max_pixels: int = field(default=4096 * 4096, kw_only=True)
    # Labels index a multi-hot matrix in learning: an unbounded label is an unbounded allocation.
    max_label: int = field(default=9999, kw_only=True)
    max_labels: int = field(default=64, kw_only=True)
    # How an image of another size or colour mode becomes this shape (STREAMHASH_IMAGE__*).
    conversion: Conversion = field(default_factory=Conversion, kw_only=True)

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.channels, self.max_value_bytes) <= 0:
            raise ConfigError(f"image spec needs positive sizes, got {self}")
        if self.max_pixels < self.height * self.width:
            raise ConfigError(f"max_pixels={self.max_pixels} is below the {self.width}x{self.height} images it must "
                              "accept (STREAMHASH_STORE__MAX_IMAGE_PIXELS)")
        if self.max_label < 0 or self.max_labels < 1:
            raise ConfigError(f"need max_label >= 0 and max_labels >= 1, got {self.max_label} and {self.max_labels}")
        self.conversion.check_channels(self.channels)

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
    # (label, class name) pairs from the ``label-names`` header; empty when the producer named none
    label_names: tuple[tuple[int, str], ...] = ()


def parse_key(key: bytes | None) -> str:
    if not key:
        raise RecordRejected("key", "missing key: the item id must be the message key")
    if len(key) > MAX_KEY_BYTES:
        raise RecordRejected("key", f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}")
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected("key", f"key is not UTF-8: {exc}") from None


def parse_labels(raw: bytes | None, max_label: int = ImageSpec.max_label,
                 max_labels: int = ImageSpec.max_labels) -> tuple[int, ...] | None:
    """``b"3,1,3"`` -> ``(1, 3)``; None when absent."""
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace").strip()
    labels = set()
    for part in text.split(","):
        part = part.strip()
        # isdigit() alone admits "²" and "١", which int() then refuses or reads as another number
        if not (part.isascii() and part.isdigit()):  # also rejects "", "-1", "1.5", "x"
            raise RecordRejected("headers", f"labels must be comma-separated non-negative integers, got {_clip(text)!r}")
        # count digits before int(): int() of thousands of digits is slow or refused outright
        digits = part.lstrip("0") or "0"
        label = int(digits) if len(digits) <= len(str(max_label)) else max_label + 1
        if label > max_label:
            raise RecordRejected("headers", f"label {_clip(part)} exceeds the maximum label {max_label} "
                                            "(STREAMHASH_LEARN__MAX_LABEL)")
        labels.add(label)
        if len(labels) > max_labels:
            raise RecordRejected("headers", f"more than {max_labels} distinct labels on one item "
                                            "(STREAMHASH_LEARN__MAX_LABELS_PER_ITEM)")
    return tuple(sorted(labels))


def parse_label_names(raw: bytes | None, raw_labels: bytes | None) -> tuple[tuple[int, str], ...]:
    """``label-names`` against the ``labels`` header as sent (already checked by :func:`parse_labels`): the
    (label, name) pairs, ``()`` when absent. Names are given in the order of ``labels``, one per label; each is
    UTF-8, 1 to MAX_LABEL_NAME_CHARS printable characters once stripped, without a comma (the separator). A name
    without labels, a count that differs, or one label named twice differently is refused: a record whose names
    cannot be matched to its labels says nothing reliable about either.

    >>> parse_label_names(b"cat, dog", b"3,5")
    ((3, 'cat'), (5, 'dog'))
    """
    if raw is None:
        return ()
    if raw_labels is None:
        raise RecordRejected("headers", "label-names without labels: each name belongs to a label of the labels header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected("headers", f"label-names is not UTF-8: {exc}") from None
    names = [n.strip() for n in text.split(",")]
    labels = [int(p) for p in raw_labels.decode("utf-8", errors="replace").split(",")]
    if len(names) != len(labels):
        raise RecordRejected("headers", f"label-names holds {len(names)} names for {len(labels)} labels "
                                        f"({_clip(text)!r}): one name per label, in the order of labels, and no "
                                        "comma inside a name")
    pairs: dict[int, str] = {}
    for label, name in zip(labels, names):
        if not name or len(name) > MAX_LABEL_NAME_CHARS or not name.isprintable():
            raise RecordRejected("headers", f"label-names: the name of label {label} must be 1 to "
                                            f"{MAX_LABEL_NAME_CHARS} printable characters, got {_clip(name)!r}")
        if pairs.setdefault(label, name) != name:
            raise RecordRejected("headers", f"label-names names label {label} twice: {_clip(pairs[label])!r} and "
                                            f"{_clip(name)!r}")
    return tuple(sorted(pairs.items()))


def _clip(text: str, limit: int = 80) -> str:
    """Header text for a rejection message: a 1 MiB header must not become a 1 MiB DLQ header."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def labels_header_limit(spec: ImageSpec) -> int:
    """The longest ``labels`` header a sane producer sends: max_labels labels of max_label's digits, each with a
    separator and a space (64 x 6 = 384 bytes by default)."""
    return spec.max_labels * (len(str(spec.max_label)) + 2)


def read_headers(headers, spec: ImageSpec) -> dict[str, bytes | None]:
    """The message's headers by lower-cased name, checked before any is parsed: at most MAX_HEADERS of them,
    names and values within MAX_HEADER_NAME_BYTES / MAX_HEADER_VALUE_BYTES (``labels`` within
    :func:`labels_header_limit`), and each header of the contract at most once: with two ``labels`` headers
    nobody can say which the producer meant, so the message is refused rather than the last one winning."""
    headers = list(headers or [])
    if len(headers) > MAX_HEADERS:
        raise RecordRejected("headers", f"{len(headers)} headers, over the limit of {MAX_HEADERS}")
    out: dict[str, bytes | None] = {}
    for name, value in headers:
        name = name.decode("utf-8", errors="replace") if isinstance(name, bytes) else name
        if len(name.encode("utf-8", errors="replace")) > MAX_HEADER_NAME_BYTES:
            raise RecordRejected("headers", f"header name {_clip(name, 40)!r} exceeds {MAX_HEADER_NAME_BYTES} bytes")
        key = name.lower()
        limit = labels_header_limit(spec) if key == "labels" else MAX_HEADER_VALUE_BYTES
        if value is not None and len(value) > limit:
            raise RecordRejected("headers", f"header {_clip(name, 40)!r} of {len(value)} bytes exceeds the {limit}-byte "
                                            "limit" + (" (max_labels_per_item labels up to max_label)" if key == "labels" else ""))
        if key in CONTRACT_HEADERS and key in out:
            raise RecordRejected("headers", f"duplicated header {key!r}: a message carries each of "
                                            f"{', '.join(CONTRACT_HEADERS)} at most once")
        out[key] = value
    return out


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
    """Decode bytes and convert them by ``spec.conversion`` to a uint8 array of ``spec.shape``; RecordRejected
    on anything else, whatever the decoder raised."""
    try:
        if content_type == "application/x-npy":
            arr = _decode_npy(value, spec)
        elif content_type in _PIL_FORMATS:
            arr = _decode_pil(value, content_type, spec)
        else:
            raise RecordRejected("headers", f"unknown content-type {content_type!r}; expected one of {', '.join(CONTENT_TYPES)}")
    except RecordRejected:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, met inside open() before ours can look
        raise RecordUndecodable(f"{content_type} declares too many pixels (limit {spec.max_pixels}, "
                                f"STREAMHASH_STORE__MAX_IMAGE_PIXELS): {exc}", exc) from None
    except Exception as exc:  # decoders raise anything on hostile bytes: ValueError, OSError, SyntaxError, struct.error, ...
        what = ".npy" if content_type == "application/x-npy" else content_type
        raise RecordUndecodable(f"undecodable {what}: {type(exc).__name__}: {exc}", exc) from None
    return np.ascontiguousarray(arr)


def decode_images(blobs, spec: ImageSpec) -> np.ndarray:
    """Stored ``(bytes, content type)`` pairs -> the network's input batch, shape (n, *spec.shape), as on ingest."""
    out = [decode_image(raw, ctype, spec) for raw, ctype in blobs]
    return np.stack(out) if out else np.zeros((0, *spec.shape), np.uint8)


def _decode_npy(value: bytes, spec: ImageSpec) -> np.ndarray:
    # The header alone says how much np.load would allocate; read it and check before any data is touched.
    fp = io.BytesIO(value)
    version = np.lib.format.read_magic(fp)
    if version not in _NPY_HEADER_READERS:
        raise RecordRejected("decode", f"undecodable .npy: format version {version} is not supported (1.0 or 2.0)")
    shape, fortran_order, dtype = _NPY_HEADER_READERS[version](fp)
    if any(n < 0 for n in shape):
        raise RecordRejected("decode", f"undecodable .npy: negative dimension in shape {shape}")
    pixels = math.prod(shape[:2])
    if pixels > spec.max_pixels:
        raise RecordRejected("decode", f".npy declares shape {shape}: {pixels} pixels, over the limit of "
                                       f"{spec.max_pixels} (STREAMHASH_STORE__MAX_IMAGE_PIXELS)")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)) or 0 in shape:
        raise RecordRejected("shape", f".npy shape {shape} is not an image: expected (H, W) or (H, W, 1, 3 or 4)")
    if dtype.kind != "u" or dtype.itemsize not in (1, 2):
        raise RecordRejected("shape", f".npy dtype must be uint8 or uint16, got {dtype}")
    count = math.prod(shape)
    data = memoryview(value)[fp.tell():]
    if len(data) < count * dtype.itemsize:
        raise RecordRejected("decode", f"undecodable .npy: truncated, {len(data)} of {count * dtype.itemsize} data bytes")
    arr = np.frombuffer(data, dtype, count=count).reshape(shape, order="F" if fortran_order else "C")
    arr = high_byte(arr) if dtype.itemsize == 2 else arr
    arr = arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    if arr.shape == spec.shape and (spec.channels == 1 or spec.conversion.mode != "gray"):
        # already the network's input, which every conversion leaves as it is: skip the PIL round trip
        # (the ingest path's common case); a copy, as a view of the message bytes would be read-only
        return arr.copy()
    return network_input(Image.fromarray(np.ascontiguousarray(arr)), spec.shape, spec.conversion)


def _decode_pil(value: bytes, content_type: str, spec: ImageSpec) -> np.ndarray:
    # open() parses the header only: the size is known before any pixel is decompressed
    with Image.open(io.BytesIO(value), formats=_PIL_FORMATS[content_type]) as img:
        width, height = img.size
        if width * height > spec.max_pixels:
            raise RecordRejected("decode", f"{content_type} declares {width}x{height} = {width * height} pixels, over "
                                           f"the limit of {spec.max_pixels} (STREAMHASH_STORE__MAX_IMAGE_PIXELS)")
        return network_input(img, spec.shape, spec.conversion)


def parse_message(key: bytes | None, value: bytes | None, headers, spec: ImageSpec) -> ImageRecord:
    """Kafka key, value and headers -> ImageRecord; RecordRejected (with its stage) otherwise, never another error:
    one hostile record must reach the dead-letter topic, not stop the batch it came in."""
    try:
        return _parse_message(key, value, headers, spec)
    except RecordRejected:
        raise
    except Exception as exc:
        raise RecordUndecodable(f"unparseable record: {type(exc).__name__}: {exc}", exc) from exc


def _parse_message(key: bytes | None, value: bytes | None, headers, spec: ImageSpec) -> ImageRecord:
    item_id = parse_key(key)
    if not value:
        raise RecordRejected("value", "empty value")
    if len(value) > spec.max_value_bytes:
        raise RecordRejected("value", f"value of {len(value)} bytes exceeds the {spec.max_value_bytes}-byte limit")
    hdr = read_headers(headers, spec)
    labels = parse_labels(hdr.get("labels"), spec.max_label, spec.max_labels)
    names = parse_label_names(hdr.get("label-names"), hdr.get("labels"))
    ctype = content_type_of(value, hdr.get("content-type"))
    return ImageRecord(item_id, decode_image(value, ctype, spec), labels, ctype, value, names)


def encode_npy(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def message_headers(labels, content_type: str, names=None) -> list[tuple[str, bytes]]:
    """Headers for a producer: ``labels`` is an int, an iterable of ints, or None (unlabeled); ``names`` the class
    name of each (a str for one label, else a sequence in the order of ``labels``), or None. ValueError for a
    name the ``label-names`` header cannot carry (a comma)."""
    headers = [("content-type", content_type.encode())]
    if labels is not None:
        labels = [labels] if isinstance(labels, (int, np.integer)) else list(labels)
        headers.append(("labels", ",".join(str(int(v)) for v in labels).encode()))
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            if any("," in n for n in names):
                raise ValueError(f"a class name cannot hold a comma (label-names separates names by commas): {names}")
            headers.append(("label-names", ",".join(names).encode()))
    return headers
