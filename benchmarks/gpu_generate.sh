#!/usr/bin/env bash
# The generation case (benchmarks/case_generate.py) on a GPU machine of the device tool, which starts bare, reaches
# nothing outside, and receives at most 64 MiB with the repo (so SmolLM2's 540 MB of weights cannot travel).
#
#   bash benchmarks/gpu_generate.sh prepare  # here, where the package registries answer: fills .device-generate/
#                                            # (ignored by git): the wheels of the serve extra, of transformers serve
#                                            # (transformers[serving]) and of the versions of transformers/peft this
#                                            # repo tests, for Python 3.11 and 3.12; SmolLM2-135M-Instruct's config,
#                                            # generation config and tokenizer (not its weights), from the checkpoint
#                                            # the case saves under $BITFIT_BENCH_CACHE (run the case once first)
#   bash benchmarks/gpu_generate.sh run [--device cuda] [--dtype bfloat16] [--quick] [--config JSON]
#                                            # there (device run with carry [".device-generate"]): installs the wheels
#                                            # into a temporary folder, gives the SmolLM2-shaped model random weights
#                                            # (speed does not depend on their values; lengths come from the real
#                                            # tokenizer), runs the case, writes $OUT/generate_gpu.json
#
# `run --device cpu --quick` is the dry run of the same steps on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device-generate
PKGS="fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn transformers peft huggingface-hub tokenizers prometheus-client openai distro jiter rich markdown-it-py mdurl pygments accelerate"

case "${1:-}" in
prepare)
  PY=${PYTHON:-.venv/bin/python}
  rm -rf "$DEV" && mkdir -p "$DEV/wheels" "$DEV/smollm2"
  pins=$("$PY" -m pip freeze | sed "s/_/-/g" | grep -iE "^($(echo $PKGS | tr ' ' '|'))==" | tr '\n' ' ')
  for v in 3.11 3.12; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DEV/wheels" $pins
  done
  "$PY" - "$DEV/smollm2" <<'PYEOF'
import os, shutil, sys
from benchmarks.generate_models import smollm2_checkpoint
src = smollm2_checkpoint()
for name in os.listdir(src):  # config, generation config, tokenizer and chat template, not the weights
    if name.endswith((".json", ".jinja", ".txt")):
        shutil.copy(os.path.join(src, name), sys.argv[1])
PYEOF
  du -sh "$DEV"
  ;;
run)
  shift
  PY=${PYTHON:-python3}
  OUT=${OUT:-$DEV/out}
  mkdir -p "$OUT"
  work=$(mktemp -d)  # the installed wheels and the model's weights stay out of $DEV (it must travel light)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install -q --no-deps --no-index --find-links "$DEV/wheels" --target "$work/site" $PKGS
  export PYTHONPATH="$work/site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export BITFIT_BENCH_CACHE="$work/cache"
  mkdir -p "$work/cache/smollm2-135m-instruct"
  cp -r "$DEV/smollm2/." "$work/cache/smollm2-135m-instruct/"
  "$PY" - "$work/cache/smollm2-135m-instruct" <<'PYEOF'
import sys
import torch, transformers
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
transformers.AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)
PYEOF
  "$PY" -m benchmarks.case_generate --base "$work/cache/smollm2-135m-instruct" "$@" > "$OUT/generate_gpu.json"
  tail -c 2000 "$OUT/generate_gpu.json"
  ;;
*)
  echo "usage: bash benchmarks/gpu_generate.sh prepare | run [--device cuda] [--dtype D] [--quick] [--config JSON]" >&2
  exit 2
  ;;
esac
