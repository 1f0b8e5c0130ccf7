"""Long fuzzing run of the reader harnesses of tests/test_fuzz.py (issue 14).

    python bench/fuzz.py                       # 20000 examples per harness
    python bench/fuzz.py --examples 2000 --only gguf-structured safetensors-header

Runs the explicit hostile inputs (hostile sizes, every truncation of small valid files) and then
each Hypothesis harness for ``--examples`` inputs, printing per harness the inputs tried and how
many were read (accepted) or refused with a one-line CnaError. A harness that finds a crash
stops with Hypothesis' minimal failing example (the exit status is 1). Results are recorded in
bench/results/fuzz.txt by hand.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from tests import test_fuzz as F


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20000, help="examples per Hypothesis harness")
    ap.add_argument("--only", nargs="*", help="harness names (default: all)")
    args = ap.parse_args()
    names = args.only or F.EXPLICIT + list(F.HARNESSES)
    failed = 0
    print(f"{'harness':26} {'inputs':>8} {'accepted':>9} {'refused':>8}  other outcomes  seconds")
    for name in names:
        t0 = time.perf_counter()
        try:
            counts = F.run_explicit(name) if name in F.EXPLICIT else F.run_harness(name, args.examples)
        except BaseException as e:  # noqa: BLE001 - report and go on with the next harness
            if isinstance(e, KeyboardInterrupt):
                raise
            failed += 1
            print(f"{name:26} CRASH {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc(limit=3)
            continue
        other = {k: v for k, v in counts.items() if k not in ("accepted", "refused")}
        print(f"{name:26} {sum(counts.values()):8d} {counts['accepted']:9d} {counts['refused']:8d}  "
              f"{other or '-'}  {time.perf_counter() - t0:.0f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
