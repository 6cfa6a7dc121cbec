"""Learning across processes on a real broker: a worker, the learner and a query server over a 4-shard root.

precision@10 of the live index rises as the learner's codes and models reach the shards; an MI-triggered
re-encode rolls across the 4 shards (each worker-owned shard re-encoded and swapped on its own) while
queries run: every query succeeds, each shard in an answer is one generation, never going back. The
learner killed with -9 and restarted resumes from the models topic: versions stay consecutive, and no
shard holds a model or a learned code of a version that was never published.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import httpx
import numpy as np
import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.modelbus import ModelReader
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.records import encode_png
from streamhash.services.processes import scrape, spawn
from tests.conftest import synthetic_images
from tests.support import committed_through, env_for, high_watermarks, start_worker, stop, wait_for, wait_http

pytestmark = pytest.mark.integration


def precision_at_10(base: str, images, labels, truth: dict[str, int]) -> float:
    """Of each query's 10 hits, the share of its class, judged by every hit's true class (``truth``: id ->
    class), since unlabeled hits carry no label."""
    hits = []
    with httpx.Client(timeout=30) as c:
        for img, lab in zip(images, labels):
            r = c.post(f"{base}/search", json={"image_base64": base64.b64encode(encode_png(img)).decode(), "k": 10})
            r.raise_for_status()
            hits += [truth[h["id"]] == int(lab) for h in r.json()["results"]]
    return float(np.mean(hits))


@contextlib.contextmanager
def prometheus(tmp_path, metrics_port: int):
    """A real Prometheus scraping ``metrics_port`` every second as job ``streamhash-learner``; yields
    ``query(expr) -> float | None`` on its HTTP API, or None where Prometheus is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        yield None
        return
    config, port = tmp_path / "prometheus.yml", free_port()
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [
        {"job_name": "streamhash-learner", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    with (tmp_path / "prometheus.log").open("w") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        base = f"http://127.0.0.1:{port}"

        def query(expr: str) -> float | None:
            result = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5).json()["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        try:
            wait_http(f"{base}/-/ready", 60, proc, tmp_path / "prometheus.log")
            yield query
        finally:
            stop(proc)


def shard_versions(root) -> dict:
    """Per shard: its model version and the versions its learned codes came with (read in a fresh process)."""
    code = textwrap.dedent(f"""
        import json
        from streamhash.index.store import Store
        from streamhash.index.store.root import StoreRoot
        root, out = StoreRoot({str(root)!r}, create=False), {{}}
        for key in root.shards():
            s = Store(root.shard_path(key), readonly=True)
            learned_by = sorted({{s.get_item(i).get("learned_by") for i in s.snapshot().ids}} - {{None}})
            out[str(key)] = {{"model_version": s.read_meta()["model_version"], "learned_by": learned_by,
                              "generation": s.read_meta()["generation"]}}
        print(json.dumps(out))
    """)
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_the_learner_teaches_the_shards_reencodes_them_under_queries_and_resumes_after_kill_9(kafka_settings, tmp_path):
    ensure_topics(kafka_settings)
    images, labels = synthetic_images(3400, seed=11, noise=70, shift=2)
    stream, queries, q_labels = images[:3200], images[3200:], labels[3200:]
    # every fourth item unlabeled: inferred codes, what a re-encode re-encodes (an all-learned index has none)
    shown = [int(y) if i % 4 else None for i, y in enumerate(labels[:3200])]
    truth = {f"s-{i}": int(y) for i, y in enumerate(labels[:3200])}
    env = env_for(kafka_settings, tmp_path / "index", free_port(), free_port())
    env.update({"STREAMHASH_LEARN__ROUND_EVERY": "1200", "STREAMHASH_LEARN__METRICS_PORT": str(free_port()),
                "STREAMHASH_LEARN__OMEGA": "1000", "STREAMHASH_LEARN__EPOCHS": "3", "STREAMHASH_LEARN__ITERS": "3",
                "STREAMHASH_LEARN__RESERVOIR_SIZE": "300",
                # threshold below any possible gain: the first round's trigger must fire
                "STREAMHASH_LEARN__MI_THRESHOLD": "-10"})
    learner_url = f"http://127.0.0.1:{env['STREAMHASH_LEARN__METRICS_PORT']}/metrics"
    worker, metrics_url = start_worker(env, tmp_path / "worker.log")
    server = spawn(["serve"], env=env, log_path=tmp_path / "serve.log")
    learner = spawn(["learner"], env=env, log_path=tmp_path / "learner.log")
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    try:
        wait_http(f"{base}/healthz", 60, server, tmp_path / "serve.log")
        wait_http(learner_url, 60, learner, tmp_path / "learner.log")
        producer = make_producer(kafka_settings)
        # a first part, indexed with the untrained network, below the round threshold
        send(producer, kafka_settings.topic, from_arrays(stream[:1000], shown[:1000], prefix="s-"), progress=False)
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= 1000, 60, "first part indexed")
        before = precision_at_10(base, queries, q_labels, truth)
        assert httpx.get(f"{base}/healthz").json()["generation"] == 1

        seen, errors, stop_q = [], [], threading.Event()

        def hammer():  # queries all through the rounds and the rolling re-encode
            with httpx.Client(timeout=30) as c:
                while not stop_q.is_set():
                    r = c.post(f"{base}/search", json={"image_base64": base64.b64encode(encode_png(queries[0])).decode(), "k": 5})
                    if r.status_code != 200 or r.json()["partial"]:
                        errors.append(r.text)
                    else:
                        j = r.json()
                        seen.append(({s["shard"]: s["generation"] for s in j["shards"]}, j["index_size"],
                                     {s["shard"]: s["index_size"] for s in j["shards"]}))

        t = threading.Thread(target=hammer)
        t.start()
        send(producer, kafka_settings.topic, from_arrays(stream[1000:2400], shown[1000:2400], prefix="s-", start=1000),
             progress=False)
        wait_for(lambda: scrape(learner_url).get("streamhash_reencode_triggers_total", 0) >= 1
                 and scrape(metrics_url).get("streamhash_shard_reencodes_total", 0) >= 4, 300,
                 "a round, its re-encode announced, and all four shards re-encoded")
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= 2400, 60, "everything indexed")
        wait_for(lambda: all(s["generation"] >= 2 for s in httpx.get(f"{base}/healthz").json()["shards"]), 60,
                 "the query server on generation 2 everywhere")
        wait_for(lambda: seen and all(g >= 2 for g in seen[-1][0].values()), 60,
                 "an answer during the queries from generation 2 everywhere")
        stop_q.set()
        t.join()
        after = precision_at_10(base, queries, q_labels, truth)

        # the learner dies mid-stream (-9: no clean-up) and comes back; rounds go on from the models topic
        rounds = scrape(learner_url)["streamhash_learning_rounds_total"]
        send(producer, kafka_settings.topic, from_arrays(stream[2400:], shown[2400:], prefix="s-", start=2400),
             progress=False)
        producer.close()
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] > 2400, 60, "the last part arriving")
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        learner = spawn(["learner"], env=env, log_path=tmp_path / "learner2.log")
        wait_http(learner_url, 60, learner, tmp_path / "learner2.log")
        learner.send_signal(signal.SIGUSR1)  # a round now, whatever is pending
        # logged once the round's model and codes are on the broker (its round counter moves before they are sent)
        done = re.compile(r"published model version \d+ \(generation .* learned codes")
        wait_for(lambda: done.search((tmp_path / "learner2.log").read_text()), 300,
                 "a round after the restart, its model and codes published")
        codes_end = high_watermarks(kafka_settings, kafka_settings.codes_topic)
        wait_for(lambda: committed_through(tmp_path / "index", kafka_settings.codes_topic, codes_end), 60,
                 "the worker to apply every code published, the round's included", interval=0.5)
    finally:
        stop(learner)
        stop(server)
        stop(worker)

    assert not errors, errors[:3]
    for shard in seen[0][0]:  # each shard: one generation per answer, never going back
        gens = [s[shard] for s, _, _ in seen if shard in s]
        assert gens == sorted(gens) and gens[0] == 1 and gens[-1] >= 2, (shard, gens)
    # a generation is complete when it becomes visible: the index never shrinks across the swaps
    sizes = [n for _, n, _ in seen]
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), [(seen[i], seen[i + 1]) for i in range(len(sizes) - 1)
                                                             if sizes[i + 1] < sizes[i]][:3]
    print(f"precision@10 before learning {before:.3f}, after {after:.3f}; {len(seen)} queries during the re-encode; "
          f"{rounds:.0f} rounds before the kill")
    assert after > before + 0.1, (before, after)

    reader = ModelReader(kafka_settings)
    published = [a.version for a in reader.read_to_end()]
    reader.close()
    assert published == list(range(2, 2 + len(published))) and len(published) >= 2  # consecutive across the restart
    for shard, got in shard_versions(tmp_path / "index").items():
        assert got["model_version"] in [1, *published], (shard, got)
        assert set(got["learned_by"]) <= set(published), (shard, got)
    assert f"learner at model version {published[-2]}" in (tmp_path / "learner2.log").read_text()  # resumed, then +1


def test_a_class_ordered_partly_labeled_stream_triggers_a_reencode_that_raises_precision(kafka_settings, tmp_path):
    """The re-encoding issue's worker test: classes 0-4, then 5-9, a quarter of the items labeled. The learner
    learns 0-4; classes 5-9 then arrive while it is stopped (SIGSTOP), so their unlabeled items are indexed
    with codes of a network that never saw them. Resumed, it learns 5-9: those codes are stale, the MI test
    (default threshold and noise bound) fires, the workers re-encode, and precision@10 of the live index,
    judged by every item's true class (most carry no label), is higher than before."""
    ensure_topics(kafka_settings)
    images, labels = synthetic_images(4400, seed=21, noise=70, shift=2)
    first, second = np.flatnonzero(labels[:4000] < 5), np.flatnonzero(labels[:4000] >= 5)
    truth = np.concatenate([labels[first], labels[second]])
    shown = [int(y) if i % 4 == 0 else None for i, y in enumerate(truth)]  # a quarter labeled
    queries, q_labels = images[4000:], labels[4000:]
    true_class = {f"c-{i}": int(y) for i, y in enumerate(truth)}
    env = env_for(kafka_settings, tmp_path / "index", free_port(), free_port())
    env.update({"STREAMHASH_LEARN__ROUND_EVERY": "250", "STREAMHASH_LEARN__METRICS_PORT": str(free_port()),
                "STREAMHASH_LEARN__OMEGA": "1000", "STREAMHASH_LEARN__EPOCHS": "3", "STREAMHASH_LEARN__ITERS": "3",
                "STREAMHASH_LEARN__RESERVOIR_SIZE": "400"})
    learner_url = f"http://127.0.0.1:{env['STREAMHASH_LEARN__METRICS_PORT']}/metrics"
    worker, _ = start_worker(env, tmp_path / "worker.log")
    server = spawn(["serve"], env=env, log_path=tmp_path / "serve.log")
    learner = spawn(["learner"], env=env, log_path=tmp_path / "learner.log")
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    size = lambda: httpx.get(f"{base}/healthz").json()["index_size"]  # noqa: E731

    prom = contextlib.ExitStack()
    try:
        wait_http(f"{base}/healthz", 60, server, tmp_path / "serve.log")
        wait_http(learner_url, 60, learner, tmp_path / "learner.log")
        query = prom.enter_context(prometheus(tmp_path, int(env["STREAMHASH_LEARN__METRICS_PORT"])))
        triggers = 'streamhash_reencode_triggers_total{job="streamhash-learner"}'
        producer = make_producer(kafka_settings)
        n1 = len(first)
        send(producer, kafka_settings.topic, from_arrays(images[first], shown[:n1], prefix="c-"), progress=False)
        wait_for(lambda: size() >= n1, 120, "classes 0-4 indexed")
        labeled_1 = sum(x is not None for x in shown[:n1])  # the hold-out's codes are learned too
        wait_for(lambda: scrape(learner_url).get("streamhash_learned_codes_published_total", 0) >= 0.8 * labeled_1, 300,
                 "classes 0-4 learned")
        triggers_before = scrape(learner_url).get("streamhash_reencode_triggers_total", 0)
        if query is not None:  # what a Prometheus server records of the learner before the shift
            wait_for(lambda: query(triggers) == triggers_before, 30, "Prometheus to scrape the learner's triggers")
        learner.send_signal(signal.SIGSTOP)
        send(producer, kafka_settings.topic, from_arrays(images[second], shown[n1:], prefix="c-", start=n1), progress=False)
        producer.close()
        wait_for(lambda: size() >= 4000, 120, "classes 5-9 indexed")
        generation = max(s["generation"] for s in httpx.get(f"{base}/healthz").json()["shards"])
        before = precision_at_10(base, queries, q_labels, true_class)
        learner.send_signal(signal.SIGCONT)
        wait_for(lambda: scrape(learner_url).get("streamhash_reencode_triggers_total", 0) > triggers_before, 600,
                 "the MI test to fire on classes 5-9")
        if query is not None:  # and a Prometheus server sees the counter move (the Grafana panel's series)
            wait_for(lambda: (query(triggers) or 0) > triggers_before, 30, "Prometheus to see the trigger")
            wait_for(lambda: query(f"increase({triggers}[1m])") is not None, 30, "the trigger's increase in Prometheus")
        wait_for(lambda: all(s["generation"] > generation for s in httpx.get(f"{base}/healthz").json()["shards"]), 120,
                 "every shard re-encoded")
        after = precision_at_10(base, queries, q_labels, true_class)
    finally:
        prom.close()
        learner.send_signal(signal.SIGCONT)
        stop(learner)
        stop(server)
        stop(worker)
    print(f"precision@10 by true class: {before:.3f} before the trigger, {after:.3f} after")
    assert after > before, (before, after)
