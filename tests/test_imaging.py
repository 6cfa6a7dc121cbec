"""The conversion rules (STREAMHASH_IMAGE__*), through the message contract: any colour mode, bit depth
and size becomes exactly the array written here, whichever container (PNG, JPEG, .npy) carried it."""

import io

import numpy as np
import pytest
from PIL import Image

from streamhash.errors import ConfigError, RecordRejected
from streamhash.imaging import Conversion
from streamhash.records import ImageSpec, decode_image, encode_npy, encode_png, parse_message


def spec(height, width, channels, **conversion) -> ImageSpec:
    return ImageSpec(height, width, channels, conversion=Conversion(**conversion))


def png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:  # any dtype and byte order, unlike encode_npy
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def decode(value: bytes, s: ImageSpec) -> list:
    return parse_message(b"k", value, [], s).image.tolist()


# --- colour modes and bit depths ----------------------------------------------------------------

RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
LUMA = [[76, 150, 29, 18]]  # ITU-R 601-2: 10*.299 + 20*.587 + 30*.114 = 18.15


@pytest.mark.parametrize("value", [encode_png(RGB), encode_npy(RGB)], ids=["png", "npy"])
def test_rgb_to_gray_is_the_601_luma(value):
    assert decode(value, spec(1, 4, 1, mode="gray")) == LUMA


RGBA = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [0, 0, 0, 128]]], np.uint8)


@pytest.mark.parametrize("background,want", [
    ("black", [[[200, 100, 50], [0, 0, 0], [100, 50, 25], [0, 0, 0]]]),  # 200*128/255 = 100.4
    ("white", [[[200, 100, 50], [255, 255, 255], [227, 177, 152], [127, 127, 127]]]),  # 255*127/255 + 0 = 127
])
@pytest.mark.parametrize("encode", [encode_png, encode_npy], ids=["png", "npy"])
def test_rgba_is_composited_over_the_background(encode, background, want):
    assert decode(encode(RGBA), spec(1, 4, 3, mode="rgb", background=background)) == want


@pytest.mark.parametrize("background,want", [("black", [[100, 0, 50]]), ("white", [[100, 255, 177]])])
def test_gray_with_alpha_is_composited_too(background, want):
    la = Image.fromarray(np.array([[[100, 255], [100, 0], [100, 128]]], np.uint8), "LA")
    assert decode(png(la), spec(1, 3, 1, mode="gray", background=background)) == want


def test_palette_colours_and_transparent_entry():
    p = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 0, 255, 255, 255, 255])
    assert decode(png(p), spec(1, 3, 1, mode="gray")) == [[76, 29, 255]]
    assert decode(png(p, transparency=1), spec(1, 3, 1, mode="gray", background="white")) == [[76, 255, 255]]
    assert decode(png(p, transparency=1), spec(1, 3, 3, mode="rgb")) == [[[255, 0, 0], [0, 0, 0], [255, 255, 255]]]


SIXTEEN = np.array([[0, 255, 256, 1000, 32768, 65535]], np.uint16)
HIGH_BYTE = [[0, 0, 1, 3, 128, 255]]  # PIL's own convert("L") clipped: 256 and above all became 255


@pytest.mark.parametrize("value", [png(Image.fromarray(SIXTEEN)), npy(SIXTEEN), npy(SIXTEEN.astype(">u2"))],
                         ids=["png-I;16", "npy-le", "npy-be"])
@pytest.mark.parametrize("mode", [None, "gray"])
def test_sixteen_bit_gray_keeps_its_high_byte(value, mode):
    assert decode(value, spec(1, 6, 1, mode=mode)) == HIGH_BYTE


def test_one_bit_and_cmyk():
    bits = Image.fromarray(np.array([[0, 255, 0]], np.uint8)).convert("1")
    assert decode(png(bits), spec(1, 3, 1)) == [[0, 255, 0]]
    assert decode(png(bits), spec(1, 3, 3, mode="rgb")) == [[[0, 0, 0], [255, 255, 255], [0, 0, 0]]]
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="JPEG", quality=100)  # red, in ink
    red = np.array(parse_message(b"k", buf.getvalue(), [], spec(8, 8, 3, mode="rgb")).image, int)
    assert red.shape == (8, 8, 3) and np.abs(red - [255, 0, 0]).max() <= 2  # JPEG: within rounding


def test_gray_on_a_three_channel_network_is_replicated():
    gray = np.array([[5, 6], [7, 8]], np.uint8)
    assert decode(encode_png(gray), spec(2, 2, 3, mode="rgb")) == np.repeat(gray[:, :, None], 3, 2).tolist()
    assert decode(encode_png(RGB), spec(1, 4, 3, mode="gray")) == [[[v] * 3 for v in LUMA[0]]]


@pytest.mark.parametrize("arr", [RGB, RGBA, RGB[:, :, :1], SIXTEEN[:, :4]], ids=["rgb", "rgba", "hw1", "uint16"])
def test_npy_and_png_of_the_same_pixels_convert_alike(arr):
    s = spec(3, 5, 3, mode="rgb", resize="fit", background="white")
    image = Image.fromarray(arr[:, :, 0] if arr.shape[-1:] == (1,) else arr)
    assert decode(npy(arr), s) == decode(png(image), s)


# --- sizes: a 100x60 photo with known blocks, to 20x20 -------------------------------------------

# columns 0-19 black, 80-99 white; between them rows 0-29 are 90 and rows 30-59 are 180
PHOTO = np.zeros((60, 100), np.uint8)
PHOTO[:, 80:] = 255
PHOTO[:30, 20:80], PHOTO[30:, 20:80] = 90, 180
TOP, BOTTOM = [0] * 4 + [90] * 12 + [255] * 4, [0] * 4 + [180] * 12 + [255] * 4


@pytest.mark.parametrize("resize,want", [
    ("stretch", [TOP] * 10 + [BOTTOM] * 10),  # 5x3 source pixels each
    ("fill", [[90] * 20] * 10 + [[180] * 20] * 10),  # columns 20-79 kept, 3x3 each
    ("fit", [[255] * 20] * 4 + [TOP] * 6 + [BOTTOM] * 6 + [[255] * 20] * 4),  # 20x12 inside, 5x5 each
])
def test_resize_policies_with_an_area_filter_give_exact_blocks(resize, want):
    s = spec(20, 20, 1, resize=resize, resample="box", background="white")
    assert decode(encode_png(PHOTO), s) == want
    assert decode(encode_npy(PHOTO), s) == want


@pytest.mark.parametrize("resize,points", [
    ("stretch", {(0, 0): 0, (0, 19): 255, (19, 0): 0, (19, 19): 255, (2, 10): 90, (17, 10): 180}),
    # PIL's filter reads past the crop box, so the outer columns blend in the black and white margins
    ("fill", {(0, 3): 90, (0, 16): 90, (19, 3): 180, (19, 16): 180}),
    ("fit", {(0, 0): 0, (19, 19): 0, (6, 10): 90, (13, 10): 180}),
])
def test_resize_policies_with_the_default_filter(resize, points):
    # bilinear blends near a block edge only: away from one, a pixel is the block's value
    out = np.array(decode(encode_png(PHOTO), spec(20, 20, 1, resize=resize)))
    assert out.shape == (20, 20) and {p: out[p] for p in points} == points


@pytest.mark.parametrize("resize", ["fill", "fit", "stretch"])
def test_every_size_converts(resize):
    sizes = (1, 2, 3, 29, 224, 358, 513)  # 29 -> 224: float rounding once put the crop box outside the image
    for w in sizes:
        for h in sizes:
            out = parse_message(b"k", encode_png(np.full((h, w), 9, np.uint8)), [], spec(224, 224, 1, resize=resize)).image
            assert out.shape == (224, 224) and out.max() == 9


def test_a_one_pixel_strip_still_fits():
    out = decode(encode_png(np.full((1, 1000), 200, np.uint8)), spec(20, 20, 1, resize="fit"))
    assert [row[0] for row in out] == [0] * 9 + [200] + [0] * 10


def test_exact_refuses_other_sizes_and_colour_modes():
    with pytest.raises(RecordRejected) as info:
        parse_message(b"k", encode_png(PHOTO), [], spec(20, 20, 1))
    assert info.value.stage == "shape" and "image is 100x60, expected 20x20" in info.value.message
    with pytest.raises(RecordRejected) as info:  # a size policy does not convert colour by itself
        parse_message(b"k", encode_png(np.zeros((60, 100, 4), np.uint8)), [], spec(20, 20, 1, resize="fill"))
    assert info.value.stage == "shape" and "mode RGBA (4 channels), expected 1 channel" in info.value.message


# --- the network sees the same input whichever way the image came ---------------------------------


def test_codes_of_a_converted_photo_equal_those_of_the_image_in_the_networks_shape():
    from streamhash.model.hashnet import HashNet, HashNetConfig

    rgb = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    converted = parse_message(b"k", encode_png(rgb), [], spec(28, 28, 1, mode="gray", resize="fill")).image
    given = parse_message(b"k", encode_png(converted), [], ImageSpec(28, 28, 1)).image
    net = HashNet(HashNetConfig(bits=32))
    assert net.encode(converted[None]).tolist() == net.encode(given[None]).tolist()
    np.testing.assert_array_equal(converted, given)


def test_settings_reach_the_spec_and_rgb_needs_three_channels(monkeypatch):
    from streamhash.config import Settings
    from streamhash.services.spec import image_spec

    monkeypatch.setenv("STREAMHASH_IMAGE__RESIZE", "fill")
    monkeypatch.setenv("STREAMHASH_IMAGE__MODE", "gray")
    assert image_spec(Settings()).conversion == Conversion(mode="gray", resize="fill")
    with pytest.raises(ConfigError, match="MODE=rgb needs a 3-channel network"):
        spec(28, 28, 1, mode="rgb")
    with pytest.raises(ConfigError, match="resize must be one of"):
        Conversion(resize="crop")
    assert decode_image(encode_png(PHOTO), "image/png", spec(6, 10, 1, resize="stretch", resample="box"))[0][0] == 0
