"""A query server's advert on the serving topic (:mod:`streamhash.kafka.directory`): which partitions of the images
topic it serves, at ``server.advertise_url``, so a discovering router needs no list of servers.

The served set is read from the shards under the root, each from its meta: a fenced shard (``fenced`` truthy: its
partition moved to another machine) is left out, a restoring one (``restoring`` truthy) is served and said to be
restoring. It is read every half second; the advert goes out when the set changes and every
``advertise_interval_s`` (the router drops an advert older than ``advertise_ttl_s``), and a tombstone withdraws
it when the server stops cleanly. The first advert waits for the server's port to accept connections, so a router
is not sent to a server still starting. A broker out of reach is retried and logged once: searching goes on.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable

from streamhash.config import Settings
from streamhash.index.store import Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.kafka.directory import Advertiser, ensure_serving_topic
from streamhash.services.spec import model_key

log = logging.getLogger("streamhash.query")

CHECK_S = 0.5
Shards = Callable[[], Iterable[tuple[ShardKey, Store]]]  # the shards served now, each with its open store


def served(shards: Iterable[tuple[ShardKey, Store]], topic: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(partitions served, those restoring) among ``shards`` of ``topic``: fenced shards left out."""
    parts, restoring = [], []
    for key, store in shards:
        if key.topic != topic:
            continue
        try:
            meta = store.read_meta()
        except Exception as exc:  # noqa: BLE001 - a shard being created or removed is judged on the next check
            log.debug("shard %s/%d: meta not readable: %s", key.topic, key.partition, exc)
            continue
        if meta.get("fenced"):
            continue
        parts.append(key.partition)
        if meta.get("restoring"):
            restoring.append(key.partition)
    return tuple(sorted(parts)), tuple(sorted(restoring))


class OwnStores:
    """The shards under a root opened read-only here: for a process that holds no index (the parent of
    ``--workers`` processes). LMDB wants one handle per environment per process: never beside an index."""

    def __init__(self, root: StoreRoot):
        self.root, self._open = root, {}

    def __call__(self) -> list[tuple[ShardKey, Store]]:
        for key in self.root.shards():
            if key not in self._open:
                try:
                    self._open[key] = Store(self.root.shard_path(key), readonly=True)
                except Exception as exc:  # noqa: BLE001 - a shard being created opens on a later check
                    log.debug("shard %s not open yet: %s", key, exc)
        return list(self._open.items())

    def close(self) -> None:
        for store in self._open.values():
            store.close()
        self._open.clear()


class AdvertLoop:
    """The advert kept up to date in a thread, from :meth:`start` to :meth:`stop` (which withdraws it)."""

    def __init__(self, settings: Settings, shards: Shards):
        s = settings.server
        self.kafka, self.url, self.shards = settings.kafka, s.advertise_url.rstrip("/"), shards
        self.interval_s, self.key = s.advertise_interval_s, model_key(settings)
        local = "127.0.0.1" if s.host in ("0.0.0.0", "", "::") else s.host
        self.port_at = (local, s.port)
        self.advertiser: Advertiser | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "AdvertLoop":
        self._thread = threading.Thread(target=self._run, name="advertise", daemon=True)
        self._thread.start()
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(self.port_at, timeout=1):
                return True
        except OSError:
            return False

    def _run(self) -> None:
        while not self._listening():
            if self._stop.wait(0.2):
                return
        last, sent_at, failing = None, 0.0, False
        while not self._stop.is_set():
            try:
                if self.advertiser is None:
                    ensure_serving_topic(self.kafka)
                    self.advertiser = Advertiser(self.kafka, self.url, key=self.key)
                now = served(self.shards(), self.kafka.topic)
                if now != last or time.monotonic() - sent_at >= self.interval_s:
                    self.advertiser.publish(*now)
                    if now != last:
                        log.info("advertised at %s: partitions %s, restoring %s", self.url, list(now[0]), list(now[1]))
                    last, sent_at, failing = now, time.monotonic(), False
            except Exception as exc:  # noqa: BLE001 - the broker away: search goes on, the advert is retried
                if not failing:
                    log.warning("could not advertise on %s (%s: %s); retrying", self.kafka.serving_topic,
                                type(exc).__name__, exc)
                failing, last = True, None
            self._stop.wait(CHECK_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.advertiser is not None:
            try:
                self.advertiser.withdraw()
                log.info("withdrew the advert of %s", self.url)
            except Exception as exc:  # noqa: BLE001 - the router drops it after the TTL
                log.warning("could not withdraw the advert of %s: %s", self.url, exc)
            self.advertiser.close()


def advertising(settings: Settings, shards: Shards) -> AdvertLoop | None:
    """The advert loop, started, when ``server.advertise_url`` is set; else None."""
    if not settings.server.advertise_url:
        return None
    if not settings.kafka.bootstrap_servers:
        from streamhash.errors import ConfigError

        raise ConfigError("server.advertise_url is set but kafka.bootstrap_servers is not: adverts go on Kafka")
    return AdvertLoop(settings, shards).start()
