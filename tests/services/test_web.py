"""The search page's server side in-process, over a real store root of two LMDB shards: stored images and
thumbnails, a random item, search by a stored item, the live status, and pages that load nothing from
outside the server. Items are looked up in whichever shard holds them."""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from streamhash.index.hamming import make_index
from streamhash.index.store import ItemWrite
from streamhash.records import encode_npy, encode_png
from streamhash.services.web import STATIC, LiveStatus, random_item
from tests.services.test_query_server import N_ITEMS, SHARDS, serving

EXTERNAL = re.compile(r"https?://|(?:src|href|url)\s*[=(:]\s*[\"']?//", re.IGNORECASE)


@pytest.fixture
def served(tmp_path):
    with serving(tmp_path) as (client, images):
        yield client, images, client.app.state.index.shards[0].store  # new items go to shard images/0


def put(store, item_id: str, raw: bytes, ctype: str, labels=(1,)) -> None:
    code = np.zeros(store.code_bytes, np.uint8).tobytes()
    store.write_batch([ItemWrite(item_id, code, raw, ctype, labels)])


def wait_indexed(client, n: int) -> None:
    deadline = time.monotonic() + 10
    while client.get("/healthz").json()["index_size"] < n:
        assert time.monotonic() < deadline, "the live index did not follow the store"
        time.sleep(0.02)


def png_pixels(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)))


def test_stored_bytes_come_back_with_their_content_type(served):
    client, images, store = served
    r = client.get("/items/item-3/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == encode_png(images[3])
    put(store, "npy-1", encode_npy(images[1]), "application/x-npy")
    r = client.get("/items/npy-1/image")
    assert r.headers["content-type"] == "application/x-npy" and r.content == encode_npy(images[1])


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_thumbnails_are_pngs_enlarged_by_nearest_neighbour(served, fmt):
    client, images, store = served
    raw, ctype = (encode_png(images[2]), "image/png") if fmt == "png" else (encode_npy(images[2]), "application/x-npy")
    put(store, "thumb", raw, ctype)
    r = client.get("/items/thumb/image?size=56")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array_equal(png_pixels(r.content), np.kron(images[2], np.ones((2, 2), np.uint8)))  # every pixel 2x2
    small = png_pixels(client.get("/items/thumb/image?size=14").content)
    assert small.shape == (14, 14)


def test_thumbnails_keep_the_aspect_ratio_of_colour_and_16_bit_images(served):
    client, _, store = served
    put(store, "wide", encode_png(np.zeros((10, 40, 3), np.uint8)), "image/png")
    assert png_pixels(client.get("/items/wide/image?size=80").content).shape == (20, 80, 3)
    deep = np.full((8, 8), 40000, np.uint16)
    buf = io.BytesIO()
    np.save(buf, deep)
    put(store, "deep", buf.getvalue(), "application/x-npy")
    assert (png_pixels(client.get("/items/deep/image?size=8").content) == 40000 >> 8).all()


@pytest.mark.parametrize("size", ["0", "513", "abc", "-1", "1.5", "", "٣"])
def test_a_bad_thumbnail_size_is_400(served, size):
    client, _, _ = served
    r = client.get(f"/items/item-1/image?size={size}")
    assert r.status_code == 400 and "size is a whole number" in r.json()["detail"]


def test_unknown_and_damaged_images_are_4xx_with_a_message(served):
    client, _, store = served
    r = client.get("/items/no-such/image")
    assert r.status_code == 404 and "no image for item 'no-such'" in r.json()["detail"]
    assert client.get("/items/" + "x" * 300 + "/image").status_code == 400
    put(store, "broken", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png")
    assert client.get("/items/broken/image").status_code == 200  # the bytes as stored
    r = client.get("/items/broken/image?size=32")
    assert r.status_code == 422 and "cannot be shown" in r.json()["detail"]


def test_ids_with_slashes_reach_both_the_item_and_its_image(served):
    client, images, store = served
    put(store, "a/b", encode_png(images[0]), "image/png")
    assert client.get("/items/a/b").json()["id"] == "a/b"
    assert client.get("/items/a%2Fb/image").content == encode_png(images[0])


def test_random_names_stored_items_and_not_always_the_same(served):
    client, _, _ = served
    got = [client.get("/random").json() for _ in range(40)]
    assert {g["id"] for g in got} <= {f"item-{i}" for i in range(N_ITEMS)}
    assert len({g["id"] for g in got}) > 1
    assert {int(g["id"].split("-")[1]) % SHARDS for g in got} == set(range(SHARDS))  # from every shard
    assert all(g["labels"] == [int(g["id"].split("-")[1]) % 3] for g in got)


def test_random_on_an_empty_index_is_404(tmp_path):
    from fastapi.testclient import TestClient

    from streamhash.services import query
    from tests.services.test_query_server import close_all, index_over, settings_for, shard_stores

    stores = shard_stores(tmp_path)
    with TestClient(query.create_app(settings_for(tmp_path), index_over(tmp_path, stores))) as client:
        r = client.get("/random")
    close_all(stores)
    assert r.status_code == 404 and "empty" in r.json()["detail"]


def test_random_item_finds_the_one_item_among_a_million_seqs():
    """Sampled seqs all miss: the nearest item to a random code is still returned."""
    index = make_index(32, backend="numpy")
    index.add_with_ids(np.zeros((1, 4), np.uint8), np.array([999_999], np.int64))
    g = SimpleNamespace(index=index, last_seq=1_000_000, resolve=lambda seqs: [("only", (1,)) if s == 999_999 else None
                                                                               for s in seqs])
    assert random_item(g, np.random.default_rng(0)) == ("only", (1,))


def test_search_by_a_stored_item_puts_it_first_at_distance_zero(served):
    client, _, _ = served
    for i in range(N_ITEMS):  # k=1: ties at distance 0 must not push the item out
        r = client.post("/search", json={"item_id": f"item-{i}", "k": 1})
        assert r.status_code == 200, r.text
        assert [(h["id"], h["distance"]) for h in r.json()["results"]] == [(f"item-{i}", 0)]
    res = client.post("/search", json={"item_id": "item-4", "k": N_ITEMS}).json()["results"]
    assert res[0] == {"id": "item-4", "distance": 0, "labels": [1], "shard": "images/0"} and len(res) == N_ITEMS
    assert [h["distance"] for h in res] == sorted(h["distance"] for h in res)
    assert client.post("/search", json={"item_id": "item-4", "radius": 0}).json()["results"] == []
    res = client.post("/search", json={"item_id": "item-4", "radius": 1, "k": N_ITEMS}).json()["results"]
    assert res[0]["id"] == "item-4" and {h["distance"] for h in res} == {0}


def test_search_by_an_item_the_live_index_has_not_applied_yet(served):
    client, images, store = served
    client.app.state.index.stop()  # the followers stop: the store's code of this generation answers
    put(store, "late", encode_png(images[0]), "image/png")
    r = client.post("/search", json={"item_id": "late", "k": 3})
    assert r.status_code == 200 and r.json()["results"][0] == {"id": "late", "distance": 0, "labels": [1], "shard": "images/0"}


@pytest.mark.parametrize("body,status,fragment", [
    ({"item_id": "nope"}, 404, "no item 'nope'"),
    ({"item_id": ""}, 400, "1 to 256 bytes"),
    ({"item_id": "item-1", "code_hex": "00000000"}, 400, "exactly one of"),
])
def test_bad_searches_by_item_are_4xx(served, body, status, fragment):
    client, _, _ = served
    r = client.post("/search", json=body)
    assert r.status_code == status and fragment in r.json()["detail"]


def test_status_follows_the_live_index(served):
    client, images, store = served
    s = client.get("/status").json()
    assert (s["index_size"], s["generation"], s["model_version"], s["learning_rounds"], s["reencodes"]) == (N_ITEMS, 1, 1, 0, 0)
    for i in range(5):
        put(store, f"new-{i}", encode_png(images[i]), "image/png")
    wait_indexed(client, N_ITEMS + 5)
    s = client.get("/status").json()
    assert s["index_size"] == N_ITEMS + 5 and s["ingest_rate"] > 0 and s["history"][-1][1] == N_ITEMS + 5


def test_rounds_and_reencodes_are_counted_from_what_the_server_saw():
    g = SimpleNamespace(index=SimpleNamespace(ntotal=0), generation=1, model_version=1)
    status = LiveStatus(lambda: (g.index.ntotal, g.generation, g.model_version), window_s=3600)
    for version in (2, 3, 4):  # three learning rounds, the third with a re-encode
        g.model_version, g.index.ntotal = version, g.index.ntotal + 100
        status.sample()
    assert status.snapshot()["last_reencode"] is None
    g.generation = 2
    s = status.snapshot()
    assert (s["learning_rounds"], s["reencodes"], s["index_size"]) == (3, 1, 300)
    assert s["learning_rounds_total"] == 3 and s["reencodes_total"] == 1 and s["ingest_rate"] > 0
    status.sample()  # the panel's "last" re-encode: the generation the learner's trigger made, when it went live
    g.model_version = 5
    status.sample()
    last = status.snapshot()["last_reencode"]
    assert (last["generation"], last["model_version"]) == (2, 4) and last["ago_s"] >= 0


def local_refs(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


def test_the_page_and_its_assets_load_nothing_from_outside(served):
    client, _, _ = served
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = [u for u in local_refs(r.text) if not u.startswith("data:")]
    assert {"/ui/app.js", "/ui/style.css"} <= set(refs)
    for url in refs:
        assert client.get(url).status_code == 200, url
    for path in STATIC.iterdir():  # everything the page can load
        assert not EXTERNAL.search(path.read_text()), path.name


def test_every_page_control_has_a_label_and_a_phone_width_viewport(served):
    client, _, _ = served
    html = client.get("/").text
    controls = re.findall(r"<input[^>]*\bid=\"([^\"]+)\"", html)
    labelled = set(re.findall(r"<label for=\"([^\"]+)\"", html))
    wrapped = set(re.findall(r"<label><input[^>]*\bid=\"([^\"]+)\"", html))
    assert controls and set(controls) <= labelled | wrapped
    assert 'name="viewport" content="width=device-width' in html and 'type="submit"' in html
    assert "@media" in (STATIC / "style.css").read_text()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_are_served_offline(served, page):
    client, _, _ = served
    r = client.get(page)
    assert r.status_code == 200
    assert not EXTERNAL.search(r.text), r.text
    refs = local_refs(r.text)
    assert any(u.endswith(".js") for u in refs)
    for url in refs:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/items/{item_id}/image", "/random", "/status", "/search"} <= set(paths)


def test_a_shard_created_after_the_server_started_is_no_round_and_no_reencode(tmp_path):
    """The README's start order (server, then the worker's first shard): the live panel used to show one
    learning round and one re-encode that never happened (generation 1 / version 1 counted from 0 / 0)."""
    from fastapi.testclient import TestClient

    from streamhash.index.sharded import ShardedIndex
    from streamhash.index.store.root import StoreRoot
    from streamhash.services import query
    from tests.services.test_query_server import close_all, make_root, settings_for

    StoreRoot(tmp_path)  # the layout, no shard yet
    stores: dict = {}
    index = ShardedIndex(StoreRoot(tmp_path, create=False), open_store=lambda key, _path: stores[key.partition],
                         rescan_s=0.05, refresh_interval_s=0.01)
    try:
        with TestClient(query.create_app(settings_for(tmp_path), index)) as client:
            s = client.get("/status").json()
            assert (s["index_size"], s["model_version"], s["learning_rounds_total"]) == (0, 0, 0)
            assert s["model"]["trained"] is False and "no shard" in s["model"]["note"]
            time.sleep(1.2)  # the sampler's baseline, taken with no shard
            stores.update(make_root(tmp_path)[0])
            wait_indexed(client, N_ITEMS)
            time.sleep(1.2)  # sampled with the shards
            s = client.get("/status").json()
            assert (s["generation"], s["model_version"]) == (1, 1)
            assert (s["learning_rounds"], s["reencodes"], s["learning_rounds_total"], s["reencodes_total"]) == (0, 0, 0, 0)
    finally:
        close_all(stores)


def test_status_says_the_model_is_untrained_and_what_the_first_round_waits_for(served):
    client, _, _ = served
    model = client.get("/status").json()["model"]
    assert model["trained"] is False and model["round_every"] == 2000
    assert "untrained (version 1, no learning round yet)" in model["note"]
    assert "labeled" in model["note"] and "STREAMHASH_LEARN__ROUND_EVERY" in model["note"]


def test_the_status_panel_on_the_page_shows_the_untrained_note_and_class_names():
    js = (STATIC / "app.js").read_text()
    html = (STATIC / "index.html").read_text()
    assert 'id="live-trained"' in html and "s.model.note" in js
    assert "label_names" in js  # a hit's class names are what its caption shows


def test_fashion_mnist_class_names_in_hits_status_and_random(tmp_path):
    from fastapi.testclient import TestClient

    from streamhash.data.fashion_mnist import CLASSES
    from streamhash.services import query
    from tests.services.test_query_server import close_all, index_over, make_root, settings_for

    stores, _ = make_root(tmp_path)
    settings = settings_for(tmp_path)
    settings.data.class_names = "fashion-mnist"
    try:
        with TestClient(query.create_app(settings, index_over(tmp_path, stores))) as client:
            hits = client.post("/search", json={"item_id": "item-4", "k": N_ITEMS}).json()["results"]
            assert hits and all(h["label_names"] == [CLASSES[label] for label in h["labels"]] for h in hits)
            assert {h["label_names"][0] for h in hits} == {"T-shirt/top", "Trouser", "Pullover"}  # labels 0, 1, 2
            status = client.get("/status").json()
            assert status["label_names"]["0"] == "T-shirt/top" and status["label_names"]["9"] == "Ankle boot"
            got = client.get("/random").json()
            assert got["label_names"] == [CLASSES[got["labels"][0]]]
    finally:
        close_all(stores)


def test_class_names_from_a_json_file(tmp_path):
    from streamhash.data.class_names import load_class_names
    from streamhash.errors import ConfigError

    (tmp_path / "list.json").write_text('["cat", "dog"]')
    (tmp_path / "map.json").write_text('{"7": "seven"}')
    (tmp_path / "bad.json").write_text('"cat"')
    assert load_class_names(str(tmp_path / "list.json")) == {0: "cat", 1: "dog"}
    assert load_class_names(str(tmp_path / "map.json")) == {7: "seven"}
    assert load_class_names(None) == {}
    for bad in ("bad.json", "missing.json"):
        with pytest.raises(ConfigError, match="class names"):
            load_class_names(str(tmp_path / bad))


def test_every_endpoint_has_a_description_in_the_api_docs(served):
    client, _, _ = served
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/search", "/items/{item_id}", "/items/{item_id}/image", "/healthz", "/metrics", "/status", "/random"):
        for method, op in paths[path].items():
            assert op.get("description") and op.get("summary"), (method, path)
    assert paths["/search"]["post"]["responses"]["200"]["content"]["application/json"].get("example")


def test_every_router_endpoint_has_a_description_in_the_api_docs():
    from fastapi.testclient import TestClient

    from streamhash.config import Settings
    from streamhash.services import router

    app = router.create_app(Settings(server={"shards": ["http://127.0.0.1:9"]}))
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    for path in ("/search", "/items/{item_id}", "/healthz", "/metrics"):
        for method, op in paths[path].items():
            assert op.get("summary") and "This is a router" in op.get("description", ""), (method, path)
