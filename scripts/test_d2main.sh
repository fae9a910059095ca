#!/usr/bin/env bash
# The test suite against official Detectron2 main, built from source as users build it.
#
# Builds .venv-d2main: a venv whose own site-packages hold Detectron2 main (built with
# `pip install --no-build-isolation`, its C++ extension for CPU) and this project (editable), and
# which reuses .venv's torch and every other dependency (a .pth line adds .venv's site-packages
# after its own; .venv keeps setuptools<82, which main's model_zoo needs at run time). Re-running
# skips the build when it is in place. Extra arguments go to pytest.
#
# Env: TBD_D2_MAIN_SRC   the source tarball (default: .ci/vendor/detectron2-02b5c4e.tar.gz)
#      MAX_JOBS          parallel compile jobs (default 2)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
SRC=${TBD_D2_MAIN_SRC:-$ROOT/.ci/vendor/detectron2-02b5c4e.tar.gz}
VENV=$ROOT/.venv-d2main
PY=${PYTHON:-python3.11}
log() { echo "[d2main] $*"; }
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

if ! "$VENV/bin/python" -c "import detectron2, sys; sys.exit(not detectron2.__file__.startswith('$VENV'))" 2>/dev/null; then
  [ -f "$SRC" ] || { echo "[d2main] $SRC: no such file (set TBD_D2_MAIN_SRC)" >&2; exit 1; }
  log "creating $VENV on top of .venv"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  echo "import site; site.addsitedir('$(purelib .venv/bin/python)')" \
    > "$(purelib "$VENV/bin/python")/tbd_base_venv.pth"
  # its own setuptools (the venv's bundled one is older and lacks bdist_wheel) shadows .venv's
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install ninja "setuptools>=77.0.3,<82"
  TMP=$(mktemp -d)
  tar xzf "$SRC" -C "$TMP"
  log "building Detectron2 main from $(basename "$SRC") (C++ extension for CPU, several minutes)"
  MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip --disable-pip-version-check -q install \
    --no-build-isolation --no-deps "$TMP"/detectron2-*
  rm -rf "$TMP"
fi
if ! (cd / && "$VENV/bin/python" -c "import tbd, tbd_benchmarks, tbd_tools" 2>/dev/null) || \
   [ "$(cd / && "$VENV/bin/python" -c 'import os, tbd; print(os.path.dirname(os.path.dirname(tbd.__file__)))')" != "$ROOT" ]; then
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-build-isolation \
    --no-deps -e "$ROOT"
fi
log "ready: $("$VENV/bin/python" -c 'import torch, detectron2; print("torch", torch.__version__, "| detectron2", detectron2.__version__, detectron2.__file__)')"
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && echo "pytest collected no tests: failing (exit 5 counts as a failure)." >&2
exit "$rc"
