"""DevTest curve of one of our training runs, from what ``ppfr_jax.main`` printed: one JSON line per evaluation.

    python -m ppfr_jax.main ... --config.eval.every_steps=42 2>&1 | tee RUN.log
    python bench/log_curve.py RUN.log --workdir WORKDIR [--label NAME] [--out FILE]

Each line: ``step``, ``devtest_accuracy`` / ``devtest_std`` (the run's "step N: DevTest verification
accuracy" line), the mean training loss and top-1 of the logged steps since the previous evaluation
(the run's "step N/M loss L acc A lr R" lines), and from ``WORKDIR/results.json`` the run's task,
total steps, wall seconds and the head's margin.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

EVAL = re.compile(r"^step (\d+): DevTest verification accuracy ([\d.]+)% ± ([\d.]+)")
TRAIN = re.compile(r"^step (\d+)/(\d+) loss ([\d.eE+-]+) acc ([\d.]+) lr ([\d.eE+-]+)")


def curve(lines, label: str = "", results: dict | None = None) -> list[dict]:
    out, window = [], []
    for line in lines:
        m = TRAIN.match(line)
        if m:
            window.append((int(m[1]), float(m[3]), float(m[4]), float(m[5])))
            continue
        m = EVAL.match(line)
        if m:
            rec = {"bench": "log_curve", "side": "ours", "label": label, "step": int(m[1]),
                   "devtest_accuracy": float(m[2]) / 100, "devtest_std": float(m[3]) / 100,
                   "train_loss_mean": sum(w[1] for w in window) / len(window) if window else None,
                   "train_top1_mean": sum(w[2] for w in window) / len(window) if window else None,
                   "lr": window[-1][3] if window else None}
            if results:
                cfg = results.get("config", {})
                rec.update(task=results.get("task"), steps_total=results.get("steps"), wall_s=results.get("wall_s"),
                           margin=cfg.get("head", {}).get("margin"), scale=cfg.get("head", {}).get("scale"),
                           batch_size=results.get("global_batch"))
            out.append(rec)
            window = []
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--workdir", default="", help="the run's workdir (its results.json)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    a = ap.parse_args(argv)
    results = None
    if a.workdir and os.path.isfile(os.path.join(a.workdir, "results.json")):
        results = json.load(open(os.path.join(a.workdir, "results.json")))
    with open(a.log, errors="replace") as f:
        recs = curve(f, a.label or os.path.basename(a.workdir.rstrip("/")), results)
    for r in recs:
        line = json.dumps(r)
        print(line)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    return 0 if recs else 1


if __name__ == "__main__":
    sys.exit(main())
