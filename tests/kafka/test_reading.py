"""A topic read to its end: the deadline runs from the last progress, not from the start of the read."""

from __future__ import annotations

import pytest

from streamhash.errors import BrokerError
from streamhash.kafka.reading import read_to_end


class Slow:
    """One partition of ``end`` records, one record handed out per poll; ``stall_at``: no progress from there."""

    def __init__(self, end: int, stall_at: int | None = None):
        self.end, self.stall_at, self.pos = end, stall_at, 0

    def poll(self, _timeout_s: float) -> list:
        if self.pos < self.end and self.pos != self.stall_at:
            self.pos += 1
            return [self.pos]
        return []

    def position(self, _tp) -> int:
        return self.pos

    def highwater(self, _tp) -> int:
        return self.end


class TP:
    topic = "t"


def test_a_read_that_keeps_moving_outlasts_the_timeout(monkeypatch):
    clock = iter(range(0, 10_000, 5))  # each look at the clock: 5 s later
    monkeypatch.setattr("streamhash.kafka.reading.time.monotonic", lambda: next(clock))
    c = Slow(20)
    assert read_to_end(c, [TP()], c.poll, timeout_s=12) == list(range(1, 21))  # 100 s in all, moving throughout


def test_a_read_with_no_progress_for_the_timeout_is_a_broker_error(monkeypatch):
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr("streamhash.kafka.reading.time.monotonic", lambda: next(clock))
    c = Slow(20, stall_at=7)
    with pytest.raises(BrokerError, match=r"no progress for 12s \(at offsets \[7\], ends \[20\]\)"):
        read_to_end(c, [TP()], c.poll, timeout_s=12)
