"""Queries find partitions through Kafka, on real processes and a real broker: query servers over three store
roots advertise what they serve (a: partitions 0-1, b: 2-3, c: a fenced stale copy of 1 and a restoring copy of
3) and ``streamhash serve --discover`` routes each partition to one of them with no list of servers. Searches
equal brute force over every id, each id once; a forged advert is refused and counted; stopping b makes the
answers partial (2 unserved, 3 only restoring), starting it again makes them whole; killing it (no tombstone)
takes it off the map after the TTL."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.kafka.broker import free_port
from streamhash.kafka.directory import Advert
from streamhash.kafka.produce import make_producer
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import encode_png
from streamhash.services.processes import scrape, spawn
from tests.support import module_kafka, stop, wait_for, wait_http

pytestmark = pytest.mark.integration

N, BITS = 200, 32
KEY = "discovery-test-key"


def write_shard(root: StoreRoot, topic: str, p: int, net, rows: list[tuple[str, bytes, bytes]], meta: dict) -> None:
    store = Store(root.shard_path(ShardKey(topic, p)), bits=BITS, shard=p)
    store.put_model(net.to_bytes(), make_current=True, version=1)
    store.write_batch([ItemWrite(i, code, png, "image/png", (n % 5,)) for n, (i, code, png) in enumerate(rows)])
    if meta:
        store._write(lambda txn: store._put_meta(txn, meta))
    store.close()


def build(tmp, topic: str) -> dict:
    """Roots a, b, c and the truth: each id's code and partition, in insertion order per partition."""
    net = HashNet(HashNetConfig(bits=BITS))
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (N, 28, 28), dtype=np.uint8)
    codes = rng.integers(0, 256, (12, BITS // 8), dtype=np.uint8)[rng.integers(0, 12, N)]  # many ties
    where = rng.integers(0, 4, N)
    rows = {p: [(f"it-{i}", codes[i].tobytes(), encode_png(images[i])) for i in np.flatnonzero(where == p)]
            for p in range(4)}
    roots = {name: StoreRoot(tmp / name) for name in "abc"}
    for p in range(4):
        write_shard(roots["a" if p < 2 else "b"], topic, p, net, rows[p], {})
    stale = [(f"stale-{j}", codes[j].tobytes(), encode_png(images[j])) for j in range(5)]
    write_shard(roots["c"], topic, 1, net, rows[1] + stale, {"fenced": True})  # moved away: never routed
    write_shard(roots["c"], topic, 3, net, rows[3][: len(rows[3]) // 2], {"restoring": True})
    truth = [(i, code, p, n) for p in range(4) for n, (i, code, _) in enumerate(rows[p])]
    return {"roots": roots, "truth": truth, "codes": codes, "rows": rows, "images": images}


def brute_force(truth, query: bytes, k: int) -> list[tuple[str, int]]:
    """The top k (id, distance) by distance, then partition, then insertion: one index over every shard."""
    q = np.frombuffer(query, np.uint8)
    scored = [(int(np.unpackbits(np.frombuffer(code, np.uint8) ^ q).sum()), p, n, i) for i, code, p, n in truth]
    return [(i, d) for d, _, _, i in sorted(scored)[:k]]


def serve_env(kafka) -> dict:
    return {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": kafka.topic,
            "STREAMHASH_SECURITY__MODEL_KEY": KEY, "STREAMHASH_SERVER__ADVERTISE_INTERVAL_S": "0.5",
            "STREAMHASH_SERVER__ADVERTISE_TTL_S": "5", "STREAMHASH_SERVER__SHARD_TIMEOUT_S": "5"}


def start_server(system, name: str, wait: bool = True):
    port = system["ports"][name]
    proc = spawn(["serve", "--store", str(system["roots"][name].path), "--port", str(port),
                  "--advertise-url", f"http://127.0.0.1:{port}"], env=system["env"], log_path=system["tmp"] / f"{name}.log")
    system["procs"][name] = proc
    if wait:
        wait_http(f"http://127.0.0.1:{port}/healthz", 120, proc, system["tmp"] / f"{name}.log")


@pytest.fixture(scope="module")
def system(broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("discovery")
    kafka = module_kafka(broker, "discovery")
    system = {**build(tmp, kafka.topic), "kafka": kafka, "tmp": tmp, "env": serve_env(kafka), "procs": {},
              "ports": {name: free_port() for name in ("a", "b", "c", "router")}}
    system["router"] = f"http://127.0.0.1:{system['ports']['router']}"
    try:
        for name in "abc":  # all at once: each waits for its own port before advertising
            start_server(system, name, wait=False)
        system["procs"]["router"] = spawn(["serve", "--discover", "--port", str(system["ports"]["router"])],
                                          env=system["env"], log_path=tmp / "router.log")
        for name in "abc":
            wait_http(f"http://127.0.0.1:{system['ports'][name]}/healthz", 120, system["procs"][name], tmp / f"{name}.log")
        wait_http(f"{system['router']}/healthz", 120, system["procs"]["router"], tmp / "router.log")
        wait_for(lambda: health(system)["status"] == "ok", 30, "every partition routed")
        yield system
    finally:
        for proc in system["procs"].values():
            stop(proc)


def health(system) -> dict:
    return httpx.get(f"{system['router']}/healthz", timeout=10).json()


def search(system, **body) -> dict:
    r = httpx.post(f"{system['router']}/search", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_searches_equal_brute_force_over_every_id_each_once(system):
    truth, codes = system["truth"], system["codes"]
    h = health(system)
    port = system["ports"]
    assert h["servers"] == {f"http://127.0.0.1:{port['a']}": [0, 1], f"http://127.0.0.1:{port['b']}": [2, 3]}
    for j, k in [(0, N), (1, 7), (2, 33), (5, N)]:
        got = search(system, code_hex=codes[j].tobytes().hex(), k=k)
        assert [(x["id"], x["distance"]) for x in got["results"]] == brute_force(truth, codes[j].tobytes(), k)
        assert got["partial"] is False and got["index_size"] == N
        assert [s["shard"] for s in got["shards"]] == [f"{system['kafka'].topic}/{p}" for p in range(4)]
    item, code, p, _ = truth[7]
    got = search(system, item_id=item, k=40)
    want = brute_force(truth, code, 40)
    assert got["results"][0]["id"] == item and sorted((x["id"], x["distance"]) for x in got["results"]) == sorted(want)
    files = {"image": ("q.png", encode_png(system["images"][3]), "image/png")}
    r = httpx.post(f"{system['router']}/search", files=files, data={"k": "15"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 15 and not r.json()["partial"]
    assert httpx.get(f"{system['router']}/items/{item}", timeout=10).json()["shard"].endswith(f"/{p}")
    assert httpx.get(f"{system['router']}/items/stale-0", timeout=10).status_code == 404  # only in a fenced shard


def test_a_forged_advert_is_refused_and_counted(system):
    kafka = system["kafka"]
    forged = Advert("http://127.0.0.1:9", frozenset(range(4)), frozenset(), 1e12)  # far future: would win everywhere
    producer = make_producer(kafka)
    producer.send(kafka.serving_topic, key=forged.url.encode(), value=forged.to_value(), partition=0).get(timeout=30)
    producer.close()
    url = f"{system['router']}/metrics"
    wait_for(lambda: scrape(url).get('streamhash_internal_rejected_total{topic="serving"}', 0) >= 1, 30, "the refusal")
    assert "http://127.0.0.1:9" not in health(system)["servers"]
    assert search(system, code_hex=system["codes"][0].tobytes().hex(), k=5)["partial"] is False


def test_stopping_a_server_makes_answers_partial_then_whole_again(system):
    truth, codes, topic = system["truth"], system["codes"], system["kafka"].topic
    query = codes[4].tobytes()
    b = f"http://127.0.0.1:{system['ports']['b']}"
    stop(system["procs"]["b"])  # a clean stop: its advert withdrawn (well before the TTL)
    assert "withdrew the advert" in (system["tmp"] / "b.log").read_text()
    wait_for(lambda: b not in health(system)["servers"], 4, "b's partitions off the map")
    assert health(system)["status"] == "partial"
    got = search(system, code_hex=query.hex(), k=N)
    by_shard = {s["shard"]: s for s in got["shards"]}
    assert got["partial"] is True and by_shard[f"{topic}/2"]["answered"] is False
    assert by_shard[f"{topic}/3"].get("restoring") is True  # c's copy serves it meanwhile, said to be incomplete
    half = {i for i, _, _ in system["rows"][3][: len(system["rows"][3]) // 2]}
    want = brute_force([t for t in truth if t[2] < 2 or t[0] in half], query, N)
    assert [(x["id"], x["distance"]) for x in got["results"]] == want
    start_server(system, "b")
    wait_for(lambda: health(system)["status"] == "ok", 30, "b back on the map")
    got = search(system, code_hex=query.hex(), k=N)
    assert got["partial"] is False
    assert [(x["id"], x["distance"]) for x in got["results"]] == brute_force(truth, query, N)
    system["procs"]["b"].kill()  # dies without a word: its advert ages out (TTL 5 s here)
    system["procs"]["b"].wait()
    assert search(system, code_hex=query.hex(), k=N)["partial"] is True  # meanwhile: named as not answering
    wait_for(lambda: b not in health(system)["servers"], 15, "b's advert past its TTL")
    by_shard = {s["shard"]: s for s in search(system, code_hex=query.hex(), k=N)["shards"]}
    assert by_shard[f"{topic}/2"]["error"] == "no query server serves this partition"
