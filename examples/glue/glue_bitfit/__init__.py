"""The GLUE example as a package: fine-tune an encoder with BitFit (or a baseline) and reproduce the paper's grid.

Modules: `tasks` (task definitions), `data` (loading and validating GLUE-layout files), `metrics`, `modeling` (one
model per `--method`), `options` (the command line), `train` (the Accelerate training script's steps),
`reproduce` (the grid driver) and `report` (its tables and figures). `examples/glue/train.py` and
`examples/glue/reproduce.py` are thin scripts over `train.main` and `reproduce.main`; after
`pip install -e ".[examples]"` the package imports from anywhere (`from glue_bitfit import train`) and runs as
`python -m glue_bitfit.train` / `python -m glue_bitfit.reproduce`.

Importing the package imports nothing heavy (torch, datasets and transformers load in the submodules that use them).
"""
