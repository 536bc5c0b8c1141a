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
    assert fake.trio.Lock is loop.NoCheckpointLock
    assert fake.trio.lowlevel.wait_readable == waiter.wait_readable
    assert fake.trio.open_nursery is trio.open_nursery
    assert fake.trio.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
    assert fake.trio.ClosedResourceError is trio.ClosedResourceError
