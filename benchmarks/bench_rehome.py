"""What re-routing costs (issue 25, item 4): records away from their key's home partition, produced home by the worker.

    python benchmarks/bench_rehome.py [--n 10000] [--skip cpu,broker] [--json]

1. **cpu**: the check every image record pays, ``Rehome.away`` on a record already at home (the key's hash under
   murmur2 and crc32), per record, against the reference measured in the same run: ``parse_message`` of the same
   records (28x28 .npy). ``away_vs_parse_*`` is the share the check adds to the parse step.
2. **broker**: one worker (``streamhash worker``) on the embedded broker, 4 partitions. ``--n`` images produced to
   their home partitions (murmur2, the reference), then ``--n`` other ids all on a wrong partition (an explicit
   one: home + 1), each topic fresh, timed from assignment to the last commit: ``misplaced_vs_home`` is the ingest
   rate when every record must be re-routed first (its bytes cross the broker twice) over the rate at home.
   ``exactly_once``: every id once, in its home shard, one seq per id.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import namedtuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka.partitioner import Partitioner  # noqa: E402

from benchmarks.bench_scaleout import fresh_topic, timed_ingest  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker  # noqa: E402
from streamhash.kafka.partitioner import murmur2_partition  # noqa: E402
from streamhash.kafka.produce import from_arrays, make_producer, send  # noqa: E402
from streamhash.records import ImageSpec, message_headers, parse_message  # noqa: E402
from streamhash.services.processes import stop  # noqa: E402
from streamhash.services.worker.rehome import Rehome  # noqa: E402
from tests.conftest import synthetic_images  # noqa: E402
from tests.support import read_store  # noqa: E402

PARTITIONS = 4
Rec = namedtuple("Rec", "topic partition offset key value headers timestamp")


class Elsewhere(Partitioner):
    """A producer that names a partition itself: the one after the key's murmur2 home."""

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        return (murmur2_partition(serialized_key, PARTITIONS) + 1) % PARTITIONS


def per_record_us(fn, records, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for r in records:
            fn(r)
        best = min(best, time.perf_counter() - t0)
    return best / len(records) * 1e6


def cpu_phase(n: int) -> dict:
    images, labels = synthetic_images(n, seed=3)
    records = []
    for i, msg in enumerate(from_arrays(images, labels, prefix="cpu-", fmt="npy")):
        key = msg.key.encode()
        records.append(Rec("t", murmur2_partition(key, PARTITIONS), i, key, msg.value,
                           message_headers(msg.labels, msg.content_type), 0))
    spec = ImageSpec()
    out = {"parse_us": round(per_record_us(lambda r: parse_message(r.key, r.value, r.headers, spec), records), 2)}
    for name in ("murmur2", "crc32"):
        at_home = [r._replace(partition=Rehome(None, "t", name, None, 1).home(r.key, PARTITIONS)) for r in records]
        r = Rehome(None, "t", name, lambda topic: set(range(PARTITIONS)), spec.max_value_bytes)
        assert not any(r.away(x) for x in at_home)
        out[f"away_us_{name}"] = round(per_record_us(r.away, at_home), 3)
        out[f"away_vs_parse_{name}"] = round(out[f"away_us_{name}"] / out["parse_us"], 4)
    return out


def broker_phase(work: Path, n: int) -> dict:
    images, labels = synthetic_images(2 * n, seed=5)
    out, once = {}, True
    with EmbeddedBroker(home=work) as broker:
        for name, partitioner, lo in (("home", None, 0), ("misplaced", Elsewhere(), n)):
            kafka = fresh_topic(broker.bootstrap_servers, f"rehome-{name}")
            producer = make_producer(kafka, **({"partitioner": partitioner} if partitioner else {}))
            send(producer, kafka.topic, from_arrays(images[lo:lo + n], labels[lo:lo + n], prefix=f"{name}-", fmt="npy"),
                 progress=False)
            producer.close()
            root = work / f"root-{name}"
            rate, procs = timed_ingest(kafka, root, work, 1, n)
            for p, _ in procs:
                stop(p)
            content = read_store(root)
            once &= len(content["ids"]) == len(set(content["ids"])) == n and all(
                murmur2_partition(i.encode(), PARTITIONS) == int(shard.rsplit("/", 1)[1])
                for shard, held in content["shards"].items() for i in held["ids"])
            once &= sum(sh["next_seq"] - 1 for sh in content["shards"].values()) == n
            out[f"ingest_{name}_images_per_s"] = round(rate)
    out["misplaced_vs_home"] = round(out["ingest_misplaced_images_per_s"] / out["ingest_home_images_per_s"], 3)
    out["exactly_once"] = once
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: cpu,broker")
    ap.add_argument("--workdir", default="var/bench-rehome")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict = {"partitions": PARTITIONS, "n": args.n}
    if "cpu" not in skip:
        out.update(cpu_phase(args.n))
    if "broker" not in skip:
        out.update(broker_phase(work, args.n))
    for k, v in out.items():
        print(f"{k:34s} {v}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
