"""Regenerate benchmarks/repro/sweeps/*.yaml and benchmarks/repro/matched_ranks.md from repro.yaml.

    python benchmarks/repro/generate.py            # all scales
    python benchmarks/repro/generate.py cpu        # one scale

The rank matching is `tenslora.repro.match.match_ranks` (exact counts from
`tenslora.params.predict_adapter_parameters`); tests/test_repro.py checks that the committed cpu files
are what this script writes.
"""
import sys
from pathlib import Path

from tenslora.repro.plan import generate
from tenslora.repro.spec import DEFAULT_CONFIG, load_config

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for path in generate(load_config(DEFAULT_CONFIG), here, sys.argv[1:] or None):
        print(path.relative_to(here.parents[1]))
