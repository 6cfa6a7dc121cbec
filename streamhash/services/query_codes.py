"""The query code for each shard of a search: every shard is ranked against a query in its own code space.

During a rolling re-encode the shards serve different generations, whose codes come from different
networks; a query image is therefore encoded once per distinct model version among the shards of the
query's view, each time with the network stored in a shard at that version (the learner's version
numbers are global: a version is the same network in every shard). A search by a stored item uses the
item's stored code for the shards serving the item's generation (so it is at distance 0 from itself),
and its stored image encoded by their own model for shards serving another.

A shard that cannot be given a query (its model is not stored yet) is left out of the ranking with the
reason, which the response reports (``answered: false``); a shard with no model and no items has nothing
to rank and is simply answered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException

from streamhash.errors import BadQueryError, RecordRejected
from streamhash.index.sharded import ShardedIndex, ShardView, View
from streamhash.index.store import arrival
from streamhash.model.state import NetCache, stored_net
from streamhash.records import ImageSpec, content_type_of, decode_image
from streamhash.services.http_api import PayloadTooLarge, check_item_id


@dataclass
class ShardQueries:
    """One search's query code per shard of its view (None: the shard is not ranked) and why a shard is not."""

    codes: list[np.ndarray | None]
    errors: list[str | None]
    # the query's stored input where its network has a frozen part (the image's feature, or the item's stored
    # one): what the second stage compares candidates with (streamhash.index.rerank); None: Hamming order only
    feature: np.ndarray | None = None

    @classmethod
    def same(cls, view: View, code: np.ndarray) -> "ShardQueries":
        return cls([code] * len(view), [None] * len(view))

    def check_some(self) -> None:
        """400 when shards exist but none could be given a query (as one store without a model was)."""
        if self.codes and all(c is None for c in self.codes) and any(self.errors):
            raise BadQueryError(next(e for e in self.errors if e) + "; search by code_hex or retry")


class QueryEncoder:
    """Query images encoded with each shard's model version; networks loaded from the shards, cached by version."""

    def __init__(self, spec: ImageSpec, index: ShardedIndex):
        self.spec = spec
        self.nets = NetCache(lambda version: stored_net((shard.store for shard in index.shards), version))

    def decode(self, raw: bytes) -> np.ndarray:
        if len(raw) > self.spec.max_value_bytes:
            raise PayloadTooLarge(f"query image of {len(raw)} bytes exceeds the {self.spec.max_value_bytes}-byte limit")
        try:
            return decode_image(raw, content_type_of(raw, None), self.spec)
        except RecordRejected as exc:
            raise BadQueryError(f"query image rejected: {exc.message}") from None

    def pixels(self, upload: bytes | np.ndarray) -> np.ndarray:
        """An uploaded image as the network takes it: its file's bytes decoded, or the image already decoded."""
        return self.decode(upload) if isinstance(upload, bytes) else upload

    def for_upload(self, upload: bytes | np.ndarray, view: View) -> ShardQueries:
        """The queries of an uploaded image, decoded (:meth:`pixels`) in the same call as the encode, so a search
        hands off to a thread once."""
        return self.for_image(self.pixels(upload), view)

    def for_uploads(self, uploads: list[bytes | np.ndarray], view: View) -> list[ShardQueries | Exception]:
        """:meth:`for_upload` of each, one encode call for all; an image that does not decode gets its error
        in its place (the server's batch of concurrent image searches: one bad image fails only its own)."""
        out: list[ShardQueries | Exception | None] = []
        images = []
        for upload in uploads:
            try:
                images.append(self.pixels(upload))
                out.append(None)
            except (BadQueryError, PayloadTooLarge) as exc:
                out.append(exc)
        encoded = iter(self.for_images(images, view) if images else ())
        return [got if got is not None else next(encoded) for got in out]

    def for_image(self, image: np.ndarray, view: View, only: set[int] | None = None) -> ShardQueries:
        """``image`` encoded once per model version in ``view`` (``only``: just these shard positions)."""
        return self.for_images([image], view, only)[0]

    def for_images(self, images: list[np.ndarray], view: View, only: set[int] | None = None) -> list[ShardQueries]:
        """Each image's queries: one encode call per model version in ``view`` for all of them (the server's
        concurrent image searches meet here in one batch, as their rankings do in the kernel)."""
        out = [ShardQueries([None] * len(view), [None] * len(view)) for _ in images]
        by_version: dict[int, np.ndarray | str] = {}
        for v in view.shards:
            if only is not None and v.pos not in only:
                continue
            if v.model_version not in by_version:
                by_version[v.model_version], features = self._encode(images, view, v)
                for q, f in zip(out, features if features is not None else ()):
                    q.feature = f if q.feature is None else q.feature  # one frozen part for every version
            got = by_version[v.model_version]
            for i, q in enumerate(out):
                if isinstance(got, str):
                    q.errors[v.pos] = None if v.g.index.ntotal == 0 else got  # nothing to rank: not a missing answer
                else:
                    q.codes[v.pos] = got[i]
        return out

    def keeps_features(self, version: int) -> bool | None:
        """Whether the network of ``version`` keeps a feature per item (it has a frozen part); None: unknown (no
        model yet). Its loaded network says, so a search by item in a shard without features reads none."""
        if version <= 0:
            return None
        try:
            return bool(self.nets.get(version).frozen)
        except LookupError:
            return None

    def _encode(self, images: list[np.ndarray], view: View, v: ShardView) -> tuple[np.ndarray | str, np.ndarray | None]:
        """(the codes, or why there are none; the images' stored inputs where the network has a frozen part)"""
        if v.model_version <= 0:
            return f"shard {v.name} has no model yet", None
        try:
            net = self.nets.get(v.model_version)
        except LookupError:
            return f"model version {v.model_version} is not in shard {v.name} yet", None
        batch = np.stack(images)
        # images run the network's whole path, as on ingest (a frozen backbone's part included: prepare);
        # an item's stored feature (a search by item in another generation) runs only what follows it
        if batch.dtype != np.uint8:
            return net.encode(batch), None
        stored = net.prepare(batch)
        return net.encode(stored), (stored if net.frozen else None)


def for_item(index: ShardedIndex, view: View, encoder: QueryEncoder, item_id: str) -> tuple[ShardQueries, ShardView]:
    """The queries of a search by a stored item, and the shard holding it."""
    check_item_id(item_id)
    found = index.find_item(item_id)
    if found is None:
        raise HTTPException(404, f"no item {item_id!r}")
    shard, rec = found
    own = view.by_name(shard.name)
    if own is None:  # a shard added after this search took its view
        raise HTTPException(409, f"item {item_id!r} is in shard {shard.name}, not served yet; retry")
    code = stored_code(own, rec, item_id)
    # None where its shard keeps none (not read where its network says so: a store read, ~15% of such a search)
    feature = shard.store.features([item_id])[0] if encoder.keeps_features(own.model_version) is not False else None
    queries = ShardQueries([None] * len(view), [None] * len(view), feature)
    other = set()
    for v in view.shards:
        if v.g.generation == own.g.generation:
            queries.codes[v.pos] = code
        else:
            other.add(v.pos)
    if other:  # a rolling re-encode: the item in the code space of each other generation
        if feature is not None:  # what its network's frozen part gave its image: no decode, no backbone
            encoded = encoder.for_image(feature, view, only=other)
            for pos in other:
                queries.codes[pos], queries.errors[pos] = encoded.codes[pos], encoded.errors[pos]
            return queries, own
        blob = shard.store.get_blobs([item_id])[0]
        if blob is None:
            for pos in other:
                queries.errors[pos] = f"item {item_id!r} has no stored image to encode for generation {view.shards[pos].g.generation}"
        else:
            try:
                image = encoder.decode(blob[0])
            except (BadQueryError, HTTPException) as exc:
                for pos in other:
                    queries.errors[pos] = f"the stored image of {item_id!r} cannot be encoded: {exc}"
            else:
                encoded = encoder.for_image(image, view, only=other)
                for pos in other:
                    queries.codes[pos], queries.errors[pos] = encoded.codes[pos], encoded.errors[pos]
    return queries, own


def stored_code(v: ShardView, rec: dict, item_id: str) -> np.ndarray:
    """The item's code in the generation searched in its shard, so the item is at distance 0 from itself."""
    try:
        return v.g.index.reconstruct(arrival(rec))
    except KeyError:  # written after the generation's last refresh: the store's code is right if it is of that generation
        if rec["generation"] == v.g.generation and rec["code"]:
            return np.frombuffer(rec["code"], np.uint8)
    raise HTTPException(409, f"item {item_id!r} is not in generation {v.g.generation} of shard {v.name} yet; retry")
