#!/usr/bin/env python
"""Every efficacy figure of docs/strategies.md and bench/README.md, in order, with one command.

    python bench/efficacy.py                 # all steps (strategies and peer skip what they have measured;
                                             # the SmolLM2 hardening sweeps re-run, minutes each)
    python bench/efficacy.py --only peer     # one step (strategies, peer, harden, report)

1. strategies  bench/strategies.py --steps stats,tune,tpe,heldout (Qwen2.5-Coder-0.5B: discovery statistics, the
               grid and the TPE search on the 30-pair JBB tuning split, each strategy's choice, the paper's circuit
               and CAA on the held-out pairs)
2. peer        bench/peer_heretic.py --all (heretic in its own venv on the same weights, prompts and tuning split;
               its output scored on the same held-out pairs)
3. harden      bench/harden_smollm2.py for direction+, attribution+ (x1.5 ... x32) and attribution- (x0, x-1)
4. report      bench/strategies.py --steps report and bench/harden_smollm2.py --steps report (tables, frontier
               plots, the generated sections of docs/strategies.md and bench/README.md)

Nothing is downloaded but the heretic venv's PyPI packages. On this 2-core CPU machine a run from scratch takes
many hours (the tuning grid and TPE trials are 3 to 5 minutes each, heretic about 40 minutes for 16 trials).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench._common import ROOT

STEPS = {
    "strategies": [["strategies.py", "--steps", "stats,tune,tpe,heldout"]],
    "peer": [["peer_heretic.py", "--all"]],
    "harden": [["harden_smollm2.py", "--steps", "stats,sweep", "--strategy", "direction+",
                "--multipliers", "2,4,8,16,32"],
               ["harden_smollm2.py", "--steps", "sweep", "--strategy", "attribution+", "--multipliers", "1.5,2,3"],
               ["harden_smollm2.py", "--steps", "sweep", "--strategy", "attribution-", "--multipliers", "0,-1"]],
    "report": [["strategies.py", "--steps", "report"], ["harden_smollm2.py", "--steps", "report"]],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(STEPS), action="append", help="run only these steps (repeatable)")
    a = p.parse_args()
    for step in a.only or list(STEPS):
        for cmd in STEPS[step]:
            print(f"[efficacy] {step}: python bench/{' '.join(cmd)}", file=sys.stderr, flush=True)
            module = "bench." + Path(cmd[0]).stem
            rc = subprocess.run([sys.executable, "-m", module, *cmd[1:]], cwd=ROOT).returncode
            if rc != 0:
                print(f"[efficacy] {step} failed (exit {rc})", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
