#!/usr/bin/env python
"""Check that a released student reproduces its recorded AP with stock Detectron2.

    python projects/TBD/tools/verify_release.py \\
        release/tbd_R18_FPN256_to_R18_FPN64/model_final_1a2b3c4d.pth

Stock means: ``detectron2.config.get_cfg()`` without this project's keys, ``build_model`` and
``DetectionCheckpointer`` on the release's own ``*_config.yaml``, COCOEvaluator on the config's
test set. An FCOS release is built from its ``*_lazy.py`` (``LazyConfig.load`` + ``instantiate``:
stock Detectron2 builds FCOS only from a LazyConfig). Like Detectron2's
``TEST.EXPECTED_RESULTS`` check, it fails (exit 1) when AP differs from the metadata by more than
``--tolerance`` (default 0.01 AP). Also checks the sha suffix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from tqdm import tqdm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("release", help="model_final_<sha8>.pth (metadata and config beside it)")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--output", default=None, help="evaluator output folder")
    p.add_argument("--dataset", default=None, help="registered dataset (default: the release "
                   "config's first DATASETS.TEST)")
    import tbd  # noqa: F401  (registers the synthetic datasets only; the model is stock)
    from tbd.checkpoint import ReleaseError, verify_release_file
    from tbd.data import (
        add_dataset_arguments,
        ensure_generated,
        is_shapes_dataset,
        register_datasets,
    )

    add_dataset_arguments(p)
    args = p.parse_args(argv)
    register_datasets(args)

    path = Path(args.release)
    try:
        sha = verify_release_file(path)
    except ReleaseError as e:
        sys.exit(str(e))
    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = get_cfg()  # stock: no add_tbd_config
    cfg.merge_from_file(str(path.parent / f"{path.stem}_config.yaml"))
    cfg.MODEL.WEIGHTS = str(path)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    lazy = path.parent / f"{path.stem}_lazy.py"
    if lazy.is_file():
        from detectron2.config import LazyConfig, instantiate

        model = instantiate(LazyConfig.load(str(lazy), "model")).to(cfg.MODEL.DEVICE)
    else:
        model = build_model(cfg)
    model.eval()
    DetectionCheckpointer(model).load(str(path))
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    from detectron2.data import DatasetCatalog

    if dataset is None or dataset not in DatasetCatalog.list():
        sys.exit(f"dataset {dataset!r} is not registered: register the release's test set with "
                 "--register-coco NAME JSON IMAGE_ROOT or --dataset-module (and --dataset NAME).")
    if is_shapes_dataset(dataset):
        ensure_generated(dataset)
    evaluator = COCOEvaluator(dataset, output_dir=args.output)
    loader = build_detection_test_loader(cfg, dataset)
    res = inference_on_dataset(model, tqdm(loader, desc=f"Evaluating on {dataset}", unit="img",
                                           disable=None), evaluator)
    ap = res["bbox"]["AP"]
    expected = meta.get("AP")
    print(json.dumps({"release": path.name, "sha256": sha, "AP": ap, "expected_AP": expected}))
    if expected is None:
        print("metadata has no AP to compare with", file=sys.stderr)
        return 1
    if not abs(ap - expected) <= args.tolerance:
        print(f"AP {ap:.4f} differs from the recorded {expected:.4f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
