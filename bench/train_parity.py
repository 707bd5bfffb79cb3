"""Training parity with the PyTorch reference: N SGD steps from identical starting points.

    python bench/train_parity.py --ref-python REFVENV/bin/python --tface DIR/TFace --torchjpeg DIR/torchjpeg \\
        [--cases arcface_ir18_rgb,minusface_stage1,minusface_stage2,duetface_int] [--steps 20] [--out FILE] \\
        [--noise-floor 1e-5] [--workdir DIR]

For each case the reference goes first (``bench/ref_parity_torch.py`` in a separate process
of ``--ref-python``, the reference's own virtual environment; its sources stay outside this
checkout, see ``../shared/reference/README.md``): it builds its model and head with fresh
torch weights, saves that state_dict, and runs ``--steps`` SGD steps. Ours then imports the
same state_dict (``import_torch_state_dict`` of the model, the head's kernel as is) and runs
the same steps through the engine's real jitted ``train_step`` (``ppfr_jax.train``).

Both sides see the same batch of real demo faces and labels (the first batch of the demo
pipeline, ``--batch`` faces), the same per-sample channel permutations for MinusFace stage 2
(drawn once here and used at every step, or with ``--fresh-perms`` a new set per step as
in training; ours reads them from ``batch['perms']``), the same facial ROI for DuetFace
(below), the same
optimiser (SGD, momentum 0.9, weight decay 5e-4, constant LR 0.01 for every case - at
ArcFace's own 0.1 the 8-face batch is fitted chaotically on both sides, loss 40 -> 57 -> 0.001
in 8 steps, and the curves part after step 4 -, generator x0.1 in stage 1) and the same head (ArcFace s=64, m=0.5, the demo's 115
identities). Two things are set alike rather than taken from the configs, and said so in
the output: dropout is 0 on both sides (masks cannot be drawn alike), and weight decay
applies to every parameter on both sides (the reference's rule for these models; ours
otherwise decays kernels only).

``duetface_int``: DuetFace stage 2 (``DuetFaceModel(30, 512, 512, 'IR_18', 'MobileFaceNet')``:
IR-18 with interactive blocks on the 162 server DCT channels, MobileFaceNet client on the 30
client channels, frozen and in eval() on both sides, outside both optimisers). Ours loads
the client through the real path, an engine checkpoint in a client workdir written from the
imported reference weights. The ROI is one (B, 1, 112, 112) convex-hull mask of the demo
faces' 98 landmarks (our rasteriser, equal to the reference's scipy hull), passed to the
reference as ``landmark_inference`` and to ours as ``batch['roi']``. The reference is
patched (``ref_parity_torch.keep_interface_once``, said in the output as
``reference_patch``): its InteractiveBlock draws a new random interface conv in every
forward and never trains it; patched, each block keeps the conv of a first (eval) forward,
which is saved with the initial weights and trained, as ours is. One difference remains
by design and is named in ``known_difference``: the interface bias gets no gradient on our
side (the min-max normalised mask does not depend on it), the reference's detached
min/max (``.item()``) give it one, the same for every channel (no effect on the forward).

One JSON line per case: both loss curves, ``max_rel_loss_diff`` (largest |ours - ref| /
max(|ref|, 1) over the steps), ``param_rel_diff`` (||ours - ref|| / ||ref|| after the last step, for
a few named tensors, and ``param_rel_diff_max`` over all of them), ``tolerance``, ``ok``.

Tolerance (``--rtol`` 0.12 on the loss, ``--param-rtol`` 0.25 on parameters, after 20 steps):
both sides compute in float32 with different convolution algorithms (oneDNN vs XLA:CPU) and
summation orders (torchjpeg's DCT vs our banded operators); the first loss agrees to the
printed digits and step 1 to ~1e-4, but ArcFace's s=64 turns a cosine difference d into a
logit difference 64 d, and the largest gaps sit where the loss falls 40 -> 2 in two or three
updates (one curve a fraction of a step ahead: MinusFace stage 1 at step 3, 2.30 vs 2.08).
A real divergence (a wrong term, a missing gradient, a wrong LR group or decay) shows as
curves that stay apart or reach different plateaus.

Some parameters are ill-conditioned: BatchNorm biases and running means whose gradient is a
small remainder of large cancelling terms (a BatchNorm -> PReLU -> conv -> BatchNorm chain),
and DuetFace's interactive-block weights. Where the first steps are large (DuetFace: loss 39
-> 2.9 -> 7.3 -> 6e-4) float32 rounding alone moves them by 5-10% in 20 steps.
``--noise-floor EPS`` measures that: ours is run again from its own init with every
parameter times (1 + EPS N(0,1)) and ``noise_floor`` reports how far the two of ours end
apart (same measures), and ``ref_over_floor_max``: the largest ours-vs-reference difference
divided by max(that tensor's floor, ``--param-rtol``). ``ok`` stays the fixed tolerance.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit  # noqa: E402

CASES = {  # case -> (config module, variant, lr, generator lr multiplier)
    "arcface_ir18_rgb": ("arcface", "ir18", 0.01, None),
    "minusface_stage1": ("minusface", "stage1,ir18", 0.01, 0.1),
    "minusface_stage2": ("minusface", "stage2,ir18", 0.01, None),
    # the ROI comes from batch['roi']; 'template' only so that no PFLD checkpoint is asked for
    "duetface_int": ("duetface", "server,ir18,roi=template", 0.01, None),
}
DEFAULT_CASES = ",".join(CASES)
NUM_CLASSES = 115  # the demo set's identities


def demo_batch(batch: int, seed: int = 0) -> dict:
    """The first ``batch`` faces of the demo pipeline: image (B,112,112,3) uint8, label (B,) int32,
    landmarks (B,98,2) float32 (the demo set's stored landmarks; the images are the same either way)."""
    import importlib
    from ppfr_jax import data
    cfg = importlib.import_module("arcface").get_config("demo")
    cfg.batch_size = batch
    cfg.seed = seed
    cfg.data.landmarks = True
    it, _, _ = data.train_source(cfg, batch, 0)
    b = next(iter(it))
    return {"image": np.asarray(b["image"]), "label": np.asarray(b["label"]).astype(np.int32),
            "landmarks": np.asarray(b["landmarks"], np.float32)}


def configure(case: str, batch: int, lr: float, gen_mult, stage1_workdir: str = "", client_workdir: str = ""):
    import importlib
    mod, variant, _, _ = CASES[case]
    if stage1_workdir:
        variant += f",stage1_workdir={stage1_workdir}"
    if client_workdir:
        variant += f",client_workdir={client_workdir}"
    c = importlib.import_module(mod).get_config(variant)
    c.data.source = "synthetic"
    c.data.num_classes = NUM_CLASSES
    c.batch_size = batch
    c.batch_size_per_device = 0
    c.half_precision = False
    c.model.dropout = 0.0
    c.model.embedding_size = 512
    c.head.kind, c.head.scale, c.head.margin = "arcface", 64.0, 0.5
    if case == "duetface_int":
        c.duetface.client_backbone, c.duetface.client_embedding_size = "mobilefacenet", 512
    c.optim.lr = lr
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.warmup_epochs = 0.0
    c.optim.boundaries_epochs = ()
    c.optim.lr_multipliers = {"generator": gen_mult} if gen_mult else {}
    c.eval.pairs = ""
    return c


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def duetface_import(model_sd: dict) -> dict:
    """Reference ``DuetFaceModel`` state_dict (with the interface convs) -> our full variables, numpy:
    ``params`` {server_model, attention_0..3, client_model}, ``batch_stats`` {server_model, client_model}."""
    from ppfr_jax import frequency
    from ppfr_jax.methods import duetface as duetface_method
    from ppfr_jax.models import duetface
    m = duetface_method.build_model("ir18", "mobilefacenet", embedding_size=512, client_embedding_size=512,
                                    dropout=0.0)
    n_c = 3 * len(frequency.SUB_CHS)
    xs = jax.ShapeDtypeStruct((1, 112, 112, frequency.NUM_CHANNELS - n_c), jnp.float32)
    xc = jax.ShapeDtypeStruct((1, 112, 112, n_c), jnp.float32)
    r = jax.ShapeDtypeStruct((1, 112, 112), jnp.float32)
    target = jax.eval_shape(lambda k, *x: m.init({"params": k, "dropout": k}, *x), jax.random.key(0), xs, xc, r)
    return duetface.import_torch_state_dict(model_sd, target, m)


def import_state(case: str, task, sd: dict, abstract_params, abstract_ms):
    """Reference state_dict (``model.*``, ``head.kernel``) -> our (params, model_state) as numpy."""
    from ppfr_jax.models import iresnet, minusface
    model_sd = _strip(sd, "model.")
    if case == "duetface_int":  # the client is not ours to train: it comes from the client checkpoint
        v = duetface_import(model_sd)
        params = {"duetface": {k: p for k, p in v["params"].items() if k != "client_model"}}
        ms = {"batch_stats": {"duetface": {k: p for k, p in v["batch_stats"].items() if k != "client_model"}}}
    elif case.startswith("arcface"):
        v = iresnet.import_torch_state_dict(model_sd, {"params": abstract_params["backbone"],
                                                       "batch_stats": abstract_ms["batch_stats"]["backbone"]})
        params = {"backbone": v["params"]}
        ms = {"batch_stats": {"backbone": v["batch_stats"]}}
    else:
        target = dict(abstract_params)
        if "generator" not in target:  # stage 2: the generator is frozen, outside the params
            target["generator"] = abstract_ms["frozen"]["generator"]["params"]
        v = minusface.import_torch_state_dict(model_sd, {"params": target,
                                                         "batch_stats": abstract_ms["batch_stats"]})
        params = {k: p for k, p in v["params"].items() if k in abstract_params}
        ms = {"batch_stats": v["batch_stats"]}
    # our kernel is padded to a multiple of the class shards; the padding columns are masked
    # out of the softmax (no gradient), so they keep our values
    kernel = np.array(abstract_params["head"]["kernel"], np.float32)
    ref_k = np.asarray(sd["head.kernel"], np.float32)
    kernel[:, :ref_k.shape[1]] = ref_k
    params["head"] = {"kernel": kernel}
    return params, ms


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, prefix + (str(k),))
    else:
        yield "/".join(prefix), np.asarray(tree)


def run_case(case, a, batch, tmp):
    from ppfr_jax import optim, sharding, train
    _, _, lr, gen_mult = CASES[case]
    rng = np.random.default_rng(a.seed)
    inputs = {"images": np.transpose(batch["image"].astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2)),
              "labels": batch["label"].astype(np.int64)}
    b = len(batch["label"])
    if case == "minusface_stage2":
        # one permutation per sample, drawn once and used at every step (the deterministic comparison);
        # --fresh-perms draws a new set per step, as training does (both sides still see the same ones)
        draws = a.steps if a.fresh_perms else 1
        p = np.stack([[rng.permutation(192) for _ in range(b)] for _ in range(draws)])[:, None]
        inputs["perms"] = np.repeat(p, a.steps // draws, axis=0)
    roi_mask = None
    if case == "duetface_int":
        # one ROI for all steps, rasterised here from the demo faces' 98 landmarks (our convex hull,
        # equal to the reference's scipy hull, tests/test_duetface.py); the reference gets it as
        # landmark_inference (instead of PFLD + scipy), ours as batch['roi']
        from ppfr_jax import frequency, roi
        roi_mask = np.asarray(roi.landmark_mask(batch["landmarks"]), np.float32)  # (B, 112, 112) in {0, 1}
        inputs["roi"] = roi_mask[:, None]
    settings = {"case": case, "steps": a.steps, "lr": lr, "momentum": 0.9, "weight_decay": 5e-4,
                "num_classes": NUM_CLASSES, "generator_lr_mult": gen_mult or 1.0, "embedding_size": 512}
    if case == "duetface_int":
        settings.update(sub_channels=[int(c) for c in frequency.SUB_CHS], client_embedding_size=512)
    d = os.path.join(tmp, case)
    os.makedirs(d, exist_ok=True)
    np.savez(os.path.join(d, "in.npz"), **inputs)
    json.dump(settings, open(os.path.join(d, "settings.json"), "w"))
    cmd = [a.ref_python, os.path.join(HERE, "ref_parity_torch.py"), "--tface", a.tface, "--torchjpeg", a.torchjpeg,
           "--inputs", os.path.join(d, "in.npz"), "--settings", os.path.join(d, "settings.json"),
           "--out", os.path.join(d, "ref.npz")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        return {"bench": "train_parity", "case": case, "error": f"reference exit {p.returncode}",
                "ref_tail": (p.stdout + p.stderr)[-3000:]}
    ref = dict(np.load(os.path.join(d, "ref.npz")))
    init_sd = _strip(ref, "init/")
    final_sd = _strip(ref, "final/")

    stage1_wd = ""
    if case == "minusface_stage2":  # the frozen generator goes through the real stage-1 loading path
        from train_step import _save_engine_checkpoint
        from ppfr_jax.methods import minusface as minusface_method
        from ppfr_jax.models import minusface
        c1 = configure("minusface_stage1", b, lr, None)
        m1 = minusface_method.build_model("stage1", backbone=c1.model.backbone, embedding_size=512, dropout=0.0,
                                          generator_widths=c1.minusface.generator_widths)
        v1 = minusface.init_variables(m1)
        g = minusface.unet.import_torch_state_dict(init_sd, {"params": v1["params"]["generator"]},
                                                   prefix="model.generator.backbone.")
        stage1_wd = os.path.join(d, "stage1")
        _save_engine_checkpoint(stage1_wd, {"generator": g["params"]}, {})
    client_wd = ""
    ref_client_unchanged = None
    if case == "duetface_int":  # the frozen client goes through the real loading path (an engine checkpoint)
        from train_step import _save_engine_checkpoint
        v = duetface_import(_strip(init_sd, "model."))
        client_wd = os.path.join(d, "client")
        _save_engine_checkpoint(client_wd, {"backbone": v["params"]["client_model"]},
                                {"batch_stats": {"backbone": v["batch_stats"]["client_model"]}})
        client_init = v["params"]["client_model"], v["batch_stats"]["client_model"]
        ref_client_unchanged = all(np.array_equal(init_sd[k], final_sd[k]) for k in init_sd
                                   if k.startswith("model.client_model."))
    cfg = configure(case, b, lr, gen_mult, stage1_wd, client_wd)
    mesh = sharding.create_mesh(cfg)
    setup = train.build(cfg, NUM_CLASSES, 10 * b, mesh)
    # the reference decays every parameter (no name contains 'bn'): the same rule on our side
    setup.task.decays = lambda path: True
    setup.tx = optim.make_optimizer(cfg, setup.task, setup.abstract_state.params, setup.schedule)
    state = train.init_state(setup, jax.random.key(0))
    params, ms = import_state(case, setup.task, init_sd, state.params, state.model_state)
    if case == "duetface_int":  # the task loaded the client we saved
        loaded = state.model_state["frozen"]["client_model"]
        jax.tree.map(np.testing.assert_array_equal, (loaded["params"], loaded["batch_stats"]), client_init)
    params = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), params, state.params)
    ms = {**jax.device_get(state.model_state),
          **jax.tree.map(lambda new, old: np.asarray(new, old.dtype), ms, {k: state.model_state[k] for k in ms})}
    step_no, bad_step = np.asarray(state.step), np.asarray(state.bad_step)
    step = train.compile_train_step(setup)

    def train_ours(params, ms):
        """--steps train steps of ours from (params, model_state) numpy -> (losses, final (params, model_state))."""
        p = jax.tree.map(jnp.array, params)
        st = train.TrainState(step=jnp.array(step_no), params=p, model_state=jax.tree.map(jnp.array, ms),
                              opt_state=setup.tx.init(p), bad_step=jnp.array(bad_step))
        st = jax.device_put(st, setup.state_sharding)
        losses = []
        for i in range(a.steps):
            bt = {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}
            if case == "minusface_stage2":
                bt["perms"] = jnp.asarray(np.swapaxes(inputs["perms"][i], 0, 1), jnp.int32)  # (B, n_dup, 192)
            if case == "duetface_int":
                bt["roi"] = jnp.asarray(roi_mask[..., None])  # (B, 112, 112, 1)
            st, m = step(st, sharding.make_global_batch(bt, mesh), jax.random.key(1))
            losses.append(float(m["loss"]))
        return losses, jax.device_get((st.params, st.model_state))

    def flat(final):
        return dict(_flat({"params": final[0], "batch_stats": final[1]["batch_stats"]}))

    def rel_diffs(ours, theirs):
        out = {}
        for k, v in theirs.items():
            if k not in ours or "generator" in k and case == "minusface_stage2":
                continue
            # floored at an RMS of 1e-3: some BatchNorm running means are ~0 by construction (the
            # input of a unit is a sum of two BN outputs), where a relative difference means nothing
            denom = max(float(np.linalg.norm(v)), 1e-3 * np.sqrt(v.size))
            out[k] = float(np.linalg.norm(ours[k] - v)) / denom
        return out

    def loss_diffs(ours, theirs):
        # relative where the loss is above 1, absolute below: once a batch is fitted (loss ~1e-3) the
        # loss is a difference of two nearly equal log-sum-exps and its float32 relative error is large
        return [abs(o - r) / max(abs(r), 1.0) for o, r in zip(ours, theirs)]

    losses, final = train_ours(params, ms)
    ours = flat(final)
    ref_losses = [float(v) for v in ref["losses"]]
    rel = loss_diffs(losses, ref_losses)
    ref_params, ref_ms = import_state(case, setup.task, final_sd, *final)
    theirs = dict(_flat({"params": ref_params, "batch_stats": ref_ms["batch_stats"]}))
    diffs = rel_diffs(ours, theirs)
    floor = None
    if a.noise_floor > 0:
        # ours against ours from an init perturbed at float-noise level: how far 'steps' steps carry
        # rounding differences alone (the same measures as against the reference)
        nrng = np.random.default_rng(a.seed + 1)
        pert = jax.tree.map(lambda x: (x * (1 + a.noise_floor * nrng.standard_normal(x.shape))).astype(x.dtype)
                            if np.issubdtype(x.dtype, np.floating) else x, params)
        f_losses, f_final = train_ours(pert, ms)
        fd = rel_diffs(flat(f_final), ours)
        over = {k: diffs[k] / max(fd[k], a.param_rtol) for k in diffs}
        f_worst = max(fd, key=fd.get)
        o_worst = max(over, key=over.get)
        floor = {"eps": a.noise_floor, "losses": f_losses, "max_rel_loss_diff": max(loss_diffs(f_losses, losses)),
                 "param_rel_diff_max": fd[f_worst], "param_rel_diff_argmax": f_worst,
                 "param_rel_diff_worst": dict(sorted(fd.items(), key=lambda kv: -kv[1])[:8]),
                 "ref_over_floor_max": over[o_worst], "ref_over_floor_argmax": o_worst}
    keys = [k for k in diffs if any(s in k for s in ("Conv_0/kernel", "head/kernel", "Dense", "enc_0"))][:6]
    if case == "duetface_int":  # and the interactive blocks: w and the interface conv of each stage
        keys += [k for k in diffs if "embedding_layer/weight" in k or "attention_" in k]
    worst = max(diffs, key=diffs.get)
    ok = max(rel) <= a.rtol and diffs[worst] <= a.param_rtol
    return {"bench": "train_parity", "case": case, "steps": a.steps, "batch_size": b, "num_classes": NUM_CLASSES,
            "lr": lr, "generator_lr_mult": gen_mult, "dropout": 0.0, "weight_decay_on": "all parameters",
            "ours_losses": losses, "ref_losses": ref_losses, "max_rel_loss_diff": max(rel),
            "param_rel_diff": {k: diffs[k] for k in keys}, "param_rel_diff_max": diffs[worst],
            "param_rel_diff_argmax": worst,
            "param_rel_diff_worst": dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:8]), "tolerance": {"loss_rtol": a.rtol, "param_rtol": a.param_rtol},
            "perms": ("fresh per step" if a.fresh_perms else "one set for all steps") if "stage2" in case else None,
            **(duet_info(roi_mask, ref_client_unchanged) if case == "duetface_int" else {}),
            **({"noise_floor": floor} if floor else {}),
            "ok": bool(ok)}


REFERENCE_PATCH = ("InteractiveBlock keeps the interface conv of its first forward (run in eval() before the "
                   "state_dict is saved and the optimiser built) and trains it; unpatched, the reference draws "
                   "a fresh random interface conv in every forward and never trains it")


def duet_info(roi_mask, ref_client_unchanged) -> dict:
    return {"reference_patch": REFERENCE_PATCH,
            "roi": "one (B,1,112,112) convex-hull mask of the demo faces' landmarks, all steps (reference: "
                   "landmark_inference; ours: batch['roi'])",
            "roi_fraction": [round(float(f), 4) for f in roi_mask.mean(axis=(1, 2))],
            "client": "MobileFaceNet frozen, eval(); ours loaded from an engine checkpoint of the imported weights",
            "ref_client_unchanged": ref_client_unchanged,
            "known_difference": KNOWN_DIFFERENCE}


KNOWN_DIFFERENCE = ("attention_<s>/bias (interface conv bias): ours gets no gradient, since the min-max "
                    "normalised mask does not change when the bias shifts it (only weight decay moves it); the "
                    "reference takes the min/max as constants (.item()), which gives the bias a gradient, the "
                    "same for every channel: a uniform shift without effect on the forward")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", required=True, help="python of the reference's own venv (torch)")
    ap.add_argument("--tface", required=True, help="TFace sources (the folder holding recognition/)")
    ap.add_argument("--torchjpeg", required=True, help="torchjpeg sources (the folder holding src/)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma list of {DEFAULT_CASES}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rtol", type=float, default=0.12,
                    help="largest loss difference allowed, |ours - ref| / max(|ref|, 1)")
    ap.add_argument("--param-rtol", type=float, default=0.25, help="largest relative parameter difference")
    ap.add_argument("--fresh-perms", action="store_true",
                    help="MinusFace stage 2: new permutations every step (default: one set for all steps)")
    ap.add_argument("--noise-floor", type=float, default=0.0, metavar="EPS",
                    help="also run ours from its init with every parameter x (1 + EPS N(0,1)) and report how far "
                         "the two of ours end apart (the float-noise floor of the comparison), e.g. 1e-5")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    ap.add_argument("--workdir", default="", help="keep each case's inputs, reference output (ref.npz) and "
                                                   "checkpoints in WORKDIR/<case> (default: a temporary folder); a new folder")
    a = ap.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; known: {DEFAULT_CASES}")
    if a.steps < 1 or a.batch < 2:
        ap.error("need --steps >= 1 and --batch >= 2")
    if not os.path.isfile(a.ref_python):
        ap.error(f"--ref-python {a.ref_python}: not a file")
    batch = demo_batch(a.batch, a.seed)
    all_ok = True
    with (contextlib.nullcontext(a.workdir) if a.workdir else tempfile.TemporaryDirectory(prefix="train_parity_")) as tmp:
        for case in cases:
            rec = run_case(case, a, batch, tmp)
            line = emit(rec)
            all_ok &= bool(rec.get("ok"))
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
