"""Numbered runs per (browser session, tab), so that Stop reaches a request whether it is queued or computing.

Pressing Generate first arms a new run in an unqueued event (it answers at once, before the request joins Gradio's
queue) and the queued request then carries that run's number. Stop marks every run armed so far as stopped: a
request that has not started yet returns at once without computing, a running one sees the stop between two
tokens and returns its partial images. A later Generate arms a new number, which an earlier Stop does not reach.
"""

from __future__ import annotations

import threading


class Runs:
    """The numbers of the last run armed, started and stopped, for each key (a session's tab)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._armed: dict = {}
        self._started: dict = {}
        self._stopped: dict = {}

    def arm(self, key) -> int:
        """A new run for `key` (Generate was pressed); returns its number."""
        with self._lock:
            run = self._armed.get(key, 0) + 1
            self._armed[key] = run
            return run

    def start(self, key, run: int | None = None) -> int:
        """Mark `run` as started (its handler began) and return it; a missing run number (a caller without the
        arming step) arms a new run first."""
        if not run:
            run = self.arm(key)
        with self._lock:
            self._started[key] = max(self._started.get(key, 0), int(run))
        return int(run)

    def stop(self, key) -> bool:
        """Stop every run of `key` armed so far; True when the latest one has not started (it is still queued)."""
        with self._lock:
            armed = self._armed.get(key, 0)
            self._stopped[key] = armed
            return armed > self._started.get(key, 0)

    def queued(self, key) -> bool:
        """Whether the latest run of `key` was armed but has not started."""
        with self._lock:
            return self._armed.get(key, 0) > self._started.get(key, 0)

    def latest(self, key) -> int:
        """The number of the last run armed for `key` (0 when none)."""
        with self._lock:
            return self._armed.get(key, 0)

    def stopped(self, key, run: int) -> bool:
        """Whether Stop was pressed for `run` (or a later run) of `key`."""
        with self._lock:
            return self._stopped.get(key, 0) >= run

    def forget(self, session) -> None:
        """Drop every key of a session that went away (keys are (session, tab) tuples)."""
        with self._lock:
            for table in (self._armed, self._started, self._stopped):
                for key in [k for k in table if k[0] == session]:
                    del table[key]
