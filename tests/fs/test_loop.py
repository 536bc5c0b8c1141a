"""The pieces fs/loop.py puts under pyfuse3's worker loop (no mount needed;
the FUSE tests run every request through them)."""

from __future__ import annotations

import os
import types

import trio
import trio.testing

from layerfs.fs import loop


def test_free_lock_is_taken_without_yielding():
    async def main():
        lock = loop.NoCheckpointLock()
        with trio.testing.assert_no_checkpoints():
            async with lock:
                pass
            async with lock:
                pass

    trio.run(main)


def test_lock_passes_to_waiters_in_order():
    order = []

    async def worker(lock, n, started):
        started.set()
        async with lock:
            order.append(n)
            await trio.sleep(0.01)  # others queue up meanwhile

    async def main():
        lock = loop.NoCheckpointLock()
        async with trio.open_nursery() as nursery:
            for n in range(5):
                started = trio.Event()
                nursery.start_soon(worker, lock, n, started)
                await started.wait()
        assert not lock.locked()

    trio.run(main)
    assert order == [0, 1, 2, 3, 4]


def test_a_cancelled_waiter_does_not_get_the_lock():
    async def main():
        lock = loop.NoCheckpointLock()
        got = []

        async def waiter(scope_box):
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                async with lock:
                    got.append(True)

        async with lock:
            box = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter, box)
                await trio.testing.wait_all_tasks_blocked()
                box[0].cancel()
        assert got == [] and not lock.locked()  # released by its holder, to nobody

    trio.run(main)


def _run(main) -> None:
    """trio.run with a deadline: a hand-over that never comes fails the
    test instead of hanging it."""
    async def bounded():
        with trio.fail_after(10):
            await main()

    trio.run(bounded)


async def _queue_waiters(lock, n: int, nursery, got: list) -> None:
    """Start *n* tasks that queue for *lock* in order and note when they hold it."""
    async def waiter(i):
        async with lock:
            got.append(i)
            await trio.sleep(0)

    for i in range(n):  # one at a time: trio runs tasks started together in any order
        nursery.start_soon(waiter, i)
        await trio.testing.wait_all_tasks_blocked()


def test_read_lock_free_is_taken_without_yielding():
    async def main():
        lock = loop.ReadLock()
        with trio.testing.assert_no_checkpoints():
            async with lock:
                assert lock.locked()
            async with lock:
                pass
        assert not lock.locked()

    _run(main)


def test_read_lock_stays_with_a_worker_that_comes_back_before_a_pass():
    """A request handled without an await: no hand-over, no yield."""
    async def main():
        lock = loop.ReadLock()
        got = []
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            await _queue_waiters(lock, 2, nursery, got)
            await lock.__aexit__()
            with trio.testing.assert_no_checkpoints():
                await lock.__aenter__()  # back before the scheduler ran: taken past the waiters
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and lock.locked()  # the scheduler ran: the waiters still wait
            await lock.__aexit__()
        assert got == [0, 1] and not lock.locked()

    _run(main)


def test_read_lock_goes_to_a_waiter_when_its_holder_blocks():
    """A request that waits (a thread, I/O): the next worker reads meanwhile."""
    async def main():
        lock = loop.ReadLock()
        got = []
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            await _queue_waiters(lock, 3, nursery, got)
            await lock.__aexit__()
            await trio.sleep(0.01)  # the holder's request blocks
            assert got[:1] == [0]   # the first waiter got the lock meanwhile
        assert got == [0, 1, 2] and not lock.locked()

    _run(main)


def test_read_lock_is_taken_past_waiters_at_most_once_per_pass():
    """A stream that never yields still hands the lock on: the trio loop runs between two requests."""
    async def main():
        lock = loop.ReadLock()
        got = []
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            await _queue_waiters(lock, 1, nursery, got)
            await lock.__aexit__()
            await lock.__aenter__()  # once: taken again, past the waiter
            await lock.__aexit__()
            with trio.testing.assert_checkpoints():
                await lock.__aenter__()  # twice without a pass: waits its turn behind the waiter
            assert got == [0]
            await lock.__aexit__()
        assert not lock.locked()

    _run(main)


def test_read_lock_cancelled_waiter_does_not_get_it():
    async def main():
        lock = loop.ReadLock()
        got = []
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            scope = trio.CancelScope()

            async def waiter():
                with scope:
                    async with lock:
                        got.append("cancelled one")

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            await _queue_waiters(lock, 1, nursery, got)
            await lock.__aexit__()
        assert got == [0] and not lock.locked()

    _run(main)


def test_waiter_returns_at_once_when_a_request_is_queued():
    r, w = os.pipe()
    try:
        os.write(w, b"x")

        async def main():
            waiter = loop.FuseWaiter()
            with trio.testing.assert_no_checkpoints():
                await waiter.wait_readable(r)

        trio.run(main)
    finally:
        os.close(r)
        os.close(w)


def test_waiter_parks_until_readable_and_learns_the_pace():
    r, w = os.pipe()
    try:
        async def main():
            waiter = loop.FuseWaiter()

            async def write_later(delay):
                await trio.sleep(delay)
                os.write(w, b"x")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_later, 0.05)
                await waiter.wait_readable(r)  # parked in epoll, woken by the write
            assert not waiter.streaming        # 50 ms apart: sporadic, no spinning
            os.read(r, 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_later, 0)
                await waiter.wait_readable(r)

        trio.run(main)
    finally:
        os.close(r)
        os.close(w)


def test_install_replaces_only_the_lock_and_the_wait():
    fake = types.SimpleNamespace()
    waiter = loop.install(fake)
    assert fake.trio.Lock is loop.ReadLock
    assert fake.trio.lowlevel.wait_readable == waiter.wait_readable
    assert fake.trio.open_nursery is trio.open_nursery
    assert fake.trio.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
    assert fake.trio.ClosedResourceError is trio.ClosedResourceError
