"""The discovering router's side (``streamhash serve --discover``, :mod:`streamhash.services.router`): the map of
who serves which partition, read from the serving topic, and the answers of the servers it routes to merged into
one, every partition exactly once (see the router's docstring)."""

from __future__ import annotations

import base64
import logging
import time

from streamhash.config import Settings
from streamhash.index.rerank import merge_key, merged_fields
from streamhash.kafka.directory import DirectoryReader, Routes, ensure_serving_topic
from streamhash.services.spec import model_key

log = logging.getLogger("streamhash.router")

PARTITIONS_EVERY_S = 30.0  # the images topic's partition count, read again this often (Kafka can add partitions)


class Discovery:
    """The serving topic read to its end at start, then followed; the images topic's partitions beside it."""

    def __init__(self, settings: Settings):
        kafka = settings.kafka
        self.topic = kafka.topic
        ensure_serving_topic(kafka)
        self.reader = DirectoryReader(kafka, settings.server.advertise_ttl_s, key=model_key(settings))
        self.reader.read_to_end()
        self.partitions: tuple[int, ...] = ()
        self._read_at = 0.0
        self._read_partitions()
        self.reader.follow(also=self._read_partitions)

    def _read_partitions(self) -> None:
        if self.partitions and time.monotonic() - self._read_at < PARTITIONS_EVERY_S:
            return
        found = self.reader.consumer.partitions_for_topic(self.topic)
        self._read_at = time.monotonic()
        if found and tuple(sorted(found)) != self.partitions:
            self.partitions = tuple(sorted(found))
            log.info("%s has %d partitions", self.topic, len(self.partitions))

    def routes(self, wanted: list[int] | None = None) -> Routes:
        """Every partition of the images topic (or of ``wanted`` among them) to one server."""
        parts = self.partitions if wanted is None else [p for p in self.partitions if p in set(wanted)]
        return self.reader.map.routes(parts)

    def close(self) -> None:
        self.reader.close()


def partition_of(shard: str) -> int:
    """The partition of a shard named ``topic/partition``."""
    return int(shard.rsplit("/", 1)[1])


def bodies(req, image: bytes | None, routes: Routes) -> dict[str, dict]:
    """Each routed server's JSON /search body: the request (a multipart one's image as base64) and its partitions."""
    base = req.model_dump(exclude_none=True, exclude={"partitions"})
    if image is not None and "image_base64" not in base:
        base["image_base64"] = base64.b64encode(image).decode()
    return {url: {**base, "partitions": list(parts)} for url, parts in routes.servers.items()}


def unserved(topic: str, routes: Routes) -> list[dict]:
    return [{"shard": f"{topic}/{p}", "answered": False, "error": "no query server serves this partition"}
            for p in routes.missing]


def _shards(answers, routes: Routes, topic: str, key: str = "shards") -> list[dict]:
    """Each routed partition's entry in partition order: as its server described it, or why it has none."""
    out = unserved(topic, routes)
    for a in answers:
        own = set(routes.servers.get(a.url, ()))
        if a.ok:
            out += [{**s, "url": a.url, **({"restoring": True} if partition_of(s["shard"]) in routes.restoring else {})}
                    for s in a.body.get(key, []) if "shard" in s and partition_of(s["shard"]) in own]
        else:
            out += [{"shard": f"{topic}/{p}", **a.missing()} for p in sorted(own)]
    return sorted(out, key=lambda s: partition_of(s["shard"]))


def merge(answers, routes: Routes, topic: str, k: int, item_id: str | None = None) -> dict:
    """The fields of a /search response from the routed servers' answers (at least one of them 200)."""
    ok = [a for a in answers if a.ok]
    hits = []
    for a in ok:  # a server answers for its own partitions only; one that ignored the request's is held to them
        own = set(routes.servers.get(a.url, ()))
        hits += [h for h in a.body["results"] if partition_of(h["shard"]) in own]
    hits.sort(key=lambda h: (*merge_key(h), partition_of(h["shard"])))  # stable: each shard keeps its own order
    if item_id is not None:
        hits = [h for h in hits if h["id"] == item_id] + [h for h in hits if h["id"] != item_id]
    shards = _shards(answers, routes, topic)
    newest = max(ok, key=lambda a: (a.body["generation"], a.body["model_version"]))
    return {"results": hits[:k], "model_version": newest.body["model_version"], "generation": newest.body["generation"],
            "index_size": sum(s.get("index_size") or 0 for s in shards if s["answered"]),
            "code_hex": newest.body["code_hex"], "shards": shards,
            "partial": routes.partial or any(not s["answered"] for s in shards) or any(a.body.get("partial") for a in ok),
            **merged_fields([a.body for a in ok])}


def health(answers, routes: Routes, topic: str) -> tuple[int, dict]:
    """``/healthz`` over the routed servers: each routed partition's shard, and ``partial`` where one is missing."""
    ok = [a for a in answers if a.ok]
    shards = [{**s, "answered": s.get("answered", True)} for s in _shards(answers, routes, topic)]
    whole = len(ok) == len(answers) and not routes.partial
    status = "ok" if whole and ok else "partial" if ok else "unavailable"
    return 200 if ok else 503, {"status": status, "index_size": sum(s.get("index_size") or 0 for s in shards if s["answered"]),
                                "shards": shards, "partial": not whole,
                                "servers": {url: list(parts) for url, parts in routes.servers.items()}}
