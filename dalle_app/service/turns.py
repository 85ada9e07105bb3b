"""Fair turns on the model for concurrent requests (Scheduler, Ticket), and the threads model work runs on."""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from typing import Callable, Iterator


class Cancelled(Exception):
    """The request was cancelled (its client went away) while it waited for a turn."""


class Scheduler:
    """Fair turns on the model for concurrent requests.

    `workers` requests compute at once (1 = one GPU worker). A request that has used its turn for `slice_s`
    seconds hands over, between two tokens, to the next waiting request and queues again behind it: a large
    request cannot starve a small one that arrives after it. At most `max_active` requests are started at
    once (each started request keeps its cache in memory while it waits); later ones wait for a free place.
    Pausing between tokens changes no result: the computation of each request is the same as when run alone.
    """

    def __init__(self, workers: int = 1, max_active: int | None = None, slice_s: float = 0.1):
        if int(workers) < 1:
            raise ValueError(f"concurrency must be at least 1, got {workers}.")
        self.workers = int(workers)
        self.max_active = max(self.workers, int(max_active or 4 * self.workers))
        self.slice_s = float(slice_s)
        self._cond = threading.Condition()
        self._free = self.workers
        self._active = 0  # started and not finished
        self._waiting: list[Ticket] = []

    def ticket(self) -> "Ticket":
        """A new request's place; use as `with ticket:` around its model work."""
        return Ticket(self)

    def _next(self) -> "Ticket | None":
        """The first waiting request allowed to run (started ones always are; new ones while places are free)."""
        for ticket in self._waiting:
            if ticket.started or self._active < self.max_active:
                return ticket
        return None

    def stats(self) -> dict:
        """Requests computing, started, waiting (for tests and the UI)."""
        with self._cond:
            return {"running": self.workers - self._free, "started": self._active, "waiting": len(self._waiting)}


class Ticket:
    """One request's turns in a Scheduler. `with ticket:` waits for the first turn; `pause_point()` is polled
    between tokens; `cancel()` (from any thread) makes the request stop at its next pause point."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.started = False
        self.holding = False
        self.since = 0.0
        self.cancelled = threading.Event()

    def __enter__(self) -> "Ticket":
        self._acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._release(finished=True)

    def position(self) -> int | None:
        """How many requests are ahead of this one: those computing now and those waiting before it (None when
        this one is computing or finished)."""
        s = self.scheduler
        with s._cond:
            return s._waiting.index(self) + s.workers - s._free if self in s._waiting else None

    def cancel(self) -> None:
        """Stop this request at its next pause point (or while it waits for a turn)."""
        self.cancelled.set()
        with self.scheduler._cond:
            self.scheduler._cond.notify_all()

    def _acquire(self) -> None:
        s = self.scheduler
        with s._cond:
            s._waiting.append(self)
            try:
                while not (s._free > 0 and s._next() is self):
                    if self.cancelled.is_set():
                        raise Cancelled("the request was cancelled")
                    s._cond.wait()
            finally:
                s._waiting.remove(self)
                s._cond.notify_all()
            s._free -= 1
            if not self.started:
                self.started = True
                s._active += 1
            self.holding, self.since = True, time.monotonic()

    def _release(self, finished: bool) -> None:
        s = self.scheduler
        with s._cond:
            if self.holding:
                self.holding = False
                s._free += 1
            if finished and self.started:
                self.started = False
                s._active -= 1
            s._cond.notify_all()

    def pause_point(self) -> bool:
        """Between two tokens: hand the turn over when the slice is used and another request waits.

        Returns True when the request was cancelled (the caller then stops)."""
        if self.cancelled.is_set():
            return True
        if time.monotonic() - self.since < self.scheduler.slice_s:
            return False
        with self.scheduler._cond:
            other = self.scheduler._next()
        if other is not None and other is not self:
            self._release(finished=False)
            self._acquire()
        else:
            self.since = time.monotonic()
        return self.cancelled.is_set()


def in_fresh_thread(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) run on a new, short-lived thread; its result returned, its exception re-raised here.

    PyTorch's OpenMP runtime (libgomp) keeps a pool of worker threads for every thread that ran a parallel op, and
    once the pools hold more threads than there are cores, all of them stop spinning between ops: a generation on a
    2-core CPU then runs 2.3x slower. So model work (loading, encoding, sampling) runs on short-lived threads, whose
    pools end with them, never on the app's long-lived threads (the main thread, Gradio's workers)."""
    box: dict = {}
    context = contextvars.copy_context()  # e.g. Gradio's progress tracker follows the work into the thread

    def run():
        try:
            box["result"] = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_in_thread(fn: Callable, heartbeat_s: float = 0.25) -> Iterator:
    """Run fn(emit) in a thread; yield what it emits, None after each `heartbeat_s` without news, and finally
    ("result", value). An exception in fn is re-raised here."""
    items: queue.Queue = queue.Queue()

    def run():
        try:
            items.put(("result", fn(items.put)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            items.put(("error", exc))

    threading.Thread(target=run, daemon=True).start()
    while True:
        try:
            item = items.get(timeout=heartbeat_s)
        except queue.Empty:
            yield None
            continue
        if isinstance(item, tuple) and item[0] == "error":
            raise item[1]
        yield item
        if isinstance(item, tuple) and item[0] == "result":
            return
