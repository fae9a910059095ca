#!/usr/bin/env bash
# Every GPU check of the project in one run, within a time budget (projects/TBD/benchmarks/
# README.md, "GPU").
#
#   bash projects/TBD/benchmarks/gpu_checks.sh TEACHER_WEIGHTS GIT_COMMIT OUT_DIR [BUDGET_S]
#   STAGES="accuracy" JOBS=10 bash projects/TBD/benchmarks/gpu_checks.sh ...   (one stage only)
#
# TEACHER_WEIGHTS: the accuracy benchmark's teacher, trained to convergence (its config,
# configs/shapes/retinanet_R18_FPN256_teacher.yaml, is amp_check.py's and accuracy.py's default).
#
# Needs python3 with torch (CUDA) and detectron2 importable. In order, each stage capped so the
# whole run ends within BUDGET_S (default 560 s):
#   1. speed.py --device cuda --coco --batch 8         (the 1.05x target of a distillation step)
#   2. amp_check.py                                    (fp16 autocast forward + AMPTrainer)
#   3. accuracy.py --profile gpu --jobs $JOBS          (the accuracy benchmark's GPU variant)
#   4. speed.py --device cuda --coco --batch 8 --amp --amp-dtype bf16   (if time is left; bf16:
#      the random-weight R101 teacher overflows fp16)
# The synthetic datasets are generated in the background meanwhile. The results.json of each
# stage, the accuracy benchmark's results.md and bar chart, and its per-run json and logs (one
# tarball) are copied to OUT_DIR, each a small file of its own.
# Settings (environment): STAGES (default "speed amp accuracy speed_amp") picks stages; JOBS
# (default 10) is the accuracy benchmark's runs in parallel (its 20 runs in two waves on 16
# cores); SPEED_RESERVE_S (380) is what the fp32 speed stage leaves for the stages after it,
# AMP_S (120) the AMP check's limit, SPEED_AMP_MIN_S (75) the least time the AMP speed stage
# needs to start.
set -u
STAGES=${STAGES:-speed amp accuracy speed_amp}
JOBS=${JOBS:-10}
SPEED_RESERVE_S=${SPEED_RESERVE_S:-380}
AMP_S=${AMP_S:-120}
SPEED_AMP_MIN_S=${SPEED_AMP_MIN_S:-75}
want() { [[ " $STAGES " == *" $1 "* ]]; }
TEACHER=$1
export TBD_GIT_COMMIT=$2
OUT=$3
BUDGET=${4:-560}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
stage() { echo "=== [$((SECONDS - START)) s] $*"; }
export PYTHONUNBUFFERED=1
R=projects/TBD/benchmarks/results
B=projects/TBD/benchmarks

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, detectron2; print('torch', torch.__version__, 'detectron2',
detectron2.__version__, torch.cuda.get_device_name(0))"

stage "generating the synthetic datasets in the background"
GEN=()
GENLOG=$(mktemp -d)  # not in OUT_DIR: only results are copied there
for split in tbd_shapes_train tbd_shapes_val tbd_shapes_mini_train tbd_shapes_mini_val; do
  python3 -c "import tbd; from tbd.data import ensure_generated; ensure_generated('$split')" \
    >"$GENLOG/gen_$split.log" 2>&1 &
  GEN+=($!)
done
gen_wait() {  # wait for the given generators; print the log of any that failed
  for i in "$@"; do
    wait "${GEN[$i]}" || { echo "dataset generation $i failed:"; cat "$GENLOG"/gen_*.log; }
  done
}

if want speed; then
  stage "1. speed, fp32"
  timeout $(($(left) - SPEED_RESERVE_S)) python3 $B/speed.py --device cuda --coco --batch 8 \
    --output $R/speed_cuda || echo "speed fp32 failed or timed out: rc $?"
fi

if want amp; then
  stage "2. AMP check"
  gen_wait 2 3
  timeout "$AMP_S" python3 $B/amp_check.py --teacher-weights "$TEACHER" --iters 100 \
    || echo "amp_check failed or timed out: rc $?"
fi

if want accuracy; then
  stage "3. accuracy, gpu profile"
  gen_wait 0 1
  timeout $(($(left) - 20)) python3 $B/accuracy.py --teacher-weights "$TEACHER" --profile gpu \
    --jobs "$JOBS" || echo "accuracy failed or timed out: rc $?"
fi

if want speed_amp && [ "$(left)" -gt "$SPEED_AMP_MIN_S" ]; then
  stage "4. speed, AMP"
  timeout $(($(left) - 15)) python3 $B/speed.py --device cuda --coco --batch 8 --amp \
    --amp-dtype bf16 \
    --output $R/speed_cuda_amp || echo "speed amp failed or timed out: rc $?"
fi

wait  # generators no stage waited for: none outlives the script
stage "copying results to $OUT (small separate files; the run logs in one tarball)"
for d in speed_cuda speed_cuda_amp amp_cuda accuracy_gpu; do
  [ -f $R/$d/results.json ] && cp $R/$d/results.json "$OUT/$d.json"
done
[ -f $R/accuracy_gpu/results.md ] && cp $R/accuracy_gpu/results.md "$OUT/accuracy_gpu.md"
[ -f $R/accuracy_gpu/accuracy.png ] && cp $R/accuracy_gpu/accuracy.png "$OUT/accuracy_gpu.png"
tar czf "$OUT/accuracy_gpu_runs.tgz" output/benchmarks/accuracy_gpu/*.json \
  output/benchmarks/accuracy_gpu/*.log 2>/dev/null
stage "done"
