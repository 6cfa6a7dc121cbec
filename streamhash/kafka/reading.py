"""Reading topics through to their end, for readers without a consumer group (the models topic, the dead letters).

The end is each partition's fetch high watermark: ``end_offsets`` (ListOffsets) is wrong on the embedded broker
(docs/KAFKA.md). ``timeout_s`` bounds a wait with no progress, not the whole read: a long topic of large records
takes long to read through, and a reader that moves on is not stuck (the models topic keeps every version, ~1 MB
each at the default backbone; 2,000 forged networks, ~1 GB, took over 30 s on a busy machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from streamhash.errors import BrokerError


def read_to_end(consumer, tps, poll: Callable[[float], list], timeout_s: float = 30.0) -> list:
    """``poll(seconds)``'s records until every partition in ``tps`` is read to its high watermark; BrokerError when
    no position moves for ``timeout_s``."""
    deadline, at, out = time.monotonic() + timeout_s, None, []
    while True:
        out += poll(0.2)
        ends = [(consumer.position(tp), consumer.highwater(tp)) for tp in tps]
        if all(hw is not None and position >= hw for position, hw in ends):
            return out
        if ends != at:
            deadline, at = time.monotonic() + timeout_s, ends
        elif time.monotonic() > deadline:
            raise BrokerError(f"could not read {tps[0].topic} to its end: no progress for {timeout_s:.0f}s "
                              f"(at offsets {[p for p, _ in ends]}, ends {[hw for _, hw in ends]})")
