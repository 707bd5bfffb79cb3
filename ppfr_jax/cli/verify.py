"""``ppfr-verify``: two protected files -> cosine score and same / different person (exit 0).

Runs a run's server half (``deploy.Deployment.embed``) on two files written by
``ppfr-protect`` for that run's client (``deploy.load_protected`` refuses
others) and prints the cosine similarity of the embeddings, the threshold and
where it came from (:func:`resolve_threshold`: ``--threshold``, else the run's
``results.json`` ``verify_threshold`` (cosine) or ``devtest_threshold`` (squared
L2 of unit embeddings, ``cos = 1 - d / 2``), else :data:`DEFAULT_THRESHOLD`,
which is not calibrated for any run), and the decision ("same"
when ``score >= threshold``); ``--json`` prints one JSON line instead. Every bad
input is one line ``ppfr-verify: error: ...`` and exit status 2.

Example::

    ppfr-verify --workdir runs/minusface_stage2_demo protected/a.npz protected/b.npz
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

from ppfr_jax.cli import run_cli
from ppfr_jax.cli.deploy_args import add_run_args, deployment_from_args, finite_float
from ppfr_jax.deploy import load_protected

# Cosine similarity of unit embeddings. ArcFace-trained recognisers put LFW's best
# threshold near cos 0.2-0.35 (squared distance 1.3-1.6); a placeholder, not a calibration.
DEFAULT_THRESHOLD = 0.3


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def resolve_threshold(workdir: str | None, explicit: float | None) -> tuple[float, str]:
    """(cosine threshold, where it came from): ``--threshold``, the run's results.json, or the default."""
    if explicit is not None:
        return float(explicit), "--threshold"
    if workdir:
        f = pathlib.Path(workdir) / "results.json"
        if f.is_file():
            try:
                res = json.loads(f.read_text())
            except json.JSONDecodeError:
                res = {}
            if isinstance(res.get("verify_threshold"), (int, float)):
                return float(res["verify_threshold"]), f"{f} verify_threshold"
            if isinstance(res.get("devtest_threshold"), (int, float)):  # squared L2 of unit vectors
                return 1.0 - float(res["devtest_threshold"]) / 2.0, f"{f} devtest_threshold (squared L2)"
            for name, r in (res.get("eval_sets") or {}).items():  # a run verified on named sets: the first one's
                if isinstance(r, dict) and isinstance(r.get("threshold"), (int, float)):
                    return 1.0 - float(r["threshold"]) / 2.0, f"{f} eval_sets.{name}.threshold (squared L2)"
    return DEFAULT_THRESHOLD, "default, uncalibrated"


def _verify(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="ppfr-verify", description=(
        "Run the server half of a run on two files written by ppfr-protect and decide whether they show the "
        "same person (cosine similarity of the embeddings >= threshold)."))
    add_run_args(p)
    p.add_argument("a", help="protected file (.npz)")
    p.add_argument("b", help="protected file (.npz)")
    p.add_argument("--threshold", type=finite_float, default=None,
                   help=f"cosine threshold (default: the run's results.json, else {DEFAULT_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args(argv)
    for f in (a.a, a.b):  # cheap checks first: a typo should not wait for a model
        load_protected(f)
    dep = deployment_from_args(a)
    ta, _ = load_protected(a.a, dep)
    tb, _ = load_protected(a.b, dep)
    batch = {k: np.stack([ta[k], tb[k]]) for k in dep.tensor_shapes}
    emb = dep.embed(batch)
    score = cosine(emb[0], emb[1])
    thr, where = resolve_threshold(a.workdir, a.threshold)
    same = score >= thr
    if a.json:
        print(json.dumps({"a": a.a, "b": a.b, "score": score, "threshold": thr, "threshold_source": where,
                          "same": bool(same), "method": dep.method}))
    else:
        print(f"{a.a} vs {a.b}: cosine {score:.4f}, threshold {thr:.3f} ({where}) -> "
              f"{'same person' if same else 'different people'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("ppfr-verify", _verify, argv)


if __name__ == "__main__":
    sys.exit(main())
