"""``python -m benchmarks``: every benchmark in one run; writes RESULTS.md and PNG charts from scratch.

    python -m benchmarks                   # the full run (about 30 minutes on a 2-core CPU)
    python -m benchmarks --quick           # every part at CI size (a few minutes): checks the machinery, not speed
    python -m benchmarks --only search flow_search --out /tmp/partial/RESULTS.md

See :mod:`benchmarks.harness` for the parts, their baselines and targets.
"""

from benchmarks.harness import main

if __name__ == "__main__":
    raise SystemExit(main())
