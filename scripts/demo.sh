#!/usr/bin/env bash
# Set up .venv if needed, then run the distillation demo on the bundled synthetic dataset:
# train a teacher and a light student, distil a TBD student, evaluate all three with --eval-only
# and print an AP table. About 12 minutes on a 2-core CPU, no downloads. A pipeline check only:
# its AP makes no accuracy claim (see projects/TBD/benchmarks/ for measured comparisons).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python projects/TBD/tools/demo.py "$@"
