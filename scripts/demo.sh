#!/usr/bin/env bash
# Main job on the packaged SmolLM2: collect TruthfulQA activations (cached), fit SLIM on fold 0
# (Stage 1-3), then ask whether it helps: a seeded sample of the held-out fold's questions answered
# with and without the policy, judged by the learned truth/info judge (trained once on TruthfulQA's
# human labels, then cached), with the answers it repairs and harms and the detector's rates where
# it runs. DEMO_QUESTIONS sets the sample size.
set -euo pipefail
out=${1:-runs/demo}
bin=$(dirname "$0")/../.venv/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
questions=${DEMO_QUESTIONS:-100}
"$bin/otguard" collect --model smollm2-135m --dataset truthfulqa
"$bin/otguard" fit --model smollm2-135m --dataset truthfulqa --method slim --fold 0 --folds 2 --out "$out/slim"
"$bin/otguard" evaluate --model smollm2-135m --policy "$out/slim" --questions "$questions" \
  --out "$out/evaluation.json"
