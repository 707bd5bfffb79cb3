"""The one-command pipeline (``ppfr_jax.pipeline``): configs, validation, a tiny DuetFace run end to end,
a finished run re-run (prints, changes nothing), and a run killed during stage 2 continued to the same
final parameters as an uninterrupted one."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ppfr_jax import checkpoints, config_lib, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import duetface  # noqa: E402
import minusface  # noqa: E402

PIPELINES = [(duetface, "demo"), (duetface, "tiny"), (minusface, "demo"), (minusface, "tiny")]
PRIVACY_FIGURES = ("ssim", "psnr", "protected_ssim", "protected_psnr", "attacker_accuracy", "attacker_accuracy_std",
                   "recognizer", "recognizer_skipped", "reference_accuracy", "reference_std", "attacker_steps",
                   "n_images", "wall_s")


# ----------------------------------------------------------------------------- configs (fast)


@pytest.mark.parametrize("mod,variant", PIPELINES, ids=[f"{m.__name__}:{v}" for m, v in PIPELINES])
def test_pipeline_configs_hold_their_stages_and_validate(mod, variant, tmp_path):
    c = mod.get_config(variant)
    assert pipeline.is_pipeline_config(c)
    stages = config_lib.PIPELINE_STAGES[c.pipeline.method]
    assert tuple(c.pipeline.stages) == stages
    for name in stages:  # each stage is exactly the single-stage variant users run on separate machines
        assert c.stages[name].to_dict() == mod.get_config(f"{name},{variant}").to_dict()
        assert config_lib.unchecked_numeric_fields(c.stages[name]) == []
    assert config_lib.unchecked_numeric_fields(c.privacy) == []
    pipeline.validate_pipeline(c, str(tmp_path))
    # wiring: stage 2 reads stage 1's sub-folder, the attack reads stage 2's
    wired = pipeline.stage_configs(c, str(tmp_path))
    assert [n for n, _, _ in wired][:2] == list(stages)
    assert [wd for _, _, wd in wired] == [str(tmp_path / n) for n, _, _ in wired]
    section, field = pipeline.WIRING[c.pipeline.method]
    assert wired[1][1][section][field] == str(tmp_path / stages[0])
    pc, _ = pipeline.privacy_config(c, str(tmp_path))
    assert tuple(pc.rows) == (c.pipeline.method,) and pc[c.pipeline.method].workdir == str(tmp_path / stages[1])


def test_single_stage_variants_are_unchanged():
    assert not pipeline.is_pipeline_config(duetface.get_config("client,demo"))
    assert duetface.get_config("server,demo").task == "duetface"
    assert minusface.get_config("stage2,demo").task == "minusface_stage2"
    assert minusface.get_config(None).task == "minusface_stage1"  # the paper default stays stage 1
    with pytest.raises(ValueError, match="pick one stage"):
        duetface.get_config("client,server,demo")
    with pytest.raises(ValueError, match="demo' and 'tiny' only"):
        duetface.get_config("ir50")
    with pytest.raises(ValueError, match="belong to the whole pipeline"):
        duetface.get_config("server,demo,attack_steps=3")


@pytest.mark.parametrize("field,value,match", [
    ("pipeline.method", "partialface", "config.pipeline.method"),
    ("pipeline.stages", ("server", "client"), "config.pipeline.stages"),
    ("pipeline.estimates_s.serverr", 5.0, "config.pipeline.estimates_s.serverr"),
    ("pipeline.baseline_workdir", "/nonexistent/arcface", "config.pipeline.baseline_workdir"),
    ("pipeline.grid_rows", 0, "config.pipeline.grid_rows"),
    ("stages.server.optim.lr", -1.0, "config.stages.server.optim.lr"),
    ("baseline.batch_size", 0, "config.baseline."),
    ("privacy.attacker.steps", 0, "config.privacy.attacker.steps"),
])
def test_bad_pipeline_field_is_a_config_error(field, value, match, tmp_path):
    c = duetface.get_config("tiny")
    *path, leaf = field.split(".")
    node = c
    for k in path:
        node = node[k]
    node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match.replace(".", r"\.")):
        pipeline.validate_pipeline(c, str(tmp_path))
    assert not (tmp_path / "client").exists()  # nothing was started


def test_cli_bad_pipeline_field_exits_2_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ppfr_jax.main", "--config", "configs/duetface.py:tiny",
                        "--workdir", str(tmp_path / "w"), "--config.pipeline.grid_rows=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "ppfr-train: error: config.pipeline.grid_rows" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "w" / "client").exists()


def test_progress_eta_scales_later_phases_by_the_measured_speed():
    c = duetface.get_config("demo")
    prog = pipeline.Progress(c)
    e = c.pipeline.estimates_s
    # the client goes at half the estimated speed: its projected total is twice its estimate; later phases x2
    s = prog.suffix("client", 100.0, 2 * e.client)
    assert "client ETA 1m40s" in s
    assert f"pipeline ETA {pipeline_eta(100 + 2 * (e.server + e.baseline + e.privacy))}" in s
    hook = prog.engine_hook("server")
    assert "server ETA" in hook(10, 20, 0.5) and "pipeline ETA" in hook(10, 20, 0.5)


def test_progress_counts_the_phase_wall_time_not_only_its_steps(monkeypatch):
    """Estimates are whole phases (compiles, evaluations): the speed factor compares them with the phase's wall
    time so far plus its remaining steps (steps alone made the MinusFace pipeline's ETA 2m35s for ~10 minutes)."""
    c = duetface.get_config("demo")
    e = c.pipeline.estimates_s
    now = [1000.0]
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: now[0])
    hook = pipeline.Progress(c).engine_hook("client")
    now[0] += 2 * e.client - 10.0  # compile + evaluations + steps so far: twice the estimate, minus the 10 s left
    s = hook(10, 20, 1.0)  # 10 steps left at 1 step/s
    assert "client ETA 10s" in s
    assert f"pipeline ETA {pipeline_eta(10 + 2 * (e.server + e.baseline + e.privacy))}" in s, s
    # resumed at step 10 of 20: this process's wall time covers half the phase, so it counts twice
    hook = pipeline.Progress(c).engine_hook("client")
    assert hook(10, 20, None) == ""
    now[0] += e.client - 10.0
    s = hook(15, 20, 2.0)  # 5 steps left at 2 steps/s: 2.5 s; whole phase (e.client - 7.5) * 2
    assert f"pipeline ETA {pipeline_eta(2.5 + (2 * (e.client - 7.5) / e.client) * (e.server + e.baseline + e.privacy))}" in s, s


def pipeline_eta(seconds):
    from ppfr_jax.train import format_duration
    return format_duration(seconds)


def test_report_renders_every_field_and_is_deterministic():
    stage = {"stage": "server", "workdir": "/w/server", "task": "duetface", "steps": 168, "wall_s": 840.0,
             "devtest_accuracy": 0.852, "devtest_std": 0.012}
    res = {"method": "duetface", "workdir": "/w", "stages": [dict(stage, stage="client"), stage], "server": stage,
           "baseline": {"source": "trained here", "trained_here": True, "steps": 168, "wall_s": 100.0,
                        "devtest_accuracy": 0.819, "devtest_std": 0.02},
           "privacy": {"workdir": "/w/privacy", "representation": "162 DCT channels", "ssim": 0.5, "psnr": 15.0,
                       "protected_ssim": 0.1, "protected_psnr": 8.0, "attacker_accuracy": 0.6,
                       "attacker_accuracy_std": 0.03, "recognizer": "casia", "recognizer_skipped": None,
                       "reference_accuracy": 0.95, "reference_std": 0.01, "attacker_steps": 200, "n_images": 1549,
                       "eval_set": "demo", "wall_s": 150.0},
           "wall_s_total": 1930.0}
    md = pipeline.render_report(res)
    for s in ("85.20% ± 1.20", "81.90% ± 2.00", "0.500", "15.00 dB", "60.00% ± 3.00", "95.00% ± 1.00",
              pipeline.TRANSMITTED_PNG, pipeline.RECOVERY_PNG, "32m10s"):
        assert s in md
    assert md == pipeline.render_report(json.loads(json.dumps(res)))
    skipped = dict(res, privacy=dict(res["privacy"], recognizer_skipped="the checkpoint is not there"))
    assert "skipped: the checkpoint is not there" in pipeline.render_report(skipped)
    table = pipeline.summary_table(res)
    assert "stage" in table and "baseline (RGB)" in table and "85.20% ± 1.20" in table and "14m00s" in table


# ----------------------------------------------------------------------------- end to end (slow)


def _tiny(**pipeline_fields):
    c = duetface.get_config("tiny")
    c.pipeline.update(pipeline_fields)
    return c


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (st.st_mtime_ns, fh.read())
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny DuetFace pipeline (client, server, baseline, attack) run once: (workdir, results, log lines)."""
    wd = str(tmp_path_factory.mktemp("pipe") / "run")
    lines = []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the engine's own log lines
        res = pipeline.run_pipeline(_tiny(), wd, log=lines.append)
    return wd, res, lines, buf.getvalue()


@pytest.mark.slow
def test_pipeline_end_to_end(finished):
    wd, res, lines, engine_out = finished
    # stages in order, each in its own sub-folder with its own checkpoints and results
    starts = [ln for ln in lines if ln.startswith("pipeline: ")]
    assert [ln.split()[1] for ln in starts[:3]] == ["client", "server", "baseline"]
    assert "privacy attack" in starts[3]
    for sub in ("client", "server", "baseline"):
        assert checkpoints.checkpoint_steps(os.path.join(wd, sub)), sub
        assert os.path.isfile(os.path.join(wd, sub, "results.json"))
    server_cfg = json.load(open(os.path.join(wd, "server", "config.json")))
    assert server_cfg["duetface"]["client_workdir"] == os.path.join(wd, "client")
    # results.json: every figure
    rec = json.load(open(os.path.join(wd, "results.json")))
    assert rec == res
    assert [s["stage"] for s in rec["stages"]] == ["client", "server"]
    for s in rec["stages"] + [rec["server"], rec["baseline"]]:
        for k in ("steps", "wall_s", "devtest_accuracy", "devtest_std"):
            assert k in s
    assert rec["server"]["steps"] == 2 and rec["baseline"]["source"] == "trained here"
    for k in PRIVACY_FIGURES:
        assert k in rec["privacy"], k
    pr = rec["privacy"]
    assert 0 <= pr["ssim"] <= 1 and 0 < pr["psnr"] <= 100 and pr["attacker_steps"] == 2
    # the recogniser ran, or its absence is explained
    assert (pr["attacker_accuracy"] is not None) != bool(pr["recognizer_skipped"])
    # report + pictures
    md = open(os.path.join(wd, "report.md")).read()
    for s in ("DuetFace server", "RGB ArcFace baseline", "What the server receives", "recovered SSIM",
              "recovered PSNR", "recovered faces", pipeline.TRANSMITTED_PNG, pipeline.RECOVERY_PNG, "## Stages"):
        assert s in md, s
    from PIL import Image
    t = np.asarray(Image.open(os.path.join(wd, pipeline.TRANSMITTED_PNG)))
    assert t.shape == (3 * 112 + 2 * 2, 6 * 112 + 5 * 2, 3)  # 3 faces x (original, decoded, 4 masks)
    g = np.asarray(Image.open(os.path.join(wd, pipeline.RECOVERY_PNG)))
    assert g.shape == (3 * 112 + 2 * 2, 3 * 112 + 2 * 2, 3)
    # progress: steps/s and both ETAs on every training log line, then the summary table
    steps = [ln for ln in engine_out.splitlines() if ln.startswith("step ") and "loss" in ln]
    assert len(steps) == 2 + 2 + 2  # client, server (every step), baseline (every 2nd of 4)
    for ln in steps:
        assert "steps/s" in ln and "ETA" in ln and "pipeline ETA" in ln, ln
    attacker = [ln for ln in lines if "] attacker step" in ln]
    assert attacker and all("steps/s" in ln and "pipeline ETA" in ln for ln in attacker)
    table = lines[-1].splitlines()
    assert table[1].split() == ["stage", "steps", "wall", "time", "DevTest", "accuracy"]
    assert [r.split()[0] for r in table[3:]] == ["client", "server", "baseline", "privacy", "total"]


@pytest.mark.slow
def test_finished_pipeline_rerun_prints_results_and_changes_nothing(finished, capsys):
    wd, res, _, _ = finished
    before = _snapshot(wd)
    lines = []
    again = pipeline.run_pipeline(_tiny(), wd, log=lines.append)
    assert again == res
    assert "already finished" in lines[0] and "nothing was changed" in lines[0] and "privacy attack" in lines[0]
    assert _snapshot(wd) == before
    # killed after the pictures but before results.json: the stages re-print, the attack is not redone,
    # the pictures and report come out byte-identical (files not rewritten)
    os.remove(os.path.join(wd, pipeline.RESULTS))
    lines = []
    capsys.readouterr()
    again = pipeline.run_pipeline(_tiny(), wd, log=lines.append)
    assert again == res
    out = capsys.readouterr().out
    assert out.count("already finished") == 3  # client, server, baseline: the engine's finished-run message
    assert any("privacy attack already done" in ln for ln in lines)
    after = _snapshot(wd)
    assert after.pop(pipeline.RESULTS)[1] == before.pop(pipeline.RESULTS)[1]  # rewritten: same bytes
    # the engine takes each stage's run lock again (written, then emptied): only those files' mtimes move
    locks = [k for k in before if os.path.basename(k) == checkpoints.LOCK_FILE]
    assert len(locks) == 4 and all(after.pop(k)[1] == before.pop(k)[1] == b"" for k in locks)
    assert after == before


@pytest.mark.slow
def test_pipeline_killed_during_stage_2_continues_to_the_same_parameters(finished, tmp_path, capsys):
    """Stage 1 finished and stage 2 stopped after its first checkpoint (the state a SIGKILL leaves: no
    results.json), then the same pipeline again: same final server parameters as the uninterrupted run."""
    from ppfr_jax import train
    ref_wd, _, _, _ = finished
    wd = str(tmp_path / "run")
    config = _tiny(baseline=False)  # the baseline does not touch the server's parameters
    stages = pipeline.stage_configs(config, wd)
    (_, c1, wd1), (_, c2, wd2) = stages
    shutil.copytree(os.path.join(ref_wd, "client"), wd1)  # stage 1 finished (the same run: deterministic)
    partial = pipeline._copy(c2)
    partial.num_train_steps = 1  # the same schedule (it is in epochs), stopped after step 1's checkpoint
    partial.checkpoint_every_steps = 1
    train.train_and_evaluate(partial, wd2)
    os.remove(os.path.join(wd2, "results.json"))
    assert checkpoints.checkpoint_steps(wd2) == [1]
    capsys.readouterr()
    res = pipeline.run_pipeline(config, wd, log=lambda m: None)
    out = capsys.readouterr().out
    assert "already finished at step 2" in out  # stage 1 was not redone
    assert "step 2/2" in out and "step 1/2" not in out  # stage 2 resumed from its checkpoint
    assert res["server"]["steps"] == 2
    got, step = checkpoints.restore_variables(wd2)
    want, ref_step = checkpoints.restore_variables(os.path.join(ref_wd, "server"))
    assert step == ref_step == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    shutil.rmtree(wd, ignore_errors=True)


def test_missing_recogniser_checkpoint_is_skipped_with_the_reason(tmp_path):
    c = duetface.get_config("tiny")
    c.privacy.recognizer.checkpoint = str(tmp_path / "nothing.ckpt")
    pc, why = pipeline.privacy_config(c, str(tmp_path))
    assert pc.recognizer.checkpoint == "" and "nothing.ckpt" in why and "PROVENANCE.md" in why
    c.privacy.recognizer.checkpoint = ""
    assert "empty" in pipeline.privacy_config(c, str(tmp_path))[1]
    c.privacy.recognizer.checkpoint = config_lib.CASIA_CHECKPOINT
    _, why = pipeline.privacy_config(c, str(tmp_path))
    assert (why is None) == os.path.exists(config_lib.CASIA_CHECKPOINT)
