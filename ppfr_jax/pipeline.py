"""One command per method: every training stage in order, the equal-budget baseline, the attack, a report.

``run_pipeline(config, workdir)`` takes a pipeline config (``configs/duetface.py:demo``,
``configs/minusface.py:demo``, built by ``config_lib.pipeline_config``; ``is_pipeline_config``) and

1. trains each stage of ``config.pipeline.stages`` with the engine (``train.train_and_evaluate``) in its
   own sub-folder, ``<workdir>/<stage>`` (DuetFace ``client`` then ``server``; MinusFace ``stage1`` then
   ``stage2``), wiring the second to the first (``duetface.client_workdir`` / ``minusface.stage1_workdir``);
2. with ``pipeline.baseline`` trains the RGB ArcFace baseline with the recogniser's budget in
   ``<workdir>/baseline`` (or reads the results of ``pipeline.baseline_workdir``);
3. runs the white-box recovery attack (``privacy.run_privacy``, budget ``config.privacy``) against what
   the server receives, in ``<workdir>/privacy``;
4. writes ``<workdir>/report.md``, ``transmitted.png`` (what the server receives), ``recovery.png``
   (original | transmitted | recovered) and ``<workdir>/results.json`` (:func:`run_pipeline`'s return).

Killed at any point, the same call continues: the engine resumes a stage from its checkpoint and re-prints
a finished one without changing it; a finished attack (``privacy/privacy.json`` made with the same
settings against the same checkpoint) is not redone; outputs are only written when their bytes change. A finished pipeline run again
prints its recorded results and writes nothing.

Only the CLI (``ppfr_jax.cli.train``) imports this module; it imports the engine. No TensorFlow at import.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

import ml_collections
import numpy as np

from ppfr_jax import config_lib
from ppfr_jax.config_lib import PIPELINE_STAGES, ConfigError
from ppfr_jax.errors import RunError

RESULTS = "results.json"
REPORT = "report.md"
TRANSMITTED_PNG = "transmitted.png"
RECOVERY_PNG = "recovery.png"
# each method's second stage reads the first from this field of its config
WIRING = {"duetface": ("duetface", "client_workdir"), "minusface": ("minusface", "stage1_workdir")}
WHAT_IS_SENT = {
    "duetface": ("the 162 server DCT channels, decoded to an image with the client's 30 low-frequency channels "
                 "zeroed (contrast-stretched per image: it is nearly uniform grey), and the client's 4 attention "
                 "masks"),
    "minusface": "X_p = idct(shuffle(x - g(x))), with a fresh channel permutation per image (two draws shown)",
}
TITLES = {"duetface": "DuetFace", "minusface": "MinusFace"}


def is_pipeline_config(config) -> bool:
    """True for a whole-method config (it has a ``pipeline`` section), False for one training run's."""
    return "pipeline" in config


def _plain(d):
    """A config as JSON-comparable plain data (tuples -> lists)."""
    return json.loads(json.dumps(d.to_dict() if hasattr(d, "to_dict") else d, default=str))


def _copy(config) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


# ----------------------------------------------------------------------------- configs


def phases(config) -> list[str]:
    """The phases in order: the stages, ``'baseline'`` when trained here, ``'privacy'``."""
    p = config.pipeline
    return list(p.stages) + (["baseline"] if p.baseline and not p.baseline_workdir else []) + ["privacy"]


def stage_configs(config, workdir: str) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """-> ``[(name, training config, its workdir), ...]``: the stages in order, then the baseline when it is
    trained here; each stage after the first wired to its predecessor's workdir (absolute paths)."""
    p = config.pipeline
    root = os.path.abspath(workdir)
    out = []
    prev = None
    for name in p.stages:
        c = _copy(config.stages[name])
        if prev is not None:
            section, field = WIRING[p.method]
            c[section][field] = prev
        wd = os.path.join(root, name)
        out.append((name, c, wd))
        prev = wd
    if p.baseline and not p.baseline_workdir:
        out.append(("baseline", _copy(config.baseline), os.path.join(root, "baseline")))
    return out


def privacy_config(config, workdir: str) -> tuple[ml_collections.ConfigDict, str | None]:
    """-> (the attack's config, reading the last stage's run; why the recogniser is skipped or None).

    The recogniser (``privacy.recognizer``) is dropped, with the reason, when its checkpoint is not set
    or not there."""
    p = config.pipeline
    c = _copy(config.privacy)
    c.rows = (p.method,)
    c[p.method].workdir = os.path.join(os.path.abspath(workdir), p.stages[-1])
    ck = c.recognizer.get("checkpoint", "") or ""
    why = None
    if not ck:
        why = "no recogniser checkpoint configured (privacy.recognizer.checkpoint is empty)"
    elif ck != "-" and not os.path.exists(ck):
        why = (f"the {c.recognizer.model} checkpoint {ck} is not there (see ../shared/data/models/PROVENANCE.md); "
               f"set privacy.recognizer.checkpoint to it")
    if why:
        c.recognizer.checkpoint = ""
    return c, why


def validate_pipeline(config, workdir: str) -> None:
    """Check a pipeline config before anything runs: its own fields, then every stage's training config
    (wired), the baseline's and the attack's.

    Raises:
      ConfigError naming the field (``config.pipeline.method: ...``, ``config.stages.server.optim.lr: ...``).
    """
    p = config.pipeline
    if p.get("method") not in PIPELINE_STAGES:
        raise ConfigError(f"config.pipeline.method: must be one of {sorted(PIPELINE_STAGES)}, got {p.get('method')!r}")
    want = PIPELINE_STAGES[p.method]
    if tuple(p.get("stages", ())) != want:
        raise ConfigError(f"config.pipeline.stages: {p.method} runs {want} in this order, got {tuple(p.stages)}")
    missing = [s for s in want if s not in config.get("stages", {})]
    if missing:
        raise ConfigError(f"config.stages: no training config for stage(s) {missing}")
    if not isinstance(p.get("baseline"), bool):
        raise ConfigError(f"config.pipeline.baseline: must be True or False, got {p.get('baseline')!r}")
    bw = p.get("baseline_workdir", "")
    if not isinstance(bw, str):
        raise ConfigError(f"config.pipeline.baseline_workdir: must be a path or '', got {bw!r}")
    if bw and not os.path.isfile(os.path.join(bw, RESULTS)):
        raise ConfigError(f"config.pipeline.baseline_workdir: {bw!r} has no {RESULTS} (train it first: python -m "
                          f"ppfr_jax.main --config configs/arcface.py:demo,match={p.method} --workdir {bw})")
    gr = p.get("grid_rows", 6)
    if isinstance(gr, bool) or not isinstance(gr, int) or not 1 <= gr <= 64:
        raise ConfigError(f"config.pipeline.grid_rows: must be an integer in [1, 64], got {gr!r}")
    for k, v in dict(p.get("estimates_s", {})).items():
        if k not in phases(config) + ["baseline"] or isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"config.pipeline.estimates_s.{k}: must name a phase of {phases(config)} and be "
                              f"seconds >= 0, got {v!r}")
    for name, c, _ in stage_configs(config, workdir):
        field = "baseline" if name == "baseline" else f"stages.{name}"
        try:
            config_lib.validate(c)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config.", f"config.{field}.", 1)) from None
    pc, _ = privacy_config(config, workdir)
    try:
        config_lib.validate_privacy(pc)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.", "config.privacy.", 1)) from None
    if int(pc.attacker.steps) < 1:
        raise ConfigError(f"config.privacy.attacker.steps: must be >= 1, got {pc.attacker.steps}")


# ----------------------------------------------------------------------------- progress


class Progress:
    """The whole pipeline's ETA: the running phase's own ETA plus the later phases' estimates
    (``pipeline.estimates_s``, idle 2-core CPU wall seconds of each whole phase: compiles and
    evaluations included) scaled by how fast the running phase goes compared with its estimate,
    like with like: the phase's wall time so far plus its remaining steps, against its estimate."""

    def __init__(self, config):
        self.phases = phases(config)
        self.est = {k: float(v) for k, v in dict(config.pipeline.get("estimates_s", {})).items()}
        self.factor = None  # measured / estimated speed of the last phase that ran

    def suffix(self, phase: str, remaining_s: float, projected_total_s: float | None) -> str:
        """``' | <phase> ETA ..., pipeline ETA ...'`` for a log line of ``phase``."""
        from ppfr_jax.train import format_duration
        if projected_total_s and self.est.get(phase):
            self.factor = projected_total_s / self.est[phase]
        later = self.phases[self.phases.index(phase) + 1:]
        unknown = [p for p in later if not self.est.get(p)]
        total = remaining_s + sum(self.est.get(p, 0.0) for p in later) * (self.factor or 1.0)
        tail = f" (+ {', '.join(unknown)}: no estimate)" if unknown else ""
        return f" | {phase} ETA {format_duration(remaining_s)}, pipeline ETA {format_duration(total)}{tail}"

    def engine_hook(self, phase: str) -> Callable:
        """``progress`` for ``train.train_and_evaluate``: called with (step, num_steps, steps/s).

        Made when the phase starts: its projected total is the wall time since then (the compile, the
        evaluations so far) plus the remaining steps at ``rate``, not the steps alone (which made the
        later phases look 2-3x shorter than they are: their estimates include compiles and evaluations).
        """
        start = [time.monotonic(), 0]  # wall time and step at which this process started the phase

        def hook(step, num_steps, rate):
            if rate is None:  # the engine's call before its first step: a resumed phase starts at ``step``
                start[:] = [time.monotonic(), int(step)]
                return ""
            remaining = (num_steps - step) / max(rate, 1e-9)
            # a phase resumed at step k ran only k..N here: its whole-phase figure is scaled by N / (N - k)
            whole = (time.monotonic() - start[0] + remaining) * num_steps / max(num_steps - start[1], 1)
            return self.suffix(phase, remaining, whole)
        return hook

    def privacy_log(self, log: Callable) -> Callable:
        """A ``log`` for ``run_privacy``: its attacker lines (``step i/n ... (x s/step)``) get steps/s and ETAs."""
        def out(msg: str):
            m = re.search(r"step (\d+)/(\d+).*?\(([\d.]+) s/step\)", msg)
            if m:
                i, n, s = int(m.group(1)), int(m.group(2)), max(float(m.group(3)), 1e-9)
                msg = f"{msg} {1 / s:.2f} steps/s" + self.suffix("privacy", (n - i) * s, None)
            log(msg)
        return out


# ----------------------------------------------------------------------------- file helpers


def _write_if_changed(path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless it already holds exactly these bytes (mtime then unchanged)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def _png_bytes(img: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- pictures


def transmitted_picture(config, privacy_cfg, rng_seed: int = 0) -> np.ndarray:
    """What the server receives, for the first ``pipeline.grid_rows`` held-out faces, as one uint8 picture.

    DuetFace: original | decoded server channels (contrast-stretched) | the 4 attention masks (grey, 112x112).
    MinusFace: original | X_p | X_p with another fresh permutation.
    Raises ``privacy.RowUnavailable`` when the last stage's checkpoint is missing.
    """
    import jax

    from ppfr_jax import tasks
    from ppfr_jax.privacy import attacker, report, views

    n = int(config.pipeline.grid_rows)
    faces = attacker.load_eval_set(privacy_cfg).images[:n]
    x = tasks.normalize_images(jax.numpy.asarray(faces))
    key = jax.random.key(rng_seed)
    to8 = lambda a: np.asarray(np.round(np.clip(np.asarray(a, np.float32), 0, 1) * 255), np.uint8)
    if config.pipeline.method == "duetface":
        rep = views.load_duetface(privacy_cfg, key)
        inputs, decoded = jax.jit(rep.apply)(rep.variables, x, key)
        masks = np.asarray(inputs)[..., -4:]
        cols = [faces, report.stretch_each(to8(decoded))] + [to8(np.repeat(masks[..., i:i + 1], 3, -1))
                                                             for i in range(masks.shape[-1])]
    else:
        split, variables, source = views.load_minusface_generator(privacy_cfg, key)
        rep = views.minusface_view(split, variables, source=source)
        f = jax.jit(rep.apply)
        cols = [faces] + [to8(f(rep.variables, x, jax.random.fold_in(key, i))[1]) for i in range(2)]
    return report.tile_grid(cols)


# ----------------------------------------------------------------------------- report


def _pct(acc, std=None):
    if acc is None:
        return "not measured"
    return f"{100 * acc:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def _stage_record(name: str, res: dict, wd: str) -> dict:
    return {"stage": name, "workdir": wd, "task": res.get("task"), "steps": res.get("steps"),
            "wall_s": res.get("wall_s"), "devtest_accuracy": res.get("devtest_accuracy"),
            "devtest_std": res.get("devtest_std")}


def summary_table(results: dict) -> str:
    """The console summary: one row per phase (stage, steps, wall time, DevTest accuracy)."""
    from ppfr_jax.train import format_duration
    rows = [("stage", "steps", "wall time", "DevTest accuracy")]
    for s in results["stages"]:
        rows.append((s["stage"], str(s["steps"]), format_duration(s["wall_s"] or 0),
                     _pct(s["devtest_accuracy"], s["devtest_std"])))
    b = results["baseline"]
    if b.get("devtest_accuracy") is not None or b.get("steps") is not None:
        rows.append(("baseline (RGB)", str(b.get("steps")), format_duration(b.get("wall_s") or 0)
                     if b.get("trained_here") else "-", _pct(b.get("devtest_accuracy"), b.get("devtest_std"))))
    pr = results["privacy"]
    rows.append(("privacy attack", str(pr.get("attacker_steps")), format_duration(pr.get("wall_s") or 0),
                 "recovered: " + _pct(pr.get("attacker_accuracy"), pr.get("attacker_accuracy_std"))))
    rows.append(("total", "", format_duration(results["wall_s_total"]), ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()
    return "\n".join([line(rows[0]), "  ".join("-" * x for x in w)] + [line(r) for r in rows[1:]])


def render_report(results: dict) -> str:
    """``report.md`` from the pipeline's results (deterministic: same results, same bytes)."""
    from ppfr_jax.train import format_duration
    m = results["method"]
    title = TITLES.get(m, m)
    server = results["server"]
    b = results["baseline"]
    pr = results["privacy"]
    L = [f"# {title} pipeline report", "",
         f"Workdir `{results['workdir']}`; stages {', '.join(s['stage'] for s in results['stages'])} "
         f"(each in its own sub-folder), then the recovery attack. Figures also in `{RESULTS}`.", "",
         "## Recognition (DevTest verification accuracy, 10-fold, mean ± std over folds)", "",
         "| recogniser | input | steps | DevTest accuracy |", "|---|---|---|---|",
         f"| {title} server (`{server['stage']}`) | what the client sends | {server['steps']} | "
         f"{_pct(server['devtest_accuracy'], server['devtest_std'])} |"]
    if b.get("source") == "none":
        L.append("| RGB ArcFace baseline, same budget | RGB face | - | not run (pipeline.baseline=False) |")
    else:
        L.append(f"| RGB ArcFace baseline, same budget ({b['source']}) | RGB face | {b.get('steps')} | "
                 f"{_pct(b.get('devtest_accuracy'), b.get('devtest_std'))} |")
    L += ["", "## What the server receives", "", WHAT_IS_SENT.get(m, m) + ":", "",
          f"![what the server receives]({TRANSMITTED_PNG})", ""]
    if m == "duetface":
        L += ["Columns: original | decoded server channels | attention masks 1-4.", ""]
    else:
        L += ["Columns: original | X_p | X_p (another permutation).", ""]
    L += ["## White-box recovery attack", "",
          f"A U-Net trained with L1 ({pr['attacker_steps']} steps) to map {pr['representation']} back to the face, "
          f"on the training identities; evaluated on {pr['n_images']} held-out faces ({pr['eval_set']}). "
          f"Lower is more private.", "",
          "| figure | value |", "|---|---|",
          f"| recovered SSIM | {pr['ssim']:.3f} |",
          f"| recovered PSNR | {pr['psnr']:.2f} dB |",
          f"| transmitted image SSIM / PSNR | {pr['protected_ssim']:.3f} / {pr['protected_psnr']:.2f} dB |"]
    if pr.get("recognizer_skipped"):
        L.append(f"| recogniser accuracy on recovered faces | skipped: {pr['recognizer_skipped']} |")
    else:
        L.append(f"| {pr['recognizer']} accuracy on recovered faces | "
                 f"{_pct(pr['attacker_accuracy'], pr['attacker_accuracy_std'])} |")
        L.append(f"| same recogniser on the original faces (ceiling) | "
                 f"{_pct(pr['reference_accuracy'], pr['reference_std'])} |")
    L += ["", f"![original, transmitted, recovered]({RECOVERY_PNG})", "",
          "Columns: original | transmitted (as above) | recovered by the attacker.", "",
          "## Stages", "", "| stage | workdir | steps | wall time | DevTest accuracy |", "|---|---|---|---|---|"]
    for s in results["stages"]:
        L.append(f"| {s['stage']} | `{s['workdir']}` | {s['steps']} | {format_duration(s['wall_s'] or 0)} | "
                 f"{_pct(s['devtest_accuracy'], s['devtest_std'])} |")
    L.append(f"| privacy attack | `{pr['workdir']}` | {pr['attacker_steps']} | "
             f"{format_duration(pr['wall_s'] or 0)} | - |")
    L += ["", f"Total wall time {format_duration(results['wall_s_total'])} (sum of the phases' last sessions).", ""]
    return "\n".join(L)


# ----------------------------------------------------------------------------- main


def run_pipeline(config, workdir: str, *, log: Callable[[str], None] | None = None) -> dict:
    """Run (or continue, or re-print) a whole method; see the module doc.

    Args:
      config: a pipeline config (``is_pipeline_config``).
      workdir: the pipeline's folder (local path); stages go in sub-folders.
    Returns:
      the ``results.json`` content: ``method``, ``workdir``, ``stages`` (per stage: ``stage``, ``workdir``,
      ``task``, ``steps``, ``wall_s``, ``devtest_accuracy``, ``devtest_std``), ``server`` (the last stage's),
      ``baseline`` (``source``: 'trained' / a path / 'none', and its figures), ``privacy`` (``ssim``, ``psnr``
      of recovered faces in [0, 1] terms, ``protected_ssim`` / ``protected_psnr``, ``attacker_accuracy`` /
      ``_std``, ``reference_accuracy`` / ``_std`` or ``recognizer_skipped`` with the reason,
      ``attacker_steps``, ``n_images``, ``wall_s``), ``pictures``, ``wall_s_total``, ``config``.
    Raises:
      ConfigError: a bad pipeline field (before anything is written); the engine's errors (``RunError``,
      ``NonFiniteLossError``, ...) from a stage.
    """
    from ppfr_jax import checkpoints, train
    from ppfr_jax.privacy import run_privacy

    log = log or (lambda m: print(m, flush=True))
    if not is_pipeline_config(config):
        raise ConfigError("config: not a pipeline config (no 'pipeline' section); run it with train.train_and_evaluate")
    validate_pipeline(config, workdir)
    root = os.path.abspath(workdir)
    f_results = os.path.join(root, RESULTS)

    recorded = _read_json(f_results)
    if isinstance(recorded, dict) and recorded.get("config") == _plain(config) and _outputs_present(root):
        log(f"pipeline in {workdir} already finished; its recorded results (from {f_results}); nothing was changed\n"
            + summary_table(recorded))
        return recorded

    os.makedirs(root, exist_ok=True)
    with checkpoints.workdir_lock(root):
        progress = Progress(config)
        stages, baseline_res = [], None
        for name, c, wd in stage_configs(config, workdir):
            log(f"pipeline: {name} ({c.task}/{c.model.backbone}) in {wd}")
            res = train.train_and_evaluate(c, wd, progress=progress.engine_hook(name))
            if name == "baseline":
                baseline_res = res
            else:
                stages.append(_stage_record(name, res, wd))

        p = config.pipeline
        if p.baseline_workdir:
            r = _read_json(os.path.join(p.baseline_workdir, RESULTS)) or {}
            baseline = dict(_stage_record("baseline", r, os.path.abspath(p.baseline_workdir)),
                            source=f"read from {p.baseline_workdir}", trained_here=False)
        elif baseline_res is not None:
            baseline = dict(_stage_record("baseline", baseline_res, os.path.join(root, "baseline")),
                            source="trained here", trained_here=True)
        else:
            baseline = {"source": "none", "trained_here": False, "devtest_accuracy": None, "devtest_std": None,
                        "steps": None}

        pc, skipped_why = privacy_config(config, workdir)
        pdir = os.path.join(root, "privacy")
        prec = _read_json(os.path.join(pdir, "privacy.json"))
        # reused only when made with these settings against the last stage's current checkpoint
        weights = f"{stages[-1]['workdir']} (step {stages[-1]['steps']})"
        if (isinstance(prec, dict) and prec.get("config") == _plain(pc) and prec.get("rows")
                and prec["rows"][0].get("weights") == weights):
            log(f"pipeline: privacy attack already done ({pdir}/privacy.json)")
        else:
            log(f"pipeline: privacy attack on {p.stages[-1]}'s view, {pc.attacker.steps} attacker steps, in {pdir}")
            prec = run_privacy(pc, pdir, log=progress.privacy_log(log))
            prec = _read_json(os.path.join(pdir, "privacy.json")) or prec  # what the file says (JSON types)
        if not prec.get("rows"):
            raise RunError(f"the privacy attack in {pdir} evaluated no row: "
                           f"{prec.get('skipped') or 'no reason given'}")
        row = prec["rows"][0]
        ref = prec.get("reference_accuracy") or {}
        privacy = {
            "workdir": pdir, "view": row["method"], "representation": row["representation"],
            "ssim": row["ssim"], "psnr": row["psnr"],
            "protected_ssim": row["protected_ssim"], "protected_psnr": row["protected_psnr"],
            "attacker_accuracy": row["attacker_accuracy"], "attacker_accuracy_std": row["attacker_accuracy_std"],
            "recognizer": prec.get("recognizer"), "recognizer_skipped": skipped_why,
            "reference_accuracy": ref.get("accuracy"), "reference_std": ref.get("std"),
            "attacker_steps": row["attacker_steps"], "n_images": row["n_images"], "n_pairs": row["n_pairs"],
            "eval_set": prec.get("eval_set", {}).get("name"), "wall_s": prec.get("wall_s"),
            "grid": os.path.join("privacy", row["grid"]),
        }

        # pictures (deterministic: same checkpoints, same bytes)
        _write_if_changed(os.path.join(root, TRANSMITTED_PNG), _png_bytes(transmitted_picture(config, pc)))
        with open(os.path.join(pdir, row["grid"]), "rb") as f:
            _write_if_changed(os.path.join(root, RECOVERY_PNG), f.read())

        wall = sum(float(s["wall_s"] or 0) for s in stages) + float(privacy["wall_s"] or 0)
        wall += float(baseline.get("wall_s") or 0) if baseline.get("trained_here") else 0.0
        results = {
            "method": p.method, "workdir": root, "stages": stages, "server": stages[-1], "baseline": baseline,
            "privacy": privacy, "pictures": {"transmitted": TRANSMITTED_PNG, "recovery": RECOVERY_PNG,
                                             "report": REPORT},
            "wall_s_total": wall, "config": _plain(config),
        }
        results = json.loads(json.dumps(results, default=str))
        _write_if_changed(os.path.join(root, REPORT), render_report(results).encode())
        _write_if_changed(f_results, json.dumps(results, indent=1).encode())
        log(f"pipeline finished: report {os.path.join(root, REPORT)}, figures {f_results}\n" + summary_table(results))
        return results


def _outputs_present(root: str) -> bool:
    return all(os.path.isfile(os.path.join(root, f)) for f in (REPORT, TRANSMITTED_PNG, RECOVERY_PNG))


__all__ = ["RECOVERY_PNG", "REPORT", "RESULTS", "TRANSMITTED_PNG", "Progress", "is_pipeline_config", "phases",
           "privacy_config", "render_report", "run_pipeline", "stage_configs", "summary_table",
           "transmitted_picture", "validate_pipeline"]
