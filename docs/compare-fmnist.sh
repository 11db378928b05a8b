#!/usr/bin/env bash
# The Fashion-MNIST method x data-scale comparison committed in docs/compare-fmnist/ (run from the repo root).
set -euo pipefail
PY=${PY:-.venv/bin/python}
# the data: Fashion-MNIST's 60k training images, and 300 val images per class (3,000) to keep evaluation cheap
$PY -m vanillakd prepare fashion-mnist data/fashion-mnist
test -d data/fmnist-compare || $PY -c "from vanillakd.data.fashion_mnist import make_subset; make_subset('data/fashion-mnist', 'data/fmnist-compare', {'train': None, 'val': 300})"
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $PY -m vanillakd compare data/fmnist-compare \
  --model test_resnet --teacher test_resnet --train-teacher-epochs 4 --train-teacher-fraction 0.3333 \
  --methods none kd dkd dist --fractions 0.005 0.015 0.05 --seeds 0 1 2 --output docs/compare-fmnist -- \
  --epochs 10 -b 64 --lr 3e-3 --temperature 4 --workers 1 --eval-interval 2 --eval-interval-end 1.0 \
  --input-size 3 32 32 --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --scale 0.5 1.0 --color-jitter 0 --crop-pct 1.0 \
  --interpolation bilinear --train-interpolation bilinear --opt adamw --weight-decay 0.05 --sched cosine \
  --warmup-epochs 1 --warmup-lr 1e-4 --min-lr 1e-5 --smoothing 0.0 --no-progress --log-interval 1000 \
  --checkpoint-hist 0
