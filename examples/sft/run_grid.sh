#!/usr/bin/env bash
# The comparison of docs/sft.md: for each task given, the base zero-shot and three adapters trained with the same
# data, steps and seed (BitFit b_q+b_m2, BitFit all biases, LoRA r=8 on q,v), each scored on the same dev subset.
#   examples/sft/run_grid.sh DATA_DIR TASK...     e.g. examples/sft/run_grid.sh ../shared/data sst2 trec agnews
# Sizes come from the environment: TRAIN_SIZE (256), EVAL_SIZE (200), EPOCHS (1), OUT (out/sft).
set -euo pipefail
cd "$(dirname "$0")/../.."
data=$1
shift
train_size=${TRAIN_SIZE:-256}
eval_size=${EVAL_SIZE:-200}
epochs=${EPOCHS:-1}
out=${OUT:-out/sft}
base=out/smollm2-135m
python examples/sft/prepare_base.py --out "$base"
for task in "$@"; do
  python examples/sft/evaluate.py --base "$base" --task "$task" --data-dir "$data" --eval-size "$eval_size" \
    --json "$out/$task-base/eval.json"
  for method in bitfit-bq-bm2 bitfit-all lora-r8; do
    python examples/sft/train.py --base "$base" --task "$task" --method "$method" --data-dir "$data" \
      --train-size "$train_size" --epochs "$epochs" --seed 0 --output-dir "$out/$task-$method"
    python examples/sft/evaluate.py --base "$base" --task "$task" --data-dir "$data" --eval-size "$eval_size" \
      --adapter "$out/$task-$method" --json "$out/$task-$method/eval.json"
  done
done
python examples/sft/report.py "$out"/*/eval.json
