#!/usr/bin/env python
"""Train and evaluate TBD students (and their teachers) with Detectron2's engine.

    python projects/TBD/train_net.py \
        --config-file projects/TBD/configs/shapes/tbd_R18_FPN256_to_R18_FPN64.yaml
    python projects/TBD/train_net.py --config-file <cfg> --resume          # after an interruption
    python projects/TBD/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <model.pth>
    python projects/TBD/train_net.py --config-file <cfg> --num-gpus 8      # DDP on 8 GPUs
    python projects/TBD/train_net.py --config-file <cfg> --num-gpus 2 --dist-backend gloo \\
        MODEL.DEVICE cpu                                                    # 2 CPU processes

Everything that can be checked (config keys, datasets, weight files, the teacher, the resumed
checkpoint's teacher) is checked before the output folder is written (``tbd.engine.defaults``).
``--eval-only`` builds the student alone, as its stock detector, without a teacher.
"""

from __future__ import annotations

import sys

import tbd  # noqa: F401  (registers DistillMetaArch, the distillers and the synthetic datasets)
from tbd.engine import DistillTrainer, argument_parser, evaluate, launch, setup_config, train
from tbd.engine.defaults import input_errors_reported

Trainer = DistillTrainer  # the name Detectron2 projects use


def setup(args):
    """Config from file + command-line overrides, checked; nothing is written yet."""
    return setup_config(args)


def main(args):
    with input_errors_reported(args):  # the message alone (--traceback: the traceback too)
        cfg = setup(args)
        if args.eval_only:
            return evaluate(cfg, args, Trainer)
        return train(cfg, args, Trainer)


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend=args.dist_backend,
    )


if __name__ == "__main__":
    sys.exit(invoke_main())
