#!/usr/bin/env python
"""Draw teacher and student detections, the teacher's Harmony Score and TFD masks over images.

    python projects/TBD/tools/visualize.py \\
        --config-file projects/TBD/configs/shapes/tbd_R18_FPN256_to_R18_FPN64.yaml \\
        --output output/vis --num-images 4 \\
        MODEL.WEIGHTS output/shapes/tbd_R18_FPN256_to_R18_FPN64/model_final.pth

One PNG per image: the image with GT (green), teacher detections (red) and student detections
(blue) above ``--score-thresh``; the teacher's HS on the student's foreground anchors and the TFD
masks M_cls, M_reg and M, each at the finest FPN level (maximum over anchors per location).
Needs a DistillMetaArch config with its teacher weights (MODEL.DISTILL.TEACHER.WEIGHTS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess

from tbd.analysis import build_analysis_loader
from tbd.config import load_config
from tbd.data import add_dataset_arguments, ensure_generated, is_shapes_dataset, register_datasets
from tbd.distillers.hd import compute_harmony
from tbd.distillers.tfd import TFD
from tbd.modeling import dense_taps
from tbd.modeling.teacher import teacher_images


def _boxes(ax, boxes, color, scores=None):
    import matplotlib.pyplot as plt

    for k, b in enumerate(boxes):
        ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                   color=color, lw=1))
        if scores is not None:
            ax.text(b[0], b[1], f"{scores[k]:.2f}", color=color, fontsize=5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dataset", default=None, help="default: first of DATASETS.TEST")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--score-thresh", type=float, default=0.3)
    add_dataset_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    register_datasets(args)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "DistillMetaArch":
        sys.exit("visualize.py needs a DistillMetaArch config (teacher and student).")
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    tfd = model.distillers["TFD"] if "TFD" in model.distillers else TFD(
        adapters=torch.nn.ModuleDict(), gamma=cfg.MODEL.DISTILL.TFD.GAMMA,
        balance_mode=cfg.MODEL.DISTILL.TFD.BALANCE_MODE)
    hs_cfg = cfg.MODEL.DISTILL.HS
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    if is_shapes_dataset(dataset):
        ensure_generated(dataset)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for k, batch in enumerate(build_analysis_loader(cfg, dataset)):
        if k >= args.num_images:
            break
        with torch.no_grad():
            inputs = model.distill_inputs(batch)
            student = model(batch)[0]["instances"]
            teacher_model = model.teacher
            t_images = teacher_images(teacher_model, batch, model.preprocess_image(batch),
                                      model.input_format, model.teacher_input_format)
            taps = dense_taps(teacher_model, t_images)
            h, w = batch[0]["image"].shape[-2:]
            t_out = teacher_model.forward_inference(t_images, taps.features, taps.predictions)[0]
            teacher = detector_postprocess(t_out, h, w)
        hs = compute_harmony(inputs, hs_cfg.FORM, hs_cfg.ALIGNED_ALPHA, hs_cfg.ALIGNED_BETA)
        n_first = inputs.num_anchors_per_level[0]
        gh, gw = inputs.student_features[0].shape[-2:]
        hs_map = hs[0, :n_first].view(gh, gw, -1).amax(-1).cpu().numpy()
        mask, m_cls, m_reg = (x[0].cpu().numpy() for x in tfd.masks(inputs)[0])

        img = batch[0]["image"].permute(1, 2, 0).numpy()[:, :, ::-1] / 255.0
        fig, axes = plt.subplots(1, 5, figsize=(15, 3.2))
        axes[0].imshow(np.clip(img, 0, 1))
        _boxes(axes[0], batch[0]["instances"].gt_boxes.tensor.tolist(), "lime")
        for inst, color in ((teacher, "red"), (student, "deepskyblue")):
            keep = inst.scores > args.score_thresh
            _boxes(axes[0], inst.pred_boxes.tensor[keep].tolist(), color,
                   inst.scores[keep].tolist())
        axes[0].set_title("GT (green), teacher (red), student (blue)", fontsize=8)
        for ax, m, title in zip(axes[1:], (hs_map, m_cls, m_reg, mask),
                                (f"teacher HS ({hs_cfg.FORM})", "TFD M_cls", "TFD M_reg",
                                 f"TFD M ({cfg.MODEL.DISTILL.TFD.BALANCE_MODE})")):
            im = ax.imshow(m, cmap="magma", vmin=0)
            ax.set_title(title + f", {inputs.level_names[0]}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"vis_{k:03d}.png", dpi=110)
        plt.close(fig)
    print(f"wrote {min(k + 1, args.num_images)} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
