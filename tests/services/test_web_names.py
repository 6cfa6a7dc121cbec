"""Class names kept with the index, as the query server shows them: merged over its shards (per label the
newest), under the operator's own map (STREAMHASH_DATA__CLASS_NAMES wins), in search hits, ``/items/<id>``,
``/random`` and ``/status``, and followed while serving: a name recorded with a new item is shown with it."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
from fastapi.testclient import TestClient

from streamhash.index import label_names
from streamhash.index.store import ItemWrite
from streamhash.records import encode_png
from streamhash.services import query
from tests.services.test_query_server import N_ITEMS, close_all, index_over, make_root, settings_for


def named(store, ts: float, **names) -> None:
    """Record names in a shard as the worker does: from records carrying label-names."""
    recs = [SimpleNamespace(label_names=((int(label[1:]), name),)) for label, name in names.items()]
    label_names.record(store, recs, [ts] * len(recs))


def test_hits_items_random_and_status_show_the_shards_names(tmp_path):
    stores, images = make_root(tmp_path)  # item i: shard i % 2, label i % 3
    named(stores[0], 1.0, l0="cat", l1="dog")
    named(stores[1], 2.0, l1="hound", l2="bird")  # label 1 named again later in another shard: the newer wins
    (tmp_path / "names.json").write_text(json.dumps({"2": "parrot"}))
    settings = settings_for(tmp_path)
    settings.data.class_names = str(tmp_path / "names.json")  # the operator's word wins over the stream's
    expect = {0: "cat", 1: "hound", 2: "parrot"}
    try:
        with TestClient(query.create_app(settings, index_over(tmp_path, stores))) as client:
            hits = client.post("/search", json={"item_id": "item-4", "k": N_ITEMS}).json()["results"]
            assert len(hits) == N_ITEMS and all(h["label_names"] == [expect[h["labels"][0]]] for h in hits)
            item = client.get("/items/item-5").json()
            assert item["labels"] == [2] and item["label_names"] == ["parrot"]
            assert client.get("/status").json()["label_names"] == {"0": "cat", "1": "hound", "2": "parrot"}
            got = client.get("/random").json()
            assert got["label_names"] == [expect[got["labels"][0]]]

            # while serving: a new class arrives with its name, written before its item as the worker does
            named(stores[0], 3.0, l7="horse")
            code = client.get("/items/item-0").json()["code_hex"]
            stores[0].write_batch([ItemWrite("new-1", bytes.fromhex(code), encode_png(images[0]), "image/png", (7,))])
            deadline = time.monotonic() + 10
            while client.get("/healthz").json()["index_size"] < N_ITEMS + 1:
                assert time.monotonic() < deadline, "the live index did not follow the store"
                time.sleep(0.02)
            hits = client.post("/search", json={"item_id": "new-1", "k": 3}).json()["results"]
            assert hits[0]["id"] == "new-1" and hits[0]["label_names"] == ["horse"]
    finally:
        close_all(stores)


def test_a_server_without_names_answers_bare_labels(tmp_path):
    stores, _ = make_root(tmp_path)
    try:
        with TestClient(query.create_app(settings_for(tmp_path), index_over(tmp_path, stores))) as client:
            hits = client.post("/search", json={"item_id": "item-1", "k": 3}).json()["results"]
            assert hits and all(h.get("label_names") is None for h in hits)
            assert client.get("/items/item-1").json()["label_names"] is None
            assert client.get("/status").json()["label_names"] == {}
    finally:
        close_all(stores)
