"""The readers-writer lock the Hamming index and the store's resize guard share."""

import threading
import time

from streamhash.rwlock import RWLock


def test_readers_share_and_a_waiting_writer_goes_before_later_readers():
    lock, order = RWLock(), []
    both_in = threading.Barrier(3, timeout=5)
    release = threading.Event()

    def early_reader(name):
        with lock.read():
            both_in.wait()  # two readers inside at once, else this times out
            release.wait(5)
            order.append(name)

    def writer():
        with lock.write():
            order.append("writer")

    def late_reader():
        with lock.read():
            order.append("late reader")

    readers = [threading.Thread(target=early_reader, args=(f"reader {i}",)) for i in range(2)]
    for t in readers:
        t.start()
    both_in.wait()
    w = threading.Thread(target=writer)
    w.start()
    while not lock._writers_waiting:  # the writer is queued behind the two readers
        time.sleep(0.001)
    late = threading.Thread(target=late_reader)
    late.start()
    time.sleep(0.05)
    assert order == []  # the late reader waits behind the writer, the writer behind the readers
    release.set()
    for t in [*readers, w, late]:
        t.join(5)
        assert not t.is_alive()
    assert order[2:] == ["writer", "late reader"]


def test_writers_exclude_readers_and_each_other_under_contention():
    lock, state, seen = RWLock(), [0, 0], []
    stop = threading.Event()

    def write():
        for _ in range(2000):
            with lock.write():
                state[0] += 1
                time.sleep(0)  # let a reader in if it could get in
                state[1] += 1

    def read():
        while not stop.is_set():
            with lock.read():
                a, b = state
                if a != b:
                    seen.append((a, b))

    threads = [threading.Thread(target=write) for _ in range(2)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(60)
    stop.set()
    for t in threads[2:]:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert state == [4000, 4000] and seen == []
