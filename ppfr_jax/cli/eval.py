"""``ppfr-eval``: verification accuracy of a recognizer on pairs files / .bin sets, or IJB-B / IJB-C 1:1.

``ppfr-eval --model casia_mobilefacenet|ppfr|... --checkpoint X --pairs
demo|x.bin|pairs.txt [--pairs ...]`` loads the recognizer
(``evaluate.MODELS``), each set (``evaluate.load_set``; a pairs.txt is
aligned from a sibling ``derived/lfw-deepfunneled_5pt.tsv`` when it exists),
embeds it (``evaluate.embed``) and prints the 10-fold accuracy per set
(``--json``: also fold accuracies, thresholds, TPR@FPR). A bad input the
user can fix (``PpfrError``, a missing file) is ``ppfr-eval: error: ...``, exit 2.

``ppfr-eval --model ... --checkpoint X --ijb ROOT --target IJBB|IJBC --out DIR`` runs the IJB 1:1
template protocol instead (``evaluate.ijb``: ROOT/<target>/meta and loose_crop, as insightface's
``eval_ijbc.py``): prints TPR at FPR 1e-6 .. 1e-1 and writes ``DIR/<t>_results.json``,
``<t>_roc.png`` and ``<t>_scores.npy``; ``--no-detector-score`` drops the detector-score weighting.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Sequence

from ppfr_jax.cli import error_exit, run_cli
from ppfr_jax.evaluate import ijb
from ppfr_jax.evaluate.recognizers import MODELS, evaluate_set
from ppfr_jax.evaluate.sets import load_set

PROG = "ppfr-eval"


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="verification accuracy of a recogniser on pairs files / "
                                                       ".bin sets")
    p.add_argument("--model", default="casia_mobilefacenet", help=f"one of {sorted(MODELS)}")
    p.add_argument("--checkpoint", required=True, help="weights file (068.ckpt) or workdir")
    p.add_argument("--pairs", action="append", default=None,
                   help="pairs.txt, an insightface .bin, or 'demo'; repeatable (or --ijb)")
    p.add_argument("--ijb", default=None, metavar="ROOT",
                   help="IJB 1:1 verification: ROOT holds IJBB/ and IJBC/ (meta/, loose_crop/) as released")
    p.add_argument("--target", default="IJBC", help=f"with --ijb: one of {', '.join(ijb.TARGETS)}")
    p.add_argument("--out", default=None, help="with --ijb: folder for <t>_results.json, <t>_roc.png, <t>_scores.npy")
    p.add_argument("--no-detector-score", action="store_true",
                   help="with --ijb: do not weight faces by their detector score (insightface weights them)")
    p.add_argument("--normalize-faces", action="store_true",
                   help="with --ijb: L2-normalise each face before pooling (insightface keeps the norms)")
    p.add_argument("--images", default=None, help="image root for a pairs.txt (default: sibling lfw-deepfunneled/)")
    p.add_argument("--landmarks", default=None,
                   help="5-point TSV to align pairs.txt images (default: sibling derived/lfw-deepfunneled_5pt.tsv "
                        "when it exists; 'none' to use the images as they are)")
    p.add_argument("--template", default=None, help="alignment template (default: the model's)")
    p.add_argument("--flip", default=None, choices=["none", "sum", "concat"], help="default: the model's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--skip-bad", action="store_true", help="drop pairs with missing/corrupt images (counted)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.model not in MODELS:
        p.error(f"unknown --model {a.model!r}; known: {sorted(MODELS)}")
    if (a.pairs is None) == (a.ijb is None):
        p.error("give --pairs (repeatable) or --ijb ROOT, not both")
    if a.ijb is not None and a.out is None:
        p.error("--ijb needs --out DIR (for the results, the ROC figure and the pair scores)")
    try:
        return _evaluate_ijb(a) if a.ijb is not None else _evaluate(a)
    except OSError as e:  # a checkpoint, pairs file or image root that is not there: the user's to fix
        return error_exit(PROG, e)


def _evaluate(a: argparse.Namespace) -> int:
    rec = MODELS[a.model](a.checkpoint)
    flip = rec.flip if a.flip is None else (None if a.flip == "none" else a.flip)
    template = a.template or rec.template
    results = {}
    for spec in a.pairs:
        t0 = time.time()
        lm = a.landmarks
        if lm is None and spec != "demo" and not spec.endswith(".bin"):
            cand = pathlib.Path(spec).parent / "derived" / "lfw-deepfunneled_5pt.tsv"
            lm = str(cand) if cand.is_file() else None
        if lm == "none":
            lm = None
        # lazy: a 14,000-image benchmark is checked once, then decoded batch by batch as it is embedded
        vs = load_set(spec, image_root=a.images, landmarks=lm, template=template, skip_bad=a.skip_bad, lazy=True)
        res = evaluate_set(rec, vs, batch_size=a.batch_size, flip=flip, nrof_folds=a.folds)
        dt = time.time() - t0
        print(f"{spec}: accuracy {100 * res['accuracy_mean']:.2f}% +- {100 * res['accuracy_std']:.2f} "
              f"({a.folds} folds, {res['num_pairs']} pairs, {len(res['skipped'])} skipped, "
              f"{len(vs.images)} images, {dt:.0f} s)")
        for msg in res["skipped"][:10]:
            print(f"  skipped: {msg}")
        results[spec] = {"accuracy": res["accuracy_mean"], "std": res["accuracy_std"],
                         "fold_accuracy": res["accuracy"].tolist(),
                         "best_thresholds": res["best_thresholds"].tolist(),
                         "tpr_at_fpr": res["tpr_at_fpr"], "num_pairs": res["num_pairs"],
                         "skipped": res["skipped"], "model": a.model, "checkpoint": a.checkpoint,
                         "flip": flip, "template": template if lm else None}
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _evaluate_ijb(a: argparse.Namespace) -> int:
    meta = ijb.read_meta(a.ijb, a.target)  # every table and crop checked before the model loads
    target = meta.target
    rec = MODELS[a.model](a.checkpoint)
    res = ijb.evaluate_ijb(rec, meta, a.out, flip=a.flip, template=a.template, batch_size=a.batch_size,
                           use_detector_score=not a.no_detector_score, normalize_faces=a.normalize_faces,
                           label=a.model, info={"model": a.model, "checkpoint": a.checkpoint})
    print(f"{target} 1:1 verification, TPR (%) at FPR ({res['num_crops']} crops, {res['num_templates']} "
          f"templates, {res['num_pairs']} pairs, {res['images_per_s']:.1f} images/s, {res['wall_s']:.0f} s):")
    print(ijb.format_table(target, res["tpr_at_fpr"]))
    print(f"AUC {100 * res['auc']:.4f}%; wrote {', '.join(res['files'].values())}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({target: res["summary"]}, indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: -> exit code (0, or 2 for a bad flag or input)."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
