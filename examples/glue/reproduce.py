"""Run a BitFit reproduction grid with `train.py`, then render its table and figures: `glue_bitfit.reproduce`.

    python examples/glue/reproduce.py run --model "$MINILM" --data-root ../shared/data --out runs/repro
    python examples/glue/reproduce.py report --out runs/repro --docs docs

Run as a script, Python puts this directory first on `sys.path`, so the `glue_bitfit` package beside it is the one
imported, installed or not.
"""

import sys

from glue_bitfit.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
