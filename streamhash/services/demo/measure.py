"""What the demo measures over HTTP: freshness (send -> searchable, per probe image), precision@10 and the
latency of searches by image, and the processes' metrics, scraped with a deadline."""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np

from streamhash.records import encode_png, message_headers
from streamhash.services import processes

# One metrics scrape of a learner in a round on a loaded machine once took over 5 s and ended the demo with
# a traceback: each scrape is asked again until this deadline, then the demo stops with one line.
SCRAPE_DEADLINE_S = 60.0


def scrape(url: str) -> dict[str, float]:
    return processes.scrape(url, deadline_s=SCRAPE_DEADLINE_S)


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def probe_freshness(producer, topic: str, server: str, images: np.ndarray, labels: np.ndarray, *,
                    interval: float = 0.05, timeout: float = 10.0, first: int = 0) -> list[dict]:
    """Send probe images one at a time; each row times one from send (seconds): ``acked`` (the broker's
    acknowledgement), ``committed`` (the worker's LMDB commit: ``GET /items`` finds it in the store) and
    ``visible`` (in the query server's index), with ``at`` (when it was sent, wall clock). A probe not
    visible within ``timeout`` has no row. Ids are ``probe-{first}``, ``probe-{first + 1}``...: a later
    call passes on ``first`` so that it never re-sends an id already visible."""
    rows = []
    with httpx.Client(timeout=5) as client:
        for i, (img, lab) in enumerate(zip(images, labels), start=first):
            item_id = f"probe-{i}"
            sent = time.time()
            producer.send(topic, key=item_id.encode(), value=encode_png(img), headers=message_headers(int(lab), "image/png"))
            producer.flush()
            row = {"at": sent, "acked": time.time() - sent}
            while time.time() - sent < timeout:
                r = client.get(f"{server}/items/{item_id}")
                if r.status_code == 200:
                    row.setdefault("committed", time.time() - sent)
                    if r.json()["visible"]:
                        row["visible"] = time.time() - sent
                        rows.append(row)
                        break
                time.sleep(0.002)
            time.sleep(interval)
    return rows


def measure_freshness(producer, topic: str, server: str, images: np.ndarray, labels: np.ndarray, **kw) -> list[float]:
    """Seconds from send to visible in the query server, per probe (:func:`probe_freshness`)."""
    return [row["visible"] for row in probe_freshness(producer, topic, server, images, labels, **kw)]


def precision_at_10(server: str, images: np.ndarray, labels: np.ndarray,
                    truth: dict[str, int] | None = None) -> tuple[float, list[float]]:
    """Mean precision@10 of HTTP searches with these images, and each search's latency (seconds). ``truth``: each
    stored id's true class (an item sent unlabeled has one too); without it, a hit's own labels."""
    hits, latencies = [], []
    with httpx.Client(timeout=30) as client:
        for img, lab in zip(images, labels):
            body = {"image_base64": base64.b64encode(encode_png(img)).decode(), "k": 10}
            t = time.perf_counter()
            r = client.post(f"{server}/search", json=body)
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            results = r.json()["results"]
            if truth is None:
                hits.append(np.mean([h["labels"] == [int(lab)] for h in results]))
            else:
                hits.append(np.mean([truth.get(h["id"]) == int(lab) for h in results]))
    return float(np.mean(hits)), latencies
