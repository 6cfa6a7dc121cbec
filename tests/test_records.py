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
    # by default nothing converts colour: the strict contract of the gray network
    (b"k", encode_npy(np.zeros((28, 28, 3), np.uint8)), [], "shape", "expected 1 channel"),
    (b"k", encode_npy(np.zeros((28, 28, 2), np.uint8)), [], "shape", "is not an image"),
    (b"k", encode_npy(np.zeros((0, 28), np.uint8)), [], "shape", "is not an image"),
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


# --- hostile values: sizes are checked from the header, before any pixel is decoded -------------


def png_declaring(width: int, height: int) -> bytes:
    """A 65-byte PNG whose header claims ``width`` x ``height``: what a decompression bomb looks like on the wire."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    import struct

    data = bytearray(jpeg(GRAY))
    sof = data.find(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def npy_declaring(shape, descr="|u1") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def real_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("value", [
    png_declaring(30000, 30000),  # past PIL's own ceiling: it raised DecompressionBombError out of parse_message
    png_declaring(5000, 5000),  # under PIL's ceiling, over ours
    real_png(20000, 20000),  # 400 MB of pixels in a few hundred kB
    jpeg_declaring(60000, 60000),
    npy_declaring((100000, 100000)),  # np.load would allocate 10 GB before noticing the data is missing
    npy_declaring((5000, 5000, 1)),
], ids=["png-header-30000", "png-header-5000", "png-real-20000", "jpeg-header-60000", "npy-header-1e10", "npy-header-25e6"])
def test_decompression_bombs_are_rejected_before_decoding(value):
    spec = ImageSpec(28, 28, 1)  # the default value limit: the bombs are small
    assert len(value) < spec.max_value_bytes
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", value, [], spec)
    assert info.value.stage == "decode"
    assert str(spec.max_pixels) in info.value.message and "STREAMHASH_STORE__MAX_IMAGE_PIXELS" in info.value.message


def test_pixel_limit_is_configurable_and_precedes_the_shape_check():
    spec = ImageSpec(28, 28, 1, max_pixels=28 * 29)
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", encode_png(np.zeros((30, 30), np.uint8)), [], spec)
    assert info.value.stage == "decode" and "30x30 = 900 pixels, over the limit of 812" in info.value.message
    with pytest.raises(RecordRejected) as info:  # within the limit: the ordinary shape rejection
        parse_message(b"k", encode_png(np.zeros((29, 28), np.uint8)), [], spec)
    assert info.value.stage == "shape"


@pytest.mark.parametrize("cut", [0.5, 0.8])
def test_truncated_images_are_rejected_not_padded(cut):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (28, 28), dtype=np.uint8)  # incompressible: a cut lands inside the pixel data
    for value in (encode_png(noisy), jpeg(noisy), encode_npy(noisy)):
        with pytest.raises(RecordRejected) as info:
            parse_message(b"k", value[:int(len(value) * cut)], [], SPEC)
        assert info.value.stage == "decode"


@pytest.mark.parametrize("value,headers", [
    (npy_declaring((28, -28)), []),
    (npy_declaring((28, 28), descr="|O"), []),
    (b"\x93NUMPY\x09\x00" + b"x" * 20, []),  # unknown .npy version
    (png_declaring(28, 28), []),  # right size, no pixel data
    (jpeg(GRAY), [("content-type", b"image/png")]),  # the type decides the decoder
    (b"GIF89a" + b"\x00" * 20, [("content-type", b"image/png")]),
])
def test_malformed_values_are_rejections(value, headers):
    with pytest.raises(RecordRejected):
        parse_message(b"k", value, headers, SPEC)


def test_any_decoder_exception_becomes_a_rejection_naming_its_class(monkeypatch):
    import streamhash.records as records

    def broken(*_):
        raise ZeroDivisionError("a decoder bug")

    monkeypatch.setattr(records, "_decode_pil", broken)
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", encode_png(GRAY), [], SPEC)
    assert info.value.stage == "decode" and info.value.cause == "ZeroDivisionError"
    assert "ZeroDivisionError: a decoder bug" in info.value.message


def test_any_parse_exception_becomes_a_rejection():
    with pytest.raises(RecordRejected) as info:  # a header name that is not a string
        parse_message(b"k", encode_png(GRAY), [(None, b"1")], SPEC)
    assert info.value.stage == "decode" and info.value.cause == "AttributeError"


def test_plain_rejections_name_no_other_cause():
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", b"", [], SPEC)
    assert getattr(info.value, "cause", type(info.value).__name__) == "RecordRejected"


# --- labels are bounded: they size the learner's multi-hot matrix -------------------------------


@pytest.mark.parametrize("raw,fragment", [
    (b"99999999999999999999", "exceeds the maximum label 9999 (STREAMHASH_LEARN__MAX_LABEL)"),
    (b"3,10000", "exceeds the maximum label 9999"),
    (b"1" * 300, "exceeds the maximum label"),
    (",".join(map(str, range(65))).encode(), "more than 64 distinct labels on one item (STREAMHASH_LEARN__MAX_LABELS_PER_ITEM)"),
    ("\u00b2".encode(), "non-negative integers"),  # str.isdigit() is true, int() raised ValueError
    ("\u0661".encode(), "non-negative integers"),  # Arabic-Indic one: int() read it as 1
])
def test_labels_out_of_bounds_are_rejected(raw, fragment):
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", encode_png(GRAY), [("labels", raw)], SPEC)
    assert info.value.stage == "headers" and fragment in info.value.message


def test_label_bounds_come_from_the_spec():
    assert parse_labels(b"9999," + b"0" * 6000) == (0, 9999)  # leading zeros are still small numbers
    assert parse_labels(b",".join(b"%d" % i for i in range(64))) == tuple(range(64))
    spec = ImageSpec(28, 28, 1, max_label=20, max_labels=2)
    assert parse_message(b"k", encode_png(GRAY), [("labels", b"20,3,3")], spec).labels == (3, 20)
    for raw in (b"21", b"1,2,3"):
        with pytest.raises(RecordRejected):
            parse_message(b"k", encode_png(GRAY), [("labels", raw)], spec)


def test_huge_numbers_are_refused_without_int():
    # int() refuses 4300+ digits (it raised ValueError); parse_labels counts digits first. A message never gets
    # here with such a header (read_headers bounds it), other callers may.
    with pytest.raises(RecordRejected, match="exceeds the maximum label"):
        parse_labels(b"1" * 5000)


# Issue 26: with two `labels` headers the last silently won, and a 1 MB `labels` header was parsed.
@pytest.mark.parametrize("headers", [
    [("labels", b"1"), ("labels", b"2")],
    [("labels", b"1"), ("Labels", b"1")],  # header names are case-insensitive: the same header twice
    [("content-type", b"image/png"), ("content-type", b"image/png")],
])
def test_a_duplicated_contract_header_is_rejected(headers):
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", encode_png(GRAY), headers, SPEC)
    assert info.value.stage == "headers" and "duplicated header" in info.value.message


def test_other_headers_may_repeat():
    headers = [("trace", b"a"), ("trace", b"b"), ("labels", b"4")]
    assert parse_message(b"k", encode_png(GRAY), headers, SPEC).labels == (4,)


@pytest.mark.parametrize("headers,fragment", [
    ([("labels", b"7," * 500_000)], "header 'labels' of 1000000 bytes exceeds the 384-byte limit"),
    ([("labels", b"1" * 385)], "exceeds the 384-byte limit"),
    ([("x-anything", b"a" * 4097)], "header 'x-anything' of 4097 bytes exceeds the 4096-byte limit"),
    ([("n" * 300, b"v")], "exceeds 256 bytes"),
    ([(f"h{i}", b"") for i in range(65)], "65 headers, over the limit of 64"),
])
def test_oversized_headers_are_rejected_before_parsing(headers, fragment, monkeypatch):
    import streamhash.records as records

    def never(*_a, **_k):
        raise AssertionError("a header past its bound was parsed")

    monkeypatch.setattr(records, "parse_labels", never)
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", encode_png(GRAY), headers, SPEC)
    assert info.value.stage == "headers" and fragment in info.value.message and len(info.value.message) < 300


def test_the_labels_bound_fits_the_largest_valid_header():
    spec = ImageSpec(28, 28, 1, max_value_bytes=4096)
    widest = ", ".join(str(9999 - i) for i in range(64)).encode()  # 64 four-digit labels, ", " between
    assert len(widest) <= 384
    assert len(parse_message(b"k", encode_png(GRAY), [("labels", widest)], spec).labels) == 64
    small = ImageSpec(28, 28, 1, max_label=20, max_labels=2)
    with pytest.raises(RecordRejected, match="8-byte limit"):
        parse_message(b"k", encode_png(GRAY), [("labels", b"1,2,3,4,5")], small)


def test_long_label_headers_are_clipped_in_the_message():
    with pytest.raises(RecordRejected) as info:
        parse_labels(b"x" * 100_000)
    assert len(info.value.message) < 300


# --- the spec every process builds --------------------------------------------------------------


def test_spec_from_settings_and_positional_construction():
    from streamhash.config import Settings
    from streamhash.services.spec import image_spec

    s = Settings(model={"image_size": 32, "channels": 3}, store={"max_value_bytes": 5000, "max_image_pixels": 4096},
                 learn={"max_label": 99, "max_labels_per_item": 4})
    assert image_spec(s) == ImageSpec(32, 32, 3, 5000, max_pixels=4096, max_label=99, max_labels=4)
    default = image_spec(Settings())
    assert (default.max_pixels, default.max_label, default.max_labels) == (4096 * 4096, 9999, 64)
    assert ImageSpec(28, 28, 1, 4096).shape == (28, 28)


def test_spec_refuses_a_pixel_limit_below_its_own_images():
    from streamhash.errors import ConfigError

    with pytest.raises(ConfigError, match="MAX_IMAGE_PIXELS"):
        ImageSpec(28, 28, 1, max_pixels=100)
