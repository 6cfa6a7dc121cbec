"""The pretrained EfficientNet-Lite0 backbone (extra `natural`, installed by `make test`: no skip, a
missing package fails here), frozen under a learning hash head, fed by the photo conversion rules."""

import numpy as np
import torch

from streamhash.imaging import Conversion
from streamhash.model.efficientnet import EfficientNetLite0Backbone
from streamhash.model.hashnet import HashNet, HashNetConfig, images_to_tensor
from streamhash.records import ImageSpec, decode_image, encode_png
from tests.photos import photo, saved

PHOTOS = ImageSpec(224, 224, 3, conversion=Conversion(mode="rgb", resize="fill"))


def test_frozen_pretrained_backbone_features_and_hash_head():
    bb = EfficientNetLite0Backbone()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    bb.train()
    assert not bb.training and not bb.net.training
    f = bb(x)
    assert f.shape == (2, bb.out_features) and torch.isfinite(f).all()
    torch.testing.assert_close(bb(x), f)  # eval mode, deterministic
    assert not any(p.requires_grad for p in bb.parameters())
    net = HashNet(HashNetConfig(bits=16, backbone="efficientnet_lite0", image_size=28, channels=1))
    codes = net.encode(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    assert codes.shape == (3, 2)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]


def test_codes_of_a_converted_photo_equal_those_of_the_image_in_the_networks_shape():
    net = HashNet(HashNetConfig(bits=64, backbone="efficientnet_lite0", image_size=224, channels=3))
    rgba = photo(1, 300, 200).convert("RGBA")
    converted = decode_image(saved(rgba, "PNG"), "image/png", PHOTOS)
    given = decode_image(encode_png(converted), "image/png", ImageSpec(224, 224, 3))
    np.testing.assert_array_equal(converted, given)
    assert net.encode(converted[None]).tolist() == net.encode(given[None]).tolist()
    gray = photo(2, 224, 224).convert("L")  # a gray photo on the RGB network: the band three times
    as_rgb = decode_image(saved(gray.convert("RGB"), "PNG"), "image/png", PHOTOS)
    assert net.encode(decode_image(saved(gray, "PNG"), "image/png", PHOTOS)[None]).tolist() == net.encode(as_rgb[None]).tolist()


def test_a_photo_re_saved_at_another_size_keeps_its_features():
    bb = EfficientNetLite0Backbone()
    photos = [photo(seed, *size) for seed, size in enumerate([(320, 240), (240, 320), (500, 200), (150, 150)] * 3)]
    cfg = HashNetConfig(image_size=224, channels=3)

    def features(values: list[bytes], ctype: str) -> torch.Tensor:
        x = images_to_tensor(np.stack([decode_image(v, ctype, PHOTOS) for v in values]), cfg)
        return torch.nn.functional.normalize(bb(x), dim=1)

    stored = features([saved(p, "PNG") for p in photos], "image/png")
    smaller = [p.resize((p.width * 7 // 10, p.height * 7 // 10)) for p in photos]
    queries = features([saved(p, "JPEG", quality=85) for p in smaller], "image/jpeg")
    # nearest stored photo by cosine is each query's own: the backbone sees photos, not bytes or sizes
    assert (queries @ stored.T).argmax(dim=1).tolist() == list(range(len(photos)))
