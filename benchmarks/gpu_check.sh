#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (speed and data-pipeline issues). Installs nothing: it uses the
# image's torch and timm. Writes JSON under $OUT (default benchmarks/results/gpu) and prints the tables last.
# About 8 minutes in all; each part has its own time limit so one failure leaves the others' results.
#   OUT=/some/folder bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PAIR=(--device cuda --student resnet50 --teacher beitv2_base_patch16_224 --num-classes 1000 --img-size 224
      --batch-size 256 --opt lamb)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/card.txt"
nproc | sed 's/^/cpu cores /' | tee -a "$OUT/card.txt"
# (1) step speed, eager: (a) teacher, (b) student, (c) our KD step, (d) original-style, (e) cached (top-10)
timeout 120 python -m vanillakd bench "${PAIR[@]}" --steps 10 --rounds 2 --json "$OUT/step_eager.json" \
  > "$OUT/step_eager.txt" 2>&1
# (2) the same with torch.compile on student and teacher (the original-style step stays eager, as the seed's)
timeout 240 python -m vanillakd bench "${PAIR[@]}" --compile --steps 10 --rounds 2 --json "$OUT/step_compiled.json" \
  > "$OUT/step_compiled.txt" 2>&1
# (3) input pipelines on 3,000 generated JPEGs (500x375), A2 recipe, batch 256, 15 workers: per worker, the loader
# alone, and end to end through the compiled KD step (its graphs are in inductor's cache from (2))
timeout 180 python -m vanillakd bench --data "${PAIR[@]}" --compile --with-kd --num-images 3000 \
  --data-batch-size 256 --data-workers 15 --json "$OUT/data.json" > "$OUT/data.txt" 2>&1
for f in step_eager step_compiled data; do echo "== $f"; tail -n 14 "$OUT/$f.txt"; done
