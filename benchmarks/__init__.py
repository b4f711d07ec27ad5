"""bitfit-peft benchmark suite: speed, memory and size of BitFit against the alternatives, measured side by side.

Run `python -m benchmarks.run` (full: tens of minutes on a shared 2-core CPU; `--cases`, `--models` and `--repeats`
run part of it) or `python -m benchmarks.run --quick` (tiny sizes, CI). Modules: `timing` (interleaved medians),
`common` (models, variants, memory probes, the per-model group runner), one `case_*` module per case group, `report`
(Markdown), `run` (the command line) and `gpu_check` (CUDA correctness and ratios on one GPU).
"""
