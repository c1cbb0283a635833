"""The discrete-event core: (time, priority, sequence) order, the big lock, signals."""

from __future__ import annotations

from ringenv.vmm.sim import EventLoop, Lock, Process, Signal


def run(loop, until=10**12):
    while loop.heap and loop.peek_time() <= until:
        loop.fire_next()


def test_events_run_by_time_then_priority_then_sequence():
    loop, out = EventLoop(), []
    for t, prio, tag in [(5, 1, "a"), (3, 2, "b"), (3, 1, "c"), (5, 1, "d"), (3, 1, "e")]:
        loop.schedule(t, prio, out.append, tag)
    run(loop)
    assert out == ["c", "e", "b", "a", "d"]


def test_processes_sleep_and_the_lock_hands_over_in_fifo_order():
    loop, bql, log = EventLoop(), Lock(), []

    def worker(name, start, hold):
        yield start
        t0 = loop.now
        yield bql
        log.append((name, "got", loop.now, loop.now - t0))
        yield hold
        bql.release()

    for name, start, hold in [("A", 0, 10), ("B", 2, 5), ("C", 3, 1)]:
        Process(loop, worker(name, start, hold), 1, name).start()
    run(loop)
    assert log == [("A", "got", 0, 0), ("B", "got", 10, 8), ("C", "got", 15, 12)]


def test_release_at_reserves_the_lock_without_an_event():
    loop, bql, log = EventLoop(), Lock(), []

    def holder():
        yield bql
        bql.release_at(loop.now + 100)  # did its work at once, holds the lock for 100 ns
        log.append(("holder done", loop.now))

    def waiter():
        yield 30
        yield bql
        log.append(("waiter", loop.now))
        bql.release()

    Process(loop, holder(), 1).start()
    Process(loop, waiter(), 1).start()
    run(loop)
    assert log == [("holder done", 0), ("waiter", 100)]
    assert not bql.held_at(100)


def test_wake_at_retimes_a_sleep_and_signals_wake_waiters():
    loop, sig, log = EventLoop(), Signal(), []

    def sleeper():
        yield 1000
        log.append(("woke", loop.now))
        yield sig
        log.append(("signalled", loop.now))

    p = Process(loop, sleeper(), 1).start()
    loop.schedule(10, 0, lambda _: p.wake_at(50))
    loop.schedule(70, 0, lambda _: sig.fire())
    run(loop)
    assert log == [("woke", 50), ("signalled", 70)]


def test_a_retimed_sleep_leaves_one_event_in_the_heap():
    """wake_at takes the superseded wake-up out of the heap: no event is left at the old time
    (the session would otherwise run the host to it for nothing), earlier or later."""
    loop, log = EventLoop(), []

    def sleeper():
        yield 1000
        log.append(("woke", loop.now))
        yield 500
        log.append(("woke", loop.now))

    p = Process(loop, sleeper(), 1).start()
    run(loop, until=0)  # started: asleep until 1000
    assert [e[0] for e in loop.heap] == [1000]
    p.wake_at(200)  # sooner
    assert [e[0] for e in loop.heap] == [200]
    p.wake_at(5000)  # later
    assert [e[0] for e in loop.heap] == [5000]
    other = loop.schedule(300, 0, log.append, "other")
    loop.schedule(400, 0, log.append, "kept")
    loop.cancel(other)
    assert sorted(e[0] for e in loop.heap) == [400, 5000]
    run(loop)
    assert log == ["kept", ("woke", 5000), ("woke", 5500)]
    assert not loop.heap
