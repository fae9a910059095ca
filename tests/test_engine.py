"""Engine pieces: the memory hook, the launcher's backend choice, loader state with new settings."""

from __future__ import annotations

import logging

import pytest
import torch
from detectron2.utils.events import EventStorage

from tbd.data.loader import ResumableTrainLoader
from tbd.engine import MemoryMonitor, launch, rss_mb
from tbd.engine.launch import resolve_backend


def test_rss_and_memory_monitor():
    own, workers = rss_mb()
    assert own > 10 and workers >= 0  # a Python process with torch holds well over 10 MB

    class _Trainer:
        iter = 19

    hook = MemoryMonitor(period=20)
    hook.trainer = _Trainer()
    with EventStorage(19) as storage:
        hook.trainer.storage = storage
        hook.after_step()
        assert storage.latest()["memory/rss_mb"][0] == pytest.approx(own, rel=0.5)
        assert "memory/rss_workers_mb" in storage.latest()
        hook.trainer.iter = 20
        storage.iter = 20
        hook.after_step()  # not a multiple of the period: nothing new
        assert storage.latest()["memory/rss_mb"][1] == 19


def test_backend_choice_and_single_process_runs_inline():
    assert resolve_backend("gloo") == "gloo"
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError, match="--dist-backend"):
        resolve_backend("mpi")
    seen = []
    launch(seen.append, 1, backend="gloo", args=("ran",))
    assert seen == ["ran"]
    with pytest.raises(ValueError, match="--dist-url"):
        launch(seen.append, 2, num_machines=2, backend="gloo", dist_url="auto", args=(1,))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_loader_state_with_other_batch_size_continues_approximately():
    recs = [{"id": i, "width": 10, "height": 10} for i in range(8)]
    state = {"batches": 6, "seed": 1, "total_batch_size": 2, "world_size": 1, "num_images": 8}
    loader = ResumableTrainLoader(recs, lambda d: d["id"], 4, seed=1)
    records = _Records()
    logging.getLogger("tbd.data.loader").addHandler(records)
    try:
        loader.load_state_dict(state)
    finally:
        logging.getLogger("tbd.data.loader").removeHandler(records)
    assert loader.batches_consumed == 3  # 12 images seen = 3 batches of 4
    assert any("not those of an uninterrupted run" in m for m in records.messages)
    next(iter(loader))
    with pytest.raises(RuntimeError, match="after iteration started"):
        loader.load_state_dict(state)


def test_other_samplers_use_detectron2_loader(tiny_datasets):
    from tbd.engine import DistillTrainer

    from .conftest import tiny_retinanet_cfg

    cfg = tiny_retinanet_cfg()
    cfg.DATASETS.TRAIN = (tiny_datasets[0],)
    assert isinstance(DistillTrainer.build_train_loader(cfg), ResumableTrainLoader)
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    loader = DistillTrainer.build_train_loader(cfg)
    assert not isinstance(loader, ResumableTrainLoader)
    assert len(next(iter(loader))) == cfg.SOLVER.IMS_PER_BATCH
