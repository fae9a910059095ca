#!/usr/bin/env bash
# Set up .venv if needed, then run the distillation demo on the bundled synthetic data: distil the
# shipped teacher (projects/TBD/demo_teacher/) into a small student, train the same student alone,
# evaluate the three with --eval-only on a held-out split, print an AP table and write
# output/demo/demo.png. About 12 minutes on 2 idle CPU cores, no downloads (--quick: 2 minutes, a
# pipeline check). Options: python projects/TBD/tools/demo.py --help.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python projects/TBD/tools/demo.py "$@"
