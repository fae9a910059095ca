"""Training engine: the trainer, its hooks, the CPU/GPU multi-process launcher, and the checked
set-up, training and evaluation that ``train_net.py`` runs (``defaults``)."""

from .defaults import argument_parser, evaluate, setup_config, train
from .hooks import MemoryMonitor, rss_mb
from .launch import launch
from .trainer import DistillTrainer, create_ddp

__all__ = [
    "DistillTrainer",
    "MemoryMonitor",
    "argument_parser",
    "create_ddp",
    "evaluate",
    "launch",
    "rss_mb",
    "setup_config",
    "train",
]
