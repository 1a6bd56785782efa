"""Architecture coverage benchmark: a thin entry to :func:`tenslora.coverage.run_coverage`
(the same as ``tenslora bench coverage``).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/coverage.py --out benchmarks/results/coverage/coverage \
        --label after
"""
from __future__ import annotations

import argparse
import sys

from tenslora.coverage import DEFAULT_METHODS, ALL_METHODS, run_coverage


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/coverage", help="Output stem: writes STEM-LABEL.json/.md")
    parser.add_argument("--label", default="run", help="Name of this run (e.g. before, after).")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"Comma-separated, or 'all' ({','.join(ALL_METHODS)}).")
    parser.add_argument("--types", default="", help="Comma-separated model types (default: every type).")
    parser.add_argument("--cap", type=int, default=90, help="Seconds per model type (build and all methods).")
    args = parser.parse_args(argv)

    def progress(model_type, entry):
        status = entry.get("reason", "")[:80] if entry["built"] is None else \
            " ".join(f"{m}={r['status']}" for m, r in entry["methods"].items())
        print(f"{model_type:28s} {entry['seconds']:6.1f}s {status}", file=sys.stderr, flush=True)

    command = "OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/coverage.py " + " ".join(argv or sys.argv[1:])
    try:
        result = run_coverage(args.out, args.label, args.methods.split(","),
                              [t for t in args.types.split(",") if t] or None, args.cap, command, progress)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(result["markdown"])


if __name__ == "__main__":
    main()
