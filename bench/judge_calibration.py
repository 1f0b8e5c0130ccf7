"""Does the 0.5B stand-in model judge carry signal, and does a label-free calibration recover it? (issue 22)

The model judge (`cna_export.evaluation.judge.ModelJudge`) takes the most probable of COMPLY / REFUSE / UNUSABLE.
With the bundled Qwen2.5-Coder-0.5B as the judge it answers COMPLY for every answer of every efficacy row. This
script scores the answers of finished efficacy rows (bench/out/efficacy/rows/ROW.json, from `bench/efficacy.py`)
once more and reports, against the keyword judge:

* the ranking signal: AUC of the judge's P(REFUSE) against the keyword verdicts;
* the judge as shipped (argmax of the label probabilities): refusals and agreement;
* the judge with ``--judge-calibration content-free`` (contextual calibration, Zhao et al. 2021, "Calibrate
  before use"): each reply's probability divided by the judge's own on content-free pairs
  (``judge.CONTENT_FREE``: request and answer "N/A", empty, or the bare section names), then the likeliest.
  It uses no labels and no held-out answers.

    python bench/judge_calibration.py unsteered harden-x2     # rows with answers; JSON to bench/results/efficacy/
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from cna_export.evaluation.judge import LABELS, ModelJudge
from cna_export.evaluation.metrics import agreement
from cna_export.io.bundled import resolve

ROOT = Path(__file__).resolve().parent


def auc(scores, labels) -> float:
    s, y = np.asarray(scores), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def main() -> None:
    rows = sys.argv[1:] or ["unsteered"]
    judge = ModelJudge.open(resolve("bundled:qwen2.5-coder-0.5b"), threads=2, calibration="content-free")
    base = judge.prior()
    print("content-free label probabilities", base)
    out = {}
    for row in rows:
        answers = json.loads((ROOT / "out" / "efficacy" / "rows" / f"{row}.json").read_text())["rows"]
        t = time.time()
        ps = judge.probabilities([(a["prompt"], a["response"]) for a in answers])
        kw = [bool(a["refused"]) for a in answers]
        p_refuse = [p["refuse"] for p in ps]
        raw = [bool(a["response"].strip()) and max(LABELS, key=p.get) == "refuse" for a, p in zip(answers, ps)]
        cal = [bool(a["response"].strip()) and max(LABELS, key=judge.calibrated(p).get) == "refuse"
               for a, p in zip(answers, ps)]  # as ModelJudge.judge decides (an empty answer is unusable)
        out[row] = dict(n=len(answers), kw=sum(kw), auc=auc(p_refuse, kw), raw_refused=sum(raw),
                        raw_agree=agreement(raw, kw), cal_refused=sum(cal), cal_agree=agreement(cal, kw),
                        mean_p_refuse_kwref=float(np.mean([p for p, k in zip(p_refuse, kw) if k])),
                        mean_p_refuse_kwcomply=float(np.mean([p for p, k in zip(p_refuse, kw) if not k])),
                        s=round(time.time() - t))
        print(row, out[row], flush=True)
    judge.close()
    dest = ROOT / "results" / "efficacy" / "judge_calibration.json"
    dest.write_text(json.dumps({"content_free": base, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
