"""Shared helpers of the benchmarks: machine description, git commit, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SHAPES = "projects/TBD/configs/shapes"
# The benchmark's pair: the R18-FPN256 teacher (4 head convs) and the R18-FPN64 student (2).
PAIR = "R18_FPN256_to_R18_FPN64"


def method_config(method: str) -> str:
    """The shapes config of a method of ``tbd.METHODS`` on the benchmark's pair: the student alone
    for "baseline", else ``<method>_<PAIR>.yaml``."""
    if method.lower() == "baseline":
        return f"{SHAPES}/retinanet_R18_FPN64_student.yaml"
    return f"{SHAPES}/{method.lower()}_{PAIR}.yaml"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import detectron2
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "detectron2": detectron2.__version__, "torch_threads": torch.get_num_threads()}


def git_commit() -> str:
    """HEAD (+ "-dirty"), or $TBD_GIT_COMMIT where the checkout has no .git (a copied tree)."""
    if os.environ.get("TBD_GIT_COMMIT"):
        return os.environ["TBD_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    return " ".join([Path(sys.executable).name if "python" in sys.executable else sys.executable,
                     *sys.argv])


def write_results(out_dir: Path, benchmark: str, settings: dict, rows: list[dict],
                  markdown: str, commit: str | None = None) -> None:
    """results.json (the format of docs/benchmarks.md) and results.md, written atomically.

    ``commit``: the commit the run started from (default: the current one).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": benchmark,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d"),
        "git_commit": commit or git_commit(),
        "machine": machine_info(),
        "settings": settings,
        "rows": rows,
    }
    from tbd.checkpoint import atomic_write_text

    for name, text in (("results.json", json.dumps(payload, indent=2)), ("results.md", markdown)):
        atomic_write_text(str(out_dir / name), text)


def log_beside(out: Path) -> Path:
    """The log file beside the folder ``out``. Not ``out.with_suffix``: that cuts a name at its
    last dot (``tbd_hd_bg0.5_s0_h`` would log to ``tbd_hd_bg0.log``, shared by other names)."""
    return out.parent / f"{out.name}.log"


def run_logged(cmd: list[str], log: Path, extra_env: dict | None = None) -> None:
    """Run ``cmd`` in the repository root with its output in ``log``; raise with the log's tail."""
    env = {**os.environ, **(extra_env or {})}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(Path(log).read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")


def model_gflops(config: str, image_size: int = 128) -> dict:
    """fvcore's FLOP count of one ``image_size``-square image's inference forward, in GFLOPs.

    Split into backbone (with the FPN) and head; the post-processing (decoding, NMS) is not
    counted. Random weights: FLOPs do not depend on them.
    """
    import torch
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import FlopCountAnalysis

    import tbd  # noqa: F401 - registers DistillMetaArch
    from tbd.config import load_config

    model = build_model(load_config(config, ["MODEL.DEVICE", "cpu"])).eval()
    image = torch.zeros(3, image_size, image_size, dtype=torch.uint8)
    flops = FlopCountAnalysis(model, [{"image": image}])
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    by_module = flops.by_module()  # Detectron2's wrapper names the model "model"
    return {"total": flops.total() / 1e9, "backbone_fpn": by_module["model.backbone"] / 1e9,
            "head": by_module["model.head"] / 1e9}


def eval_bbox(config: str, weights: str, dataset: str, out: Path, log: Path,
              extra_env: dict | None = None) -> dict:
    """``train_net.py --eval-only`` of ``weights`` on ``dataset``: its COCO "bbox" metrics."""
    run_logged([sys.executable, "projects/TBD/train_net.py", "--config-file", config,
                "--eval-only", "DATASETS.TEST", f"('{dataset}',)", "MODEL.WEIGHTS", weights,
                "OUTPUT_DIR", str(out)], log, extra_env)
    return json.loads((out / "eval_results.json").read_text())["bbox"]
