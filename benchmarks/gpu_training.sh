#!/usr/bin/env bash
# Sharded BitFit training (benchmarks/sharded_training.py) under the Accelerate configs of examples/configs/ (FSDP2,
# DeepSpeed ZeRO-3) and a plain launch as the baseline, each with and without gradient checkpointing, on a GPU
# machine of the device tool (it starts bare, reaches nothing outside, and receives at most 64 MiB with the repo).
#
#   bash benchmarks/gpu_training.sh prepare   # here, where the package registries answer: fills .device/ (ignored
#                                             # by git) with the wheels of accelerate/transformers/peft as this repo
#                                             # pins them, and DeepSpeed's source with its dependencies
#   bash benchmarks/gpu_training.sh run [--quick]
#                                             # there (device run with carry [".device"]): installs them into a
#                                             # temporary folder and writes $OUT/training_<config>[_ckpt].json, one per
#                                             # run, and $OUT/training_gpu.json (all of them); a failed run is
#                                             # recorded with its log tail and the others go on
#
# `run --quick` with OUT set is also the CPU dry run of the plain launch (FSDP and DeepSpeed need a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device
PKGS="transformers peft huggingface-hub tokenizers accelerate safetensors"
DS_DEPS="hjson py-cpuinfo ninja msgpack einops"

case "${1:-}" in
prepare)
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p "$DEV/train-wheels"
  pins=$("$PY" -m pip freeze | sed "s/_/-/g" | grep -iE "^($(echo $PKGS | tr ' ' '|'))==" | tr '\n' ' ')
  for v in 3.11 3.12; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DEV/train-wheels" $pins $DS_DEPS
  done
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DEV/train-wheels" deepspeed
  du -sh "$DEV/train-wheels"
  ;;
run)
  shift
  PY=${PYTHON:-python3}
  OUT=${OUT:-$DEV/out}
  mkdir -p "$OUT"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install -q --no-deps --no-index --find-links "$DEV/train-wheels" --target "$work/site" $PKGS
  export PYTHONPATH="$work/site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # DeepSpeed from source, no ops prebuilt (DS_BUILD_OPS=0): ZeRO-3 with torch's AdamW needs none.
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --find-links "$DEV/train-wheels" \
    --target "$work/site" deepspeed $DS_DEPS > "$OUT/deepspeed_install.log" 2>&1 || echo "deepspeed install failed"
  sizes=(--hidden 2048 --layers 16 --batch 4 --seq 1024 --steps 8)
  [[ " $* " == *" --quick "* ]] && sizes=(--hidden 128 --layers 2 --batch 2 --seq 32 --steps 3)
  for config in plain fsdp2 deepspeed_zero3; do
    for ckpt in "" --checkpointing; do
      name="training_${config}${ckpt:+_ckpt}"
      launch=("$PY" -m accelerate.commands.launch --num_processes 1)
      [[ $config != plain ]] && launch+=(--config_file "examples/configs/$config.yaml")
      if ! "${launch[@]}" -m benchmarks.sharded_training --out "$OUT/$name.json" "${sizes[@]}" $ckpt \
        > "$OUT/$name.log" 2>&1; then
        "$PY" -c 'import json,sys; print(json.dumps({"error": open(sys.argv[1]).read()[-3000:]}))' "$OUT/$name.log" \
          > "$OUT/$name.json"
      fi
    done
  done
  "$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(f"{out}/training_*.json"))
        if not p.endswith("training_gpu.json")}
json.dump(runs, open(f"{out}/training_gpu.json", "w"), indent=1)
for name, r in runs.items():
    print(name, "ERROR" if "error" in r else
          f"{r['distributed_type']} loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f} step {r['median_step_s']:.3f}s "
          f"peak {r['peak_device_memory_bytes']} saved {r['saved_tensors']} tensors only deltas {r['saved_only_deltas']}")
PYEOF
  ;;
*)
  echo "usage: bash benchmarks/gpu_training.sh prepare | run [--quick]" >&2
  exit 2
  ;;
esac
