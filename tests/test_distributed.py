"""Two gloo processes on CPU give the same losses as one process with the same total batch, with
automatic loss weights on."""

from __future__ import annotations

import json

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from tbd.engine import launch

from .conftest import make_teacher, tiny_distill_cfg, write_cfg
from .helpers.dist_worker import nonfinite_on_rank1, train_and_report

# Per-iteration losses of 1 process (batch 4) and 2 processes (batch 2 each) agree within this
# relative tolerance: only the order of floating-point sums differs (gradient all-reduce, thread
# counts), which moves later iterations by ~1e-6 relative.
RTOL = 1e-4


def _cfg(tmp_path, tiny_datasets, teacher, out):
    cfg_path, weights = teacher
    cfg = tiny_distill_cfg(tmp_path, losses=("HD", "TFD", "FRS", "FGD"), teacher_weights=weights)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = cfg_path
    cfg.MODEL.DISTILL.TFD.WEIGHT = 1e-3
    cfg.MODEL.DISTILL.FRS.FEAT_WEIGHT = 1e-3
    # Automatic weights measured at iteration 0 and used from 1: the processes' measurements
    # must give the single process's scales.
    cfg.MODEL.DISTILL.AUTO_WEIGHT.ENABLED = True
    cfg.MODEL.DISTILL.AUTO_WEIGHT.ITERS = 1
    # GroupNorm: per-image statistics, so the split of the batch over processes does not matter
    # (BN would differ, and SyncBatchNorm is GPU-only). GN needs channels divisible by 32.
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.DATASETS.TRAIN = (tiny_datasets[0],)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.SEED = 3
    cfg.OUTPUT_DIR = str(out)
    return write_cfg(cfg, out.parent / f"{out.name}.yaml")


def test_two_gloo_processes_match_one(tmp_path, tiny_datasets):
    name = tiny_datasets[0]
    DatasetCatalog.get(name)  # generated; json_file/image_root in its metadata
    md = MetadataCatalog.get(name)
    dataset = (name, md.json_file, md.image_root)
    c, w, _ = make_teacher(tmp_path)

    train_and_report(_cfg(tmp_path, tiny_datasets, (c, w), tmp_path / "one"),
                     str(tmp_path / "one"), dataset)
    launch(train_and_report, 2, backend="gloo", dist_url="auto",
           args=(_cfg(tmp_path, tiny_datasets, (c, w), tmp_path / "two"), str(tmp_path / "two"),
                 dataset))

    one = json.loads((tmp_path / "one.rank0").read_text())
    two = [json.loads((tmp_path / f"two.rank{r}").read_text()) for r in (0, 1)]
    assert one["world_size"] == 1 and [t["world_size"] for t in two] == [2, 2]
    assert all(t["teacher_built"] for t in two)  # the teacher is built on every rank
    assert [t["find_unused_parameters"] for t in two] == [False, False]
    keys = {"loss_cls", "loss_box_reg", "loss_hd_cls", "loss_hd_reg", "loss_tfd",
            "loss_frs_feat", "loss_fgd_fg"}
    assert keys <= set(one["losses"]), sorted(one["losses"])
    assert set(one["losses"]) == set(two[0]["losses"])
    for k, v in one["losses"].items():
        assert len(v) == 3
        np.testing.assert_allclose(two[0]["losses"][k], v, rtol=RTOL, err_msg=k)


def test_nonfinite_term_on_one_process_stops_every_process(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    launch(nonfinite_on_rank1, 2, backend="gloo", dist_url="auto", args=(cfg, str(tmp_path / "r")))
    rank0, rank1 = ((tmp_path / f"r.rank{r}").read_text() for r in (0, 1))
    assert "['loss_x']" in rank1 and "iteration 5" in rank1
    assert "on another process" in rank0
