"""A tiny discrete-event core in the style of SimPy: an event heap ordered by (time, priority,
sequence), generator processes, a mutex and signals. Simulated time is integer nanoseconds.

A process is a generator. What it yields says what it waits for:

- an ``int``: sleep that many ns (0 or less: continue at once);
- a :class:`Lock`: acquire it (FIFO hand-over; resumes when it is this process's turn);
- a :class:`Signal`: wait until the signal fires.

Simultaneous events run by priority, then in the order they were scheduled, so a run is a
deterministic function of its inputs.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Generator

FOREVER = 1 << 62


class EventLoop:
    """The event heap. ``now`` is the time of the event being processed; ``procs`` the processes
    started and not finished (for :meth:`close`)."""

    __slots__ = ("heap", "seq", "now", "procs")

    def __init__(self):
        self.heap: list = []
        self.seq = 0
        self.now = 0
        self.procs: set[Process] = set()

    def close(self) -> None:
        """End the simulation: close every unfinished process's generator (its frame, and what its
        locals hold, goes at once) and drop every event. A process waiting on a lock or a signal
        and the lock's queue refer to each other through the generator's locals, and every event
        holds its process, which holds the loop: without this only the cyclic collector frees them."""
        procs, self.procs = self.procs, set()
        self.heap.clear()
        for p in procs:
            p.alive = False
            p.pending = None
            p.gen.close()

    def schedule(self, t: int, prio: int, fn: Callable, arg=None) -> tuple:
        """Run ``fn(arg)`` at ``t``; returns the event (for :meth:`cancel`)."""
        if t < self.now:
            raise AssertionError(f"event scheduled in the past: {t} < {self.now}")
        event = (t, prio, self.seq, fn, arg)
        heapq.heappush(self.heap, event)
        self.seq += 1
        return event

    def cancel(self, event: tuple) -> None:
        """Take a scheduled event out of the heap (it must not have run yet)."""
        heap = self.heap
        i = heap.index(event)
        last = heap.pop()
        if i < len(heap):
            heap[i] = last
            heapq.heapify(heap)

    def peek_time(self) -> int:
        return self.heap[0][0] if self.heap else FOREVER

    def fire_next(self) -> None:
        t, _, _, fn, arg = heapq.heappop(self.heap)
        self.now = t
        fn(arg)


class Process:
    """A generator driven by the loop. ``wake_at`` re-times a sleeping process (its older
    wake-up is taken out of the heap: a superseded wake-up is no event at all, so the host is
    not run to it); ``interrupt`` wakes it now."""

    __slots__ = ("loop", "gen", "prio", "name", "alive", "sleeping", "pending")

    def __init__(self, loop: EventLoop, gen: Generator, prio: int, name: str = ""):
        self.loop = loop
        self.gen = gen
        self.prio = prio
        self.name = name
        self.alive = True
        self.sleeping = False
        self.pending: tuple | None = None  # the wake-up event in the heap, if any

    def start(self, t: int | None = None) -> Process:
        self.loop.procs.add(self)
        self._schedule(self.loop.now if t is None else t)
        return self

    def _schedule(self, t: int) -> None:
        if self.pending is not None:  # re-timed: the older wake-up is no event any more
            self.loop.cancel(self.pending)
        self.pending = self.loop.schedule(t, self.prio, self._resume)

    def _resume(self, _=None) -> None:
        self.pending = None
        self.sleeping = False
        self._run()

    def wake_at(self, t: int) -> None:
        """Re-time the current sleep to end at ``t`` (not before now)."""
        if self.alive and self.sleeping:
            self._schedule(max(t, self.loop.now))

    def interrupt(self) -> None:
        self.wake_at(self.loop.now)

    def _run(self) -> None:
        gen = self.gen
        while True:
            try:
                cmd = next(gen)
            except StopIteration:
                self.alive = False
                self.loop.procs.discard(self)
                return
            if type(cmd) is int:
                if cmd <= 0:
                    continue
                self.sleeping = True
                self._schedule(self.loop.now + cmd)
                return
            if isinstance(cmd, Lock):
                if cmd.owner is None and not cmd.queue:
                    cmd.owner = self
                    if self.loop.now >= cmd.busy_until:
                        continue
                    self._schedule(cmd.busy_until)  # reserved by the last holder until then
                    return
                cmd.queue.append(self)
                return
            if isinstance(cmd, Signal):
                if cmd.fired:
                    continue
                cmd.waiters.append(self)
                return
            raise TypeError(f"process {self.name} yielded {cmd!r}")


class Lock:
    """A mutex with FIFO hand-over (QEMU's big lock, BQL).

    ``release_at(t)`` releases it as of a later time ``t`` without an event: a holder that
    knows how long its critical section takes does its work at once and reserves the lock for
    that long (the next owner gets it at ``t``). This keeps one event per critical section."""

    __slots__ = ("owner", "queue", "name", "busy_until")

    def __init__(self, name: str = ""):
        self.owner: Process | None = None
        self.queue: deque[Process] = deque()
        self.name = name
        self.busy_until = 0

    def release(self) -> None:
        self.release_at(self.owner.loop.now if self.owner is not None else 0)

    def release_at(self, t: int) -> None:
        self.busy_until = t
        if self.queue:
            nxt = self.queue.popleft()
            self.owner = nxt
            nxt._schedule(max(t, nxt.loop.now))
        else:
            self.owner = None

    def held_at(self, t: int) -> bool:
        return self.owner is not None or t < self.busy_until


class Signal:
    """A one-shot condition: ``fire`` wakes every waiter now; waiting on a fired signal
    continues at once. ``reset`` arms it again."""

    __slots__ = ("waiters", "fired")

    def __init__(self):
        self.waiters: list[Process] = []
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        waiters, self.waiters = self.waiters, []
        for p in waiters:
            p._schedule(p.loop.now)

    def reset(self) -> None:
        self.fired = False
