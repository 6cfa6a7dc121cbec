"""MicroBatcher: requests queued together share one call, each gets its own result, errors stay in their group."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streamhash.services.batching import MicroBatcher


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("in_loop", [False, True])
def test_a_lone_request_is_answered_alone_and_at_once(in_loop):
    calls = []

    def batch(key, items):
        calls.append((key, list(items)))
        return [x * 2 for x in items]

    async def main():
        b = MicroBatcher(batch, in_loop=in_loop)
        t = time.perf_counter()
        got = await b.submit("g", 21)
        took = time.perf_counter() - t
        await b.aclose()
        return got, took

    got, took = run(main())
    assert got == 42 and calls == [("g", [21])] and took < 0.5


def test_requests_waiting_together_share_one_call_per_key_in_order():
    gate = threading.Event()
    calls = []

    def batch(key, items):
        if key == "block":
            gate.wait(5)  # holds the batcher while the others queue up
        calls.append((key, list(items)))
        return [(key, x) for x in items]

    async def main():
        b = MicroBatcher(batch, max_batch=100)
        first = asyncio.ensure_future(b.submit("block", -1))
        await asyncio.sleep(0.05)  # the batcher is now inside the blocked call
        rest = [asyncio.ensure_future(b.submit("ab"[i % 2], i)) for i in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(first, *rest)
        await b.aclose()
        return out, b.batches

    out, batches = run(main())
    assert out[0] == ("block", -1)
    assert out[1:] == [("ab"[i % 2], i) for i in range(20)]
    assert batches == 3  # block, then one call for "a" and one for "b"
    assert calls[1:] == [("a", list(range(0, 20, 2))), ("b", list(range(1, 20, 2)))]


@pytest.mark.parametrize("in_loop", [False, True])
def test_max_batch_bounds_a_call(in_loop):
    sizes = []

    def batch(key, items):
        sizes.append(len(items))
        time.sleep(0.01)
        return list(items)

    async def main():
        b = MicroBatcher(batch, max_batch=4, in_loop=in_loop)
        out = await asyncio.gather(*(b.submit(0, i) for i in range(17)))
        await b.aclose()
        return out

    assert run(main()) == list(range(17))
    assert max(sizes) <= 4 and sum(sizes) == 17


@pytest.mark.parametrize("in_loop", [False, True])
def test_a_window_gathers_requests_that_arrive_within_it(in_loop):
    sizes = []

    def batch(key, items):
        sizes.append(len(items))
        return list(items)

    async def main():
        b = MicroBatcher(batch, window_s=0.2, in_loop=in_loop)
        tasks = []
        for i in range(5):
            tasks.append(asyncio.ensure_future(b.submit(0, i)))
            await asyncio.sleep(0.01)
        out = await asyncio.gather(*tasks)
        await b.aclose()
        return out

    assert run(main()) == list(range(5))
    assert sizes == [5]


@pytest.mark.parametrize("in_loop", [False, True])
def test_an_error_reaches_only_its_group(in_loop):
    gate = threading.Event()

    def batch(key, items):
        if key == "block":
            gate.wait(5)
        if key == "bad":
            raise ValueError("broken group")
        return list(items)

    async def main():
        b = MicroBatcher(batch, in_loop=in_loop)
        first = asyncio.ensure_future(b.submit("block", 0))
        await asyncio.sleep(0.05)
        good = [asyncio.ensure_future(b.submit("good", i)) for i in range(3)]
        bad = [asyncio.ensure_future(b.submit("bad", i)) for i in range(3)]
        await asyncio.sleep(0.05)
        gate.set()
        res = await asyncio.gather(first, *good, *bad, return_exceptions=True)
        again = await b.submit("good", 7)  # the batcher survives the error
        await b.aclose()
        return res, again

    res, again = run(main())
    assert res[:4] == [0, 0, 1, 2]
    assert all(isinstance(r, ValueError) and "broken group" in str(r) for r in res[4:])
    assert again == 7


@pytest.mark.parametrize("in_loop", [False, True])
def test_an_exception_in_an_items_place_reaches_only_that_request(in_loop):
    def batch(key, items):
        return [ValueError(f"bad {i}") if i % 2 else i * 10 for i in items]

    async def main():
        b = MicroBatcher(batch, in_loop=in_loop, window_s=0.02)
        futs = [asyncio.ensure_future(b.submit("k", i)) for i in range(6)]
        await asyncio.wait(futs)
        await b.aclose()
        return [("raised", str(f.exception())) if f.exception() else ("answered", f.result()) for f in futs], b.batches

    outcomes, batches = run(main())
    assert batches == 1
    assert outcomes == [("answered", 0), ("raised", "bad 1"), ("answered", 20), ("raised", "bad 3"), ("answered", 40),
                        ("raised", "bad 5")]


@pytest.mark.parametrize("in_loop", [False, True])
def test_a_wrong_number_of_results_is_an_error(in_loop):
    async def main():
        b = MicroBatcher(lambda key, items: [], in_loop=in_loop)
        try:
            with pytest.raises(RuntimeError, match="0 results for 1 items"):
                await b.submit(0, 1)
        finally:
            await b.aclose()

    run(main())


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(lambda k, i: i, max_batch=0)


def test_max_inflight_batches_run_at_the_same_time():
    both = threading.Barrier(2, timeout=5)  # passes only when two batches are inside run_batch together

    def batch(key, items):
        both.wait()
        return list(items)

    async def main():
        b = MicroBatcher(batch, max_inflight=2)
        first = asyncio.ensure_future(b.submit("a", 1))
        await asyncio.sleep(0.05)  # the first batch is running (and waiting at the barrier)
        second = await b.submit("b", 2)
        out = [await first, second]
        await b.aclose()
        return out

    assert run(main()) == [1, 2]


@pytest.mark.parametrize("in_loop", [False, True])
def test_in_loop_batches_run_on_the_event_loops_thread(in_loop):
    """in_loop spares the hand-off to a thread and back, which cost more than a small search's ranking."""
    ran_on = []

    def batch(key, items):
        ran_on.append(threading.get_ident())
        return list(items)

    async def main():
        b = MicroBatcher(batch, in_loop=in_loop)
        got = await asyncio.gather(*(b.submit("a", i) for i in range(5)))
        await b.aclose()
        return got

    assert run(main()) == list(range(5))
    assert (set(ran_on) == {threading.get_ident()}) is in_loop
