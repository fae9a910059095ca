#!/usr/bin/env bash
# Prepare .gpu/ for an offline GPU machine that has torch but no Detectron2:
# the pure-Python packages of this project's venv (Detectron2 with its install-time fixes, fvcore,
# iopath, yacs, omegaconf, antlr4, termcolor, tabulate, portalocker), a pycocotools wheel for
# Python 3.12, and the shapes teacher's weights, with conv/linear weights in fp16 when HALF=1 (the
# default: half the size for machines that take small transfers; BN statistics stay fp32).
#
#   [HALF=0] bash projects/TBD/benchmarks/gpu_bundle.sh [TEACHER_CHECKPOINT]
#
# On the GPU machine, from the repository root:
#   cp -r .gpu/site /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site \
#     .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash projects/TBD/benchmarks/gpu_checks.sh .gpu/teacher_R18_FPN256.pth <commit> <out dir>
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
TEACHER=${1:-output/shapes/teacher_R18_FPN256/model_final.pth}  # the accuracy benchmark's
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/site .gpu/whl
SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for p in detectron2 fvcore iopath yacs omegaconf antlr4 tabulate termcolor portalocker; do
  cp -r "$SP/$p" .gpu/site/
done
find .gpu/site -name __pycache__ -type d -prune -exec rm -rf {} +
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl pycocotools==2.0.11
.venv/bin/python - "$TEACHER" "${HALF:-1}" <<'PY'
import sys
import torch
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
half = sys.argv[2] == "1"
sd = {k: v.half() if half and v.is_floating_point() and "running" not in k else v
      for k, v in ck["model"].items()}
torch.save({"model": sd, "iteration": ck.get("iteration")}, ".gpu/teacher_R18_FPN256.pth")
PY
du -sh .gpu
