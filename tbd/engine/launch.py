"""Multi-process launch: Detectron2's ``launch`` on GPUs (NCCL), and a CPU path with gloo.

Detectron2 v0.6's ``launch`` asserts CUDA and uses NCCL. For CPU users and CPU tests this module
starts the processes itself with ``torch.multiprocessing`` and ``init_process_group("gloo")``, and
sets Detectron2's local process group, so ``detectron2.utils.comm`` works unchanged. Each process
uses ``cpu_count // processes_per_machine`` threads unless OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
DEFAULT_TIMEOUT = timedelta(minutes=30)


def resolve_backend(backend: str) -> str:
    """"auto" -> "nccl" when CUDA is available, else "gloo"."""
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend={backend!r}: choose one of {BACKENDS}.")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--dist-backend nccl needs CUDA; use gloo on CPU.")
    return backend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_local_group(procs_per_machine: int, machine_rank: int, world_size: int) -> None:
    if hasattr(comm, "create_local_process_group"):  # Detectron2 after v0.6
        comm.create_local_process_group(procs_per_machine)
        return
    num_machines = world_size // procs_per_machine
    for i in range(num_machines):  # every rank must create every group
        group = dist.new_group(list(range(i * procs_per_machine, (i + 1) * procs_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _gloo_worker(local_rank: int, main_func: Callable, world_size: int, procs_per_machine: int,
                 machine_rank: int, dist_url: str, args: tuple, timeout: timedelta) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs_per_machine))
    rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=rank, timeout=timeout)
    _set_local_group(procs_per_machine, machine_rank, world_size)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch(main_func: Callable, procs_per_machine: int, num_machines: int = 1,
           machine_rank: int = 0, dist_url: str | None = None, args: tuple = (),
           backend: str = "auto", timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` in ``procs_per_machine * num_machines`` processes.

    ``backend="nccl"`` (or "auto" with CUDA) is Detectron2's ``launch``, one process per GPU.
    ``"gloo"`` starts CPU processes. ``dist_url="auto"`` picks a free local port (one machine).
    """
    backend = resolve_backend(backend)
    if backend == "nccl":
        d2_launch(main_func, procs_per_machine, num_machines=num_machines,
                  machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
        return
    world_size = procs_per_machine * num_machines
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only: pass "
                             "tcp://<machine 0 address>:<port> to every machine.")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    logger.info("Starting %d gloo processes (world size %d) at %s", procs_per_machine,
                world_size, dist_url)
    mp.start_processes(
        _gloo_worker, nprocs=procs_per_machine,
        args=(main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout),
        start_method="spawn",
    )
