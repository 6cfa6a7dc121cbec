"""Stored features (issue 23): a frozen backbone's output kept per item beside its blob, in the item's
transaction, deleted with it; the shard's meta says what it keeps and a writer of another network is refused."""

import dataclasses

import numpy as np
import pytest

from streamhash.errors import FeatureSpecMismatch, SchemaMismatchError, StoreError
from streamhash.index.store import GenerationBuilder, Store
from tests.index.store.support import items

SPEC = {"backbone": "efficientnet_lite0", "cut": "pooled", "feature_shape": [8], "dtype": "float16"}


def with_features(batch, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((len(batch), 8)).astype(np.float16)
    return [dataclasses.replace(it, feature=f.tobytes()) for it, f in zip(batch, feats)], feats


def test_features_round_trip_and_go_with_their_item(tmp_path):
    s = Store(tmp_path, bits=32, backbone="efficientnet_lite0", features=SPEC)
    assert s.feature_spec() is None  # written with the first feature, not at open
    batch, feats = with_features(items(6))
    s.write_batch(batch)
    assert s.feature_spec() == SPEC
    got = s.features(["id3", "nope", "id0"])
    assert got[1] is None and got[0].dtype == np.float16 and got[0].shape == (8,)
    np.testing.assert_array_equal(got[0], feats[3])
    np.testing.assert_array_equal(got[2], feats[0])
    again, new = with_features(items(1), seed=5)  # a re-sent id: its new image's feature replaces the old one
    s.write_batch(again)
    np.testing.assert_array_equal(s.features(["id0"])[0], new[0])
    s.write_batch(items(2)[1:])  # re-sent without a feature: the old one goes too
    s.write_batch([], deletes=["id2"])  # removed: its feature with it
    assert s.features(["id1", "id2"]) == [None, None]
    with s.env.begin() as txn:
        assert txn.stat(s.db["features"])["entries"] == 4  # id0, id3, id4, id5
    s.close()
    ro = Store(tmp_path, readonly=True)
    np.testing.assert_array_equal(ro.features(["id3"])[0], feats[3])
    ro.close()


def test_a_feature_of_the_wrong_size_is_refused_and_nothing_written(tmp_path):
    s = Store(tmp_path, bits=32, features=SPEC)
    batch, _ = with_features(items(3))
    batch[2] = dataclasses.replace(batch[2], feature=b"\0" * 4)
    with pytest.raises(StoreError, match="4 bytes for item 'id2'"):
        s.write_batch(batch)
    assert s.count() == 0
    with pytest.raises(StoreError, match="without a feature spec"):
        Store(tmp_path / "other", bits=32).write_batch(with_features(items(1))[0])


@pytest.mark.parametrize("other", [
    {"backbone": "efficientnet_lite0", "cut": "pooled", "feature_shape": [16], "dtype": "float16"},
    {"backbone": "efficientnet_lite0", "cut": "stage6", "feature_shape": [8], "dtype": "float16"},
])
def test_a_shard_written_with_another_feature_spec_is_refused_at_open_naming_both(tmp_path, other):
    s = Store(tmp_path, bits=32, backbone="efficientnet_lite0", features=SPEC)
    s.write_batch(with_features(items(2))[0])
    s.close()
    with pytest.raises(FeatureSpecMismatch) as err:
        Store(tmp_path, bits=32, backbone="efficientnet_lite0", features=other)
    msg = str(err.value)
    assert "(8,)" in msg and f"({other['feature_shape'][0]},)" in msg and f"cut {other['cut']}" in msg
    Store(tmp_path, bits=32, backbone="efficientnet_lite0", features=SPEC).close()  # the same network opens it


def test_a_shard_of_another_backbone_is_refused_at_open_naming_both(tmp_path):
    Store(tmp_path, bits=32, backbone="small_cnn").close()
    with pytest.raises(SchemaMismatchError, match="backbone small_cnn.*backbone efficientnet_lite0.*\\(8,\\)"):
        Store(tmp_path, bits=32, backbone="efficientnet_lite0", features=SPEC)


def test_a_reencode_encodes_stragglers_from_their_stored_features_not_their_blobs(tmp_path):
    s = Store(tmp_path, bits=32, features=SPEC)
    s.write_batch(with_features(items(4))[0])
    seen = {"blobs": 0, "features": 0}

    def encode_ids(ids):  # meanwhile, two more items arrive: the swap encodes them in its transaction
        if not seen.get("wrote"):
            seen["wrote"] = True
            s.write_batch(with_features(items(2, prefix="late"), seed=3)[0])
        return np.zeros((len(ids), 4), np.uint8)

    def encode_blobs(blobs):
        seen["blobs"] += len(blobs)
        return np.zeros((len(blobs), 4), np.uint8)

    def encode_features(feats):
        assert feats.shape == (len(feats), 8) and feats.dtype == np.float16
        seen["features"] += len(feats)
        return np.full((len(feats), 4), 9, np.uint8)

    GenerationBuilder(s, encode_ids=encode_ids, encode_blobs=encode_blobs, encode_features=encode_features,
                      catch_up_rounds=0).build(2)
    assert seen["features"] == 2 and seen["blobs"] == 0
    assert s.get_item("late1")["code"] == bytes([9] * 4)


def test_a_shard_restored_from_its_changelog_says_what_its_features_are(tmp_path):
    from streamhash.index.store.restore import apply_changelog
    from streamhash.kafka.changelog import ItemState

    s = Store(tmp_path, bits=32, backbone="efficientnet_lite0", features=SPEC)
    feats = np.arange(16, dtype=np.float16).reshape(2, 8)
    apply_changelog(s, [ItemState(f"r{i}", bytes(4), b"b", "image/png", (1,), 0.0, model=1, feature=feats[i].tobytes())
                        for i in range(2)], {("t", 0): 2})
    assert s.feature_spec() == SPEC
    np.testing.assert_array_equal(np.stack(s.features(["r0", "r1"])), feats)


def test_pooled_features_of_another_input_size_are_refused_though_their_shape_is_the_same(tmp_path):
    s = Store(tmp_path, bits=32, features={**SPEC, "input_size": 224})
    s.write_batch(with_features(items(1))[0])
    s.close()
    with pytest.raises(FeatureSpecMismatch, match=r"input 224\).*input 128\)"):
        Store(tmp_path, bits=32, features={**SPEC, "input_size": 128})
