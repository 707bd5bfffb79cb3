"""Training engine: sharded == single-device, resume, restore on another mesh, bad configs, NaN stop.

Tiny IR on synthetic data (deterministic per step) so each case runs in seconds.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ppfr_jax import checkpoints, config_lib, data, errors, methods, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import arcface  # noqa: E402


def tiny_config(**over):
    c = arcface.get_config("tiny")
    c.data.num_classes = 13  # divides neither 8 nor 4 devices: exercises class padding
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def run_steps(config, mesh, n, rng_seed=0):
    setup = train.build(config, config.data.num_classes, 1000, mesh)
    state = train.init_state(setup, jax.random.key(rng_seed))
    step = train.compile_train_step(setup)
    src = data.synthetic_batches(config, setup.global_batch, 0, config.data.num_classes)
    losses = []
    for _ in range(n):
        state, m = step(state, sharding.make_global_batch(next(src), mesh), jax.random.key(1))
        losses.append(float(m["loss"]))
    return setup, state, losses


@pytest.mark.slow
def test_sharded_step_matches_single_device():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    c = tiny_config()
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    eight = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    c8 = tiny_config(**{"mesh.model": 2})
    _, s1, l1 = run_steps(c, one, 2)
    setup8, s8, l8 = run_steps(c8, eight, 2)
    # the head's class axis really is split over all 8 devices
    kernel = s8.params["head"]["kernel"]
    assert kernel.shape[1] == 128 and len({d for d in kernel.sharding.device_set}) == 8
    assert kernel.addressable_shards[0].data.shape[1] == 16
    # float32 sums in a different order (batch split over devices, cross-device reductions)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    p1, p8 = jax.device_get(s1.params), jax.device_get(s8.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p1, p8)


def test_arcface_match_copies_the_method_budget():
    # the equal-budget baselines of bench/RESULTS.md: same batch, epochs and LR schedule
    import duetface as duetface_cfg
    import minusface as minusface_cfg
    for match, other in (("duetface", duetface_cfg.get_config("server,demo")),
                         ("minusface", minusface_cfg.get_config("stage2,demo"))):
        c = arcface.get_config(f"demo,match={match}")
        assert (c.batch_size, c.num_epochs, c.model.backbone) == (other.batch_size, other.num_epochs,
                                                                 other.model.backbone)
        assert c.optim.to_dict() == other.optim.to_dict()
        assert c.head.to_dict() == other.head.to_dict() and c.model.input == "rgb"
    assert arcface.get_config("demo").num_epochs != duetface_cfg.get_config("server,demo").num_epochs
    with pytest.raises(ValueError, match="match"):
        arcface.get_config("demo,match=cosface")


def test_load_config_spec(tmp_path):
    c = config_lib.load_config_spec(os.path.join(ROOT, "configs", "arcface.py") + ":demo,match=duetface")
    assert c.num_epochs == 4.0 and c.model.backbone == "ir_tiny"
    with pytest.raises(ValueError, match=r"nothing\.py is not a file"):
        config_lib.load_config_spec(f"{tmp_path}/nothing.py:demo")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(KeyError, match="has no get_config"):  # the caller's error type
        config_lib.load_config_spec(f"{tmp_path}/empty.py", error=KeyError)


def test_bad_configs_name_the_field(tmp_path):
    cases = {
        "model.backbone": ("model.backbone", "resnet9000"),
        "optim.lr": ("optim.lr", -0.1),
        "batch_size": ("batch_size", 12),
        "data.path": ("data.source", "tfrecord"),
    }
    for field, (k, v) in cases.items():
        c = tiny_config(**{k: v})
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            config_lib.validate(c, 8)


@pytest.mark.slow
def test_end_to_end_writes_results_and_resumes(tmp_path):
    c = tiny_config()
    wd = str(tmp_path / "run")
    r = train.train_and_evaluate(c, wd)
    assert r["steps"] == 4
    res = json.load(open(os.path.join(wd, "results.json")))
    for k in ("config", "steps", "wall_s", "devtest_accuracy", "devtest_std"):
        assert k in res
    # a second call finds the final checkpoint and does no more work
    c2 = tiny_config(num_train_steps=6)
    r2 = train.train_and_evaluate(c2, wd)
    assert r2["steps"] == 6
    # the run loads for inference from its workdir alone (ppfr-eval --model ppfr)
    from ppfr_jax import evaluate
    task, variables, step = methods.load_for_inference(wd)
    assert step == 6 and task.config.num_train_steps == 6
    jax.tree.map(np.testing.assert_array_equal, variables["params"], _params(wd))
    rec = evaluate.MODELS["ppfr"](wd)
    x = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    e = evaluate.embed(rec.apply_fn, x, preprocess=rec.preprocess, flip=None)
    # evaluate.embed runs the images in a padded batch of eval.batch_size, task.embed
    # in a batch of 3: XLA may pick other float32 conv/matmul orders for the two shapes
    # (CI: 1.1e-5 absolute on an entry of 0.039 in a vector whose entries reach 15), so
    # the tolerance is float32 rounding relative to the embedding's scale.
    want = np.asarray(task.embed(variables, x))
    np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert e.shape == (3, c.model.embedding_size) and np.isfinite(e).all()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_checkpoints(tmp_path):
    wd = str(tmp_path / "nan")
    train.train_and_evaluate(tiny_config(), wd)  # 4 good steps, checkpoints at 2 and 4
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    c = tiny_config(num_train_steps=8, **{"optim.lr": 1e30})
    with pytest.raises(errors.NonFiniteLossError, match="step"):
        train.train_and_evaluate(c, wd)
    mngr = checkpoints.checkpoint_manager(wd, c)
    assert mngr.latest_step() == 4
    assert set(before) <= set(os.listdir(os.path.join(wd, "checkpoints")))


@pytest.mark.slow
def test_non_finite_step_leaves_the_state_unchanged():
    # lr 1e30 overflows within a few steps; the first non-finite step must return the state it got
    c = tiny_config(**{"optim.lr": 1e30})
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    setup = train.build(c, c.data.num_classes, 1000, mesh)
    state = train.init_state(setup, jax.random.key(0))
    step = train.compile_train_step(setup)
    src = data.synthetic_batches(c, setup.global_batch, 0, c.data.num_classes)
    changed = False
    for i in range(12):
        before = jax.device_get(state)  # the step donates its input
        state, m = step(state, sharding.make_global_batch(next(src), mesh), jax.random.key(1))
        if int(state.bad_step) >= 0:
            break
        changed |= not np.array_equal(before.params["head"]["kernel"], np.asarray(state.params["head"]["kernel"]))
    else:
        pytest.fail("lr=1e30 never produced a non-finite step")
    assert changed, "the good steps before it should have moved the parameters"
    assert int(state.bad_step) == i and int(state.step) == i + 1
    after = jax.device_get(state)
    for name in ("params", "opt_state", "model_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
    assert not np.isfinite(float(m["loss"])) or not np.isfinite(float(m["grad_norm"]))


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_4(tmp_path):
    c = tiny_config()
    eight = Mesh(np.asarray(jax.devices()).reshape(8, 1), ("data", "model"))
    setup8, s8, _ = run_steps(c, eight, 1)
    mngr = checkpoints.checkpoint_manager(str(tmp_path), c)
    checkpoints.save_checkpoint(mngr, s8, {"step": 1})
    mngr.wait_until_finished()
    four = Mesh(np.asarray(jax.devices()[:4]).reshape(4, 1), ("data", "model"))
    setup4 = train.build(c, c.data.num_classes, 1000, four)
    restored, meta = checkpoints.restore_checkpoint(checkpoints.checkpoint_manager(str(tmp_path), c), setup4.abstract_state)
    assert meta["step"] == 1
    k = restored.params["head"]["kernel"]
    assert len(k.sharding.device_set) == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jax.device_get(s8.params), jax.device_get(restored.params))


_CHILD = textwrap.dedent("""
    import os, sys, json
    sys.path.insert(0, {configs!r})
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    {dist}
    import arcface
    from ppfr_jax import train
    c = arcface.get_config("tiny")
    c.data.num_classes = 13
    c.num_train_steps = {steps}
    c.checkpoint_every_steps = 1
    c.log_every_steps = 1
    r = train.train_and_evaluate(c, {workdir!r})
    print("DONE", r["steps"], flush=True)
    if jax.distributed.is_initialized():
        # every process leaves together: process 0 hosts the coordination service
        jax.distributed.shutdown()
""")


def _child(workdir, steps, dist=""):
    return [sys.executable, "-c", _CHILD.format(configs=os.path.join(ROOT, "configs"), workdir=workdir,
                                                steps=steps, dist=dist)]


def _params(workdir):
    c = tiny_config()
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    setup = train.build(c, 13, 1000, mesh)
    state, _ = checkpoints.restore_checkpoint(checkpoints.checkpoint_manager(workdir, c), setup.abstract_state)
    return jax.device_get(state.params)


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    steps = 6
    ref = str(tmp_path / "ref")
    subprocess.run(_child(ref, steps), check=True, env=_env(), capture_output=True, timeout=600)
    wd = str(tmp_path / "killed")
    # kill as soon as the checkpoint of step 3 is on disk
    p = subprocess.Popen(_child(wd, steps), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time
    t0 = time.time()
    while time.time() - t0 < 300:
        d = os.path.join(wd, "checkpoints")
        if os.path.isdir(d) and any(x.isdigit() and int(x) >= 3 for x in os.listdir(d)):
            break
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps_on_disk = [int(x) for x in os.listdir(os.path.join(wd, "checkpoints")) if x.isdigit()]
    assert steps_on_disk and max(steps_on_disk) < steps, f"run was not interrupted: {steps_on_disk}"
    out = subprocess.run(_child(wd, steps), env=_env(), capture_output=True, text=True, timeout=600)
    assert "DONE 6" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    a, b = _params(ref), _params(wd)
    # same program, same data, same devices: bit-for-bit on CPU
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    """Two processes (gloo collectives over localhost, jax.distributed) == one process.

    Earlier this hung at JAX's shutdown barrier: process 0 alone opened an extra Orbax
    manager (a cross-process barrier the other never joined). Now every process
    closes its manager and calls jax.distributed.shutdown() together.
    """
    steps = 2
    one = str(tmp_path / "one")
    env = _env()
    subprocess.run(_child(one, steps), check=True, env=env, capture_output=True, timeout=600)
    two = str(tmp_path / "two")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs = []
    for pid in range(2):
        dist = (f"jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
                f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id={pid})")
        # one device per process, so the global mesh (2 devices) matches the single-process run
        cmd = _child(two, steps, dist)
        cmd[-1] = cmd[-1].replace("device_count=2", "device_count=1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    a, b = _params(one), _params(two)
    # 2 processes x 1 device vs 1 process x 2 devices: the same global computation
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


# ----------------------------------------------------------------------------- training-state safety


@pytest.mark.slow
def test_update_that_overflows_the_parameters_is_not_applied():
    # loss and gradients are finite at step 0; lr * grad overflows float32: the new state is non-finite
    c = tiny_config(**{"optim.lr": 3e38, "optim.warmup_epochs": 0.0})
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    setup = train.build(c, c.data.num_classes, 1000, mesh)
    state = train.init_state(setup, jax.random.key(0))
    before = jax.device_get(state)
    step = train.compile_train_step(setup)
    src = data.synthetic_batches(c, setup.global_batch, 0, c.data.num_classes)
    state, m = step(state, sharding.make_global_batch(next(src), mesh), jax.random.key(1))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))  # only the new state is bad
    assert int(state.bad_step) == 0
    after = jax.device_get(state)
    for name in ("params", "opt_state", "model_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
    with pytest.raises(errors.NonFiniteLossError, match="updated state at step 1"):
        train._check_finite(state, "wd")


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    """20 DevTest pairs of the demo set as a .bin (verification in seconds)."""
    from ppfr_jax import evaluate
    from ppfr_jax.demo_data import demo_paths
    images, same = evaluate.load_bin(demo_paths()["eval_bin"])
    path = tmp_path_factory.mktemp("pairs") / "small.bin"
    evaluate.save_bin(path, images[:40], same[:20])
    return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_pairs):
    """A finished 4-step run with a checkpoint at every step and a recorded DevTest accuracy."""
    wd = str(tmp_path_factory.mktemp("base") / "run")
    c = tiny_config(checkpoint_every_steps=1, keep_checkpoints=10, **{"eval.pairs": small_pairs})
    train.train_and_evaluate(c, wd)
    return wd, c


def _copy(base, tmp_path, name="run"):
    import shutil
    dst = str(tmp_path / name)
    shutil.copytree(base, dst)
    return dst


def _corrupt(wd, how):
    import shutil
    d = os.path.join(wd, "checkpoints", "4")
    if how == "state_removed":
        shutil.rmtree(os.path.join(d, "state"))
    elif how == "meta_removed":
        shutil.rmtree(os.path.join(d, "meta"))
    elif how == "metadata_garbage":
        open(os.path.join(d, "state", "_METADATA"), "w").write("{not json")
    elif how == "data_truncated":
        for root, _, files in os.walk(os.path.join(d, "state")):
            for f in files:
                p = os.path.join(root, f)
                if os.path.getsize(p) > 1000:
                    open(p, "r+b").truncate(os.path.getsize(p) // 2)
    elif how == "empty_newer_dir":
        os.makedirs(os.path.join(wd, "checkpoints", "99"))
        return 99
    return 4


def _setup_for(c, devices=1):
    mesh = Mesh(np.asarray(jax.devices()[:devices]).reshape(devices, 1), ("data", "model"))
    return train.build(c, c.data.num_classes, 1000, mesh)


@pytest.mark.parametrize("how", ["state_removed", "meta_removed", "metadata_garbage", "data_truncated",
                                 "empty_newer_dir"])
@pytest.mark.slow
def test_restart_falls_back_to_the_newest_intact_checkpoint(base_run, tmp_path, how):
    wd = _copy(base_run[0], tmp_path)
    bad = _corrupt(wd, how)
    logs = []
    state, meta, step, skipped = checkpoints.restore_newest_intact(wd, _setup_for(base_run[1]).abstract_state, 13, logs.append)
    want = 4 if how == "empty_newer_dir" else 3
    assert step == want and meta["step"] == want and int(state.step) == want
    assert [s for s, _ in skipped] == [bad] and skipped[0][1]
    assert any(f"checkpoints/{bad} is unusable" in m for m in logs)


@pytest.mark.slow
def test_restart_skips_a_non_finite_checkpoint_and_resumes(base_run, tmp_path, capsys):
    wd = _copy(base_run[0], tmp_path)
    c = base_run[1]
    setup = _setup_for(c)
    state, _, _, _ = checkpoints.restore_newest_intact(wd, setup.abstract_state, 13)
    poisoned = state.replace(step=state.step + 1,
                             params=jax.tree.map(lambda x: x * np.float32("nan"), state.params))
    mngr = checkpoints.checkpoint_manager(wd, c)
    checkpoints.save_checkpoint(mngr, poisoned, {"step": 5, "num_classes": 13})  # what an older version could leave
    mngr.wait_until_finished()
    mngr.close()
    _corrupt(wd, "state_removed")  # and step 4 is damaged too
    c6 = tiny_config(num_train_steps=6, checkpoint_every_steps=1, keep_checkpoints=10,
                     **{"eval.pairs": c.eval.pairs})
    r = train.train_and_evaluate(c6, wd)
    out = capsys.readouterr().out
    assert r["steps"] == 6 and r["devtest_accuracy"] is not None
    assert "resuming from step 3" in out and "step 5 (ValueError: non-finite values" in out and "step 4 (" in out
    moved = sorted(os.listdir(os.path.join(wd, "damaged_checkpoints")))
    assert [m.split("-")[0] for m in moved] == ["4", "5"]
    assert checkpoints.checkpoint_steps(wd)[-1] == 6
    v, _ = checkpoints.restore_variables(wd)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(v))


@pytest.mark.parametrize("err", [MemoryError("host out of memory"), TimeoutError("storage timed out")])
def test_a_passing_failure_is_not_damage(base_run, tmp_path, monkeypatch, err):
    # a transient error on the newest checkpoint stops the restart; nothing is moved or skipped
    wd = _copy(base_run[0], tmp_path)

    def fail(*a, **k):
        raise err
    monkeypatch.setattr(checkpoints, "restore_checkpoint", fail)
    with pytest.raises(type(err), match=str(err)):
        checkpoints.restore_newest_intact(wd, _setup_for(base_run[1]).abstract_state, 13)
    assert checkpoints.checkpoint_steps(wd) == [1, 2, 3, 4]
    assert not os.path.exists(os.path.join(wd, "damaged_checkpoints"))


def test_no_intact_checkpoint_or_another_model_stops_naming_them(base_run, tmp_path):
    wd = _copy(base_run[0], tmp_path)
    for s in checkpoints.checkpoint_steps(wd):
        open(os.path.join(wd, "checkpoints", str(s), "state", "_METADATA"), "w").write("garbage")
    with pytest.raises(errors.RunError, match=r"no intact checkpoint under .*checkpoints: step 4: .*step 1: "):
        checkpoints.restore_newest_intact(wd, _setup_for(base_run[1]).abstract_state, 13)
    wd2 = _copy(base_run[0], tmp_path, "other")
    other = tiny_config(**{"model.embedding_size": 64})
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"checkpoints/4: .* has shape .*use a new workdir"):
        checkpoints.restore_newest_intact(wd2, _setup_for(other).abstract_state, 13)
    assert checkpoints.checkpoint_steps(wd2) == [1, 2, 3, 4]  # not damage: nothing moved


def test_finished_run_run_again_changes_nothing(base_run, tmp_path, capsys):
    wd = _copy(base_run[0], tmp_path)
    snapshot = {}
    for root, _, files in os.walk(wd):
        for f in files:
            p = os.path.join(root, f)
            snapshot[p] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    first = json.load(open(os.path.join(wd, "results.json")))
    assert first["devtest_accuracy"] is not None
    r = train.train_and_evaluate(base_run[1], wd)
    assert r == first
    assert "already finished at step 4" in capsys.readouterr().out
    for p, (content, mtime) in snapshot.items():
        if not p.endswith(checkpoints.LOCK_FILE):
            assert open(p, "rb").read() == content and os.stat(p).st_mtime_ns == mtime, p
    # killed after the last checkpoint, before results.json: the re-run records them
    os.remove(os.path.join(wd, "results.json"))
    r = train.train_and_evaluate(base_run[1], wd)
    assert r["steps"] == 4 and r["devtest_accuracy"] == pytest.approx(first["devtest_accuracy"])
    assert json.load(open(os.path.join(wd, "results.json")))["devtest_accuracy"] == r["devtest_accuracy"]


def test_engine_verification_and_ppfr_eval_embed_alike(base_run):
    """One embedding loop: the engine's DevTest evaluator and ``ppfr-eval --model ppfr`` give the same embeddings."""
    from ppfr_jax import evaluate
    from ppfr_jax.evaluate.evaluator import VerificationEvaluator
    wd, c = base_run
    task, variables, _ = methods.load_for_inference(wd)
    vs = evaluate.load_set(c.eval.pairs)
    images, _ = vs.interleaved()
    rec = evaluate.MODELS["ppfr"](wd)  # what ppfr-eval loads
    cli = evaluate.embed(rec.apply_fn, images, flip=rec.flip, preprocess=rec.preprocess,
                         batch_size=c.eval.batch_size)
    one_device = VerificationEvaluator(task.embed, vs, batch_size=c.eval.batch_size)
    np.testing.assert_array_equal(one_device.embeddings(variables), cli)  # same function, same loop: same bits
    # the engine's form: batches sharded over the 8 devices, output replicated; what the run recorded
    mesh = Mesh(np.array(jax.devices()), ("data",))
    engine = VerificationEvaluator.from_config(c, task.embed, sharding.batch_sharding(mesh))
    # sharded batches may take other float32 conv orders: rounding relative to the scale
    np.testing.assert_allclose(engine.embeddings(variables), cli, rtol=1e-5,
                               atol=1e-5 * np.abs(cli).max())
    r = engine.run(variables)
    recorded = json.load(open(os.path.join(wd, "results.json")))
    assert r["accuracy"] == recorded["devtest_accuracy"] and r["std"] == recorded["devtest_std"]
    assert r["threshold"] == recorded["devtest_threshold"]


@pytest.mark.slow
@pytest.mark.parametrize("saved_on,resumed_on", [(4, 3), (3, 4), (8, 5)])
def test_any_device_count_resumes_any_checkpoint(tmp_path, saved_on, resumed_on):
    import math
    # 13 classes: padded to 128 on 4 or 8 devices, 384 on 3, 640 on 5; one global batch for both meshes
    c = tiny_config(batch_size=math.lcm(saved_on, resumed_on))
    src_mesh = Mesh(np.asarray(jax.devices()[:saved_on]).reshape(saved_on, 1), ("data", "model"))
    _, state, _ = run_steps(c, src_mesh, 1)
    mngr = checkpoints.checkpoint_manager(str(tmp_path), c)
    checkpoints.save_checkpoint(mngr, state, {"step": 1, "num_classes": 13})
    mngr.wait_until_finished()
    mngr.close()
    setup = _setup_for(c, resumed_on)
    restored, _, step, skipped = checkpoints.restore_newest_intact(str(tmp_path), setup.abstract_state, 13)
    assert step == 1 and not skipped
    k_old = np.asarray(jax.device_get(state.params["head"]["kernel"]))
    k_new = restored.params["head"]["kernel"]
    assert k_new.shape[1] == sharding.padded_num_classes(13, resumed_on) and len(k_new.sharding.device_set) == resumed_on
    np.testing.assert_array_equal(np.asarray(k_new)[:, :13], k_old[:, :13])  # the real classes, exactly
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["backbone"]),
                 jax.device_get(restored.params["backbone"]))
    step_fn = train.compile_train_step(setup)  # and it trains on
    batch = next(data.synthetic_batches(c, setup.global_batch, 1, 13))
    new, m = step_fn(restored, sharding.make_global_batch(batch, setup.mesh), jax.random.key(1))
    assert np.isfinite(float(m["loss"])) and int(new.bad_step) < 0


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from ppfr_jax import checkpoints
    with checkpoints.workdir_lock({wd!r}):
        print("LOCKED", flush=True)
        time.sleep(600)
""")


def test_one_run_per_workdir_and_a_killed_run_does_not_block(tmp_path):
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    p = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=ROOT, wd=wd)], env=_env(),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "LOCKED"
        with pytest.raises(errors.RunError, match=rf"workdir {wd} is in use by another run \(pid {p.pid} on "):
            train.train_and_evaluate(tiny_config(), wd)
        assert os.listdir(wd) == [checkpoints.LOCK_FILE]  # refused before config.json or anything else
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with checkpoints.workdir_lock(wd):  # the kernel released the killed holder's lock
        with pytest.raises(errors.RunError, match="in use by another run"):
            with checkpoints.workdir_lock(wd):
                pass


def test_no_setting_deletes_the_only_checkpoint(tmp_path):
    c = tiny_config(keep_checkpoints=0, keep_best=0)  # validate refuses it; the manager keeps one anyway
    with pytest.raises(ValueError, match="keep_checkpoints"):
        config_lib.validate(c, 8)
    mngr = checkpoints.checkpoint_manager(str(tmp_path), c)
    for s in (1, 2, 3):
        st = train.TrainState(step=jnp.int32(s), params={"w": jnp.ones(2)}, model_state={"b": jnp.zeros(1)},
                              opt_state={"m": jnp.zeros(2)}, bad_step=jnp.int32(-1))
        checkpoints.save_checkpoint(mngr, st, {"step": s})
        mngr.wait_until_finished()
    mngr.close()
    assert checkpoints.checkpoint_steps(str(tmp_path)) == [3]


def test_unwritable_checkpoint_folder_stops_before_training(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(errors.RunError, match=r"checkpoint folder .*/run/checkpoints is not writable.*nothing was"):
        train.train_and_evaluate(tiny_config(), str(wd))
    assert not (wd / "config.json").exists()


def test_failed_save_stops_the_run_at_once_naming_the_path(tmp_path, monkeypatch):
    real = checkpoints.save_checkpoint
    calls = []

    def failing(mngr, state, meta, metrics=None):
        calls.append(meta["step"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(mngr, state, meta, metrics)
    monkeypatch.setattr(train, "save_checkpoint", failing)
    wd = str(tmp_path / "run")
    with pytest.raises(errors.RunError, match=r"saving the checkpoint .*/run/checkpoints/2 failed .*No space left"):
        train.train_and_evaluate(tiny_config(num_train_steps=6, checkpoint_every_steps=1), wd)
    assert calls == [1, 2] and checkpoints.checkpoint_steps(wd) == [1]
    assert not os.path.exists(os.path.join(wd, "results.json"))


def test_folder_made_unwritable_mid_run_stops_without_the_orbax_timeout(tmp_path, monkeypatch):
    """The real thing: the folder becomes unwritable (immutable) after the first save. Orbax creates
    the step folder in a background thread; when that failed, its other threads waited 300 s and the
    next save (and the interpreter's exit) with them. The folder is probed before every save."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE on ext4/xfs)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    wd = tmp_path / "run"
    real = checkpoints.probe_write
    calls = []

    def lock_before_second_save(folder):
        calls.append(str(folder))
        if len(calls) == 3:  # 1: the check before training, 2: before save 1, 3: before save 2
            subprocess.run(["chattr", "+i", str(wd / "checkpoints")], check=True)
        return real(folder)
    monkeypatch.setattr(checkpoints, "probe_write", lock_before_second_save)  # check_writable's
    monkeypatch.setattr(train, "probe_write", lock_before_second_save)  # the engine's, before each save
    saves = []
    real_save = checkpoints.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda m, s, meta, metrics=None: (
        saves.append(meta["step"]), real_save(m, s, meta, metrics))[1])
    try:
        with pytest.raises(errors.RunError, match=r"saving the checkpoint .*/run/checkpoints/2 failed .*Operation not"):
            train.train_and_evaluate(tiny_config(num_train_steps=8, checkpoint_every_steps=1), str(wd))
    finally:
        subprocess.run(["chattr", "-i", str(wd / "checkpoints")])
    assert saves == [1] and checkpoints.checkpoint_steps(str(wd)) == [1]  # Orbax never started the failing save
