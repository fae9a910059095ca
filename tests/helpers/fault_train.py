"""Run what projects/TBD/train_net.py runs, in this process, and SIGKILL the process in the middle
of writing its Nth checkpoint (env TBD_TEST_KILL_AT_SAVE=N; 0 = never). Env TBD_TEST_DATASET=
"name|json_file|image_root" registers a test's COCO-format dataset in this process.

    python tests/helpers/fault_train.py --config-file cfg.yaml [--resume] [KEY VALUE ...]
"""

import os
import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
KILL_AT = int(os.environ.get("TBD_TEST_KILL_AT_SAVE", "0"))
_real_save = torch.save
_count = 0


def _save(obj, f, *args, **kwargs):
    global _count
    _count += 1
    if _count == KILL_AT and hasattr(f, "write"):
        f.write(b"PK\x03\x04 half a checkpoint")  # the start of a zip archive, then death
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(obj, f, *args, **kwargs)


if __name__ == "__main__":
    torch.save = _save
    if os.environ.get("TBD_TEST_DATASET"):
        from detectron2.data.datasets import register_coco_instances

        name, json_file, image_root = os.environ["TBD_TEST_DATASET"].split("|")
        register_coco_instances(name, {}, json_file, image_root)
    from tbd.engine import argument_parser, evaluate, setup_config, train

    args = argument_parser().parse_args(sys.argv[1:])
    cfg = setup_config(args)
    evaluate(cfg, args) if args.eval_only else train(cfg, args)
