"""The worker's encode step with a frozen backbone (issue 23): each image's stored input is computed once, in the
batch, and written with its item; a batch encoded again (a re-encode swapped the shard meanwhile) encodes its
stored inputs, never running the frozen part a second time. SmallCNN stores nothing."""

from types import SimpleNamespace

import numpy as np

from streamhash.index.store import Store
from streamhash.index.store.root import ShardKey
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import ImageRecord
from streamhash.services.worker.pipeline import BatchPipeline, ShardWrite
from tests.photos import photo

KEY = ShardKey("t", 0)


def pipeline_for(net) -> BatchPipeline:
    return BatchPipeline(owner=SimpleNamespace(serving=lambda key: (1, 1)),
                         follower=SimpleNamespace(nets=SimpleNamespace(get=lambda version: net)),
                         spec=None, encoder=None, dead_letters=None, positions=None, checkpoint=None,
                         codes_topic="t.codes", bits=net.cfg.bits, encode_batch=64)


def records(images) -> list[ImageRecord]:
    return [ImageRecord(f"p-{i}", img, (i % 2,), "image/png", b"png") for i, img in enumerate(images)]


def test_a_frozen_backbone_runs_once_per_image_and_a_batch_encoded_again_reuses_its_features(tmp_path, monkeypatch):
    net = HashNet(HashNetConfig(bits=32, backbone="efficientnet_lite0", image_size=32, channels=3))
    net.backbone._cache_dir = tmp_path / "onnx"
    recs = records([np.asarray(photo(i, 32, 32)) for i in range(3)])
    pipeline = pipeline_for(net)
    calls = []
    run = net.backbone._run_frozen
    monkeypatch.setattr(net.backbone, "_run_frozen", lambda x: (calls.append(len(x)), run(x))[1])
    serving, codes, stored = pipeline.encode(recs, [(1, 1)] * 3)
    assert calls == [3] and stored.dtype == np.float16 and stored.shape == (3, 1280)
    assert codes.tolist() == net.encode(stored).tolist()

    store = Store(tmp_path / "shard", bits=32, backbone="efficientnet_lite0", features=net.feature_spec())
    feats = [stored[i].tobytes() for i in range(3)]
    # encoded for generation 0; the shard is at 1, as after a swap: the write is refused and the batch encoded again
    write = ShardWrite(KEY, store, recs, [0.0] * 3, (0, 1), np.zeros_like(codes), {}, [], {},
                       lambda rs, fs: pipeline._reencode(KEY, rs, fs), [], feats)
    write.write()
    assert calls == [3]  # from the stored features: the frozen part did not run again
    assert [store.get_item(r.id)["code"] for r in recs] == [c.tobytes() for c in codes]
    np.testing.assert_array_equal(np.stack(store.features([r.id for r in recs])), stored)
    store.close()


def test_a_network_trained_end_to_end_stores_no_feature(tmp_path):
    net = HashNet(HashNetConfig(bits=32))
    recs = records(np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    serving, codes, stored = pipeline_for(net).encode(recs, [(1, 1)] * 4)
    assert stored is None and codes.tolist() == net.encode(np.stack([r.image for r in recs])).tolist()
    store = Store(tmp_path / "shard", bits=32)
    ShardWrite(KEY, store, recs, [0.0] * 4, (1, 1), codes, {}, [], {}, None).write()
    assert store.features([r.id for r in recs]) == [None] * 4 and store.feature_spec() is None
    store.close()
