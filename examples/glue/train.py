"""Fine-tune an encoder on a GLUE task with BitFit (or a baseline) using Accelerate: `glue_bitfit.train`.

    python examples/glue/train.py --model MODEL --task sst2 --data-dir ../shared/data/glue --output-dir out/run
    accelerate launch --multi_gpu --num_processes 2 examples/glue/train.py ...

Run as a script, Python puts this directory first on `sys.path`, so the `glue_bitfit` package beside it is the one
imported, installed or not. Options: `--help`, or `glue_bitfit/options.py`.
"""

import os
import sys

from glue_bitfit.train import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
