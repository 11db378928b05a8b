#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (speed and data-pipeline issues). Installs nothing: it uses the
# image's torch and timm and this checkout (run it from the repository root). Writes logs and JSON under $OUT
# (default benchmarks/results/gpu) and prints the tables last.
#   (0) smoke: every training mode runs ~30 steps on generated JPEGs with small random-weight models and must
#       finish and print its img/s: PASS, FAIL (with the end of its log) or SKIP, one line per part;
#   (1)-(3) the step and data benches.
# Under 8 minutes in all: each part has its own time limit, cut to what is left of the smoke's share
# (GPU_CHECK_SMOKE_BUDGET s) or of the whole (GPU_CHECK_BUDGET s), so a hang costs its own limit and no more.
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # smoke alone, tiny models, CPU
# GPU_CHECK_SKIP="compile ..." leaves out smoke parts by name.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-455}
SMOKE_BUDGET=${GPU_CHECK_SMOKE_BUDGET:-210}
SKIP=" ${GPU_CHECK_SKIP:-} "
mkdir -p "$OUT/smoke"
: > "$OUT/card.txt"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

# cut LIMIT DEADLINE: a part's limit, cut to the seconds left before DEADLINE (seconds since the start)
cut() { local left=$(( $2 - (SECONDS - START) )); echo $(( $1 < left ? $1 : left )); }

# rate LOG: the last img/s a training log printed; for cache-teacher, its batches x batch size / seconds
rate() {
  local r
  r=$(grep -o '[0-9.]* img/s' "$1" | tail -n 1)
  [[ -z $r ]] && r=$(grep -o 'cached [0-9]* batches in [0-9.]*s' "$1" | tail -n 1 |
                     awk -v b="$S_BATCH" '{s = $5; sub("s$", "", s); if (s > 0) printf "%.1f img/s", $2 * b / s}')
  echo "$r"
}

# smoke NAME LIMIT CMD...: one smoke part under its own limit; its log is $OUT/smoke/NAME.log
smoke() {
  local name=$1 limit t0=$SECONDS rc r
  limit=$(cut "$2" "$SMOKE_BUDGET"); shift 2
  if [[ $SKIP == *" $name "* ]]; then report "$name" SKIP "GPU_CHECK_SKIP"; return 1; fi
  if (( limit < 10 )); then report "$name" SKIP "smoke budget spent"; return 1; fi
  timeout -k 10 "$limit" "$@" > "$OUT/smoke/$name.log" 2>&1; rc=$?
  r=$(rate "$OUT/smoke/$name.log")
  if (( rc == 0 )) && [[ -n $r ]]; then
    report "$name" PASS "$r in $(( SECONDS - t0 ))s"
    return 0
  fi
  (( rc == 124 || rc == 137 )) && report "$name" FAIL "timed out after ${limit}s" \
                               || report "$name" FAIL "exit $rc${r:+, $r}"
  tail -n 12 "$OUT/smoke/$name.log" | sed 's/^/    | /'
  return 1
}

report() { printf '%-14s %-4s %s\n' "$1" "$2" "$3" | tee -a "$OUT/smoke.txt"; }

# bench NAME LIMIT CMD...: one bench part, its limit cut to what is left of the whole budget
bench() {
  local name=$1 limit rc
  limit=$(cut "$2" "$BUDGET"); shift 2
  if (( limit < 20 )); then echo "budget spent: $name skipped" > "$OUT/$name.txt"; return; fi
  timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1; rc=$?
  (( rc == 124 || rc == 137 )) && echo "timed out after ${limit}s" >> "$OUT/$name.txt"
}

if [[ $DEVICE == cpu ]]; then
  # a dry run of the smoke's flags: test models, tiny images, few steps
  S_STUDENT=test_resnet S_TEACHER=test_resnet S_IMG=32 S_BATCH=8 S_STEPS=6 S_WORKERS=1 S_CLASSES=4
  S_JPEG="48 40" S_NCE_K=8
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/card.txt"
  S_STUDENT=resnet18 S_TEACHER=resnet34 S_IMG=128 S_BATCH=32 S_STEPS=30 S_WORKERS=8 S_CLASSES=10
  S_JPEG="160 120" S_NCE_K=256
fi
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/card.txt"
nproc | sed 's/^/cpu cores /' | tee -a "$OUT/card.txt"

# (0) smoke. Pretrained weights cannot be fetched offline: the teacher is a random-init timm model saved to a
# file, which is how the training scripts take a teacher without the hub.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$OUT/smoke.txt"
echo "== (0) smoke on $DEVICE: $S_STUDENT <- $S_TEACHER, ${S_IMG}px, batch $S_BATCH, $S_STEPS steps"
SETUP_OK=0
smoke setup 40 "$PY" - "$WORK" "$S_TEACHER" "$S_CLASSES" "$(( (S_STEPS + 1) * S_BATCH ))" "$(( 4 * S_BATCH ))" \
  $S_JPEG <<'EOF' && SETUP_OK=1
import sys, time
from pathlib import Path
import timm, torch
from vanillakd.tools.bench_data import write_jpegs
work, teacher, classes, n_train, n_val, w, h = sys.argv[1:]
t0 = time.perf_counter()
for split, n, seed in (("train", int(n_train), 0), ("val", int(n_val), 1)):
    write_jpegs(Path(work) / "data" / split, n, (int(w), int(h)), classes=int(classes), seed=seed)
torch.save(timm.create_model(teacher, num_classes=int(classes)).state_dict(), Path(work) / "teacher.pth")
n = int(n_train) + int(n_val)
print(f"{n} JPEGs and a {teacher} teacher file: {n / (time.perf_counter() - t0):.1f} img/s")
EOF
TRAIN_ARGS=("$WORK/data" --device "$DEVICE" --model "$S_STUDENT" --teacher "$S_TEACHER"
            --teacher-pretrained "$WORK/teacher.pth" --img-size "$S_IMG" -b "$S_BATCH" --workers "$S_WORKERS"
            --epochs 1 --warmup-epochs 0 --max-train-steps "$S_STEPS" --opt adamw --lr 1e-3
            --aa rand-m7-mstd0.5-inc1 --mixup 0.1 --cutmix 1.0 --reprob 0.25
            --log-interval 10 --no-progress --output "$WORK/runs")
KD=("$PY" -m vanillakd train-kd "${TRAIN_ARGS[@]}")
if (( SETUP_OK )); then
  smoke cpu-pipeline 40 "${KD[@]}" --data-pipeline cpu --experiment cpu-pipeline
  smoke gpu-pipeline 40 "${KD[@]}" --data-pipeline gpu --experiment gpu-pipeline
  smoke ema-force-cpu 40 "${KD[@]}" --model-ema --model-ema-force-cpu --experiment ema-force-cpu &&
    grep -h -o -- '--model-ema-force-cpu: .*not evaluated[^(]*' "$OUT/smoke/ema-force-cpu.log" | sed 's/^/    /'
  if smoke cache-teacher 40 "$PY" -m vanillakd cache-teacher "${TRAIN_ARGS[@]}" --cache-dir "$WORK/cache"; then
    smoke cached-kd 40 "${KD[@]}" --teacher-cache "$WORK/cache" --experiment cached-kd
  else
    report cached-kd SKIP "needs cache-teacher"
  fi
  # ReviewKD's weight ramps up from 0 over its first epoch: two half-length epochs, the second with the loss on
  smoke review 45 "$PY" -m vanillakd train-fd "${TRAIN_ARGS[@]}" --kd-loss review --epochs 2 \
    --max-train-steps "$(( S_STEPS / 2 ))" --experiment review
  smoke crd 40 "$PY" -m vanillakd train-crd "${TRAIN_ARGS[@]}" --kd-loss crd --nce-k "$S_NCE_K" --experiment crd
  # last: the slowest part (inductor compiles the student's step and the teacher's forward) can only cut itself
  smoke compile 100 "${KD[@]}" --compile --experiment compile
fi
echo "smoke: $(grep -c ' PASS ' "$OUT/smoke.txt") passed, $(grep -c ' FAIL ' "$OUT/smoke.txt") failed, \
$(grep -c ' SKIP ' "$OUT/smoke.txt") skipped in $(( SECONDS - START ))s" | tee -a "$OUT/smoke.txt"
if [[ $DEVICE == cpu ]]; then
  echo "(the step and data benches measure ResNet-50 <- BEiTv2-B on a GPU: not run with GPU_CHECK_DEVICE=cpu)"
  exit 0
fi

PAIR=(--device cuda --student resnet50 --teacher beitv2_base_patch16_224 --num-classes 1000 --img-size 224
      --batch-size 256 --opt lamb)
# (1) step speed, eager: (a) teacher, (b) student, (c) our KD step, (d) original-style, (e) cached (top-10)
bench step_eager 120 "$PY" -m vanillakd bench "${PAIR[@]}" --steps 10 --rounds 2 --json "$OUT/step_eager.json"
# (2) the same with torch.compile on student and teacher (the original-style step stays eager, as the seed's)
bench step_compiled 240 "$PY" -m vanillakd bench "${PAIR[@]}" --compile --steps 10 --rounds 2 \
  --json "$OUT/step_compiled.json"
# (3) input pipelines on 3,000 generated JPEGs (500x375), A2 recipe, batch 256, 15 workers: per worker, the loader
# alone, and end to end through the compiled KD step (its graphs are in inductor's cache from (2))
bench data 180 "$PY" -m vanillakd bench --data "${PAIR[@]}" --compile --with-kd --num-images 3000 \
  --data-batch-size 256 --data-workers 15 --json "$OUT/data.json"
echo "== smoke"; cat "$OUT/smoke.txt"
for f in step_eager step_compiled data; do echo "== $f"; tail -n 14 "$OUT/$f.txt"; done
echo "total $(( SECONDS - START ))s"
