"""Training hooks: resident-memory monitoring (for multi-day runs and the soak benchmark)."""

from __future__ import annotations

import logging
import os

from detectron2.engine import HookBase

logger = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes(pid: str) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _children(pid: str) -> list[str]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += f.read().split()
        except OSError:
            pass
    return out


def rss_mb() -> tuple[float, float]:
    """Resident memory of this process and the sum over its child processes (data-loader
    workers), in MB, from /proc (Linux). Shared pages count in both."""
    own = _rss_bytes("self")
    kids = 0
    for pid in _children(str(os.getpid())):
        try:
            kids += _rss_bytes(pid)
        except OSError:  # exited meanwhile
            pass
    return own / 2**20, kids / 2**20


class MemoryMonitor(HookBase):
    """Writes ``memory/rss_mb`` and ``memory/rss_workers_mb`` to the event storage every
    ``period`` iterations. A no-op where /proc is unavailable (not Linux)."""

    def __init__(self, period: int = 20):
        self.period = period
        self.enabled = os.path.exists("/proc/self/statm")
        if not self.enabled:
            logger.info("MemoryMonitor: /proc is unavailable, resident memory is not logged.")

    def after_step(self) -> None:
        if not self.enabled or (self.trainer.iter + 1) % self.period:
            return
        own, workers = rss_mb()
        storage = self.trainer.storage
        storage.put_scalar("memory/rss_mb", own, smoothing_hint=False)
        storage.put_scalar("memory/rss_workers_mb", workers, smoothing_hint=False)
