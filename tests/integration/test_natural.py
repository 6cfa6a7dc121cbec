"""Real photos in, end to end on real processes: a worker with the pretrained EfficientNet-Lite0 backbone
indexes RGB, RGBA, gray, palette and CMYK photos of many sizes as PNG, JPEG and .npy; the query server
finds them from an uploaded photo. Learning is off there: the hash head stays as initialised, so what ranks
the photos is the pretrained backbone seen through the conversion rules (STREAMHASH_IMAGE__*).

Then CIFAR-10 photos with the learner (issue 23): the worker stores each photo's pooled feature with it, the
learner's round trains the head on stored features and the workers' re-encode runs the head over them — neither
decodes a stored image (``streamhash_stored_images_decoded_total`` stays 0) — and precision@10 of searches by
photo rises after the round."""

from __future__ import annotations

import signal

import httpx
import numpy as np
import pytest
from PIL import Image

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.records import encode_npy, encode_png, message_headers
from streamhash.services.processes import scrape, spawn, total
from tests.data.test_cifar10 import TARBALL
from tests.photos import photo, saved
from tests.support import env_for, module_kafka, scaled, start_worker, stop, wait_for, wait_http

pytestmark = pytest.mark.integration

N = 40
SIZES = [(320, 240), (240, 320), (500, 200), (150, 150), (640, 480), (300, 300), (260, 180)]


def message(i: int) -> tuple[bytes, str]:
    """Photo ``i`` in one of seven forms a producer may send: the value and its content type."""
    img = photo(i, *SIZES[i % len(SIZES)])
    form = i % 7
    if form == 0:
        return saved(img, "JPEG", quality=90), "image/jpeg"
    if form == 1:
        return saved(img, "PNG"), "image/png"
    if form == 2:
        alpha = np.linspace(128, 255, img.width).astype(np.uint8)[None, :].repeat(img.height, 0)  # fades to the left
        return saved(Image.fromarray(np.dstack([np.asarray(img), alpha])), "PNG"), "image/png"
    if form == 3:
        return saved(img.convert("L"), "JPEG", quality=90), "image/jpeg"
    if form == 4:
        return saved(img.quantize(256), "PNG"), "image/png"
    if form == 5:
        return saved(img.convert("CMYK"), "JPEG", quality=90), "image/jpeg"
    return encode_npy(np.asarray(img)), "application/x-npy"


@pytest.fixture(scope="module")
def natural(broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("natural")
    kafka = module_kafka(broker, "natural")
    env = env_for(kafka, tmp / "index", free_port(), free_port())
    env.update({"STREAMHASH_MODEL__BACKBONE": "efficientnet_lite0", "STREAMHASH_MODEL__IMAGE_SIZE": "224",
                "STREAMHASH_MODEL__CHANNELS": "3", "STREAMHASH_MODEL__BITS": "64",
                "STREAMHASH_IMAGE__MODE": "rgb", "STREAMHASH_IMAGE__RESIZE": "fill"})
    worker, metrics_url = start_worker(env, tmp / "worker.log")
    server = spawn(["serve"], env=env, log_path=tmp / "serve.log")
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    wait_http(f"{base}/healthz", 120, server, tmp / "serve.log")
    values = [message(i) for i in range(N)]
    producer = make_producer(kafka)
    for i, (value, ctype) in enumerate(values):
        producer.send(kafka.topic, key=f"photo-{i}".encode(), value=value, headers=message_headers(i % 5, ctype))
    producer.flush()
    producer.close()

    def settled():
        s = scrape(metrics_url)
        handled = s.get("streamhash_items_indexed_total", 0) + total(s, "streamhash_messages_dead_lettered_total")
        return s if handled >= N else None

    metrics = wait_for(settled, 120, f"{N} photos indexed or dead-lettered")
    wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= N, 60, "the query index to load")
    yield {"base": base, "metrics": metrics, "values": values}
    stop(server)
    stop(worker)


def search(base: str, value: bytes, name: str, k: int) -> list[dict]:
    r = httpx.post(f"{base}/search", files={"image": (name, value, "application/octet-stream")}, data={"k": str(k)},
                   timeout=scaled(60))
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_every_photo_is_indexed_whatever_its_size_mode_and_format(natural):
    assert natural["metrics"]["streamhash_items_indexed_total"] == N
    assert total(natural["metrics"], "streamhash_messages_dead_lettered_total") == 0


@pytest.mark.parametrize("i", [0, 2, 5, 6])  # JPEG, RGBA PNG, CMYK JPEG, .npy
def test_the_same_bytes_find_their_photo_at_distance_zero(natural, i):
    value, ctype = natural["values"][i]
    hits = search(natural["base"], value, f"q.{ctype.rsplit('/', 1)[1]}", k=N)
    assert f"photo-{i}" in [h["id"] for h in hits if h["distance"] == 0]


@pytest.mark.parametrize("i", [0, 1, 3, 8, 15, 22])  # stored as RGB JPEG, RGB PNG, gray JPEG
def test_a_photo_re_saved_at_another_size_finds_its_original(natural, i):
    img = photo(i, *SIZES[i % len(SIZES)])
    img = img.convert("L") if i % 7 == 3 else img
    smaller = img.resize((img.width * 7 // 10, img.height * 7 // 10))
    hits = search(natural["base"], saved(smaller, "JPEG", quality=85), "q.jpg", k=3)
    assert f"photo-{i}" in [h["id"] for h in hits]


CIFAR_ENV = {"STREAMHASH_MODEL__BACKBONE": "efficientnet_lite0", "STREAMHASH_MODEL__IMAGE_SIZE": "32",
             "STREAMHASH_MODEL__CHANNELS": "3", "STREAMHASH_MODEL__BITS": "32", "STREAMHASH_IMAGE__MODE": "rgb",
             "STREAMHASH_LEARN__ROUND_EVERY": "100", "STREAMHASH_LEARN__OMEGA": "200", "STREAMHASH_LEARN__EPOCHS": "20",
             "STREAMHASH_LEARN__ITERS": "3",
             "STREAMHASH_LEARN__RESERVOIR_SIZE": "100", "STREAMHASH_LEARN__MI_THRESHOLD": "-10"}  # the re-encode fires


def precision_at_10(base: str, images: np.ndarray, labels: np.ndarray, truth: dict[str, int]) -> float:
    """Of each photo query's 10 hits, the share of its class (every hit judged by its true class)."""
    hits = []
    with httpx.Client(timeout=scaled(60)) as c:
        for img, lab in zip(images, labels):
            r = c.post(f"{base}/search", files={"image": ("q.png", encode_png(img), "image/png")}, data={"k": "10"})
            assert r.status_code == 200, r.text
            hits += [truth[h["id"]] == int(lab) for h in r.json()["results"]]
    return float(np.mean(hits))


@pytest.mark.skipif(not TARBALL.exists(), reason=f"the shared CIFAR-10 tarball is not at {TARBALL}")
def test_cifar10_photos_learned_from_stored_features_no_image_decoded_again(broker, tmp_path):
    from streamhash.data import cifar10
    from streamhash.index.store import Store
    from streamhash.index.store.root import StoreRoot

    data = cifar10.load_split("train", source=TARBALL, per_class=14)  # 140: 10 a class labeled, 4 not
    rank = np.array([np.sum(data.labels[:i] == y) for i, y in enumerate(data.labels)])
    shown = [int(y) if r < 10 else None for y, r in zip(data.labels, rank)]
    queries = cifar10.load_split("test", source=TARBALL, per_class=2)
    truth = {f"c-{i}": int(y) for i, y in enumerate(data.labels)}
    kafka = module_kafka(broker, "cifarlearn")
    env = {**env_for(kafka, tmp_path / "index", free_port(), free_port()), **CIFAR_ENV,
           "STREAMHASH_LEARN__METRICS_PORT": str(free_port()), "STREAMHASH_LEARN__NICE": "0"}
    learner_url = f"http://127.0.0.1:{env['STREAMHASH_LEARN__METRICS_PORT']}/metrics"
    server = spawn(["serve"], env=env, log_path=tmp_path / "serve.log")
    learner = spawn(["learner"], env=env, log_path=tmp_path / "learner.log")  # all three start side by side
    worker, metrics_url = start_worker(env, tmp_path / "worker.log")
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    try:
        wait_http(f"{base}/healthz", 120, server, tmp_path / "serve.log")
        wait_http(learner_url, 180, learner, tmp_path / "learner.log")
        learner.send_signal(signal.SIGSTOP)  # no round until precision before it is measured
        producer = make_producer(kafka)
        send(producer, kafka.topic, from_arrays(data.images, shown, prefix="c-"), progress=False)
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= len(shown), 180, "the photos indexed")
        before = precision_at_10(base, queries.images, queries.labels, truth)
        learner.send_signal(signal.SIGCONT)
        wait_for(lambda: scrape(learner_url).get("streamhash_reencode_triggers_total", 0) >= 1, 300,
                 "a round on stored features and its re-encode announced")
        wait_for(lambda: all(s["generation"] >= 2 for s in httpx.get(f"{base}/healthz").json()["shards"]), 180,
                 "every shard re-encoded and served")
        after = precision_at_10(base, queries.images, queries.labels, truth)
        worker_metrics, learner_metrics = scrape(metrics_url), scrape(learner_url)
    finally:
        learner.send_signal(signal.SIGCONT)
        for proc in (learner, server, worker):
            stop(proc)
    print(f"CIFAR-10 photos: precision@10 {before:.3f} before the round, {after:.3f} after")
    assert learner_metrics["streamhash_learning_rounds_total"] >= 1
    assert worker_metrics.get("streamhash_reencoded_images_total", 0) >= 1  # unlabeled items' codes, from features
    assert total(worker_metrics, "streamhash_stored_images_decoded_total") == 0
    assert total(learner_metrics, "streamhash_stored_images_decoded_total") == 0
    assert after > before + 0.1
    root, kept = StoreRoot(tmp_path / "index", create=False), 0
    for key in root.shards():
        store = Store(root.shard_path(key), readonly=True)
        assert store.feature_spec() == {"backbone": "efficientnet_lite0", "cut": "pooled", "feature_shape": [1280],
                                        "dtype": "float16", "input_size": 224}
        ids = store.snapshot().ids
        kept += sum(f is not None and f.shape == (1280,) for f in store.features(ids))
        store.close()
    assert kept == len(shown)
