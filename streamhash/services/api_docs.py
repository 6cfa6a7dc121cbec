"""What ``/docs`` and ``/redoc`` say about each query-server endpoint: summary, description, examples.

Kept apart from the routes so that the handlers stay readable; each dict is spread into a route decorator.
"""

from __future__ import annotations

_HIT = {"id": "fmnist-train-17", "distance": 3, "labels": [7], "label_names": ["Sneaker"], "shard": "streamhash.images/2"}
_SHARD = {"shard": "streamhash.images/2", "generation": 1, "model_version": 3, "index_size": 2512, "answered": True}

SEARCH = dict(
    summary="Nearest stored items by Hamming distance",
    description=(
        "Give exactly one query: `image_base64` (PNG, JPEG or .npy bytes, checked like an ingested image), "
        "`code_hex` (a packed code, bits/4 hex digits) or `item_id` (a stored item: it comes first, at distance 0); "
        "or a multipart form with an `image` file. `k` neighbours (default 10), or with `radius` only those at "
        "distance < radius. Hits are ordered by distance, then shard, then insertion, across every shard; each shard "
        "is ranked against the query encoded by that shard's model. Where the shards keep features (photos), a "
        "search by image or item is re-ranked (`reranked: true`): `server.rerank_candidates` Hamming hits ordered by "
        "distance, then by the labels of the 10 most similar of that distance (their class first), then by the "
        "cosine of their stored features to the query's (each hit's `similarity`); a search by "
        "`code_hex` keeps Hamming order (`rerank_note` says why). `model_version` 1 means the model is untrained "
        "(no learning round yet): hits are then close to noise. `partial: true` when a shard did not answer.\n\n"
        "Errors: 400 an unreadable or refused image (the reason is in `detail`), a bad code, k or radius; 404 an "
        "unknown `item_id`; 409 an item not yet in the live generation; 413 a body over the size limit."),
    responses={
        200: {"content": {"application/json": {"example": {
            "results": [{**_HIT, "distance": 0, "id": "fmnist-train-4"}, _HIT], "model_version": 3, "generation": 1,
            "index_size": 10050, "code_hex": "0f3a9c21", "took_ms": 1.2, "shards": [_SHARD], "partial": False,
            "reranked": False, "rerank_note": "no stored feature for the query (its shards' network is trained end to "
                                              "end: it keeps the image, not a feature)"}}}},
        400: {"description": "a bad query: unreadable or refused image, bad code, k or radius",
              "content": {"application/json": {"example": {"detail": "image is 30x30, expected 28x28 "
                                                                     "(STREAMHASH_IMAGE__RESIZE=fill or fit accepts any size)"}}}},
        404: {"description": "no such item (search by `item_id`)"},
        413: {"description": "the body is over the size limit"},
    },
)

ITEM = dict(
    summary="One stored item: labels, code, shard, whether it is searchable yet",
    description=(
        "The item as its shard stores it: labels (`label_names`: their class names, where the index has them), "
        "arrival time `ts`, `seq` in its shard, the `generation` and `code_hex` it is ranked by, its `shard` and "
        "stored `content_type`, and `visible`: whether the live index already searches it (an item is committed a "
        "moment before it is visible). The image itself is at `/items/{id}/image`. 404 for an unknown id."),
    responses={
        200: {"content": {"application/json": {"example": {
            "id": "fmnist-train-4", "labels": [9], "label_names": ["Ankle boot"], "ts": 1765000000.5, "seq": 1203,
            "generation": 1, "shard": "streamhash.images/1", "content_type": "image/png", "code_hex": "0f3a9c21",
            "visible": True}}}},
        404: {"description": "no such item", "content": {"application/json": {"example": {"detail": "no item 'x'"}}}},
    },
)

HEALTHZ = dict(
    summary="Liveness and what is served: index size, model, every shard",
    description=(
        "Always 200 while the process serves: the items in every shard, the newest shard's generation and model "
        "version (1: untrained, no learning round yet), the code width, and per shard its generation, model "
        "version, size and last sequence number."),
    responses={200: {"content": {"application/json": {"example": {
        "status": "ok", "index_size": 10050, "generation": 1, "model_version": 3, "bits": 32,
        "shards": [{**_SHARD, "last_seq": 2512}]}}}}},
)

METRICS = dict(
    summary="Prometheus metrics of this query server",
    description=(
        "The text exposition format: `streamhash_queries_total{endpoint,status}`, "
        "`streamhash_query_duration_seconds`, `streamhash_index_items{process=\"query\"}`, the served model "
        "version and generation, and the process's own. Workers and the learner serve their own metrics."),
    responses={200: {"content": {"text/plain": {"example": "streamhash_index_items{process=\"query\"} 10050.0\n"}}}},
)


def for_router(doc: dict) -> dict:
    """A query server's endpoint doc as a router's (``streamhash serve --shards``): the same answer, merged."""
    return {**doc, "description": doc["description"] + (
        "\n\nThis is a router: it asks every query server in `--shards` and merges their answers (a server that "
        "does not answer within `STREAMHASH_SERVER__SHARD_TIMEOUT_S` is named in `shards` and the answer is "
        "`partial`).")}
