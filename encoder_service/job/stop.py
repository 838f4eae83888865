"""Clean stops: SIGTERM (what Kubernetes sends) and SIGINT (Ctrl-C) to the driver.

The first signal stops feeding new work: the driver leaves the stream of results at the next
point where it waits for one (never in the middle of handling a row), lets the commits under way
finish (finished shards are committed), writes the run record with
`"interrupted": true`, releases the folder's lease and exits 128 + the signal (143, 130). If that
takes longer than the grace period, or a second signal comes, it stops at once: the lease is
released and the process exits with the same status; what it had not committed is cleaned up by
the next run, as after a crash. Commits are all-or-nothing either way.
"""
import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Raised in the driver's main thread by the first signal, at a point where it waits for results."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """`with StopSignals(grace_s, at_once):` installs the handlers (main thread only) for the block;
    `with stop.waiting():` marks where Interrupted may be raised; `stop.check()` raises it there
    if a signal came meanwhile. `at_once()` runs before a hard stop (it releases the lease)."""

    def __init__(self, grace_s: float, at_once=lambda: None):
        self.grace_s, self.at_once = grace_s, at_once
        self.signum: int | None = None
        self._waiting, self._previous, self._timer = False, {}, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def install(self) -> None:
        """Ours again, after a library (ray.init) installed its own; __exit__ still restores the
        handlers from before __enter__."""
        if self._previous:
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    @contextlib.contextmanager
    def waiting(self):
        self.check()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal
            self._hard_stop(f"a second {signal.Signals(signum).name}")
            return
        self.signum = signum
        print(f"[stop] {signal.Signals(signum).name}: no new shards; finishing the commits under way, if any (at "
              f"most {self.grace_s:g} s; a second signal stops at once)", file=sys.stderr, flush=True)
        self._timer = threading.Timer(self.grace_s, self._hard_stop, args=(f"{self.grace_s:g} s of grace over",))
        self._timer.daemon = True
        self._timer.start()
        if self._waiting:
            raise Interrupted(signum)

    def _hard_stop(self, why: str) -> None:
        print(f"[stop] {why}: stopping now; what was not committed is cleaned up by the next run",
              file=sys.stderr, flush=True)
        try:
            self.at_once()
        finally:
            os._exit(128 + (self.signum or signal.SIGTERM))


__all__ = ["Interrupted", "StopSignals"]
