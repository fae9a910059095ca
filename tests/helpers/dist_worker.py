"""A training run through the functions projects/TBD/train_net.py uses, reporting per-iteration
losses (process 0) and what each process built. Run in-process or by tbd.engine.launch (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_and_report(cfg_path: str, report: str, dataset: tuple[str, str, str]) -> None:
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.utils import comm

    name, json_file, image_root = dataset
    if name not in DatasetCatalog.list():  # a spawned process: register the test's dataset
        register_coco_instances(name, {}, json_file, image_root)
    from tbd.engine import DistillTrainer, argument_parser, setup_config
    from tbd.engine.defaults import prepare_training, setup_outputs

    args = argument_parser().parse_args(["--config-file", cfg_path])
    cfg = setup_config(args)
    model, dicts = prepare_training(cfg, args)
    setup_outputs(cfg, args)
    trainer = DistillTrainer(cfg, model=model, train_dicts=dicts)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ddp = trainer._trainer.model
    out = {"world_size": comm.get_world_size(), "teacher_built": model.teacher is not None,
           "find_unused_parameters": getattr(ddp, "find_unused_parameters", None)}
    if comm.is_main_process():
        hist = trainer.storage.histories()
        out["losses"] = {k: [v for v, _ in hist[k].values()] for k in hist
                         if k.startswith("loss_") or k == "total_loss"}
    Path(f"{report}.rank{comm.get_rank()}").write_text(json.dumps(out))


def nonfinite_on_rank1(cfg, report: str) -> None:
    """Rank 1 alone has a NaN distillation term: every rank must raise at the same check."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    from tbd.modeling.guards import check_finite
    from tests.conftest import make_batch

    model = build_model(cfg)
    inputs = model.distill_inputs(make_batch(2))
    value = float("nan") if comm.get_rank() == 1 else 1.0
    try:
        check_finite({"loss_x": torch.tensor(value)}, inputs, 5)
        msg = "no error"
    except FloatingPointError as e:
        msg = str(e)
    Path(f"{report}.rank{comm.get_rank()}").write_text(msg)
