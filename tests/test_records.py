"""Every rejection reason of the message contract, and the accepted forms."""

import numpy as np
import pytest

from streamhash.errors import RecordRejected
from streamhash.records import ImageSpec, encode_npy, encode_png, parse_labels, parse_message

SPEC = ImageSpec(28, 28, 1, max_value_bytes=4096)
GRAY = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)


def raw_npy(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def jpeg(img, mode="L"):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("value,headers", [
    (encode_png(GRAY), [("content-type", b"image/png")]),
    (encode_npy(GRAY), [("content-type", b"application/x-npy")]),
    (encode_npy(GRAY[:, :, None]), []),  # (28, 28, 1) is gray too; type sniffed
    (encode_png(GRAY), []),
])
def test_lossless_forms_round_trip(value, headers):
    rec = parse_message(b"id-1", value, headers + [("labels", b"2")], SPEC)
    assert rec.id == "id-1" and rec.labels == (2,)
    np.testing.assert_array_equal(rec.image, GRAY)
    assert rec.value == value


def test_jpeg_accepted_and_unlabeled_is_none():
    rec = parse_message(b"j", jpeg(GRAY), [("content-type", b"image/jpeg")], SPEC)
    assert rec.labels is None and rec.image.shape == (28, 28) and rec.content_type == "image/jpeg"
    assert np.abs(rec.image.astype(int) - GRAY).mean() < 8  # lossy, but the same picture


def test_labels_are_deduplicated_and_sorted():
    assert parse_labels(b" 5,1,5 ") == (1, 5)
    assert parse_labels(None) is None


@pytest.mark.parametrize("key,value,headers,stage,fragment", [
    (None, encode_png(GRAY), [], "key", "missing key"),
    (b"", encode_png(GRAY), [], "key", "missing key"),
    (b"x" * 257, encode_png(GRAY), [], "key", "exceeds 256"),
    (b"\xff\xfe", encode_png(GRAY), [], "key", "not UTF-8"),
    (b"k", b"", [], "value", "empty value"),
    (b"k", None, [], "value", "empty value"),
    (b"k", b"\x89PNG\r\n\x1a\n" + b"0" * 5000, [], "value", "exceeds the 4096-byte limit"),
    (b"k", b"garbage", [("content-type", b"image/png")], "decode", "undecodable image/png"),
    (b"k", b"garbage", [("content-type", b"application/x-npy")], "decode", "undecodable .npy"),
    (b"k", b"garbage", [], "decode", "not PNG, JPEG or .npy"),
    (b"k", encode_png(GRAY), [("content-type", b"image/gif")], "headers", "unknown content-type"),
    (b"k", encode_png(np.zeros((30, 28), np.uint8)), [], "shape", "expected 28x28"),
    (b"k", encode_npy(np.zeros((28, 28, 3), np.uint8)), [], "shape", "expected (28, 28)"),
    (b"k", raw_npy(np.zeros((28, 28), np.float32)), [], "shape", "dtype must be uint8"),
    (b"k", encode_png(np.zeros((28, 28, 3), np.uint8)), [], "shape", "expected 1 channel"),
    (b"k", encode_png(GRAY), [("labels", b"1,-2")], "headers", "non-negative integers"),
    (b"k", encode_png(GRAY), [("labels", b"1.5")], "headers", "non-negative integers"),
    (b"k", encode_png(GRAY), [("labels", b"cat")], "headers", "non-negative integers"),
    (b"k", encode_png(GRAY), [("labels", b"")], "headers", "non-negative integers"),
])
def test_each_rejection_reason(key, value, headers, stage, fragment):
    with pytest.raises(RecordRejected) as info:
        parse_message(key, value, headers, SPEC)
    assert info.value.stage == stage
    assert fragment in info.value.message


def test_color_spec_accepts_rgb_and_rejects_gray():
    spec = ImageSpec(32, 32, 3)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(parse_message(b"c", encode_png(rgb), [], spec).image, rgb)
    with pytest.raises(RecordRejected, match="expected 3"):
        parse_message(b"c", encode_png(np.zeros((32, 32), np.uint8)), [], spec)
