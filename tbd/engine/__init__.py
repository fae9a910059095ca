"""Training engine: the trainer, its hooks and the CPU/GPU multi-process launcher."""

from .hooks import MemoryMonitor, rss_mb
from .launch import launch
from .trainer import DistillTrainer, create_ddp

__all__ = ["DistillTrainer", "MemoryMonitor", "create_ddp", "launch", "rss_mb"]
