"""The query server in-process (no broker, no worker): over a real store root with two LMDB shards, a model
and a few items, every client mistake is a 4xx with a message, every /search response is counted by
status, results are merged across shards exactly, and each shard is ranked with its own model."""

from __future__ import annotations

import base64
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

import streamhash.services.query as query
from streamhash import metrics as m
from streamhash.codes import hamming_brute
from streamhash.config import Settings
from streamhash.index.sharded import ShardedIndex, View
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import encode_png
from tests.test_records import jpeg_declaring, npy_declaring, png_declaring, real_png

N_ITEMS = 8
SHARDS = 2
TOPIC = "images"


def shard_stores(path, n_shards: int = SHARDS, bits: int = 32) -> dict[int, Store]:
    """Writable shards ``images/0 .. n-1`` under a store root at ``path``, by partition."""
    root = StoreRoot(path)
    return {p: Store(root.shard_path(ShardKey(TOPIC, p)), bits=bits, shard=p) for p in range(n_shards)}


def make_root(path, n: int = N_ITEMS, n_shards: int = SHARDS) -> tuple[dict[int, Store], np.ndarray]:
    """A root as the workers leave it: in every shard the current model (version 1, the same network), and
    n items encoded with it, item i in shard i % n_shards."""
    stores = shard_stores(path, n_shards)
    net = HashNet(HashNetConfig(bits=32))
    for store in stores.values():
        store.put_model(net.to_bytes(), make_current=True, version=1)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    codes = net.encode(images)
    for i in range(n):
        stores[i % n_shards].write_batch([ItemWrite(f"item-{i}", codes[i].tobytes(), encode_png(images[i]), "image/png",
                                                    (i % 3,))])
    return stores, images


def index_over(path, stores: dict[int, Store], **kw) -> ShardedIndex:
    """The server's ShardedIndex over the test's own handles (LMDB allows one per environment and process)."""
    return ShardedIndex(StoreRoot(path, create=False), open_store=lambda key, _path: stores[key.partition],
                        refresh_interval_s=0.01, **kw)


def settings_for(path, **store) -> Settings:
    return Settings(store={"path": str(path), **store}, server={"refresh_interval_s": 0.01})


def close_all(stores: dict[int, Store]) -> None:
    for store in stores.values():
        store.close()


@contextmanager
def serving(path, **store_settings):
    stores, images = make_root(path)
    app = query.create_app(settings_for(path, **store_settings), index_over(path, stores))
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, images
    finally:
        close_all(stores)


@pytest.fixture
def server(tmp_path):
    with serving(tmp_path) as served:
        yield served


SMALL_VALUES = 64 * 1024


@pytest.fixture
def small_server(tmp_path):
    """max_value_bytes of 64 KiB: bodies past the cap are cheap to send."""
    with serving(tmp_path, max_value_bytes=SMALL_VALUES) as served:
        yield served


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def queries_total(status: str) -> float:
    return m.QUERY_REGISTRY.get_sample_value("streamhash_queries_total", {"endpoint": "/search", "status": status}) or 0.0


def test_a_stored_image_finds_itself(server):
    client, images = server
    r = client.post("/search", json={"image_base64": b64(encode_png(images[3])), "k": N_ITEMS})
    assert r.status_code == 200, r.text
    assert "item-3" in [h["id"] for h in r.json()["results"] if h["distance"] == 0]
    r = client.post("/search", files={"image": ("q.png", encode_png(images[3]), "image/png")}, data={"k": "2"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("image", [
    png_declaring(30000, 30000), real_png(20000, 20000), jpeg_declaring(60000, 60000), npy_declaring((100000, 100000)),
    png_declaring(28, 28), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
], ids=["png-30000", "png-real-20000", "jpeg-60000", "npy-1e10", "png-no-data", "png-garbage"])
@pytest.mark.parametrize("form", ["json", "multipart"])
def test_bombs_and_undecodable_images_are_400(server, image, form):
    client, _ = server
    if form == "json":
        r = client.post("/search", json={"image_base64": b64(image)})
    else:
        r = client.post("/search", files={"image": ("q", image, "application/octet-stream")})
    assert r.status_code == 400, r.text
    assert "query image rejected" in r.json()["detail"]


def test_any_exception_while_decoding_a_query_image_is_400(server, monkeypatch):
    import streamhash.records as records

    def broken(*_):
        raise KeyError("a decoder bug")

    monkeypatch.setattr(records, "_decode_pil", broken)
    client, images = server
    r = client.post("/search", json={"image_base64": b64(encode_png(images[0]))})
    assert r.status_code == 400 and "KeyError" in r.json()["detail"]


def test_oversized_bodies_are_413_before_being_read(small_server):
    client, _ = small_server
    limit = query.max_body_bytes(settings_for("x", max_value_bytes=SMALL_VALUES))
    big = b"{" + b" " * limit + b"}"
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"exceeds the {limit}-byte limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the cap is enforced while streaming
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]
    # a multipart image over max_value_bytes but within the body cap
    r = client.post("/search", files={"image": ("q.png", b"\x89PNG\r\n\x1a\n" + b"0" * SMALL_VALUES, "image/png")})
    assert r.status_code == 413 and "65544 bytes exceeds the 65536-byte limit" in r.json()["detail"]


def test_a_body_within_the_cap_still_works_chunked(server):
    client, images = server

    def chunks():
        body = ('{"k": 2, "image_base64": "%s"}' % b64(encode_png(images[1]))).encode()
        for i in range(0, len(body), 100):
            yield body[i:i + 100]

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_content_length_that_is_not_a_number_is_400(server):
    client, _ = server
    r = client.post("/search", content=b'{"code_hex":"00000000"}',
                    headers={"content-type": "application/json", "content-length": "-1"})
    assert r.status_code == 400 and "Content-Length" in r.json()["detail"]


def test_a_huge_radius_means_everything(server):
    client, _ = server
    r = client.post("/search", json={"code_hex": "00000000", "k": N_ITEMS, "radius": 10**30})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == N_ITEMS


@pytest.mark.parametrize("path,status,fragment", [
    ("/items/", 400, "1 to 256 bytes"),
    ("/items/" + "x" * 257, 400, "got 257 bytes"),
    ("/items/" + "x" * 600, 400, "got 600 bytes"),  # past LMDB's 511-byte key limit
    ("/items/" + "\u00e9" * 129, 400, "got 258 bytes"),  # 129 characters, 258 bytes
    ("/items/" + "x" * 256, 404, "no item"),
    ("/items/no-such-id", 404, "no item"),
])
def test_item_ids_outside_the_contract_are_4xx(server, path, status, fragment):
    client, _ = server
    r = client.get(path)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_items_are_served_from_the_shard_holding_them(server):
    client, _ = server
    for i in (4, 5):
        r = client.get(f"/items/item-{i}")
        assert r.status_code == 200 and r.json()["labels"] == [i % 3] and r.json()["visible"] in (True, False)
        assert r.json()["shard"] == f"images/{i % SHARDS}"


def test_every_search_response_is_counted_by_status(small_server, monkeypatch):
    client, _ = small_server
    before = {s: queries_total(s) for s in ("200", "400", "413", "405", "500")}
    assert client.post("/search", json={"code_hex": "00000000"}).status_code == 200
    assert client.post("/search", json={"code_hex": "0"}).status_code == 400
    assert client.post("/search", content=b"x" * 200_000, headers={"content-type": "application/json"}).status_code == 413
    assert client.get("/search").status_code == 405

    def broken(*_):
        raise RuntimeError("a ranking bug")

    monkeypatch.setattr(View, "rank", broken)
    assert client.post("/search", json={"code_hex": "00000000"}).status_code == 500
    after = {s: queries_total(s) for s in before}
    assert {s: after[s] - before[s] for s in before} == {"200": 1, "400": 1, "413": 1, "405": 1, "500": 1}


def test_other_paths_are_not_counted_as_searches(server):
    client, _ = server
    before = sum(s.value for f in m.QUERY_REGISTRY.collect() if f.name == "streamhash_queries" for s in f.samples
                 if s.name == "streamhash_queries_total")
    client.get("/items/")
    client.get("/healthz")
    after = sum(s.value for f in m.QUERY_REGISTRY.collect() if f.name == "streamhash_queries" for s in f.samples
                if s.name == "streamhash_queries_total")
    assert after == before


def test_metrics_page_has_query_metrics_only(server):
    client, _ = server
    text = client.get("/metrics").text
    assert "streamhash_queries_total" in text and "process_start_time_seconds" in text and 'streamhash_index_items{process="query"}' in text
    for worker_only in ("streamhash_reencode_triggers_total", "streamhash_learning_rounds_total",
                        "streamhash_consumer_lag_messages", "streamhash_index_mi", "streamhash_messages_consumed_total"):
        assert worker_only not in text


@pytest.mark.parametrize("body", [{}, {"code_hex": "00000000", "item_id": "item-1"},
                                  {"image_base64": "AA==", "code_hex": "00000000", "item_id": "item-1"}])
def test_a_search_names_exactly_one_of_three_sources(server, body):
    client, _ = server
    r = client.post("/search", json=body)
    assert r.status_code == 400 and "exactly one of image_base64, code_hex or item_id" in r.json()["detail"]


def _tied_root(path, n: int = 400, n_shards: int = 3) -> tuple[dict[int, Store], np.ndarray]:
    """n items over 3 shards whose 32-bit codes take only 12 values: nearly every top-k ends inside a run of
    ties, which the merge breaks by shard, then by insertion."""
    stores = shard_stores(path, n_shards)
    for store in stores.values():
        store.put_model(HashNet(HashNetConfig(bits=32)).to_bytes(), make_current=True, version=1)
    rng = np.random.default_rng(7)
    distinct = rng.integers(0, 256, (12, 4), dtype=np.uint8)
    codes = distinct[rng.integers(0, len(distinct), n)]
    where = rng.integers(0, n_shards, n)
    for i in range(n):
        stores[int(where[i])].write_batch([ItemWrite(f"t-{i}", codes[i].tobytes(), b"", "image/png", (i % 5,))])
    return stores, codes


def brute_hits(stores: dict[int, Store], q: np.ndarray, k: int, radius: int | None = None) -> list[tuple[str, int, str]]:
    """(id, distance, shard) of the first k items by (distance, shard, seq) over every shard's snapshot."""
    rows = []
    for p in sorted(stores):
        snap = stores[p].snapshot()
        dist = hamming_brute(q[None], snap.codes)[0]
        rows += [(int(d), p, int(seq), item_id) for d, seq, item_id in zip(dist, snap.seqs, snap.ids)]
    rows.sort()
    return [(item_id, d, f"{TOPIC}/{p}") for d, p, _, item_id in rows if radius is None or d < radius][:k]


def one_by_one_then_together(path, stores, bodies):
    """The answers of an unbatched server taking ``bodies`` one at a time, those of a batched server taking
    them 16 at once (a window makes sure they really meet in batches), and the batched app."""
    from concurrent.futures import ThreadPoolExecutor

    strip = lambda r: {key: v for key, v in r.json().items() if key != "took_ms"}  # noqa: E731
    plain = query.create_app(Settings(store={"path": str(path)}, server={"batch_enabled": False}), index_over(path, stores))
    with TestClient(plain) as client:
        expected = [strip(client.post("/search", json=b)) for b in bodies]
    batched = query.create_app(Settings(store={"path": str(path)}, server={"batch_window_s": 0.02, "batch_max": 32}),
                               index_over(path, stores))
    with TestClient(batched) as client:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda b: client.post("/search", json=b), bodies))
    assert all(r.status_code == 200 for r in got), [r.text for r in got if r.status_code != 200][:3]
    return expected, [strip(r) for r in got], batched


def test_concurrent_searches_are_batched_and_answer_exactly_as_one_by_one(tmp_path):
    stores, codes = _tied_root(tmp_path)
    rng = np.random.default_rng(3)
    bodies = []
    for i in range(120):
        k = int(rng.integers(1, 60))
        if i % 5 == 0:
            bodies.append({"item_id": f"t-{int(rng.integers(0, len(codes)))}", "k": k})
        elif i % 7 == 0:
            bodies.append({"code_hex": codes[i].tobytes().hex(), "k": k, "radius": int(rng.integers(0, 20))})
        else:
            bodies.append({"code_hex": rng.integers(0, 256, 4, dtype=np.uint8).tobytes().hex(), "k": k})
    try:
        expected, got, batched = one_by_one_then_together(tmp_path, stores, bodies)
        assert got == expected
        batcher = batched.state.batcher
        assert batcher.requests == sum(1 for b in bodies if "radius" not in b)
        assert batcher.batches < batcher.requests  # some requests shared a kernel call
        # and each answer is brute force over the union of the shards, in the documented order
        for b, r in zip(bodies, expected):
            assert r["index_size"] == len(codes) and r["partial"] is False
            assert [(s["shard"], s["answered"], s["index_size"]) for s in r["shards"]] == \
                [(f"{TOPIC}/{p}", True, stores[p].count()) for p in range(3)]
            hits = [(h["id"], h["distance"], h["shard"]) for h in r["results"]]
            if "code_hex" in b:
                q = np.frombuffer(bytes.fromhex(b["code_hex"]), np.uint8)
                assert hits == brute_hits(stores, q, b["k"], b.get("radius"))
            else:  # by item: the item first, then the others in order
                q = codes[int(b["item_id"][2:])]
                want = brute_hits(stores, q, len(codes))
                want = ([h for h in want if h[0] == b["item_id"]] + [h for h in want if h[0] != b["item_id"]])[:b["k"]]
                assert hits == want
    finally:
        close_all(stores)


def test_concurrent_image_searches_share_encode_calls_and_answer_as_one_by_one(tmp_path):
    """Image queries arriving together are encoded in one call per model version (as their rankings share
    a kernel call): the same codes and hits as one at a time, in fewer encode calls than requests."""
    stores, images = make_root(tmp_path, n=40)
    rng = np.random.default_rng(4)
    bodies = [{"image_base64": b64(encode_png(images[int(rng.integers(0, 40))])), "k": int(rng.integers(1, 40))}
              for _ in range(60)]
    try:
        expected, got, batched = one_by_one_then_together(tmp_path, stores, bodies)
        assert got == expected
        encodes = batched.state.encodes
        assert encodes.requests == len(bodies) and encodes.batches < encodes.requests
    finally:
        close_all(stores)


def test_an_undecodable_image_fails_alone_in_its_encode_batch(tmp_path, monkeypatch):
    """Small query images are decoded in their encode batch, large ones before it: a bad one gets its own 400,
    and the good ones it shared the batch with get the answers they get alone."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, PngImagePlugin

    from streamhash.services.query_codes import QueryEncoder

    stores, images = make_root(tmp_path, n=40)
    bodies = [{"image_base64": b64(encode_png(images[i])), "k": 7} for i in range(16)]
    for i in (1, 5, 9, 13):
        bodies[i] = {"image_base64": b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "k": 7}
    padding = PngImagePlugin.PngInfo()  # images[0]'s pixels in a file past DECODE_IN_BATCH_BYTES
    padding.add_text("padding", "x" * query.DECODE_IN_BATCH_BYTES)
    large = io.BytesIO()
    Image.fromarray(images[0]).save(large, "PNG", pnginfo=padding)
    assert len(large.getvalue()) > query.DECODE_IN_BATCH_BYTES
    bodies.append({"image_base64": b64(large.getvalue()), "k": 7})
    bodies.append({"image_base64": b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * query.DECODE_IN_BATCH_BYTES), "k": 7})
    batches = []
    original = QueryEncoder.for_uploads
    monkeypatch.setattr(QueryEncoder, "for_uploads", lambda self, uploads, view:
                        batches.append([isinstance(u, bytes) for u in uploads]) or original(self, uploads, view))
    strip = lambda r: {key: v for key, v in r.json().items() if key != "took_ms"}  # noqa: E731
    try:
        alone = query.create_app(Settings(store={"path": str(tmp_path)}, server={"batch_enabled": False}),
                                 index_over(tmp_path, stores))
        with TestClient(alone) as client:
            expected = [strip(client.post("/search", json=b)) for b in bodies]
        assert [i for i, want in enumerate(expected) if "detail" in want] == [1, 5, 9, 13, 17]
        assert expected[16] == expected[0]  # the large file: the same pixels, the same answer
        batched = query.create_app(Settings(store={"path": str(tmp_path)}, server={"batch_window_s": 0.05}),
                                   index_over(tmp_path, stores))
        with TestClient(batched) as client, ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(lambda b: client.post("/search", json=b), bodies))
        assert max(map(len, batches)) > 1  # images met in a batch
        # the 16 small files reached the batches undecoded, the large good one decoded (the large bad one never did)
        assert sorted(sum(batches, [])) == [False] + [True] * 16
        for want, r in zip(expected, got):
            if "detail" in want:
                assert r.status_code == 400 and "query image rejected" in r.json()["detail"]
            else:
                assert r.status_code == 200 and strip(r) == want
    finally:
        close_all(stores)


def _two_generations(path) -> tuple[dict[int, Store], np.ndarray, HashNet, HashNet]:
    """A rolling re-encode half done: shard 0 serves generation 1 (network v1), shard 1 has been re-encoded
    into generation 2 by network v2 (a different network: another code space)."""
    stores = shard_stores(path)
    net1, net2 = HashNet(HashNetConfig(bits=32, seed=1)), HashNet(HashNetConfig(bits=32, seed=2))
    images = np.random.default_rng(5).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    for p, store in stores.items():
        store.put_model(net1.to_bytes(), make_current=True, version=1)
        mine = list(range(p, len(images), 2))
        store.write_batch([ItemWrite(f"g-{i}", net1.encode(images[i:i + 1])[0].tobytes(), encode_png(images[i]),
                                     "image/png", (i % 3,)) for i in mine])
    store = stores[1]
    store.put_model(net2.to_bytes(), version=2)
    gen, _ = store.begin_generation()
    ids = [f"g-{i}" for i in range(1, len(images), 2)]
    store.put_generation_codes(gen, ids, net2.encode(images[1::2]))
    store.swap_generation(gen, 2, [], np.zeros((0, 4), np.uint8))
    return stores, images, net1, net2


def test_during_a_rolling_reencode_each_shard_is_ranked_with_its_own_model(tmp_path):
    stores, images, net1, net2 = _two_generations(tmp_path)
    codes = {0: net1.encode(images[0::2]), 1: net2.encode(images[1::2])}  # what each shard holds
    ids = {0: [f"g-{i}" for i in range(0, 12, 2)], 1: [f"g-{i}" for i in range(1, 12, 2)]}

    def expected(q_by_shard):
        rows = sorted((int(d), p, n) for p in (0, 1) for n, d in enumerate(hamming_brute(q_by_shard[p][None], codes[p])[0]))
        return [(ids[p][n], d, f"{TOPIC}/{p}") for d, p, n in rows]

    try:
        app = query.create_app(settings_for(tmp_path), index_over(tmp_path, stores))
        with TestClient(app) as client:
            r = client.post("/search", json={"image_base64": b64(encode_png(images[3])), "k": 12}).json()
            q1, q2 = net1.encode(images[3:4])[0], net2.encode(images[3:4])[0]
            assert [(h["id"], h["distance"], h["shard"]) for h in r["results"]] == expected({0: q1, 1: q2})
            assert ("g-3", 0) in [(h["id"], h["distance"]) for h in r["results"]]  # in shard 1, by v2's code
            assert (r["model_version"], r["generation"], r["code_hex"], r["partial"]) == (2, 2, q2.tobytes().hex(), False)
            assert [(s["shard"], s["generation"], s["model_version"]) for s in r["shards"]] == \
                [(f"{TOPIC}/0", 1, 1), (f"{TOPIC}/1", 2, 2)]
            # by a stored item of shard 0: its code there, its image encoded by v2 for shard 1
            r = client.post("/search", json={"item_id": "g-4", "k": 12}).json()
            want = expected({0: codes[0][2], 1: net2.encode(images[4:5])[0]})
            want = [h for h in want if h[0] == "g-4"] + [h for h in want if h[0] != "g-4"]
            assert [(h["id"], h["distance"], h["shard"]) for h in r["results"]] == want
            health = client.get("/healthz").json()
            assert (health["generation"], health["model_version"], health["index_size"]) == (2, 2, 12)
            assert [(s["shard"], s["generation"], s["model_version"]) for s in health["shards"]] == \
                [(f"{TOPIC}/0", 1, 1), (f"{TOPIC}/1", 2, 2)]
    finally:
        close_all(stores)


def test_a_shard_whose_model_is_missing_is_named_and_the_answer_is_partial(tmp_path):
    stores, images = make_root(tmp_path, n_shards=1)
    late = Store(StoreRoot(tmp_path).shard_path(ShardKey(TOPIC, 1)), bits=32, shard=1)  # items, no model yet
    late.write_batch([ItemWrite("orphan", bytes(4), b"", "image/png", None)])
    stores[1] = late
    try:
        app = query.create_app(settings_for(tmp_path), index_over(tmp_path, stores))
        with TestClient(app) as client:
            r = client.post("/search", json={"image_base64": b64(encode_png(images[2])), "k": 20}).json()
            assert r["partial"] is True and "orphan" not in [h["id"] for h in r["results"]]
            assert ("item-2", 0) in [(h["id"], h["distance"]) for h in r["results"]] and len(r["results"]) == N_ITEMS
            assert [(s["shard"], s["answered"]) for s in r["shards"]] == [(f"{TOPIC}/0", True), (f"{TOPIC}/1", False)]
            assert "no model" in r["shards"][1]["error"]
            r = client.post("/search", json={"code_hex": "00000000", "k": 20}).json()  # a code needs no model
            assert r["partial"] is False and "orphan" in [h["id"] for h in r["results"]]
    finally:
        close_all(stores)


def test_settings_for_workers_round_trip_through_the_environment(tmp_path, monkeypatch):
    close_all(make_root(tmp_path)[0])  # closed: the app opens the shards read-only itself
    s = Settings(store={"path": str(tmp_path)}, server={"workers": 3, "batch_max": 7, "refresh_interval_s": 0.01})
    monkeypatch.setenv(query.SETTINGS_ENV, s.model_dump_json(exclude={"kafka"}))
    monkeypatch.setattr(query, "_prepare_process", lambda _settings: None)  # leave this process's torch threads alone
    app = query.app_from_env()
    try:
        assert app.state.batcher.max_batch == 7
        with TestClient(app) as client:
            r = client.post("/search", json={"code_hex": "00000000", "k": 3})
            assert r.status_code == 200 and len(r.json()["results"]) == 3
            assert [sh["shard"] for sh in r.json()["shards"]] == [f"{TOPIC}/0", f"{TOPIC}/1"]
    finally:
        app.state.index.close()


def test_a_legacy_store_is_refused_and_a_missing_root_waited_for(tmp_path):
    import time

    close_all({0: Store(tmp_path / "old", bits=32)})  # data.mdb directly under the path: before shards
    t0 = time.monotonic()
    assert query._open_root(Settings(store={"path": str(tmp_path / "old")}, server={"store_wait_s": 30})) is None
    assert time.monotonic() - t0 < 5  # refused at once, with what to do: waiting would not help
    assert query._open_root(Settings(store={"path": str(tmp_path / "none")}, server={"store_wait_s": 0.2})) is None
    StoreRoot(tmp_path / "new")
    assert query._open_root(Settings(store={"path": str(tmp_path / "new")})).path == tmp_path / "new"


def test_the_server_exempts_its_start_up_objects_from_garbage_collection(tmp_path):
    """Full collections walked every object start-up left (torch, FastAPI, the network): under 8 connections
    the p99 was 78 ms with the collector, 7 ms without (RESULTS, "Serving")."""
    import gc

    gc.unfreeze()
    try:
        with serving(tmp_path) as (client, _images):
            assert client.get("/healthz").status_code == 200
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()  # the test process's objects go back to the collector


def test_a_json_search_is_answered_ahead_of_fastapis_layers(tmp_path):
    """FastAPI's middleware, routing and dependency layers cost more than ranking a search by code (RESULTS,
    "Serving"): a JSON search skips them with the same contract; multipart searches and other paths go through."""
    seen = []

    class Spy:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                seen.append((scope["method"], scope["path"]))
            await self.app(scope, receive, send)

    stores, images = make_root(tmp_path)
    app = query.create_app(settings_for(tmp_path), index_over(tmp_path, stores))
    app.add_middleware(Spy)
    try:
        with TestClient(app) as client:
            r = client.post("/search", json={"code_hex": "00000000", "k": 3})
            assert r.status_code == 200 and len(r.json()["results"]) == 3
            assert r.headers["content-type"] == "application/json"
            assert client.post("/search", content=b'{"code_hex": 5}').status_code == 400  # no content type: JSON
            r = client.post("/search", json={"item_id": "no-such-item"})
            assert r.status_code == 404 and "no item" in r.json()["detail"]
            assert seen == []
            r = client.post("/search", files={"image": ("q.png", encode_png(images[1]), "image/png")}, data={"k": "2"})
            assert r.status_code == 200 and len(r.json()["results"]) == 2
            assert client.get("/healthz").status_code == 200
            assert client.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"].keys() == \
                {"application/json", "multipart/form-data"}
            assert seen == [("POST", "/search"), ("GET", "/healthz"), ("GET", "/openapi.json")]
    finally:
        close_all(stores)


def test_searches_are_ranked_on_the_event_loops_thread_by_default(tmp_path, monkeypatch):
    """No hand-off to a thread and back per batch (it cost more than a small search's ranking)."""
    import threading

    rank, ranked_on, loop_thread = View.rank, [], []

    def spy_rank(*a):
        ranked_on.append(threading.get_ident())
        return rank(*a)

    monkeypatch.setattr(View, "rank", spy_rank)
    stores, _ = make_root(tmp_path)
    app = query.create_app(settings_for(tmp_path), index_over(tmp_path, stores))

    @app.middleware("http")
    async def note_loop_thread(request, call_next):  # middleware runs on the event loop
        loop_thread.append(threading.get_ident())
        return await call_next(request)

    try:
        with TestClient(app) as client:
            assert client.post("/search", json={"code_hex": "00000000", "k": 3}).status_code == 200
            assert client.get("/healthz").status_code == 200
        assert ranked_on and set(ranked_on) == set(loop_thread)
    finally:
        close_all(stores)


@pytest.mark.parametrize("batched", [True, False])
def test_every_search_path_ranks_through_the_index(tmp_path, monkeypatch, batched):
    """JSON (the lean path), multipart (FastAPI's route), batched or not, top-k or radius: one method ranks
    them all (View.rank), and each answers with the hits that method returns for its query."""
    calls = []
    rank = View.rank

    def spy_rank(view, codes, ks, radius=None):
        hits = rank(view, codes, ks, radius)
        calls.append((len(codes), radius, hits[0]))
        return hits

    monkeypatch.setattr(View, "rank", spy_rank)
    stores, images = make_root(tmp_path)
    settings = Settings(store={"path": str(tmp_path)}, server={"refresh_interval_s": 0.01, "batch_enabled": batched})
    app = query.create_app(settings, index_over(tmp_path, stores))
    try:
        with TestClient(app) as client:
            answers = [client.post("/search", json={"code_hex": "00000000", "k": 3}),
                       client.post("/search", json={"code_hex": "00000000", "k": 30, "radius": 20}),
                       client.post("/search", files={"image": ("q.png", encode_png(images[3]), "image/png")}, data={"k": "2"})]
        assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
        assert [(n, radius) for n, radius, _ in calls] == [(1, None), (1, 20), (1, None)]
        for r, (_, _, hits) in zip(answers, calls):
            assert [(h["id"], h["distance"], h["shard"]) for h in r.json()["results"]] == \
                [(h["id"], h["distance"], h["shard"]) for h in hits]
        assert calls[2][2][0]["distance"] == 0  # the stored image's code: itself (or a tie) first
    finally:
        close_all(stores)
