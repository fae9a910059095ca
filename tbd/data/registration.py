"""One way for every entry point (train_net.py, the tools) to see a user's datasets.

    --register-coco NAME JSON IMAGE_ROOT     a COCO-format dataset (repeatable)
    --dataset-module MODULE_OR_FILE          a Python module or file that registers datasets when
                                             imported (repeatable), e.g. my_project/datasets.py

Registration happens in every process that runs (also the spawned processes of a multi-process
run), before the config is checked, so an unknown name is still refused with the registered ones.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
from pathlib import Path

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from .loader import DataError

logger = logging.getLogger(__name__)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--register-coco`` and ``--dataset-module`` to ``parser``."""
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset under NAME (repeatable)")
    parser.add_argument("--dataset-module", action="append", default=[], metavar="MODULE",
                        help="import a module or .py file that registers datasets (repeatable)")
    return parser


def register_datasets(args: argparse.Namespace) -> None:
    """Register what ``add_dataset_arguments``' options name; raise DataError naming the option
    and the file when one cannot be used."""
    for spec in getattr(args, "dataset_module", []) or []:
        path = Path(spec)
        try:
            if path.suffix == ".py":
                if not path.is_file():
                    raise FileNotFoundError(f"no such file (cwd {os.getcwd()})")
                spec_ = importlib.util.spec_from_file_location(path.stem, path)
                spec_.loader.exec_module(importlib.util.module_from_spec(spec_))
            else:
                importlib.import_module(spec)
        except Exception as e:  # noqa: BLE001 - the user's module: report whatever it raised
            raise DataError(f"--dataset-module {spec}: could not be imported ({type(e).__name__}: "
                            f"{e}).") from e
    for name, json_file, image_root in getattr(args, "register_coco", []) or []:
        if name in DatasetCatalog.list():
            logger.info("--register-coco %s: already registered, kept.", name)
            continue
        for what, path in (("JSON", json_file), ("IMAGE_ROOT", image_root)):
            if not os.path.exists(path):
                raise DataError(f"--register-coco {name} {json_file} {image_root}: {what} {path} "
                                f"does not exist (cwd {os.getcwd()}).")
        register_coco_instances(name, {}, json_file, image_root)
