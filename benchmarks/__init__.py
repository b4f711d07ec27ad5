"""bitfit-peft benchmark suite: speed, memory and size of BitFit against the alternatives, measured side by side.

Run `python -m benchmarks.run` (full, ~30 min on 2 cores) or `python -m benchmarks.run --quick` (tiny sizes, CI).
Modules: `timing` (interleaved medians), `common` (models, variants, memory probes), one `case_*` module per case
group, `report` (Markdown) and `run` (the command line).
"""
