"""The router on real processes: two ``streamhash serve`` over two store roots (shards images/0-1 and
images/2-3), a ``streamhash serve --shards URL,URL`` over them, and a third server over one root holding
all four shards. Merged answers equal the one server's; a server that stops answering (SIGSTOP: the
timeout) or is gone (connection refused) leaves a 200 that says partial and names it, within the timeout;
none left is 503."""

from __future__ import annotations

import base64
import os
import signal
import time

import httpx
import numpy as np
import pytest

from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.kafka.broker import free_port
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import encode_png
from streamhash.services.processes import scrape, spawn
from tests.support import stop, wait_http

pytestmark = pytest.mark.integration

TIMEOUT_S = 3.0  # the router's per-shard timeout: the servers share 2 busy cores with the tests
N = 240


def build_roots(tmp) -> tuple[dict, np.ndarray, np.ndarray]:
    """Roots a (partitions 0, 1), b (2, 3) and union (0-3), each shard written identically wherever it is, with
    one network (version 1) and codes from 10 values plus image items: ties across shards everywhere."""
    roots = {name: StoreRoot(tmp / name) for name in ("a", "b", "union")}
    net = HashNet(HashNetConfig(bits=32))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 28, 28), dtype=np.uint8)
    codes = net.encode(images)
    codes[: N // 2] = rng.integers(0, 256, (10, 4), dtype=np.uint8)[rng.integers(0, 10, N // 2)]
    where = rng.integers(0, 4, N)
    for p in range(4):
        items = [ItemWrite(f"it-{i}", codes[i].tobytes(), encode_png(images[i]), "image/png", (int(i) % 7,))
                 for i in np.flatnonzero(where == p)]
        for name in ("a" if p < 2 else "b", "union"):
            store = Store(roots[name].shard_path(ShardKey("images", p)), bits=32, shard=p)
            store.put_model(net.to_bytes(), make_current=True, version=1)
            store.write_batch(items[: len(items) // 2])
            store.write_batch(items[len(items) // 2:])
            store.close()
    return roots, images, codes


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    roots, images, codes = build_roots(tmp)
    procs, urls = {}, {}
    try:
        for name in ("a", "b", "union"):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            procs[name] = spawn(["serve", "--store", str(roots[name].path), "--port", str(port)], env={},
                                log_path=tmp / f"serve-{name}.log")
        port = free_port()
        urls["router"] = f"http://127.0.0.1:{port}"
        procs["router"] = spawn(["serve", "--shards", f"{urls['a']},{urls['b']}", "--shard-timeout-s", str(TIMEOUT_S),
                                 "--port", str(port)], env={}, log_path=tmp / "router.log")
        for name in ("a", "b", "union", "router"):
            wait_http(f"{urls[name]}/healthz", 120, procs[name], tmp / ("router.log" if name == "router" else f"serve-{name}.log"))
        yield {"urls": urls, "procs": procs, "images": images, "codes": codes}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            stop(proc)


def bodies(images, codes) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(0, N, 17):
        out.append({"code_hex": codes[i].tobytes().hex(), "k": int(rng.integers(1, 80))})
        out.append({"code_hex": codes[i].tobytes().hex(), "k": 50, "radius": int(rng.integers(0, 12))})
        out.append({"item_id": f"it-{i}", "k": int(rng.integers(1, 40))})
    for i in (3, N - 5):
        out.append({"image_base64": base64.b64encode(encode_png(images[i])).decode(), "k": 30})
    return out


def post(url: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}/search", timeout=30, **kw)


def hits(r: httpx.Response) -> list[tuple]:
    return [(h["id"], h["distance"], h["shard"]) for h in r.json()["results"]]


def test_merged_answers_equal_one_server_over_the_union(system):
    urls, images, codes = system["urls"], system["images"], system["codes"]
    for body in bodies(images, codes):
        want, got = post(urls["union"], json=body), post(urls["router"], json=body)
        assert want.status_code == got.status_code == 200, (want.text, got.text)
        assert hits(got) == hits(want), body
        w, g = want.json(), got.json()
        assert (g["index_size"], g["model_version"], g["generation"], g["partial"]) == (N, 1, 1, False)
        assert (w["index_size"], w["model_version"], w["generation"]) == (N, 1, 1)
        assert [{k: v for k, v in s.items() if k != "url"} for s in g["shards"]] == w["shards"]
        assert [s["url"] for s in g["shards"]] == [urls["a"]] * 2 + [urls["b"]] * 2
    files = {"image": ("q.png", encode_png(images[9]), "image/png")}
    want, got = post(urls["union"], files=files, data={"k": "25"}), post(urls["router"], files=files, data={"k": "25"})
    assert got.status_code == 200 and hits(got) == hits(want)
    # the remotes' refusals come back as they are; an item nobody holds is 404
    assert post(urls["router"], json={"code_hex": "00"}).status_code == 400
    assert post(urls["router"], json={"item_id": "nobody"}).status_code == 404
    item = httpx.get(f"{urls['router']}/items/it-7", timeout=10).json()
    assert item["id"] == "it-7" and item["url"] in (urls["a"], urls["b"])


def test_a_server_that_stops_answering_is_named_within_the_timeout(system):
    urls, procs, codes = system["urls"], system["procs"], system["codes"]
    body = {"code_hex": codes[0].tobytes().hex(), "k": 60}
    alone = post(urls["a"], json=body)
    os.kill(procs["b"].pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        t0 = time.monotonic()
        r = post(urls["router"], json=body)
        took = time.monotonic() - t0
    finally:
        os.kill(procs["b"].pid, signal.SIGCONT)
    assert r.status_code == 200 and TIMEOUT_S * 0.9 <= took < TIMEOUT_S + 2.0, (r.status_code, took)
    res = r.json()
    assert res["partial"] is True and hits(r) == hits(alone)
    assert res["shards"][-1] == {"url": urls["b"], "answered": False, "error": "timeout"}
    assert [s["shard"] for s in res["shards"][:-1]] == ["images/0", "images/1"]
    assert res["index_size"] == alone.json()["index_size"]
    assert post(urls["router"], json=body).json()["partial"] is False  # answering again: whole again
    samples = scrape(f"{urls['router']}/metrics")
    assert samples['streamhash_router_shard_requests_total{result="timeout",shard="1"}'] >= 1
    assert samples['streamhash_router_shard_requests_total{result="ok",shard="0"}'] >= 2


def test_a_server_gone_is_named_and_none_left_is_503(system):
    urls, procs, codes = system["urls"], system["procs"], system["codes"]
    body = {"code_hex": codes[5].tobytes().hex(), "k": 20}
    alone = post(urls["b"], json=body)
    stop(procs["a"])
    t0 = time.monotonic()
    r = post(urls["router"], json=body)
    assert r.status_code == 200 and time.monotonic() - t0 < TIMEOUT_S
    res = r.json()
    assert res["partial"] is True and hits(r) == hits(alone)
    assert res["shards"][0]["url"] == urls["a"] and res["shards"][0]["answered"] is False
    assert "Connect" in res["shards"][0]["error"]
    health = httpx.get(f"{urls['router']}/healthz", timeout=10).json()
    assert health["status"] == "partial" and health["partial"] is True
    stop(procs["b"])
    r = post(urls["router"], json=body)
    assert r.status_code == 503 and r.json()["partial"] is True and len(r.json()["shards"]) == 2
    assert httpx.get(f"{urls['router']}/healthz", timeout=10).status_code == 503
    samples = scrape(f"{urls['router']}/metrics")
    assert samples['streamhash_router_shard_requests_total{result="error",shard="0"}'] >= 1
