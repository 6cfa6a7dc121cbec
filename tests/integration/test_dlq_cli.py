"""`streamhash dlq` on a real broker and worker: the demo's malformed messages are listed by stage and error
class with their source offsets, and `--replay` sends them back to the images topic as they were sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.dlq_reader import DeadLetterReader
from streamhash.kafka.produce import make_producer
from streamhash.services.demo import MALFORMED
from streamhash.services.processes import scrape, total
from tests.support import env_for, module_kafka, start_worker, stop, wait_for

pytestmark = pytest.mark.integration


def dlq_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamhash", "dlq", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.fixture(scope="module")
def dead_lettered(broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dlq-cli")
    kafka = module_kafka(broker, "dlqcli")
    env = env_for(kafka, tmp / "index", free_port())
    worker, metrics = start_worker(env, tmp / "worker.log")
    producer = make_producer(kafka)
    for key, value, headers, _ in MALFORMED:
        producer.send(kafka.topic, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()
    wait_for(lambda: total(scrape(metrics), "streamhash_messages_dead_lettered_total") >= len(MALFORMED), 60,
             "every malformed message dead-lettered")
    try:
        yield kafka, env, metrics
    finally:
        stop(worker)


def test_dlq_json_lists_the_demos_malformed_messages_by_stage(dead_lettered):
    kafka, env, _ = dead_lettered
    out = dlq_cli(env, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["topic"] == kafka.dlq_topic and got["total"] == len(MALFORMED)
    assert got["by_stage"] == dict(Counter(stage for *_, stage in MALFORMED))
    assert got["by_class"]["decode/UnidentifiedImageError"] == 1 and got["by_class"]["shape/RecordRejected"] == 2
    letters = {d["key"]: d for d in got["letters"]}
    assert letters["bad-shape"]["reason"].startswith("image is 30x30, expected 28x28")
    assert None in letters and letters[None]["stage"] == "key"  # the message without a key is listed too
    for d in got["letters"]:
        assert d["source_topic"] == kafka.topic and d["source_partition"] in range(4) and d["source_offset"] >= 0
    assert len({(d["source_partition"], d["source_offset"]) for d in got["letters"]}) == len(MALFORMED)


def test_dlq_text_counts_and_last_n(dead_lettered):
    _, env, _ = dead_lettered
    out = dlq_cli(env, "--last", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].endswith(f"{len(MALFORMED)} dead letters (one per refused message)")
    assert lines[1].startswith("  by stage:  ") and "shape 2" in lines[1] and "key 2" in lines[1]
    assert lines[3] == "last 2:" and len(lines) == 6 and all("partition" in ln and "offset" in ln for ln in lines[4:])


def test_replay_sends_the_original_messages_back_without_error_headers(dead_lettered):
    kafka, env, metrics = dead_lettered
    out = dlq_cli(env, "--replay")
    assert out.returncode == 0 and out.stdout.strip() == f"replayed {len(MALFORMED)} dead letters to {kafka.topic}", out
    # nothing was fixed: the worker refuses each again, now from its replayed copy's offset
    wait_for(lambda: total(scrape(metrics), "streamhash_messages_dead_lettered_total") >= 2 * len(MALFORMED), 60,
             "every replayed message dead-lettered again")
    reader = DeadLetterReader(kafka)
    try:
        letters = reader.read_to_end()
    finally:
        reader.close()
    assert len(letters) == 2 * len(MALFORMED)
    first, again = letters[:len(MALFORMED)], letters[len(MALFORMED):]
    assert sorted((d.key or b"", d.value, d.original_headers) for d in first) == \
           sorted((d.key or b"", d.value, d.original_headers) for d in again)
    for d in again:  # one set of error.* headers: the replayed message carried none of the first refusal's
        assert [k for k, _ in d.headers].count("error.stage") == 1 and [k for k, _ in d.headers].count("source.offset") == 1
    assert {d.source for d in again}.isdisjoint({d.source for d in first})
    assert Counter(d.stage for d in again) == Counter(stage for *_, stage in MALFORMED)


def test_follow_prints_each_new_dead_letter_as_it_comes(dead_lettered):
    kafka, env, _ = dead_lettered
    proc = subprocess.Popen([sys.executable, "-m", "streamhash", "dlq", "--json", "--last", "0", "--follow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        first = json.loads(proc.stdout.readline())  # the counts so far, then one line per new dead letter
        assert first["total"] >= len(MALFORMED) and first["letters"] == []
        producer = make_producer(kafka)
        producer.send(kafka.topic, key=b"followed", value=b"still not an image", headers=[("content-type", b"image/png")])
        producer.flush()
        producer.close()
        line = json.loads(proc.stdout.readline())
        assert (line["key"], line["stage"], line["error_class"]) == ("followed", "decode", "UnidentifiedImageError")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
