#!/usr/bin/env bash
# Create .venv with torch, Detectron2 v0.6 (pure Python, tested recipe) and this project.
#
# Works on a fresh machine whose only network is the package registries. Re-running is fast and
# harmless: every step is skipped when its result is already in place.
#
# Usage: bash scripts/setup.sh [VENV_DIR]      (default: .venv)
# Env:   PYTHON=python3.11                      interpreter used to create the venv
#        TBD_SKIP_DEV=1                         skip the dev tools (pytest, ruff)
#
# Detectron2 is not on PyPI under its own name. We install `pb1-detectron2==0.6`, which is the
# official v0.6 Python source re-published, with the install-time fixes numbered 1-7 below (no C++
# extension, configs packaged, Pillow/numpy fixes, pycocotools COCOeval, optional caffe2 export). Users with internet can instead install official Detectron2 from source
# into the venv first; this script then leaves it alone.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29

log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch 2.14.1 / torchvision 0.29.1"
  "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
fi

if ! "$VPY" -c "import fvcore, iopath, pycocotools, cv2, matplotlib, scipy, tqdm" 2>/dev/null; then
  log "installing detectron2 runtime dependencies"
  "${PIP[@]}" install "setuptools>=77.0.3,<82" "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" \
    pycocotools opencv-python-headless matplotlib scipy tqdm tabulate tensorboard
fi

if ! "$VPY" -c "import detectron2, detectron2.model_zoo, detectron2.data, detectron2.export" \
    2>/dev/null; then
  log "installing detectron2 0.6 (pure Python, tested recipe)"
  SRC=$(mktemp -d)
  trap 'rm -rf "$SRC"' EXIT
  "${PIP[@]}" download --no-deps --no-build-isolation pb1-detectron2==0.6 -d "$SRC"
  echo "$SDIST_SHA256  $SRC/pb1-detectron2-0.6.tar.gz" | sha256sum -c - >/dev/null
  tar -xzf "$SRC/pb1-detectron2-0.6.tar.gz" -C "$SRC"
  (
    cd "$SRC/pb1-detectron2-0.6"
    # 1. the sdist has no C++ sources: build no extension
    sed -i 's/^    ext_modules=get_extensions(),$/    ext_modules=[],/' setup.py
    grep -q '^    ext_modules=\[\],$' setup.py
    # 2. setup.py packages the model-zoo configs only from ./configs
    mv detectron2/model_zoo/configs configs
    # 3. importable stand-in for detectron2._C (imported at module level by detectron2.layers)
    cat > detectron2/_C.py <<'PYEOF'
"""Stand-in: detectron2 installed without its C++ extension (the PyPI sdist has no csrc).
Unavailable: rotated-box IoU/NMS, ROIAlignRotated, deformable conv, fast COCOeval."""


def get_compiler_version():
    return "none (detectron2._C stand-in)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    raise AttributeError(
        f"detectron2._C.{name} is unavailable: detectron2 was installed without its C++ extension"
    )
PYEOF
    # 4. Pillow >= 10 removed Image.LINEAR
    sed -i 's/interp=Image\.LINEAR/interp=Image.BILINEAR/' detectron2/data/transforms/transform.py
    # 5. numpy >= 1.24 removed np.int / np.float / np.str
    grep -rlE '\bnp\.(int|float|str|bool)\b' --include='*.py' detectron2 \
      | xargs sed -i -E 's/\bnp\.(int|float|str|bool)\b/\1/g'
    # 6. the fast COCOeval is in the missing extension: default to pycocotools' COCOeval
    sed -i 's/use_fast_impl=True,/use_fast_impl=False,/' detectron2/evaluation/coco_evaluation.py
    # 7. detectron2.export imports the caffe2 exporter (caffe2 left PyTorch) at package import,
    #    which breaks TracingAdapter; upstream made it optional later. Same change here.
    "$VPY" - detectron2/export/__init__.py <<'PYEOF'
import sys
path = sys.argv[1]
src = open(path).read()
old = "from .api import *\n"
new = ("try:\n    from .api import *  # caffe2 exporter: optional (caffe2 left PyTorch)\n"
       "except ImportError:\n    pass\n")
assert old in src, "detectron2/export/__init__.py changed: review install edit 7"
open(path, "w").write(src.replace(old, new, 1))
PYEOF
    "${PIP[@]}" install --no-build-isolation .
  )
fi

if [ "${TBD_SKIP_DEV:-0}" != "1" ] && ! "$VPY" -c "import pytest, ruff" 2>/dev/null; then
  log "installing dev tools"
  "${PIP[@]}" install "pytest>=8" "ruff>=0.6"
fi

# Checked from / : in the repository root, `import tbd` would find ./tbd without any install,
# (the benchmarks and tools are installed as the packages tbd_benchmarks and tbd_tools),
# and subprocesses started elsewhere (python projects/TBD/train_net.py) would not.
if ! (cd / && "$VPY" -c "import tbd, tbd_benchmarks, tbd_tools") 2>/dev/null || \
   [ "$(cd / && "$VPY" -c 'import os, tbd; print(os.path.dirname(os.path.dirname(tbd.__file__)))')" != "$ROOT" ]; then
  log "installing this project (editable)"
  "${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT"
fi

log "ready: $("$VPY" -c 'import torch, detectron2; print("torch", torch.__version__, "| detectron2", detectron2.__version__)')"
