"""Micro-batching for the query server: concurrent requests answered by one kernel call.

A request is ``submit``-ted with a key (requests with equal keys can share a call: the same generation)
and an item (its query). One task per event loop takes everything queued at that moment, up to
``max_batch`` (and, with ``window_s > 0``, what arrives within that window while the batch is not full),
groups it by key and runs ``run_batch(key, items)`` once per group in a thread: the Hamming kernel
releases the GIL, so the event loop keeps reading requests meanwhile, and those become the next batch.
A lone request finds nothing else queued and goes at once: no added latency at the default window of 0.
Up to ``max_inflight`` batches run at the same time (the kernel's cost is nearly linear in the number of
queries, so one batch at a time would leave the other cores idle); the next batch is gathered while
they run. With ``in_loop`` a batch runs on the event loop's own thread instead, in the batcher's task: no hand-off
to a thread and back (~30 us a batch, more than a small search's ranking) nor to a task of its own, at the
price of reading no request while it runs; those wait in the sockets and make the next batch
(``max_inflight`` does not apply).

``run_batch`` returns one result per item, in order; an exception in an item's place goes to that request
alone (a query image that does not decode), and an exception it raises goes to every request of that group
(and to no other group).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int = 256, window_s: float = 0.0, max_inflight: int = 1,
                 in_loop: bool = False):
        if max_batch < 1 or max_inflight < 1:
            raise ValueError(f"max_batch and max_inflight must be >= 1, got {max_batch} and {max_inflight}")
        self.run_batch, self.max_batch, self.window_s = run_batch, int(max_batch), float(window_s)
        self.max_inflight, self.in_loop = int(max_inflight), bool(in_loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # kernel calls made (groups run), for tests and benchmarks
        self.requests = 0
        self._count_lock = threading.Lock()

    async def submit(self, key: Hashable, item: Any) -> Any:
        """The result for ``item``, computed in a batch with whatever else waits under ``key``."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._start(loop)
        fut = loop.create_future()
        self._queue.put_nowait((key, item, fut))
        return await fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        # one task per event loop (a test client opens a new loop per `with`): created on first use
        self._loop, self._queue = loop, asyncio.Queue()
        self._task = loop.create_task(self._serve(self._queue), name="streamhash-search-batcher")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def _serve(self, queue: asyncio.Queue) -> None:
        slots = asyncio.Semaphore(self.max_inflight)
        running: set[asyncio.Task] = set()
        try:
            while True:
                batch = [await queue.get()]
                if self.in_loop:  # ranked right here: no task of its own to start and switch to (~10 us a batch)
                    groups = self._groups(await self._gather(queue, batch))
                    if groups:
                        self._settle(groups, self._run_groups(groups))
                    continue
                await slots.acquire()  # wait for a free slot: meanwhile more requests queue up for this batch
                batch = await self._gather(queue, batch)
                task = asyncio.get_running_loop().create_task(self._run(batch, slots))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in list(running):
                task.cancel()

    async def _gather(self, queue: asyncio.Queue, batch: list) -> list:
        while len(batch) < self.max_batch and not queue.empty():
            batch.append(queue.get_nowait())
        if self.window_s > 0 and len(batch) < self.max_batch:
            deadline = asyncio.get_running_loop().time() + self.window_s
            while len(batch) < self.max_batch:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
        return batch

    async def _run(self, batch: list, slots: asyncio.Semaphore) -> None:
        try:
            groups = self._groups(batch)
            if not groups:
                return
            try:
                outcomes = await asyncio.to_thread(self._run_groups, groups)
            except asyncio.CancelledError:
                for members in groups.values():
                    for _, fut in members:
                        if not fut.done():
                            fut.cancel()
                raise
            self._settle(groups, outcomes)
        finally:
            slots.release()

    @staticmethod
    def _groups(batch: list) -> dict[Hashable, list]:
        """key -> [(item, future)] of the requests still waiting (a client that went away cancelled its future)."""
        groups: dict[Hashable, list] = {}
        for key, item, fut in batch:
            if not fut.done():
                groups.setdefault(key, []).append((item, fut))
        return groups

    @staticmethod
    def _settle(groups: dict[Hashable, list], outcomes: list) -> None:
        for (results, error), members in zip(outcomes, groups.values()):
            for i, (_, fut) in enumerate(members):
                if fut.done():
                    continue
                if error is not None:
                    fut.set_exception(error)
                elif isinstance(results[i], BaseException):
                    fut.set_exception(results[i])
                else:
                    fut.set_result(results[i])

    def _run_groups(self, groups: dict[Hashable, list]) -> list[tuple[Sequence[Any] | None, BaseException | None]]:
        outcomes = []
        for key, members in groups.items():
            with self._count_lock:
                self.batches += 1
                self.requests += len(members)
            try:
                results = self.run_batch(key, [item for item, _ in members])
                if len(results) != len(members):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(members)} items")
                outcomes.append((results, None))
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                outcomes.append((None, exc))
        return outcomes
