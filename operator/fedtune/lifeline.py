"""Tie a child process's life to its parent's: no orphaned pods or S3 servers after a crash."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for subprocess.Popen: the kernel SIGKILLs the child when its parent dies.

    Graceful stops still go through SIGTERM from the runner; this covers the runner itself being
    SIGKILLed (or crashing), where no Python cleanup can run. Linux only; a no-op elsewhere.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
