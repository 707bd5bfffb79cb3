"""The PyTorch reference's MinusFace trained with our demo settings, measured with our evaluator.

    python bench/ref_minusface_demo.py --ref-python REFVENV/bin/python --tface DIR/TFace --torchjpeg DIR/torchjpeg \\
        --workdir /tmp/ref_minus [--stretch 4] [--eval-every 42] [--ours-stage1 WORKDIR] [--out FILE] \\
        [--set head.margin=0.0 --set num_epochs=48.0 ...] [--stop-after N]

The fallback of issue 15: does the reference, trained with the same demo settings for the same
steps, reach DevTest >= 75%, and what budget does it take? Stage 1 (``configs/minusface.py:stage1,demo``:
42 steps of 32 faces) then stage 2 (``:stage2,demo``: 84 steps of 64 faces; ``--stretch N`` multiplies
its epochs, warm-up and LR boundary by N, i.e. N x 84 steps with the same schedule shape, as
``--config.num_epochs=2N --config.optim.boundaries_epochs='(1.6N,)' --config.optim.warmup_epochs=0.2N``
does for ours) are trained by the reference (``bench/ref_minusface_train.py`` in its own venv, sources
outside this checkout): its ``MinusBackbone`` at the demo's sizes, its ArcFace head (s=32, m=0.3,
128-d), SGD with our schedule's LR at every step, generator x0.1 in stage 1, its own
``torch.randperm`` shuffle per sample per step in stage 2, on exactly the batches our demo pipeline
yields (same faces, order and flips; taken from ``data.train_source`` here and handed over).
``--set FIELD=VALUE`` changes stage 2's config as ``--config.FIELD=VALUE`` changes ours (margin,
epochs, LR boundaries, warm-up); ``--stop-after N`` trains the first N steps of that whole schedule.

Measured with our yardstick: each saved reference state_dict (every ``--eval-every`` steps) is
imported into our model (``minusface.import_torch_state_dict``, as ``bench/train_parity.py`` does)
and verified on DevTest by our evaluator (``train.make_evaluator``, our stage-2 task's fixed
evaluation permutations ``eval_permutations``, no flip: what ``configs/minusface.py:stage2,demo``
reports). The stage-1 import is also written as a workdir (``WORKDIR/s1_import``: config.json +
an engine checkpoint) so ``bench/minusface_demo.py --stage1 WORKDIR/s1_import`` reports its
regeneration PSNR.

One JSON line per evaluation: ``side`` reference, ``stage``, ``step``, ``devtest_accuracy`` / ``_std``,
the reference's mean training loss / top-1 over the preceding ``--eval-every`` steps, its wall seconds.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "configs"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit  # noqa: E402


def demo_config(stage: str, stretch: float, stage1_workdir: str = "", max_steps: int = 0, overrides=()):
    """The demo config of ``stage``, its schedule x ``stretch``, then ``overrides`` ("field.path=value" strings,
    values as Python literals, as ``--config.field.path=value`` sets them for ours)."""
    variant = f"{stage},demo" + (f",stage1_workdir={stage1_workdir}" if stage1_workdir else "")
    c = importlib.import_module("minusface").get_config(variant)
    if stretch != 1:
        c.num_epochs = c.num_epochs * stretch
        c.optim.boundaries_epochs = tuple(e * stretch for e in c.optim.boundaries_epochs)
        c.optim.warmup_epochs = c.optim.warmup_epochs * stretch
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            raise SystemExit(f"--set {o!r}: expected FIELD.PATH=VALUE (e.g. head.margin=0.0)")
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        try:
            v = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            v = value
        node[leaf] = v
    if max_steps:  # smoke tests only
        c.num_train_steps = max_steps
    return c


def batches_and_lrs(cfg, path: str, stop_after: int = 0, start_at: int = 0):
    """Our demo pipeline's batches for the whole run (or its first ``stop_after`` steps) -> ``path`` (npz);
    -> (LR per step, num_classes, steps). ``stop_after`` keeps the whole run's schedule: the LRs of its
    first steps. ``start_at`` (a resumed run): the pipeline is read from its start as always (so every
    batch is the one an uninterrupted run gets) but only steps ``start_at..steps-1`` are written, with
    ``first_step`` = ``start_at`` in the file; the LRs are still the whole run's. An existing ``path`` is
    kept (written whole or not at all: ``.part`` then renamed); no ``path``: the schedule only."""
    from ppfr_jax import data, optim, sharding
    mesh = sharding.create_mesh(cfg)
    gb = sharding.global_batch_size(cfg, mesh)
    it, num_classes, size = data.train_source(cfg, gb, 0)
    spe = optim.steps_per_epoch(cfg, size, gb)
    steps = int(cfg.num_train_steps) if cfg.get("num_train_steps", 0) else int(round(cfg.num_epochs * spe))
    sched = optim.make_schedule(cfg, spe)
    if stop_after:
        steps = min(steps, stop_after)
    if not 0 <= start_at < steps:
        raise SystemExit(f"resume at step {start_at}: outside the run's {steps} steps")
    lrs = [float(sched(i)) for i in range(steps)]
    if path and not os.path.exists(path):
        imgs, labs = [], []
        for i, b in zip(range(steps), it):
            if i >= start_at:
                imgs.append(np.asarray(b["image"], np.uint8))
                labs.append(np.asarray(b["label"], np.int64))
        np.savez(path + ".part.npz", images=np.stack(imgs), labels=np.stack(labs), first_step=np.int64(start_at))
        os.replace(path + ".part.npz", path)
    return lrs, num_classes, steps


def settings(cfg, lrs, num_classes, save_steps, seed):
    from ppfr_jax.models import iresnet
    if cfg.model.backbone != "ir_tiny":
        raise SystemExit(f"recogniser {cfg.model.backbone!r}: the reference side is built for the demo's ir_tiny")
    kw = iresnet.IR_TINY.keywords
    if tuple(kw["stage_sizes"]) != (1, 1, 1, 1):
        raise SystemExit(f"demo recogniser {kw}: the reference side builds one unit per stage")
    return {"lrs": lrs, "momentum": float(cfg.optim.momentum), "weight_decay": float(cfg.optim.weight_decay),
            "generator_lr_mult": float(dict(cfg.optim.lr_multipliers).get("generator", 1.0)),
            "num_classes": num_classes, "embedding_size": int(cfg.model.embedding_size),
            "scale": float(cfg.head.scale), "margin": float(cfg.head.margin),
            "generator_widths": [int(w) for w in cfg.minusface.generator_widths],
            "ir_stem": int(kw["stem_width"]), "ir_widths": [int(w) for w in kw["widths"]],
            "n_duplicate": int(cfg.minusface.n_duplicate), "save_steps": list(save_steps), "seed": seed}


class Importer:
    """Our task built from ``cfg`` (one of the demo stages); reference state_dicts -> our variables -> DevTest."""

    def __init__(self, cfg, num_classes):
        from ppfr_jax import sharding, train
        self.cfg = cfg
        self.mesh = sharding.create_mesh(cfg)
        self.setup = train.build(cfg, num_classes, 10 * cfg.batch_size, self.mesh)
        self.state = jax.device_get(train.init_state(self.setup, jax.random.key(0)))
        self.evaluator = train.make_evaluator(cfg, self.setup)

    def variables(self, sd: dict) -> dict:
        from train_parity import import_state
        case = "minusface_" + self.setup.task.mode
        params, ms = import_state(case, self.setup.task, sd, self.state.params, self.state.model_state)
        params = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), params, self.state.params)
        return {"params": params, **{**self.state.model_state, **ms}}

    def verify(self, variables) -> dict:
        """-> the DevTest set's ``{'accuracy', 'std', 'threshold'}`` (``EvalSuite.run``'s ``sets['devtest']``)."""
        return self.evaluator.run(variables)["sets"]["devtest"]

    def save_workdir(self, variables, workdir: str):
        """config.json + an engine checkpoint of ``variables``: a workdir stage 2 / minusface_demo.py can read."""
        from train_step import _save_engine_checkpoint
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(self.cfg.to_json())
        _save_engine_checkpoint(workdir, variables["params"], {k: v for k, v in variables.items() if k != "params"})


def _saved_steps(d: str) -> set:
    return {int(f[5:-4]) for f in os.listdir(d) if f.startswith("step_") and f.endswith(".npz") and ".part" not in f}


def run_stage(a, stage, cfg, tmp, seed, stage1_state="", out_lines=None):
    d = os.path.join(tmp, f"ref_{stage}")
    os.makedirs(d, exist_ok=True)
    stop_after = a.stop_after if stage == "stage2" else 0
    batches = os.path.join(tmp, f"batches_{stage}.npz")
    saved = _saved_steps(d) if a.resume else set()
    lrs, num_classes, steps = batches_and_lrs(cfg, "" if saved else batches, stop_after)
    done = {st for st in saved if st <= steps}
    # --resume after a run that stopped part-way (or that a larger --stop-after extends): the reference
    # continues from its newest checkpoint; the steps up to it are neither retrained nor re-evaluated
    start_at = max(done) if done and max(done) < steps else 0
    if start_at:
        batches = os.path.join(tmp, f"batches_{stage}_from{start_at}.npz")
        batches_and_lrs(cfg, batches, stop_after, start_at)
    elif saved and max(done, default=0) < steps:
        batches_and_lrs(cfg, batches, stop_after)
    save_steps = sorted(set(range(a.eval_every, steps + 1, a.eval_every)) | {steps}) if stage == "stage2" else [steps]
    s = settings(cfg, lrs, num_classes, save_steps, seed)
    with open(os.path.join(d, "settings.json"), "w") as f:
        json.dump(s, f)
    imp = Importer(cfg, num_classes)
    cmd = (["nice", "-n", str(a.nice)] if a.nice else []) + [
        a.ref_python, os.path.join(HERE, "ref_minusface_train.py"), "--tface", a.tface, "--torchjpeg", a.torchjpeg,
        "--stage", stage, "--batches", batches,
        "--settings", os.path.join(d, "settings.json"), "--out", d, "--threads", str(a.threads)]
    if stage1_state:
        cmd += ["--stage1-state", stage1_state]
    if start_at:
        cmd += ["--resume-from", os.path.join(d, f"step_{start_at}.npz")]
    pending = [st for st in save_steps if st not in done]
    proc = subprocess.Popen(cmd, stdout=open(os.path.join(d, "stdout.txt"), "a" if start_at else "w"),
                            stderr=subprocess.STDOUT) if pending else None
    evaluated = {st for st in save_steps if st <= start_at}  # measured by the run that saved them
    recs = []
    while True:
        ready = [st for st in save_steps if st not in evaluated and os.path.exists(os.path.join(d, f"step_{st}.npz"))]
        for st in ready:
            sd = dict(np.load(os.path.join(d, f"step_{st}.npz")))
            v = imp.variables(sd)
            t0 = time.time()
            r = imp.verify(v)
            log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
            win = [x for x in log if st - a.eval_every < x["step"] <= st]
            check = [json.loads(line)["fast_transforms_check"] for line in open(os.path.join(d, "stdout.txt"))
                     if line.startswith('{"fast_transforms_check"')]
            rec = {"bench": "ref_minusface_demo", "side": "reference", "stage": stage, "step": st,
                   "frozen_generator": None if stage == "stage1" else (
                       f"ours, exported: {os.path.abspath(a.ours_stage1)}" if a.ours_stage1
                       else "the reference's stage 1"),
                   "batch_size": int(cfg.batch_size), "devtest_accuracy": r["accuracy"], "devtest_std": r["std"],
                   "train_loss_fr_mean": float(np.mean([x["loss_fr"] for x in win])) if win else None,
                   "train_loss_gen_mean": float(np.mean([x["loss_gen"] for x in win])) if win else None,
                   "train_top1_mean": float(np.mean([x["train_acc"] for x in win])) if win else None,
                   "lr": win[-1]["lr"] if win else None,
                   "ref_wall_s": log[[x["step"] for x in log].index(st)]["wall_s"] if win else None,
                   "eval_wall_s": round(time.time() - t0, 1), "stretch": a.stretch if stage == "stage2" else 1,
                   "steps_total": steps, "overrides": list(a.set) if stage == "stage2" else [],
                   "schedule_epochs": float(cfg.num_epochs), "fast_transforms_check": check[-1] if check else None,
                   "margin": float(cfg.head.margin), "scale": float(cfg.head.scale),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": os.getloadavg()}
            line = emit(rec)
            recs.append(rec)
            if out_lines:
                with open(out_lines, "a") as f:
                    f.write(line + "\n")
            evaluated.add(st)
            if stage == "stage1" and st == steps:
                imp.save_workdir(v, os.path.join(tmp, "s1_import"))
        if len(evaluated) == len(save_steps):
            break
        if proc is not None and proc.poll() is not None and not ready:
            missing = [st for st in save_steps if st not in evaluated]
            if missing and not any(os.path.exists(os.path.join(d, f"step_{st}.npz")) for st in missing):
                tail = open(os.path.join(d, "stdout.txt")).read()[-3000:]
                raise SystemExit(f"reference {stage} exited {proc.returncode} before steps {missing}:\n{tail}")
        time.sleep(5)
    if proc is not None:
        proc.wait()
    return recs, os.path.join(d, f"step_{steps}.npz")


def export_generator(a, ours_workdir: str, out_npz: str) -> dict:
    """Our stage-1 run's generator as a reference state_dict (``model.generator.backbone.*``) -> ``out_npz``.

    The key names, shapes and layouts come from the reference itself: its fresh stage-1 state_dict at the
    demo's sizes (``ref_minusface_train.py --dump-init``) is filled with distinct values (0, 1, 2, ...),
    imported by our ``unet.import_torch_state_dict``, and where each value lands says where each of our
    weights goes back. Checked: importing the exported state_dict gives our generator exactly.
    """
    from ppfr_jax import checkpoints
    from ppfr_jax.methods.minusface import generator_params
    from ppfr_jax.models import unet
    cfg = demo_config("stage1", 1.0)
    d = os.path.dirname(out_npz)
    st = os.path.join(d, "dump_settings.json")
    with open(st, "w") as f:
        json.dump(settings(cfg, [0.0], 1, [], 0), f)
    init = os.path.join(d, "ref_stage1_init.npz")
    subprocess.run([a.ref_python, os.path.join(HERE, "ref_minusface_train.py"), "--tface", a.tface, "--torchjpeg",
                    a.torchjpeg, "--settings", st, "--out", d, "--dump-init", init], check=True)
    prefix = "model.generator.backbone."
    ref = {k: v for k, v in np.load(init).items() if k.startswith(prefix)}
    probe, off = {}, 0
    for k in sorted(ref):
        probe[k] = (off + np.arange(ref[k].size, dtype=np.float64)).reshape(ref[k].shape)
        off += ref[k].size
    variables, step = checkpoints.restore_variables(ours_workdir)
    ours = generator_params(variables)
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float64), ours)}
    where = unet.import_torch_state_dict(probe, target, prefix=prefix)["params"]
    flat_ref = np.zeros(off, np.float64)
    filled = np.zeros(off, bool)
    for w, o in zip(jax.tree.leaves(where), jax.tree.leaves(ours)):
        idx = np.asarray(w).astype(np.int64).ravel()
        flat_ref[idx] = np.asarray(o, np.float64).ravel()
        filled[idx] = True
    if not filled.all():
        raise SystemExit(f"export: {int((~filled).sum())} reference generator values have no counterpart of ours")
    out, off = {}, 0
    for k in sorted(ref):
        out[k] = flat_ref[off:off + ref[k].size].reshape(ref[k].shape).astype(np.float32)
        off += ref[k].size
    np.savez(out_npz, **out)
    back = unet.import_torch_state_dict(out, {"params": ours}, prefix=prefix)["params"]
    same = all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ours)))
    if not same:
        raise SystemExit("export: importing the exported generator does not give ours back")
    return {"ours_stage1_workdir": os.path.abspath(ours_workdir), "ours_stage1_step": step,
            "exported_tensors": len(out), "round_trip_exact": same}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", required=True, help="python of the reference's own venv (torch)")
    ap.add_argument("--tface", required=True)
    ap.add_argument("--torchjpeg", required=True)
    ap.add_argument("--workdir", required=True, help="batches, reference checkpoints and the stage-1 import go here")
    ap.add_argument("--stretch", type=float, default=1.0, help="stage 2: N x the demo's epochs (schedule stretched)")
    ap.add_argument("--eval-every", type=int, default=42)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="stage 2: set a config field after --stretch, as --config.FIELD=VALUE does for ours "
                         "(e.g. --set head.margin=0.0 --set num_epochs=48.0); repeatable")
    ap.add_argument("--stop-after", type=int, default=0, metavar="N",
                    help="stage 2: train only the first N steps of the (whole) schedule")
    ap.add_argument("--stages", default="stage1,stage2")
    ap.add_argument("--ours-stage1", default="", metavar="WORKDIR",
                    help="skip the reference's stage 1: its stage 2 freezes the generator of this stage-1 run of ours "
                         "(exported to the reference's layout), as our stage 2 does")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the reference (init, head, randperm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0,
                    help="run the reference under nice -n N (0: as this process; run this script under nice instead)")
    ap.add_argument("--resume", action="store_true",
                    help="do not retrain a stage whose checkpoints exist; a stage saved only part-way (or extended by "
                         "a larger --stop-after) continues from its newest checkpoint (model, head and, where saved, "
                         "the SGD momentum)")
    ap.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    stages = a.stages.split(",")
    d1 = os.path.join(a.workdir, "ref_stage1")
    s1_state = (max((os.path.join(d1, f) for f in os.listdir(d1) if f.startswith("step_") and ".part" not in f),
                    key=lambda p: int(os.path.basename(p)[5:-4])) if os.path.isdir(d1) else "")
    if "stage1" in stages:
        _, s1_state = run_stage(a, "stage1", demo_config("stage1", 1.0, max_steps=a.max_steps), a.workdir, a.seed,
                                out_lines=a.out)
    s1_wd = os.path.join(a.workdir, "s1_import")
    if a.ours_stage1:  # stage 2 of the reference on OUR stage-1 generator (exported): the same frozen g both sides
        stages = [x for x in stages if x != "stage1"]
        s1_state = os.path.join(a.workdir, "ours_generator_as_ref.npz")
        info = export_generator(a, a.ours_stage1, s1_state)
        print(json.dumps({"export": info}), flush=True)
        s1_wd = a.ours_stage1
    if "stage2" in stages:
        cfg2 = demo_config("stage2", a.stretch, s1_wd, a.max_steps, a.set)
        run_stage(a, "stage2", cfg2, a.workdir, a.seed + 1, stage1_state=s1_state, out_lines=a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
