"""The query server's two-stage search (issue 23 item 6), in-process over real LMDB shards: items that learning
left at one code come back ordered by their labels' votes among the query's look-alikes, then by the cosine of
their stored features to the query's (an uploaded photo's feature from the network's frozen part, or a stored
item's own), each keeping its Hamming distance; a search by code keeps Hamming order and says why;
``server.rerank_candidates`` bounds what the second stage sees."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch import nn

import streamhash.services.query as query
from streamhash.config import Settings
from streamhash.index.sharded import ShardedIndex
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.model.hashnet import HashNet, HashNetConfig, register_backbone
from streamhash.records import encode_png

DIM, N, SHARDS = 8, 12, 2
SPEC = {"backbone": "rerank_probe", "cut": "pooled", "feature_shape": [DIM], "dtype": "float16"}


class ProbeFrozen(nn.Module):
    """A frozen backbone whose feature is the image's first DIM pixels, centred: a test sets it exactly."""

    frozen, out_features, stored_shape, cut = True, DIM, (DIM,), "pooled"

    def __init__(self, _cfg=None):
        super().__init__()
        self.tail = nn.Identity()

    def prepare(self, images: np.ndarray) -> np.ndarray:
        return (images.reshape(len(images), -1)[:, :DIM].astype(np.float32) / 255 - 0.5).astype(np.float16)


register_backbone("rerank_probe", ProbeFrozen)


def image_with(feature: np.ndarray) -> np.ndarray:
    img = np.full(28 * 28, 128, np.uint8)
    img[:DIM] = np.clip(np.round((feature + 0.5) * 255), 0, 255).astype(np.uint8)
    return img.reshape(28, 28)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture
def served(tmp_path, request):
    """Two shards of N items all at the same learned code, features random, labelled (1,) or, with param
    (candidates, classes), (1 + i % classes,); a client per candidate setting."""
    param = getattr(request, "param", 1000)
    candidates, classes = (param, 1) if isinstance(param, int) else param
    root = StoreRoot(tmp_path)
    stores = {p: Store(root.shard_path(ShardKey("images", p)), bits=32, shard=p, backbone="rerank_probe",
                       features=SPEC) for p in range(SHARDS)}
    net = HashNet(HashNetConfig(bits=32, backbone="rerank_probe"))
    rng = np.random.default_rng(7)
    feats = (rng.random((N, DIM)) - 0.5).astype(np.float16)
    code = np.zeros(4, np.uint8).tobytes()  # learning gave the whole class one code
    for s in stores.values():
        s.put_model(net.to_bytes(), make_current=True, version=1)
    for i in range(N):
        stores[i % SHARDS].write_batch([ItemWrite(f"item-{i:02d}", code, encode_png(image_with(feats[i])), "image/png",
                                                  (1 + i % classes,), feature=feats[i].tobytes())])
    index = ShardedIndex(StoreRoot(tmp_path, create=False), open_store=lambda key, _p: stores[key.partition],
                         refresh_interval_s=0.01)
    settings = Settings(store={"path": str(tmp_path)},
                        server={"refresh_interval_s": 0.01, "rerank_candidates": candidates})
    try:
        with TestClient(query.create_app(settings, index), raise_server_exceptions=False) as client:
            yield client, feats, net
    finally:
        for s in stores.values():
            s.close()


def hamming_order() -> list[str]:
    """Ties in the index's order: shard 0's items, then shard 1's, each in insertion order."""
    return [f"item-{i:02d}" for p in range(SHARDS) for i in range(p, N, SHARDS)]


def test_a_photo_search_orders_one_distance_by_feature_similarity(served):
    client, feats, net = served
    q = (np.random.default_rng(3).random(DIM) - 0.5).astype(np.float16)
    image = image_with(q)
    r = client.post("/search", json={"image_base64": base64.b64encode(encode_png(image)).decode(), "k": N})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reranked"] is True and body["rerank_note"] is None
    hits = body["results"]
    query_feature = net.prepare(image[None])[0]
    distance = int(np.unpackbits(net.encode(query_feature[None])[0]).sum())  # every item's code is all zeros
    assert [h["distance"] for h in hits] == [distance] * N  # the Hamming distance kept
    want = sorted(range(N), key=lambda i: -cosine(query_feature, feats[i]))
    assert [h["id"] for h in hits] == [f"item-{i:02d}" for i in want]
    assert [h["id"] for h in hits] != hamming_order()
    for h, i in zip(hits, want):
        assert h["similarity"] == pytest.approx(cosine(query_feature, feats[i]), abs=1e-4)


def test_an_item_search_ranks_by_the_items_stored_feature_and_comes_first(served):
    client, feats, _ = served
    r = client.post("/search", json={"item_id": "item-05", "k": 4})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    want = sorted(range(N), key=lambda i: -cosine(feats[5], feats[i]))[:4]
    assert want[0] == 5 and [h["id"] for h in hits] == [f"item-{i:02d}" for i in want]
    assert r.json()["reranked"] is True and all(h["distance"] == 0 for h in hits)


def test_a_code_search_keeps_hamming_order_and_says_why(served):
    client, _, _ = served
    r = client.post("/search", json={"code_hex": "00000000", "k": N})
    body = r.json()
    assert r.status_code == 200 and body["reranked"] is False and "code_hex" in body["rerank_note"]
    assert [h["id"] for h in body["results"]] == hamming_order()


@pytest.mark.parametrize("served", [(1000, 3)], indirect=True)
def test_one_distance_of_several_classes_puts_the_class_most_look_alikes_share_first(served):
    """Within the tie the 10 items most similar to the query vote with their labels; an item ranks by its class's
    votes, then by similarity (rerank.votes), so a class is not split by look-alikes of another."""
    from streamhash.index.rerank import VOTERS

    client, feats, _ = served
    r = client.post("/search", json={"item_id": "item-04", "k": N})
    assert r.status_code == 200, r.text
    sims = [cosine(feats[4], feats[i]) for i in range(N)]
    voters = sorted(range(N), key=lambda i: -sims[i])[:VOTERS]
    votes = {y: sum(1 + j % 3 == y for j in voters) for y in (1, 2, 3)}
    want = sorted(range(N), key=lambda i: (-votes[1 + i % 3], -sims[i]))
    assert want != sorted(range(N), key=lambda i: -sims[i])  # the cosine alone would interleave the classes
    assert [h["id"] for h in r.json()["results"]] == [f"item-{i:02d}" for i in want]


@pytest.mark.parametrize("served", [5], indirect=True)
def test_only_the_candidates_are_reranked(served):
    client, feats, _ = served
    r = client.post("/search", json={"item_id": "item-02", "k": 3})
    candidates = [int(i[-2:]) for i in hamming_order()[:5]]  # the first 5 of Hamming order (item-02 among them)
    want = sorted(candidates, key=lambda i: -cosine(feats[2], feats[i]))[:3]
    assert [h["id"] for h in r.json()["results"]] == [f"item-{i:02d}" for i in want]


@pytest.mark.parametrize("served", [0], indirect=True)
def test_zero_candidates_switches_it_off(served):
    client, _, _ = served
    body = client.post("/search", json={"item_id": "item-02", "k": N}).json()
    assert body["reranked"] is False and "rerank_candidates" in body["rerank_note"]
    assert [h["id"] for h in body["results"]] == ["item-02"] + [i for i in hamming_order() if i != "item-02"]


def test_a_router_merges_reranked_answers_by_distance_then_similarity(served):
    """Two query servers (here the same one asked twice, its shards split between the answers): the merge keeps
    the distance first, then puts ties in similarity order across servers, as one server over both would."""
    from streamhash.services.router import Answer, merge

    client, feats, _ = served
    whole = client.post("/search", json={"item_id": "item-05", "k": N}).json()
    parts = [{**whole, "results": [h for h in whole["results"] if h["shard"] == f"images/{p}"]} for p in (1, 0)]
    merged = merge([Answer(f"http://s{p}", 200, body) for p, body in enumerate(parts)], N, "item-05")
    assert [h["id"] for h in merged["results"]] == [h["id"] for h in whole["results"]]
    assert merged["reranked"] is True
    plain = client.post("/search", json={"code_hex": "00000000", "k": N}).json()
    merged = merge([Answer("http://s0", 200, plain), Answer("http://s1", 200, whole)], N)
    assert merged["reranked"] is False and "code_hex" in merged["rerank_note"]
