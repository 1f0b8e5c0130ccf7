"""The tables, JSON and plot of bench/audit_sweep.py, from its finished cells (bench/out/audit_sweep/cells/)."""

from __future__ import annotations

import json
from pathlib import Path

STORAGES = ("F32", "Q8_0", "Q4_K_M")
WINDOW_ORDER = ("early", "middle", "late", "all", "heretic")  # heretic: its own layer kernel (bench/peer_heretic.py)
BINS = ((None, 0.0, "none"), (0.0, 0.25, "1-24%"), (0.25, 0.5, "25-49%"), (0.5, 0.75, "50-74%"),
        (0.75, 1.01, "75-100%"))  # lo <= reduction < hi
FLOOR = 1e-3  # plotted gap / threshold floor (an exact ablation's gap is 0)
GOAL = 0.5  # an edit that removes at least this share of the refusals must be flagged


def load(cells: Path) -> tuple[dict, list[dict], list[dict]]:
    base, edits, clean = {}, [], []
    for p in sorted(cells.glob("*.json")):
        rec = json.loads(p.read_text())
        name = p.stem
        if name.startswith("base_"):
            _, model, storage = name.split("_", 2)
            base[(model, storage)] = rec["refused"]
        elif name.startswith("edit_"):
            edits.append(rec)
        elif name.startswith("clean_"):
            clean.append({k: v for k, v in rec.items() if k != "restored"})
    return base, edits, clean


def reduction(base: dict, model: str, storage: str, refused: int | None) -> float | None:
    b = base.get((model, "Q4_K_M" if storage == "Q4_K_M" else "Q8_0"))
    if refused is None or not b:
        return None
    return (b - refused) / b


def rows(base: dict, edits: list[dict]) -> list[dict]:
    out = []
    for e in edits:
        for storage in STORAGES:
            c = e["storage"].get(storage)
            if c is None:
                continue
            red = reduction(base, e["model"], storage, c.get("refused"))
            b = base.get((e["model"], "Q4_K_M" if storage == "Q4_K_M" else "Q8_0"))
            out.append({"model": e["model"], "technique": e["technique"], "window": e["window"],
                        "layers": f"{e['layers'][0]}-{e['layers'][-1]}", "strength": e["strength"], "storage": storage,
                        "refused_base": b, "refused": c.get("refused"), "reduction": red, "gap": c["gap"],
                        "threshold": c["threshold"], "flagged": c["flagged"], "gap_window": c["window"],
                        "gap_writers": c["writers"], "label": e.get("label"),
                        "audit": c.get("audit")})
    order = {w: i for i, w in enumerate(WINDOW_ORDER)}
    return sorted(out, key=lambda r: (r["model"], r["technique"], order[r["window"]], r["label"] or "",
                                      -1 if r["strength"] is None else r["strength"], STORAGES.index(r["storage"])))


def _strength(r: dict) -> str:
    return "-" if r["strength"] is None else f"{r['strength']:g}"


def _name(r: dict) -> str:
    return r["label"] or f"{r['technique']} {r['window']} x{_strength(r)}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def curve(rs: list[dict]) -> list[dict]:
    """Detection rate per refusal-reduction bin, per window and per storage."""
    out = []
    for key, values in (("window", WINDOW_ORDER), ("storage", STORAGES)):
        for v in values:
            for lo, hi, label in BINS:
                sel = [r for r in rs if r[key] == v and r["reduction"] is not None
                       and (r["reduction"] <= 0 if lo is None else lo <= r["reduction"] < hi and r["reduction"] > 0)]
                if sel:
                    out.append({"by": key, "value": v, "reduction": label, "cells": len(sel),
                                "flagged": sum(r["flagged"] for r in sel)})
    return out


def markdown(base: dict, rs: list[dict], clean: list[dict], cv: list[dict]) -> str:
    fp = [c for c in clean if c["flagged"]]
    need = [r for r in rs if r["reduction"] is not None and r["reduction"] >= GOAL]
    missed = [r for r in need if not r["flagged"]]
    lines = [f"False positives: **{len(fp)} of {len(clean)} clean files** flagged. Edits removing >= 50% of the "
             f"refusals: **{len(need) - len(missed)} of {len(need)} flagged**.", "",
             "Baseline refusals (held-out recipe prompts): " + ", ".join(
                 f"{m} {s} {n}" for (m, s), n in sorted(base.items())), "",
             "### Detection curve (cells flagged / cells, by refusal reduction)", "",
             "| by | value | " + " | ".join(b[2] for b in BINS) + " |", "|---|---|" + "---|" * len(BINS)]
    for key, values in (("window", WINDOW_ORDER), ("storage", STORAGES)):
        for v in values:
            cells = {c["reduction"]: f"{c['flagged']}/{c['cells']}" for c in cv if c["by"] == key and c["value"] == v}
            if cells:
                lines.append(f"| {key} | {v} | " + " | ".join(cells.get(b[2], "-") for b in BINS) + " |")
    strengths = sorted({r["strength"] for r in rs if r["strength"] is not None})
    lines += ["", "### Detection by strength, every model (with or without a refusal count; cells flagged / cells)", "",
              "| model | storage | " + " | ".join(f"x{s:g}" for s in strengths) + " |",
              "|---|---|" + "---|" * len(strengths)]
    for model in sorted({r["model"] for r in rs}):
        for storage in STORAGES:
            sel = [r for r in rs if r["model"] == model and r["storage"] == storage]
            cells = [[r for r in sel if r["strength"] == s] for s in strengths]
            lines.append(f"| {model} | {storage} | " + " | ".join(
                f"{sum(r['flagged'] for r in c)}/{len(c)}" if c else "-" for c in cells) + " |")
    lines += ["", "### Every edit", "", "| model | technique | window (layers) | strength | storage | refusals | "
              "reduction | gap / threshold | flagged | weakest window |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        ref = "-" if r["refused"] is None else f"{r['refused_base']} -> {r['refused']}"
        weakest = f"{r['gap_writers']} {r['gap_window'][0]}-{r['gap_window'][1]}"
        lines.append(f"| {r['model']} | {r['label'] or r['technique']} | {r['window']} ({r['layers']}) | "
                     f"{_strength(r)} | {r['storage']} | {ref} | {_pct(r['reduction'])} | "
                     f"{r['gap']:.3f} / {r['threshold']:.3f} | {'yes' if r['flagged'] else 'no'} | {weakest} |")
    lines += ["", "### Clean files (false positives)", "", "| model | file | storage | gap / threshold | flagged |",
              "|---|---|---|---|---|"]
    for c in sorted(clean, key=lambda c: (c["model"], c["variant"], c["storage"])):
        lines.append(f"| {c['model']} | {c['variant']} | {c['storage']} | {c['gap']:.3f} / {c['threshold']:.3f} | "
                     f"{'yes' if c['flagged'] else 'no'} |")
    lines += heretic_lines(rs)
    if missed:
        lines += ["", "### Missed edits that remove >= 50% of the refusals", ""]
        lines += [f"* {r['model']} {_name(r)} {r['storage']}: "
                  f"{_pct(r['reduction'])} fewer refusals, gap {r['gap']:.3f} vs threshold {r['threshold']:.3f}"
                  for r in missed]
    return "\n".join(lines) + "\n"


def heretic_lines(rs: list[dict]) -> list[str]:
    """heretic's edits: the gap score and the whole base-free audit's verdict (every signal), per GGUF."""
    hs = [r for r in rs if r["technique"] == "heretic" and r["audit"] is not None]
    if not hs:
        return []
    lines = ["", "### heretic 1.4.0's edits, base-free (the gap score, and the whole audit as a user runs it)", "",
             "| edit | layers | storage | refusals | reduction | gap / threshold | gap flags | audit exit | "
             "audit verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in hs:
        a = r["audit"]
        ref = "-" if r["refused"] is None else f"{r['refused_base']} -> {r['refused']}"
        lines.append(f"| {r['label']} | {r['layers']} | {r['storage']} | {ref} | {_pct(r['reduction'])} | "
                     f"{r['gap']:.3f} / {r['threshold']:.3f} | {'yes' if r['flagged'] else 'no'} | {a['exit_code']} | "
                     f"{a['verdict'].replace('|', '/')[:160]} |")
    return lines


def plot(rs: list[dict], clean: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"early": "tab:blue", "middle": "tab:orange", "late": "tab:green", "all": "tab:red",
               "heretic": "tab:purple"}
    markers = {"rank1": "o", "normpres3": "s", "heretic": "D"}
    fig, axes = plt.subplots(1, len(STORAGES), figsize=(15, 4.8), sharey=True)
    for ax, storage in zip(axes, STORAGES, strict=True):
        for r in rs:
            if r["storage"] == storage and r["reduction"] is not None:
                ax.scatter(100 * r["reduction"], max(r["gap"] / r["threshold"], FLOOR), c=colours[r["window"]],
                           marker=markers.get(r["technique"], "^"), alpha=0.8,
                           edgecolors="black" if r["model"] == "qwen" else "none")
        cl = [max(c["gap"] / c["threshold"], FLOOR) for c in clean if c["storage"] == storage]
        ax.scatter([0] * len(cl), cl, c="grey", marker="x", label="clean files")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.axvline(100 * GOAL, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 2, 5)
        ax.set_title(f"{storage}")
        ax.set_xlabel("refusal reduction (%), held-out recipe prompts")
    axes[0].set_ylabel(f"gap / threshold (flagged below 1; drawn at {FLOOR:g} when lower)")
    for w, c in colours.items():
        axes[-1].scatter([], [], c=c, label=f"window {w}")
    for t, m in markers.items():
        axes[-1].scatter([], [], c="white", edgecolors="black", marker=m, label=t)
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Base-free eigenvalue-gap audit: detection vs refusal reduction (Qwen: black edge)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_block(base: dict, rs: list[dict], clean: list[dict], cv: list[dict]) -> str:
    """The short section for bench/README.md: the command, the goal's figures, the curve, the false positives."""
    md = markdown(base, rs, clean, cv)
    head = md.split("### Every edit")[0].rstrip()
    fp = [c for c in clean if c["flagged"]]
    worst = min(clean, key=lambda c: c["gap"] / c["threshold"]) if clean else None
    lines = ["`nice -n 10 python bench/audit_sweep.py` (resumable; every edit's row, the clean files and the plot: "
             "bench/results/audit_sweep/audit_sweep.md, audit_sweep.json, detection.png). The rule, its per-type "
             "thresholds and the limits: docs/audit.md. Thresholds (cna_export/core/data/base_free.json) come from "
             "clean SmolLM2 and Gemma files only; Qwen2.5-Coder-0.5B, the one model with refusal counts, is held out. "
             "Refusals: 24 recipe harmful prompts held out from the direction's, greedy llama.cpp, 24 tokens, keyword "
             "judge; F32 takes the Q8_0 count.", "", head, ""]
    if worst is not None:
        lines.append(f"Clean files: {len(fp)} of {len(clean)} flagged; the closest to its threshold is "
                     f"{worst['model']} {worst['variant']} {worst['storage']} at gap {worst['gap']:.3f} against "
                     f"{worst['threshold']:.3f}.")
    missed = md.split("### Missed edits that remove >= 50% of the refusals")
    if len(missed) > 1:
        lines += ["", "Missed edits that remove >= 50% of the refusals:", "", missed[1].strip()]
    return "\n".join(lines)


def report(cells: Path, results: Path, readme: Path | None = None) -> None:
    base, edits, clean = load(cells)
    rs = rows(base, edits)
    cv = curve(rs)
    results.mkdir(parents=True, exist_ok=True)
    (results / "audit_sweep.md").write_text(markdown(base, rs, clean, cv))
    summary = {"schema": 1, "goal_reduction": GOAL, "base_refusals": {f"{m} {s}": n for (m, s), n in base.items()},
               "edits": rs, "curve": cv, "clean": clean,
               "false_positives": sum(c["flagged"] for c in clean), "clean_files": len(clean)}
    (results / "audit_sweep.json").write_text(json.dumps(summary, indent=1))
    plot(rs, clean, results / "detection.png")
    if readme is not None:
        from bench._common import splice

        start, end = "<!-- audit-sweep:start -->", "<!-- audit-sweep:end -->"
        block = start + "\n" + readme_block(base, rs, clean, cv) + "\n" + end
        readme.write_text(splice(readme.read_text(), start, end, block,
                                 heading="## Base-free audit: detection curve and false positives "
                                         "(bench/audit_sweep.py)\n\n"))
