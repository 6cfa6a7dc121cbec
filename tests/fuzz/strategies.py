"""Hypothesis strategies for what a producer or an HTTP client can send: valid images in every accepted
encoding, the same bytes mutated (bit flips, truncations, splices, width/height edits with a valid CRC),
random bytes, random headers, keys and labels, and /search and /items requests built from them.

Images are drawn as a seed plus a few choices and rendered with numpy and PIL, so one example costs
microseconds to generate: the fuzz benchmark draws 100,000 of them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import urllib.parse
import zlib

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from streamhash.records import ImageSpec

SPEC = ImageSpec(28, 28, 1)
EXAMPLES = int(os.environ.get("STREAMHASH_FUZZ_EXAMPLES", "200"))
# database=None: nothing written into the working tree; a failure prints its example and seed instead.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

_SHAPES = [(28, 28)] * 6 + [(28, 28, 1), (28, 28, 3), (28, 29), (29, 28), (1, 1), (56, 56), (28,), (2, 28, 28)]
_PNG_MODES = ["L"] * 4 + ["RGB", "LA", "P", "I;16", "1", "RGBA"]
_JPEG_MODES = ["L"] * 4 + ["RGB", "1", "CMYK"]
_NPY_DTYPES = ["u1"] * 4 + ["f4", "i2", "u2", "b1", "i8"]


def _pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png(arr: np.ndarray, mode: str) -> bytes:
    img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] == 3 else arr[:, :, 0])
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _jpeg(arr: np.ndarray, mode: str, quality: int, progressive: bool) -> bytes:
    img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] == 3 else arr[:, :, 0])
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


def _npy(arr: np.ndarray, dtype: str, fortran: bool) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(arr.astype(dtype)) if fortran else arr.astype(dtype), allow_pickle=False)
    return buf.getvalue()


@st.composite
def valid_images(draw) -> tuple[str, bytes]:
    """(content type, bytes) of a well-formed PNG, JPEG or .npy; mostly the spec's shape, sometimes not."""
    shape = draw(st.sampled_from(_SHAPES))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["image/png", "image/jpeg", "application/x-npy"]))
    if kind == "application/x-npy":
        return kind, _npy(_pixels(seed, shape), draw(st.sampled_from(_NPY_DTYPES)), draw(st.booleans()))
    if len(shape) != 2 and not (len(shape) == 3 and shape[2] in (1, 3)):
        shape = (28, 28)  # PIL draws 2-D images, gray or colour
    arr = _pixels(seed, shape)
    if kind == "image/png":
        return kind, _png(arr, draw(st.sampled_from(_PNG_MODES)))
    return kind, _jpeg(arr, draw(st.sampled_from(_JPEG_MODES)), draw(st.integers(1, 100)), draw(st.booleans()))


_DIMENSIONS = st.one_of(st.integers(0, 64), st.sampled_from([28, 4096, 4097, 20000, 30000, 65535]),
                        st.integers(0, 2**32 - 1))


def _set_png_size(value: bytes, width: int, height: int) -> bytes:
    if len(value) < 33 or value[12:16] != b"IHDR":
        return value
    ihdr = struct.pack(">II", width % 2**32, height % 2**32) + value[24:29]
    return value[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + value[33:]


def _set_jpeg_size(value: bytes, width: int, height: int) -> bytes:
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        at = value.find(marker)
        if at >= 0 and at + 9 <= len(value):
            return value[:at + 5] + struct.pack(">HH", height % 2**16, width % 2**16) + value[at + 9:]
    return value


def _set_npy_header(value: bytes, shape: tuple, descr: str, fortran: bool) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    at = value.find(b"\n", 10)
    return buf.getvalue() + (value[at + 1:] if at >= 0 else b"")


@st.composite
def mutated(draw, value: bytes) -> bytes:
    """``value`` after one to three mutations."""
    data = bytearray(value)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "splice", "delete", "size", "size"]))
        if op == "flip" and data:
            for _ in range(draw(st.integers(1, 8))):
                at = draw(st.integers(0, len(data) - 1))
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif op == "splice":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and data:
            at = draw(st.integers(0, len(data) - 1))
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "size":
            width, height = draw(_DIMENSIONS), draw(_DIMENSIONS)
            raw = bytes(data)
            if raw.startswith(b"\x89PNG"):
                data = bytearray(_set_png_size(raw, width, height))
            elif raw.startswith(b"\xff\xd8"):
                data = bytearray(_set_jpeg_size(raw, width, height))
            elif raw.startswith(b"\x93NUMPY"):
                shape = draw(st.lists(_DIMENSIONS, max_size=4).map(tuple))
                descr = draw(st.sampled_from(["|u1", "<f4", "|O", "<U3", "|V4", "|u1"]))
                data = bytearray(_set_npy_header(raw, shape, descr, draw(st.booleans())))
    return bytes(data)


_MAGICS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x93NUMPY", b"\x93NUMPY\x01\x00", b"GIF89a", b"BM", b"II*\x00"]


@st.composite
def image_values(draw) -> bytes:
    """Bytes a client might call an image: valid, mutated valid, or random behind a magic prefix."""
    how = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "mutated", "random"]))
    if how == "random":
        return draw(st.sampled_from(_MAGICS)) + draw(st.binary(max_size=512))
    _, value = draw(valid_images())
    return value if how == "valid" else draw(mutated(value))


def _label_part():
    return st.one_of(
        st.integers(0, SPEC.max_label).map(str),
        st.integers(0, 10**30).map(str),
        st.integers(-10, -1).map(str),
        st.sampled_from(["", " ", "1.5", "x", "\u00b2", "\u0661", "0" * 5000, "9" * 5000, "+1", "1e3", "0x10", "\x00"]),
        st.text(max_size=6),
    )


labels_headers = st.one_of(
    st.lists(_label_part(), min_size=1, max_size=8).map(lambda parts: ",".join(parts).encode()),
    st.lists(st.integers(0, 200), max_size=100).map(lambda ls: ",".join(map(str, ls)).encode()),
    st.binary(max_size=64),
)
content_type_headers = st.one_of(
    st.sampled_from([b"image/png", b"image/jpeg", b"application/x-npy", b"IMAGE/PNG ", b"image/gif", b"", b"\xff\xfe"]),
    st.binary(max_size=32),
)
_HEADER = st.one_of(
    st.tuples(st.sampled_from(["labels", "Labels", "LABELS"]), st.one_of(labels_headers, st.none())),
    st.tuples(st.sampled_from(["content-type", "Content-Type"]), st.one_of(content_type_headers, st.none())),
    st.tuples(st.text(max_size=12), st.one_of(st.binary(max_size=32), st.none())),
)
headers = st.lists(_HEADER, max_size=4)
_good_keys = st.text(min_size=1, max_size=60).map(str.encode)
_bad_keys = st.one_of(st.none(), st.binary(max_size=300), st.sampled_from([b"", b"x" * 257, b"\xff\xfe"]))
keys = st.one_of(st.sampled_from([b"k", b"x" * 256, b"\x00"]), _good_keys, _bad_keys)
_good_labels = st.lists(st.integers(0, SPEC.max_label), min_size=1, max_size=4).map(lambda ls: ",".join(map(str, ls)).encode())


@st.composite
def messages(draw) -> tuple[bytes | None, bytes | None, list]:
    """(key, value, headers) as a Kafka record carries them: most with a good key and labels, so that the
    value, not an earlier check, decides the outcome; the rest hostile in every part."""
    value = draw(_mostly(image_values(), st.one_of(st.none(), st.binary(max_size=64))))
    if draw(st.integers(0, 3)):
        key, hdrs = draw(_good_keys), [("labels", draw(_good_labels))] if draw(st.booleans()) else []
    else:
        key, hdrs = draw(keys), draw(headers)
    if value and draw(st.booleans()):  # the right content type, so mutated bytes reach their decoder
        for magic, ctype in ((b"\x89PNG", b"image/png"), (b"\xff\xd8", b"image/jpeg"), (b"\x93NUMPY", b"application/x-npy")):
            if value.startswith(magic):
                hdrs = [("content-type", ctype)] + hdrs
    return key, value, hdrs


# --- HTTP ------------------------------------------------------------------------------------

_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                          st.text(max_size=20))
_json_values = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                   st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                            max_leaves=8)
_NUMBERS = st.one_of(st.integers(-5, 40), st.integers(-2**80, 2**80), st.sampled_from([0, 1, 10, 10_000, 10_001]),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6), st.none(), st.booleans())
_CODES = st.one_of(st.binary(min_size=4, max_size=4).map(bytes.hex), st.binary(max_size=8).map(bytes.hex),
                   st.text(alphabet="0123456789abcdefABCDEFxyz -", max_size=12), _JSON_SCALARS)
_B64 = st.one_of(image_values().map(lambda v: base64.b64encode(v).decode()), st.text(max_size=40), _JSON_SCALARS)


def _mostly(good, bad):
    """``good`` three times in four: st.one_of would flatten ``bad``'s branches and weigh each like ``good``."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 0 else good)


_K = _mostly(st.integers(1, 20), _NUMBERS)
_RADIUS = _mostly(st.one_of(st.none(), st.integers(0, 40)), _NUMBERS)


@st.composite
def search_json(draw) -> dict:
    """Mostly a well-formed search (one of image or code, sane k and radius) with one part hostile;
    sometimes any subset of the fields with any JSON values."""
    if draw(st.integers(0, 3)):
        body = {"k": draw(_K), "radius": draw(_RADIUS)}
        if draw(st.booleans()):
            body["image_base64"] = base64.b64encode(draw(image_values())).decode()
        else:
            body["code_hex"] = draw(_mostly(st.binary(min_size=4, max_size=4).map(bytes.hex), _CODES))
        return body
    body = {}
    for field, values in (("image_base64", _B64), ("code_hex", _CODES), ("k", _NUMBERS), ("radius", _NUMBERS)):
        if draw(st.booleans()):
            body[field] = draw(values)
    body.update(draw(st.dictionaries(st.text(max_size=10), _json_values, max_size=2)))
    return body


@st.composite
def requests(draw) -> tuple[str, str, dict]:
    """(method, path, keyword arguments for TestClient.request)."""
    kind = draw(st.sampled_from(["json", "json", "json", "multipart", "multipart", "raw", "item"]))
    if kind == "json":
        body = draw(st.one_of(search_json(), search_json(), _json_values))
        return "POST", "/search", {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}
    if kind == "multipart":
        field = draw(st.sampled_from(["image", "image", "image", "file", "k"]))
        files = {field: (draw(st.text(max_size=10)), draw(image_values()),
                         draw(st.sampled_from(["image/png", "application/octet-stream", "text/plain"])))}
        data = {name: str(draw(_K))
                for name in draw(st.lists(st.sampled_from(["k", "radius", "code_hex", "other"]), max_size=3, unique=True))}
        return "POST", "/search", {"files": files, "data": data}
    if kind == "raw":
        ctype = draw(st.sampled_from(["application/json", "multipart/form-data", "multipart/form-data; boundary=x",
                                      "application/x-www-form-urlencoded", "image/png", "text/plain", ""]))
        content = draw(st.one_of(st.binary(max_size=256), image_values()))
        return "POST", "/search", {"content": content, "headers": {"content-type": ctype}}
    item_id = draw(st.one_of(st.sampled_from(["", "item-1", "item-7", "x" * 256, "x" * 257, "x" * 600]),
                             st.text(max_size=300)))
    return "GET", "/items/" + urllib.parse.quote(item_id, safe=""), {}
