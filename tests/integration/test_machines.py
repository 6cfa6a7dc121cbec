"""Three "machines" on loopback on Kafka alone (issue 25): three store roots, each with its own worker and query
server advertising what it serves, one learner with no root (it reads the changelog), a discovering router.

Labeled and unlabeled images are produced, some relabeled; one machine is killed (every process, -9) and its disk
wiped while producing goes on: its partitions restore from the changelog on the other two; every id is in exactly
one served shard with its latest labels, searches through the router equal brute force over every id, learned codes
reach every partition. The machine comes back empty: partitions rebalance onto it (restored there), and the copies
left on the others are fenced, never served. Scaled down from the issue's 30,000 images to 1,800 (+ 300 relabels).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.config import KafkaSettings
from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.services.processes import scrape, spawn
from tests.conftest import synthetic_images
from tests.support import high_watermarks, stop, wait_for, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PARTITIONS, FIRST, SECOND, RELABEL = 6, 1200, 600, 300
KEY = "machines-test-key"


def shards(roots) -> list[dict]:
    """Every shard of every root, read in a fresh process: root, partition, flags, ids in seq order, labels, codes,
    learned count, offsets."""
    code = textwrap.dedent(f"""
        import json
        from streamhash.index.store import Store
        from streamhash.index.store.root import StoreRoot
        out = []
        for path in {[str(r) for r in roots]!r}:
            try:
                root = StoreRoot(path, create=False)
            except Exception:
                continue
            for key in root.shards():
                try:
                    s = Store(root.shard_path(key), readonly=True)
                except Exception:  # being created: not served yet either
                    continue
                snap, meta = s.snapshot(), s.read_meta()
                out.append({{"root": path, "p": key.partition, "fenced": bool(meta.get("fenced")),
                             "restoring": bool(meta.get("restoring")), "ids": snap.ids,
                             "labels": [list(x) if x else None for x in snap.labels],
                             "codes": [c.tobytes().hex() for c in snap.codes], "learned": int(snap.learned.sum()),
                             "offsets": {{f"{{t}}:{{p}}": o for (t, p), o in s.offsets().items()}}}})
                s.close()
        print(json.dumps(out))
    """)
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def served(roots) -> list[dict]:
    return sorted((s for s in shards(roots) if not s["fenced"]), key=lambda s: s["p"])


def steady(predicate, hold_s: float):
    """``predicate`` made to hold for ``hold_s`` on end (a rebalance may move a partition once more meanwhile)."""
    since: list[float] = []

    def check() -> bool:
        if not predicate():
            since.clear()
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= hold_s
    return check


def settled(roots, kafka, ends: dict) -> bool:
    """One unfenced, restored shard per partition, each committed through ``ends`` (topic -> partition -> offset)."""
    got = served(roots)
    if sorted(s["p"] for s in got) != list(range(PARTITIONS)) or any(s["restoring"] for s in got):
        return False
    return all(s["offsets"].get(f"{t}:{s['p']}", 0) >= e[s["p"]] for s in got for t, e in ends.items())


class System:
    def __init__(self, kafka, tmp):
        self.kafka, self.tmp, self.procs = kafka, tmp, {}
        self.env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": kafka.topic,
                    "STREAMHASH_KAFKA__GROUP_ID": kafka.group_id, "STREAMHASH_KAFKA__TOPIC_PARTITIONS": str(PARTITIONS),
                    "STREAMHASH_SECURITY__MODEL_KEY": KEY, "STREAMHASH_LEARN__ENABLED": "false",
                    "STREAMHASH_STORE__FENCE_AFTER_S": "2", "STREAMHASH_SERVER__ADVERTISE_INTERVAL_S": "0.5",
                    "STREAMHASH_SERVER__ADVERTISE_TTL_S": "4", "STREAMHASH_SERVER__SHARD_TIMEOUT_S": "10"}
        self.roots = {m: tmp / f"machine-{m}" for m in "abc"}
        self.ports = {name: free_port() for name in ("a", "b", "c", "router", "learner")}
        self.router = f"http://127.0.0.1:{self.ports['router']}"

    def spawn(self, name: str, args: list[str], extra: dict | None = None):
        self.procs[name] = spawn(args, env={**self.env, **(extra or {})}, log_path=self.tmp / f"{name}.log")
        return self.procs[name]

    def start_machine(self, m: str) -> None:
        self.spawn(f"worker-{m}", ["worker"], {"STREAMHASH_STORE__PATH": str(self.roots[m]),
                                               "STREAMHASH_WORKER__METRICS_PORT": str(free_port())})
        port = self.ports[m]
        self.spawn(f"serve-{m}", ["serve", "--store", str(self.roots[m]), "--port", str(port),
                                  "--advertise-url", f"http://127.0.0.1:{port}"])

    def kill_machine(self, m: str) -> None:
        for name in (f"worker-{m}", f"serve-{m}"):
            self.procs[name].send_signal(signal.SIGKILL)
            self.procs[name].wait()
        shutil.rmtree(self.roots[m])

    def health(self) -> dict:
        return httpx.get(f"{self.router}/healthz", timeout=10).json()

    def search(self, code: bytes, k: int) -> dict:
        r = httpx.post(f"{self.router}/search", json={"code_hex": code.hex(), "k": k}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def system(broker, tmp_path):
    tag = tmp_path.name[-12:].replace("_", "")
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=f"machines-{tag}.images",
                          dlq_topic=f"machines-{tag}.images.dlq", group_id=f"machines-{tag}-workers",
                          topic_partitions=PARTITIONS)
    ensure_topics(kafka)
    s = System(kafka, tmp_path)
    try:
        yield s
    finally:  # all at once: each takes a few seconds to stop
        with ThreadPoolExecutor(len(s.procs) or 1) as pool:
            list(pool.map(lambda proc: stop(proc, timeout=30), s.procs.values()))


def check_whole(system: System, truth: dict[str, list | None], roots) -> list[dict]:
    """Every id once in the served shards with its latest labels; the router's answers equal brute force."""
    got = served(roots)
    ids = [i for s in got for i in s["ids"]]
    assert len(ids) == len(set(ids)) == len(truth)
    labels = {i: lab for s in got for i, lab in zip(s["ids"], s["labels"])}
    assert labels == truth
    codes = np.stack([np.frombuffer(bytes.fromhex(c), np.uint8) for s in got for c in s["codes"]])
    wait_for(lambda: (h := system.health())["status"] == "ok" and h["index_size"] == len(truth), 60,
             "the router on every id, no partition partial")
    rng = np.random.default_rng(1)
    queries = np.concatenate([codes[rng.choice(len(codes), 4)], rng.integers(0, 256, (2, codes.shape[1]), np.uint8)])
    for q, d in zip(queries, hamming_brute(queries, codes)):
        r = system.search(q.tobytes(), len(ids))
        assert not r["partial"] and len(r["results"]) == len(ids)
        assert [h["distance"] for h in r["results"]] == sorted(d.tolist())
        assert sorted((h["id"], h["distance"]) for h in r["results"]) == sorted(zip(ids, d.tolist()))
        near = r["results"][20]["distance"]  # the top: ties broken alike wherever they are served
        assert {h["id"] for h in r["results"] if h["distance"] < near} == {i for i, x in zip(ids, d) if x < near}
    for item_id in list(truth)[:: len(truth) // 10]:
        assert httpx.get(f"{system.router}/items/{item_id}", timeout=10).json()["labels"] == truth[item_id]
    return got


def test_three_machines_one_dies_wiped_and_comes_back(system):
    kafka, env = system.kafka, system.env
    images, labels = synthetic_images(FIRST + SECOND, seed=21)
    shown = [None if i % 4 == 0 else int(y) for i, y in enumerate(labels)]
    lurl = f"http://127.0.0.1:{system.ports['learner']}/metrics"
    system.spawn("learner", ["learner"], {  # no STREAMHASH_STORE__PATH: it reads the changelog
        "STREAMHASH_LEARN__STATE_PATH": str(system.tmp / "learner-state"),
        "STREAMHASH_LEARN__METRICS_PORT": str(system.ports["learner"]), "STREAMHASH_LEARN__ROUND_EVERY": "400",
        "STREAMHASH_LEARN__ROUND_MAX_AGE_S": "5", "STREAMHASH_LEARN__OMEGA": "300", "STREAMHASH_LEARN__EPOCHS": "1",
        "STREAMHASH_LEARN__ITERS": "1", "STREAMHASH_LEARN__RESERVOIR_SIZE": "100", "STREAMHASH_LEARN__NICE": "0"})
    for m in "abc":
        system.start_machine(m)
    system.spawn("router", ["serve", "--discover", "--port", str(system.ports["router"])])
    for name in ("serve-a", "serve-b", "serve-c", "router"):
        port = system.ports[name[-1] if name != "router" else "router"]
        wait_http(f"http://127.0.0.1:{port}/healthz", 120, system.procs[name], system.tmp / f"{name}.log")
    producer = make_producer(kafka)  # the learner may still be starting: it reads the changelog from its start
    send(producer, kafka.topic, from_arrays(images[:FIRST], shown[:FIRST], prefix="m-"), progress=False)
    wait_http(lurl, 120, system.procs["learner"], system.tmp / "learner.log")
    wait_for(lambda: scrape(lurl).get("streamhash_learned_codes_published_total", 0) >= 400, 240,
             "a learning round over the changelog, its codes published")
    ends = {kafka.topic: high_watermarks(kafka, kafka.topic)}
    wait_for(lambda: settled(system.roots.values(), kafka, ends), 120, "every partition indexed", interval=0.5)
    before = {s["p"]: s["root"] for s in served(system.roots.values())}
    assert set(before.values()) == {str(r) for r in system.roots.values()}  # each machine serves some partitions

    # machine c dies with its disk; producing goes on: new items and relabels (the same ids, new labels)
    system.kill_machine("c")
    relabeled = [(int(labels[i]) + 1) % 10 for i in range(RELABEL)]
    send(producer, kafka.topic, from_arrays(images[FIRST:], shown[FIRST:], prefix="m-", start=FIRST), progress=False)
    send(producer, kafka.topic, from_arrays(images[:RELABEL], relabeled, prefix="m-"), progress=False)
    truth = {f"m-{i}": None if lab is None else [lab] for i, lab in enumerate(shown)}
    truth.update({f"m-{i}": [lab] for i, lab in enumerate(relabeled)})
    two = [system.roots["a"], system.roots["b"]]
    ends = {kafka.topic: high_watermarks(kafka, kafka.topic)}
    wait_for(lambda: settled(two, kafka, ends), 180, "c's partitions restored on a and b, everything indexed",
             interval=0.5)
    labeled = sum(lab is not None for lab in shown) + RELABEL  # each learned once at least (a relabel: again)
    wait_for(lambda: scrape(lurl)["streamhash_learned_codes_published_total"] >= labeled, 180,
             "every labeled item learned, the relabeled ones again")
    ends[kafka.codes_topic] = high_watermarks(kafka, kafka.codes_topic)
    wait_for(lambda: settled(two, kafka, ends), 120, "every learned code applied", interval=0.5)
    got = check_whole(system, truth, two)
    assert all(s["learned"] > 0 for s in got)  # learned codes in every partition, the restored ones included
    moved = [p for p, root in before.items() if root == str(system.roots["c"])]
    assert moved and all(s["root"] != str(system.roots["c"]) for s in got if s["p"] in moved)

    # c comes back, empty: the group rebalances some partitions onto it; they restore there, the copies left on a
    # and b are fenced (never served)
    system.start_machine("c")
    wait_http(f"http://127.0.0.1:{system.ports['c']}/healthz", 120, system.procs["serve-c"], system.tmp / "serve-c.log")

    def back() -> bool:
        if not settled(system.roots.values(), kafka, ends):
            return False
        return any(s["root"] == str(system.roots["c"]) for s in served(system.roots.values()))

    wait_for(steady(back, 4), 180, "partitions restored on c, their old copies fenced", interval=0.5)
    wait_for(lambda: f"http://127.0.0.1:{system.ports['c']}" in system.health()["servers"], 60, "c on the router's map")
    got = check_whole(system, truth, system.roots.values())
    on_c = {s["p"] for s in got if s["root"] == str(system.roots["c"])}
    fenced = {(s["root"], s["p"]) for s in shards(system.roots.values()) if s["fenced"]}
    assert on_c and {p for _, p in fenced} >= on_c and all(root != str(system.roots["c"]) for root, _ in fenced)
    assert all(s["learned"] > 0 for s in got)
    producer.close()
