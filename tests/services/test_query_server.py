"""The query server in-process (no broker, no worker): over a real LMDB store with a model and a few items,
every client mistake is a 4xx with a message, and every /search response is counted by status."""

from __future__ import annotations

import base64
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

import streamhash.services.query as query
from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.index.store import ItemWrite, Store
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import encode_png
from tests.test_records import jpeg_declaring, npy_declaring, png_declaring, real_png

N_ITEMS = 8


def make_store(path, n: int = N_ITEMS) -> tuple[Store, np.ndarray]:
    """A store as a worker leaves it: a current model, and n items encoded with it."""
    store = Store(path, bits=32)
    net = HashNet(HashNetConfig(bits=32))
    store.put_model(net.to_bytes(), make_current=True)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    codes = net.encode(images)
    store.write_batch([ItemWrite(f"item-{i}", codes[i].tobytes(), encode_png(images[i]), "image/png", (i % 3,))
                       for i in range(n)])
    return store, images


def settings_for(path, **store) -> Settings:
    return Settings(store={"path": str(path), **store}, server={"refresh_interval_s": 0.01})


@contextmanager
def serving(path, **store_settings):
    store, images = make_store(path)
    app = query.create_app(settings_for(path, **store_settings), store)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, images
    finally:
        store.close()


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


def test_items_are_served(server):
    client, _ = server
    r = client.get("/items/item-4")
    assert r.status_code == 200 and r.json()["labels"] == [1] and r.json()["visible"] in (True, False)


def test_every_search_response_is_counted_by_status(small_server, monkeypatch):
    client, _ = small_server
    before = {s: queries_total(s) for s in ("200", "400", "413", "405", "500")}
    assert client.post("/search", json={"code_hex": "00000000"}).status_code == 200
    assert client.post("/search", json={"code_hex": "0"}).status_code == 400
    assert client.post("/search", content=b"x" * 200_000, headers={"content-type": "application/json"}).status_code == 413
    assert client.get("/search").status_code == 405

    def broken(*_):
        raise RuntimeError("a ranking bug")

    monkeypatch.setattr(query, "_rank", broken)
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


def _tied_store(path, n: int = 400) -> tuple[Store, np.ndarray]:
    """n items whose 32-bit codes take only 12 values: nearly every top-k ends inside a run of ties."""
    store = Store(path, bits=32)
    store.put_model(HashNet(HashNetConfig(bits=32)).to_bytes(), make_current=True)
    rng = np.random.default_rng(7)
    distinct = rng.integers(0, 256, (12, 4), dtype=np.uint8)
    codes = distinct[rng.integers(0, len(distinct), n)]
    store.write_batch([ItemWrite(f"t-{i}", codes[i].tobytes(), b"", "image/png", (i % 5,)) for i in range(n)])
    return store, codes


def test_concurrent_searches_are_batched_and_answer_exactly_as_one_by_one(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store, codes = _tied_store(tmp_path)
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
    strip = lambda r: {key: v for key, v in r.json().items() if key != "took_ms"}  # noqa: E731
    try:
        plain = query.create_app(Settings(store={"path": str(tmp_path)}, server={"batch_enabled": False}), store)
        with TestClient(plain) as client:
            expected = [strip(client.post("/search", json=b)) for b in bodies]
        # a window makes sure the concurrent requests really meet in batches
        batched = query.create_app(Settings(store={"path": str(tmp_path)},
                                            server={"batch_window_s": 0.02, "batch_max": 32}), store)
        with TestClient(batched) as client:
            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(lambda b: client.post("/search", json=b), bodies))
            assert all(r.status_code == 200 for r in got), [r.text for r in got if r.status_code != 200][:3]
            assert [strip(r) for r in got] == expected
            batcher = batched.state.batcher
            assert batcher.requests == sum(1 for b in bodies if "radius" not in b)
            assert batcher.batches < batcher.requests  # some requests shared a kernel call
            # and the top-k of each is the kernel's own answer at that k
            g = batched.state.live.current
            for b, r in zip(bodies, expected):
                if "code_hex" in b and "radius" not in b:
                    _, I = g.index.search(np.frombuffer(bytes.fromhex(b["code_hex"]), np.uint8)[None], b["k"])
                    assert [h["id"] for h in r["results"]] == [item_id for item_id, _ in g.resolve(I[0][I[0] >= 0])]
    finally:
        store.close()


def test_settings_for_workers_round_trip_through_the_environment(tmp_path, monkeypatch):
    store, _ = make_store(tmp_path)
    store.close()
    s = Settings(store={"path": str(tmp_path)}, server={"workers": 3, "batch_max": 7, "refresh_interval_s": 0.01})
    monkeypatch.setenv(query.SETTINGS_ENV, s.model_dump_json(exclude={"kafka"}))
    monkeypatch.setattr(query, "_prepare_process", lambda _settings: None)  # leave this process's torch threads alone
    app = query.app_from_env()
    try:
        assert app.state.batcher.max_batch == 7
        with TestClient(app) as client:
            r = client.post("/search", json={"code_hex": "00000000", "k": 3})
            assert r.status_code == 200 and len(r.json()["results"]) == 3
    finally:
        app.state.store.close()
