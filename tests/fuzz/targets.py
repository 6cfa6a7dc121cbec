"""What the fuzz tests and benchmarks/bench_fuzz.py run on each generated input, and how they name the outcome."""

from __future__ import annotations

import numpy as np

from streamhash.errors import RecordRejected
from streamhash.records import decode_image, parse_message
from tests.fuzz.strategies import SPEC


def parse_outcome(key, value, headers) -> str:
    """``indexed`` or ``rejected_<stage>``; anything else parse_message raises propagates."""
    try:
        rec = parse_message(key, value, headers, SPEC)
    except RecordRejected as exc:
        return f"rejected_{exc.stage}"
    assert isinstance(rec.image, np.ndarray) and rec.image.dtype == np.uint8 and rec.image.shape == SPEC.shape
    assert rec.labels is None or (len(rec.labels) <= SPEC.max_labels and all(0 <= x <= SPEC.max_label for x in rec.labels))
    return "indexed"


def decode_outcome(value: bytes, content_type: str) -> str:
    """The learner and the query server call decode_image directly: the same promise as parse_message."""
    try:
        image = decode_image(value, content_type, SPEC)
    except RecordRejected as exc:
        return f"rejected_{exc.stage}"
    assert image.dtype == np.uint8 and image.shape == SPEC.shape
    return "indexed"


def http_status(client, request: tuple[str, str, dict]) -> int:
    method, path, kwargs = request
    return client.request(method, path, **kwargs).status_code
