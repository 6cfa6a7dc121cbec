"""Two "machines" (two store roots, a worker each, one group): one dies with its disk kept, its partitions are restored
on the other from the changelog; it comes back, partitions rebalance, the copies left behind are fenced. At every
end every id is in exactly one served (unfenced) shard, with its latest labels (issue 25)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from tests.conftest import synthetic_images
from tests.support import env_for, high_watermarks, module_kafka, start_worker, stop, wait_for

pytestmark = pytest.mark.integration


def served(*roots: Path) -> dict:
    """Every shard under the roots: partition -> [(root, fenced, restoring, offset, {id: labels})]."""
    code = textwrap.dedent(f"""
        import json
        from streamhash.index.store import Store
        from streamhash.index.store.root import StoreRoot
        out = {{}}
        for path in {[str(r) for r in roots]!r}:
            root = StoreRoot(path, create=False)
            for key in root.shards():
                s = Store(root.shard_path(key), readonly=True)
                snap, meta = s.snapshot(), s.read_meta()
                offset = s.offsets().get((key.topic, key.partition), 0)
                out.setdefault(key.partition, []).append([path, bool(meta.get("fenced")), bool(meta.get("restoring")),
                                                          offset, dict(zip(snap.ids, snap.labels))])
                s.close()
        print(json.dumps(out))
    """)
    try:
        got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    except subprocess.CalledProcessError:  # a shard being created: no meta yet
        return {}
    return {int(p): v for p, v in json.loads(got).items()}


def send_items(kafka, ids: list[int], seed: int) -> dict[str, list[int]]:
    images, labels = synthetic_images(len(ids), seed=seed)
    producer = make_producer(kafka)
    for i, image, label in zip(ids, images, labels):
        send(producer, kafka.topic, from_arrays(image[None], [int(label)], prefix="t-", fmt="npy", start=i),
             progress=False)
    producer.flush()
    producer.close()
    return {f"t-{i}": [int(label)] for i, label in zip(ids, labels)}


def one_copy_each(kafka, latest: dict, *roots: Path):
    """A predicate: every partition served by exactly one unfenced, caught-up shard, holding the latest labels."""
    ends = high_watermarks(kafka, kafka.topic)

    def check() -> bool:
        shards = served(*roots)
        live = {p: [s for s in shards.get(p, []) if not s[1]] for p in ends}
        if any(len(v) != 1 or v[0][2] or v[0][3] < ends[p] for p, v in live.items()):
            return False
        held: dict = {}
        for v in live.values():
            for item, labels in v[0][4].items():
                held.setdefault(item, []).append(labels)
        return held == {i: [lab] for i, lab in latest.items()}
    return check


def test_a_machine_lost_and_back_restores_moves_and_fences(broker, tmp_path):
    kafka = module_kafka(broker, "takeover")
    roots = [tmp_path / "machine-a", tmp_path / "machine-b"]
    envs = [{**env_for(kafka, r, free_port()), "STREAMHASH_STORE__FENCE_AFTER_S": "2"} for r in roots]
    a, _ = start_worker(envs[0], tmp_path / "a.log")
    b, _ = start_worker(envs[1], tmp_path / "b.log")
    try:
        latest = send_items(kafka, list(range(300)), seed=1)
        wait_for(one_copy_each(kafka, latest, *roots), 90, "both machines to ingest", interval=0.5)
        assert all(served(r) for r in roots), "the group did not use both machines"

        b.send_signal(signal.SIGKILL)  # machine b lost; its disk is kept
        b.wait()
        latest.update(send_items(kafka, list(range(0, 300, 3)) + list(range(300, 360)), seed=2))  # relabels, new
        wait_for(one_copy_each(kafka, latest, roots[0]), 120, "machine a to restore b's partitions and go on")

        b, _ = start_worker(envs[1], tmp_path / "b2.log")  # back: partitions rebalance
        latest.update(send_items(kafka, list(range(1, 360, 4)), seed=3))
        wait_for(one_copy_each(kafka, latest, *roots), 120, "one served copy per partition after the rebalance",
                 interval=0.5)
        assert all(any(not s[1] for shards in served(r).values() for s in shards) for r in roots)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                stop(proc)
