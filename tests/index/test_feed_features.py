"""The learner's feed for a network with a frozen backbone (issue 23): a round's fetch returns the features stored
with each item, decoding no image; an item stored without one (an older shard) is decoded and prepared once, and
counted; a shard whose features another network made is refused when the feed opens it, naming both."""

from types import SimpleNamespace

import numpy as np
import pytest

from streamhash import metrics as m
from streamhash.errors import FeatureSpecMismatch
from streamhash.index.feed import ShardFeed
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import ImageSpec, encode_png
from tests.photos import photo

KEY = ShardKey("t", 0)


def hasher(net):
    return SimpleNamespace(net=net, observe=lambda *a, **k: None, apply_reencode=lambda *a: None, forget=lambda *a: None)


def decoded() -> float:
    return m.STORED_IMAGES_DECODED.labels(purpose="learn")._value.get()


def test_a_round_reads_stored_features_and_decodes_only_an_item_stored_without_one(tmp_path):
    net = HashNet(HashNetConfig(bits=32, backbone="efficientnet_lite0", image_size=32, channels=3))
    net.backbone._cache_dir = tmp_path / "onnx"
    images = np.stack([np.asarray(photo(i, 32, 32)) for i in range(3)])
    feats = net.prepare(images)
    root = StoreRoot(tmp_path / "root", create=True)
    store = Store(root.shard_path(KEY), bits=32, backbone="efficientnet_lite0", features=net.feature_spec())
    store.write_batch([ItemWrite(f"p{i}", bytes(4), encode_png(images[i]), "image/png", (i,),
                                 feature=feats[i].tobytes() if i < 2 else None) for i in range(3)])
    store.close()
    feed = ShardFeed(root, "t", hasher(net), ImageSpec(32, 32, 3))
    feed.poll()
    before = decoded()
    got = feed.fetch_images(["p1", "p0"])
    assert got.dtype == np.float16 and got.shape == (2, 1280) and decoded() == before
    np.testing.assert_array_equal(got, feats[[1, 0]])
    got = feed.fetch_images(["p2", "p0"])  # p2 has no stored feature: its blob, through the frozen part, once
    assert decoded() == before + 1
    np.testing.assert_array_equal(got[0], feats[2])
    feed.close()


def test_a_shard_of_another_cut_is_refused_when_the_feed_opens_it(tmp_path):
    spec = {"backbone": "efficientnet_lite0", "cut": "pooled", "feature_shape": [4], "dtype": "float16"}
    root = StoreRoot(tmp_path, create=True)
    store = Store(root.shard_path(KEY), bits=32, backbone="efficientnet_lite0", features=spec)
    store.write_batch([ItemWrite("p0", bytes(4), b"png", "image/png", (1,), feature=bytes(8))])
    store.close()
    other = {**spec, "cut": "stage7", "feature_shape": [192, 7, 7]}
    net = SimpleNamespace(cfg=SimpleNamespace(bits=32), frozen=True, feature_spec=lambda: other)
    feed = ShardFeed(root, "t", hasher(net), ImageSpec(32, 32, 3))
    with pytest.raises(FeatureSpecMismatch, match=r"cut pooled.*\(4,\).*cut stage7.*\(192, 7, 7\)"):
        feed.poll()
