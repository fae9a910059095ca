"""A user's own COCO-format dataset, end to end and from outside the repository: register it on
the command line, train a teacher, distil, evaluate, analyse, visualise, export, verify."""

import json
import math

from detectron2.data import DatasetCatalog, MetadataCatalog

from tbd.engine import argument_parser
from tbd_tools import analyze_harmony, export_student, verify_release, visualize

from .conftest import tiny_retinanet_cfg, write_cfg
from .helpers import run_main


def _coco(name):
    DatasetCatalog.get(name)  # a shapes dataset: generated, written as COCO json
    md = MetadataCatalog.get(name)
    return md.json_file, md.image_root


def test_own_dataset_flow_from_outside_the_repository(tmp_path, tiny_datasets, monkeypatch,
                                                      capsys):
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    monkeypatch.chdir(work)
    reg = ["--register-coco", "own_train", *_coco(tiny_datasets[0]),
           "--register-coco", "own_val", *_coco(tiny_datasets[1])]

    def common(cfg, out, iters=4):
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("own_train",), ("own_val",)
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = iters, ()
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # barely trained: keep every detection
        cfg.OUTPUT_DIR = out
        return cfg

    teacher = common(tiny_retinanet_cfg(fpn_channels=32, num_convs=2), "teacher")
    write_cfg(teacher, work / "configs" / "teacher.yaml")
    run_main(argument_parser().parse_args(["--config-file", "configs/teacher.yaml", *reg]))
    assert (work / "teacher" / "model_final.pth").is_file()

    student = common(tiny_retinanet_cfg(), "student")
    student.MODEL.META_ARCHITECTURE = "DistillMetaArch"
    student.MODEL.DISTILL.LOSSES = ["HD", "TFD"]
    student.MODEL.DISTILL.TFD.WEIGHT = 1e-4
    student.MODEL.DISTILL.WARMUP_ITERS = 0
    student.MODEL.DISTILL.TEACHER.CONFIG = "teacher.yaml"  # found beside this config
    student.MODEL.DISTILL.TEACHER.WEIGHTS = "teacher/model_final.pth"  # from the working dir
    student.MODEL.DISTILL.TEACHER.EVAL_MIN_AP = 0.0  # a 10-iteration teacher: checked, not refused
    cfg = str(write_cfg(student, work / "configs" / "student.yaml"))
    run_main(argument_parser().parse_args(["--config-file", cfg, *reg]))
    final = "student/model_final.pth"
    check = json.loads((work / "student" / "teacher_check.json").read_text())
    assert check["dataset"] == "own_val" and check["images"] > 0 and "AP" in check["bbox"]

    res = run_main(argument_parser().parse_args(
        ["--config-file", cfg, *reg, "--eval-only", "MODEL.WEIGHTS", final,
         "OUTPUT_DIR", "student_eval"]))
    assert math.isfinite(res["bbox"]["AP"])

    assert analyze_harmony.main(["--config-file", cfg, *reg, "--dataset", "own_val",
                                 "--output", "harmony", "MODEL.WEIGHTS", final]) == 0
    assert (work / "harmony" / "harmony.json").is_file()
    assert visualize.main(["--config-file", cfg, *reg, "--output", "vis", "--num-images", "1",
                           "--score-thresh", "0.0", "MODEL.WEIGHTS", final]) == 0
    assert list((work / "vis").glob("vis_*.png"))

    capsys.readouterr()
    assert export_student.main(["--config-file", cfg, "--checkpoint", final,
                                "--output", "release"]) == 0
    release = capsys.readouterr().out.strip().splitlines()[-1]
    meta = json.loads(open(release.replace(".pth", ".json")).read())
    assert meta["AP"] is not None and meta["commit"]  # the project's commit, run from elsewhere
    assert verify_release.main([release, *reg, "--dataset", "own_val"]) == 0
