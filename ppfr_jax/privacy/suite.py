"""``run_privacy(config, workdir)``: every row of ``config.rows``, written to privacy.json / .md / PNG / TensorBoard.

Raises ``config_lib.ConfigError`` for a bad config (before anything is written). Rows whose run is
missing are skipped and recorded in ``privacy.json``'s ``skipped`` unless ``config.allow_untrained``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from ppfr_jax import data
from ppfr_jax.config_lib import ConfigError
from ppfr_jax.privacy.attacker import load_eval_set, load_recognizer, recognizer_accuracy, run_attack, train_attacker
from ppfr_jax.privacy.metrics import PSNR_CAP
from ppfr_jax.privacy.report import grid_file_name, make_grid, markdown_table
from ppfr_jax.privacy.views import (FIXED_FRESH, FIXED_SAME, ROWS, Representation, RowUnavailable, fixed_theta,
                                    load_duetface, load_minusface_generator, minusface_view, raw_view)


def _representations(config, rng, log) -> tuple[list[tuple[Representation, list]], dict]:
    """-> ([(training representation, [(method, eval representation), ...])], skipped {row: reason})."""
    rows = list(config.rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"config.rows: unknown row(s) {unknown}; choose from {ROWS}")
    out, skipped = [], {}
    r_duet, r_minus = jax.random.split(rng)
    mf: Any = None  # the MinusFace generator (or why it is unavailable), shared by both MinusFace rows
    for row in rows:
        try:
            if row == "raw":
                rep = raw_view()
                out.append((rep, [("raw", rep)]))
            elif row == "duetface":
                rep = load_duetface(config, r_duet)
                out.append((rep, [("duetface", rep)]))
            else:
                if mf is None:
                    try:
                        mf = load_minusface_generator(config, r_minus)
                    except RowUnavailable as e:
                        mf = e
                if isinstance(mf, RowUnavailable):
                    raise RowUnavailable(str(mf).replace("row 'minusface'", f"row {row!r}"))
                split, variables, source = mf
                fresh = minusface_view(split, variables, source=source)
                if row == "minusface":
                    out.append((fresh, [("minusface", fresh)]))
                else:
                    theta = fixed_theta(int(config.minusface.fixed_theta_seed))
                    fixed = minusface_view(split, variables, fixed_theta=theta, name="minusface_fixed_theta",
                                           source=source)
                    fresh_t = dataclasses.replace(fresh, name=FIXED_FRESH,
                                                  description="X_p, fresh θ (attacker trained on one fixed θ)")
                    out.append((fixed, [(FIXED_SAME, fixed), (FIXED_FRESH, fresh_t)]))
        except RowUnavailable as e:
            skipped[row] = str(e)
            log(str(e))
    return out, skipped


def _train_batches(config, batch_size: int):
    it, _, _ = data.train_source(config, batch_size, 0)
    return it


def run_privacy(config, workdir: str, *, log=None) -> dict:
    """Run every row of ``config.rows``; write privacy.json / privacy.md / PNG grids / TensorBoard to ``workdir``.

    Returns:
      the ``privacy.json`` content: ``{'rows': [record...], 'recognizer', 'reference_accuracy',
      'skipped', 'eval_set', 'config', 'wall_s'}``; each record has ``method``,
      ``ssim``, ``psnr`` (recovered vs face), ``attacker_accuracy`` (None without a
      recogniser), ``attacker_accuracy_std``, ``n_images``, ``n_pairs``,
      ``protected_ssim``, ``protected_psnr``, ``representation``, ``weights``,
      ``attacker_steps``, ``attacker_final_l1``, ``grid``.
    Raises:
      config_lib.ConfigError naming a bad config field (checked before anything is built).
    """
    from ppfr_jax import config_lib, writers
    config_lib.validate_privacy(config)

    is_main = jax.process_index() == 0
    log = log or (lambda msg: print(msg, flush=True) if is_main else None)
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    rng = jax.random.key(int(config.seed))
    r_reps, r_train, r_eval = jax.random.split(rng, 3)

    eval_set = load_eval_set(config)
    recognizer, rec_desc = load_recognizer(config)
    log(f"privacy: {len(eval_set.images)} held-out faces, {len(eval_set.issame)} pairs ({eval_set.name}); "
        f"recogniser {rec_desc}")
    reference = None
    if recognizer is not None:
        reference = recognizer_accuracy(recognizer, eval_set.images, eval_set, batch_size=config.eval.batch_size)
        log(f"recogniser on the original faces: {100 * reference['accuracy']:.2f}% ± {100 * reference['std']:.2f}")

    reps, skipped = _representations(config, r_reps, log)
    # TensorBoard event files; without TensorFlow, metrics.jsonl + images/ (writers.metric_writer)
    writer = writers.metric_writer(workdir, just_logging=not is_main, asynchronous=False, log=log)
    records = []
    n_grid = min(int(config.get("grid_rows", 6)), len(eval_set.images))
    try:
        for k, (train_rep, evals) in enumerate(reps):
            log(f"row {train_rep.name}: {train_rep.description}; weights {train_rep.source}; "
                f"{train_rep.channels()} input channels")
            attacker = train_attacker(train_rep, _train_batches(config, int(config.attacker.batch_size)), config,
                                      jax.random.fold_in(r_train, k), log=log)
            for m, (method, rep) in enumerate(evals):
                res = run_attack(rep, attacker, eval_set, jax.random.fold_in(jax.random.fold_in(r_eval, k), m),
                                 batch_size=int(config.eval.batch_size))
                acc = (recognizer_accuracy(recognizer, res["recovered"], eval_set,
                                           batch_size=int(config.eval.batch_size))
                       if recognizer is not None else None)
                grid = make_grid(eval_set.images[:n_grid], res["protected"][:n_grid], res["recovered"][:n_grid],
                                 stretch=train_rep.name == "duetface")
                grid_file = grid_file_name(method)
                if is_main:
                    from PIL import Image
                    Image.fromarray(grid).save(os.path.join(workdir, grid_file))
                rec = {
                    "method": method,
                    "ssim": float(np.mean(res["ssim"])),
                    "psnr": float(np.mean(res["psnr"])),
                    "attacker_accuracy": None if acc is None else acc["accuracy"],
                    "attacker_accuracy_std": None if acc is None else acc["std"],
                    "n_images": int(len(eval_set.images)),
                    "n_pairs": int(len(eval_set.issame)),
                    "protected_ssim": float(np.mean(res["protected_ssim"])),
                    "protected_psnr": float(np.mean(res["protected_psnr"])),
                    "representation": rep.description,
                    "weights": rep.source,
                    "attacker_steps": int(config.attacker.steps),
                    "attacker_final_l1": attacker.history[-1][1] if attacker.history else None,
                    "grid": grid_file,
                }
                records.append(rec)
                scalars = {f"privacy/{method}/{key}": rec[key] for key in
                           ("ssim", "psnr", "protected_ssim", "protected_psnr", "attacker_accuracy")
                           if rec[key] is not None}
                writer.write_scalars(0, scalars)
                writer.write_images(0, {f"privacy/{method}": grid[None]})
                acc_s = "-" if acc is None else f"{100 * acc['accuracy']:.2f}%"
                log(f"{method}: recovered SSIM {rec['ssim']:.3f} PSNR {rec['psnr']:.2f} dB, attacker accuracy "
                    f"{acc_s}; protected SSIM {rec['protected_ssim']:.3f} PSNR {rec['protected_psnr']:.2f} dB")
    finally:
        writer.flush()
        writer.close()

    out = {
        "rows": records,
        "recognizer": rec_desc,
        "reference_accuracy": reference,
        "skipped": skipped,
        "eval_set": {"name": eval_set.name, "n_images": int(len(eval_set.images)),
                     "n_pairs": int(len(eval_set.issame))},
        "psnr_cap_db": PSNR_CAP,
        "config": config.to_dict(),
        "wall_s": time.time() - t_start,
    }
    if is_main:
        with open(os.path.join(workdir, "privacy.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)
        table = markdown_table(records, reference, skipped)
        with open(os.path.join(workdir, "privacy.md"), "w") as f:
            f.write("# Privacy evaluation\n\n" + table)
        log("\n" + table)
    return out
