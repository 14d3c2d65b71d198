"""What checkpoint writer helper processes run at their start to survive a preemption signal and
die with the training process. Imports nothing heavy: megatron-core's results-queue Manager is a
*spawned* process that imports this module to run ``manager_init`` (importing torch and
megatron-core there cost 3.5 s per run's first save)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):
            return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def manager_init(parent_pid: int) -> None:
    """In megatron-core's results-queue Manager process: survive the preemption signal (torchrun sends
    SIGTERM to the whole process group; the save it triggers needs this process) and die with the
    training process."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)
