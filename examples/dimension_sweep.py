"""A small dimension sweep from Python: does a one-step DMD student copy its teacher's pairing?

Runs in about half a minute on one CPU core: two dimensions of a power-law Gaussian, a teacher
trained over the whole noise range, students from the teacher and from scratch, Delta E with a
bootstrap interval. `dmdcopy demo` runs the same experiment at a larger scale.

    python examples/dimension_sweep.py [OUT_DIR]
"""

import dataclasses
import sys
from pathlib import Path

import torch

from dmdcopy.errors import ConfigError
from dmdcopy.experiments import SWEEP_PRESETS, format_sweep_table, run_dimension_sweep, write_json

torch.set_num_threads(1)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "dimension_sweep_out")

config = SWEEP_PRESETS["quick"]()  # a frozen dataclass: change fields with dataclasses.replace
config = dataclasses.replace(config, dims=(2, 32), kinds=("power_law_gaussian",), num_eval=400)
results = run_dimension_sweep(config, progress=lambda message: print("...", message))

print(format_sweep_table(results))
print("wrote", write_json(out / "results.json", results))
try:
    from dmdcopy.experiments import plot_sweep

    print("wrote", plot_sweep(results, out / "sweep.png"))
except ConfigError as e:  # matplotlib is optional; plot_sweep says what to install
    print("no figure:", e)
