"""Local mode's eye on its embedded S3 server: restarted when it dies, asked whether it answers.

A storage outage is the storage's, not the parties' (fedtune.rounds.outage): the runner tells the
round state machine, at every pass, whether the storage answers. SeaweedFS that exits is started
again on the same data directory and ports (every write reached the disk before the call that made
it returned, and presigned URLs sign the port), with one line saying so; one that stops answering
while it runs (a freeze) is waited for, as on Kubernetes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from fedtune.storage.probe import unavailable
from fedtune.storage.seaweed import SeaweedError, SeaweedServer

PROBE_EVERY = 1.0  # seconds between probes of a storage that answered (each pass probes one that did not)
MAX_BACKOFF = 30.0  # seconds between restarts of a SeaweedFS that does not start again


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


class StorageWatch:
    """Watches one SeaweedServer; `check()` restarts it if it died and says why the storage does not answer."""

    def __init__(self, server: SeaweedServer, say: Callable[[str], None]):
        self.server, self.say = server, say
        self.restarts = 0  # by this runner
        self._probed_at = float("-inf")
        self._down: str | None = None  # why the storage did not answer at the last check
        self._death: str | None = None  # what ended the server that is being restarted
        self._failed_starts = 0
        self._next_start = 0.0

    @property
    def _where(self) -> str:
        return f"SeaweedFS (local mode's S3) at {self.server.endpoint}"

    def check(self) -> str | None:
        """None when the storage answers; else why not, naming it and its endpoint."""
        now = time.monotonic()
        if not self.server.running:
            self._down = self._restart(now)
            return self._down
        if self._down is None and now - self._probed_at < PROBE_EVERY:
            return None
        self._probed_at = now
        why = unavailable(self.server.endpoint)  # the round machine says when it stops and starts answering
        self._down = None if why is None else f"{self._where} does not answer: {why}"
        return self._down

    def _restart(self, now: float) -> str | None:
        if self._death is None:  # said once per death
            self._death = f"{self._where} (pid {self.server.pid}) {_exit_text(self.server.exit_code)}"
            self.say(f"! storage: {self._death}; restarting it on {self.server.workdir / 'data'} (same ports)")
        if now < self._next_start:
            return self._death
        try:
            self.server.restart()
        except (SeaweedError, OSError) as exc:
            self._failed_starts += 1
            delay = min(MAX_BACKOFF, 2.0**self._failed_starts)
            self._next_start = time.monotonic() + delay
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.say(f"! storage: SeaweedFS did not start again ({first}); trying again in {delay:.0f}s")
            return f"{self._death}, and did not start again: {first}"
        self.restarts += 1
        self._death, self._failed_starts, self._next_start = None, 0, 0.0
        self.say(f"storage: {self._where} is back (pid {self.server.pid}); restarts so far: {self.restarts}")
        return None
