"""The launchers in launch/, exercised in dry-run mode (no gcloud, no GPUs, no SLURM needed).

Printed commands are parsed back with shlex (they are meant to be copy-pasted), and the
snippets that run on the remote side (a TPU worker's ssh command, a SLURM task's wrapper)
are executed here with fake ``curl`` / ``python3`` / ``scontrol`` so their quoting and
environment handling are checked, not just their text. The SLURM task wrapper is also run
for real in two local processes against ``sharding.maybe_initialize_distributed``.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
GPU = os.path.join(LAUNCH, "gpu_single_host.sh")
SLURM = os.path.join(LAUNCH, "slurm_multihost.sbatch")
BASH = shutil.which("bash")  # absolute: some tests run the scripts with a minimal PATH

_CLEAR = ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "CONFIG", "WORKDIR", "GIT_URL",
          "GIT_REF", "JAX_SPEC", "DRY_RUN", "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES",
          "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
          "PPFR_COORDINATOR_PORT", "SCONTROL", "PYTHON")


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in _CLEAR and not k.startswith("SLURM_")}
    env.update(kw)
    return env


def _bash(script, *args, env=None, cwd=None):
    return subprocess.run([BASH, script, *args], env=env if env is not None else _env(), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _fake(tmp_path, name, body):
    """An executable ``name`` in ``tmp_path/bin`` running the bash ``body``; returns the bin dir."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/bash\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(d)


# a stand-in interpreter: prints the environment it was given and its argv, one per line
_ECHO_PY = ('echo "NPROC=${JAX_NUM_PROCESSES:-}"; echo "MEMFRAC=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}"; '
            'echo "XLA_FLAGS=${XLA_FLAGS:-}"; echo "CUDA=${CUDA_VISIBLE_DEVICES:-}"; echo ARGV; '
            'printf "%s\\n" "$@"')


def _parse_echo(out):
    head, argv = out.split("ARGV\n", 1)
    env = dict(line.split("=", 1) for line in head.splitlines())
    return env, argv.splitlines()


@pytest.mark.parametrize("script", [TPU, GPU, SLURM, os.path.join(ROOT, "bench", "gpu_run.sh")])
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- TPU pod


def _tpu_dry(*args, env=None):
    base = ["--name", "pod1", "--zone", "us-central2-b", "--dry-run"]
    r = _bash(TPU, *base, *args, env=env)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def _ssh_command(argv):
    cmd = [a for a in argv if a.startswith("--command=")]
    assert len(cmd) == 1, argv
    return cmd[0][len("--command="):]


def test_tpu_all_prints_create_setup_run_delete(tmp_path):
    workdir = "/gcs/bucket/runs/ir 50"  # a space: quoting must survive both shells
    extra = "--config.data.path=/data/it's here"
    lines = _tpu_dry("--accelerator", "v5p-32", "--version", "v2-alpha-tpuv5", "--project", "proj",
                     "--config", "configs/duetface.py:server,ir18", "--workdir", workdir, "all", "--", extra)
    assert lines[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-central2-b",
                        "--project=proj", "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]
    assert lines[1][:3] == ["git", "-C", ROOT] and "archive" in lines[1] and lines[1][-1] == "HEAD"
    tarball = lines[1][lines[1].index("-o") + 1]
    assert lines[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert tarball in lines[2] and "pod1:ppfr_jax-src.tar.gz" in lines[2] and "--worker=all" in lines[2]
    setup = lines[3]
    assert setup[4:6] == ["ssh", "pod1"] and "--worker=all" in setup and "--project=proj" in setup
    remote_setup = _ssh_command(setup)
    assert "tar xzf ppfr_jax-src.tar.gz" in remote_setup and "pip install -q 'jax[tpu]' -e ." in remote_setup
    run = lines[4]
    assert run[4:6] == ["ssh", "pod1"] and "--worker=all" in run
    assert lines[5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1", "--zone=us-central2-b",
                        "--project=proj", "--quiet"]
    assert len(lines) == 6

    # execute the run step's remote command as a worker would: fake metadata server and python3
    remote = _ssh_command(run)
    bindir = _fake(tmp_path, "curl", 'echo -n "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4"')
    _fake(tmp_path, "python3", _ECHO_PY)
    home = tmp_path / "home"
    (home / "ppfr_jax").mkdir(parents=True)
    r = subprocess.run(["bash", "-c", remote], cwd=home, env=_env(PATH=bindir + os.pathsep + os.environ["PATH"]),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    env, argv = _parse_echo(r.stdout)
    assert env["NPROC"] == "4"  # one process per host: maybe_initialize_distributed sees >1 and initialises
    assert argv == ["-m", "ppfr_jax.main", "--config", "configs/duetface.py:server,ir18", "--workdir", workdir, extra]


def test_tpu_run_without_metadata_counts_one_process(tmp_path):
    run = _tpu_dry("--workdir", "/w", "run")[0]
    bindir = _fake(tmp_path, "curl", "exit 7")  # not on a TPU VM: no metadata server
    _fake(tmp_path, "python3", _ECHO_PY)
    (tmp_path / "ppfr_jax").mkdir()
    r = subprocess.run(["bash", "-c", _ssh_command(run)], cwd=tmp_path,
                       env=_env(PATH=bindir + os.pathsep + os.environ["PATH"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _parse_echo(r.stdout)[0]["NPROC"] == "1"


def test_tpu_git_url_detach_spot_and_env_defaults():
    env = _env(TPU_NAME="envpod", ZONE="europe-west4-a", CONFIG="configs/minusface.py:stage1", WORKDIR="/nfs/w")
    r = _bash(TPU, "--git-url", "https://example.com/ppfr.git", "--ref", "v1", "--spot", "--detach", "--dry-run",
              "create", "setup", "run", env=env)
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(x) for x in r.stdout.splitlines()]
    assert len(lines) == 3  # no tarball or scp with --git-url
    assert lines[0][5] == "envpod" and "--spot" in lines[0] and "--accelerator-type=v4-32" in lines[0]
    assert "git clone --depth 1 --branch v1 https://example.com/ppfr.git ppfr_jax" in _ssh_command(lines[1])
    run = _ssh_command(lines[2])
    assert "nohup python3 -m ppfr_jax.main --config configs/minusface.py:stage1 --workdir /nfs/w" in run
    assert run.rstrip().endswith("&") and "ppfr_train.log" in run


def test_tpu_dry_run_needs_no_gcloud_and_real_run_does(tmp_path):
    # PATH holds only what the script itself uses: dirname (gcloud lives in /usr/bin on some machines)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(subprocess.run(["bash", "-c", "command -v dirname"], capture_output=True, text=True).stdout.strip(),
               bindir / "dirname")
    env = _env(PATH=str(bindir))
    r = _bash(TPU, "--name", "p", "--zone", "z", "--dry-run", "delete", env=env)
    assert r.returncode == 0 and r.stdout.startswith("gcloud compute tpus tpu-vm delete p"), r.stderr
    r = _bash(TPU, "--name", "p", "--zone", "z", "delete", env=env)
    assert r.returncode == 2 and "gcloud not found" in r.stderr


@pytest.mark.parametrize("args,message", [
    ([], "no step given"),
    (["--name", "p", "--zone", "z", "launch"], "unknown step 'launch'"),
    (["--name", "p", "--zone", "z", "--frobnicate", "run"], "unknown option --frobnicate"),
    (["--zone", "z", "create"], "--name"),
    (["--name", "p", "create"], "--zone"),
    (["--name", "p", "--zone", "z", "run"], "step run needs --workdir"),
    (["--name", "p", "--zone", "z", "--workdir", "/w", "--detach", "all"], "--detach with delete"),
    (["--name", "p", "--zone", "z", "--config"], "option --config needs a value"),
])
def test_tpu_bad_usage(args, message):
    r = _bash(TPU, *args, "--dry-run")
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


# ----------------------------------------------------------------------------- single-host GPU


def test_gpu_dry_run_prints_env_and_command():
    r = _bash(GPU, "--dry-run", "--gpus", "0,2", "--config", "configs/arcface.py:ir18", "--workdir", "runs/a b",
              "--", "--config.half_precision=True", env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d"))
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(x) for x in r.stdout.splitlines()]
    exports = dict(x[1].split("=", 1) for x in lines if x[0] == "export")
    assert exports == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90", "CUDA_VISIBLE_DEVICES": "0,2",
                       "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true"}
    assert lines[-1] == ["python3", "-m", "ppfr_jax.main", "--config", "configs/arcface.py:ir18", "--workdir",
                         "runs/a b", "--config.half_precision=True"]


def test_gpu_runs_the_trainer_with_that_environment(tmp_path):
    py = os.path.join(_fake(tmp_path, "fakepy", _ECHO_PY), "fakepy")
    r = _bash(GPU, "--python", py, "--workdir=/w", "--config=configs/arcface.py:demo",
              env=_env(XLA_PYTHON_CLIENT_MEM_FRACTION="0.5",
                       XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false"))
    assert r.returncode == 0, r.stderr
    env, argv = _parse_echo(r.stdout)
    assert env["MEMFRAC"] == "0.5"  # the user's own settings win
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=false"
    assert env["CUDA"] == ""  # all GPUs unless --gpus
    assert argv == ["-m", "ppfr_jax.main", "--config", "configs/arcface.py:demo", "--workdir", "/w"]


@pytest.mark.parametrize("args,env,message", [
    ([], {}, "--workdir"),
    (["--workdir", "w", "--gpus", "0;1"], {}, "--gpus must be"),
    (["--workdir", "w", "--nodes", "2"], {}, "unknown argument --nodes"),
    (["--workdir", "w"], {"JAX_NUM_PROCESSES": "2"}, "multi-process environment"),
    (["--workdir", "w"], {"SLURM_NTASKS": "4"}, "multi-process environment"),
])
def test_gpu_bad_usage(args, env, message):
    r = _bash(GPU, "--dry-run", *args, env=_env(**env))
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


# ----------------------------------------------------------------------------- SLURM multi-node


def _slurm_dry(*args, **env):
    r = _bash(SLURM, "--workdir", "/shared/run 1", *args, env=_env(DRY_RUN="1", **env))
    assert r.returncode == 0, r.stderr
    return r


def _srun(stdout):
    line = [x for x in stdout.splitlines() if x.startswith("srun ")]
    assert len(line) == 1, stdout
    return shlex.split(line[0])


def _coordinator(stdout):
    return [x for x in stdout.splitlines() if x.startswith("export JAX_COORDINATOR_ADDRESS=")][0].split("=", 1)[1]


def test_slurm_dry_run_outside_slurm_uses_fake_allocation():
    r = _slurm_dry("--config", "configs/arcface.py:ir100", "--", "--config.half_precision=True",
                   SCONTROL="/nonexistent/scontrol")
    assert "fake SLURM" in r.stderr
    port = 61440 + 12345 % 4096  # the port jax's own SLURM detection derives from the job id
    assert _coordinator(r.stdout) == f"node01:{port}"
    srun = _srun(r.stdout)
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    i = srun.index("ppfr_task")
    assert srun[i + 1:] == ["python3", "-m", "ppfr_jax.main", "--config", "configs/arcface.py:ir100", "--workdir",
                            "/shared/run 1", "--config.half_precision=True"]
    tasks = [x for x in r.stdout.splitlines() if x.startswith("# task")]
    assert tasks == [f"# task {k}: JAX_COORDINATOR_ADDRESS=node01:{port} JAX_PROCESS_ID={k} JAX_NUM_PROCESSES=2 "
                     "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" for k in range(2)]


@pytest.mark.parametrize("nodelist,head", [
    ("node[01-02]", "node01"),
    ("gpu[003,007-015],login2", "gpu003"),
    ("rack[1-2]-n[07,09]", "rack1-n07"),
    ("alpha,beta", "alpha"),
    ("solo", "solo"),
])
def test_slurm_first_host_without_scontrol(nodelist, head):
    r = _slurm_dry(SLURM_JOB_NODELIST=nodelist, SCONTROL="/nonexistent/scontrol", SLURM_JOB_ID="100",
                   SLURM_NNODES="3", PPFR_COORDINATOR_PORT="7777")
    assert _coordinator(r.stdout) == f"{head}:7777"
    assert "fake SLURM" not in r.stderr  # a real (here: given) allocation is used as is
    assert _srun(r.stdout)[1] == "--nodes=3"


def test_slurm_first_host_from_scontrol(tmp_path):
    bindir = _fake(tmp_path, "scontrol",
                   '[[ $1 == show && $2 == hostnames && $3 == "c[7-8]" ]] || exit 3; printf "c7\\nc8\\n"')
    r = _slurm_dry(SLURM_JOB_NODELIST="c[7-8]", SLURM_JOB_ID="777", SLURM_NNODES="2",
                   PATH=bindir + os.pathsep + os.environ["PATH"])
    assert _coordinator(r.stdout) == f"c7:{61440 + 777}"


@pytest.mark.parametrize("args,env,message", [
    (["--workdir", "/w"], {}, "not inside a SLURM allocation"),
    ([], {"DRY_RUN": "1"}, "--workdir"),
    (["--workdir", "/w", "--nodes", "2"], {"DRY_RUN": "1"}, "unknown argument --nodes"),
    (["--workdir", "/w"], {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "n[1-2", "SCONTROL": "/nonexistent"},
     "cannot parse SLURM_JOB_NODELIST"),
])
def test_slurm_bad_usage(args, env, message):
    r = _bash(SLURM, *args, env=_env(**env))
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


_TASK_PROBE = """
import json, jax
from ppfr_jax import sharding, train
sharding.maybe_initialize_distributed()
print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                  "device_count": jax.device_count(),
                  "visible": jax.config.values.get("jax_cuda_visible_devices")}), flush=True)
jax.distributed.shutdown()
"""


def test_slurm_task_wrapper_initializes_jax_distributed(tmp_path):
    """Two local 'nodes': the srun task wrapper + sharding.maybe_initialize_distributed form one job.

    SLURM's own per-task variables are set as srun would (incl. SLURM_LOCALID, which without
    JAX_LOCAL_DEVICE_IDS would make jax restrict each process to one GPU).
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = _slurm_dry(SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="5", SLURM_NNODES="2",
                   PPFR_COORDINATOR_PORT=str(port), SLURM_GPUS_ON_NODE="3")
    srun = _srun(r.stdout)
    wrapper = srun[srun.index("-c"):srun.index("ppfr_task") + 1]
    exports = dict(shlex.split(x)[1].split("=", 1) for x in r.stdout.splitlines() if x.startswith("export "))
    procs = []
    for pid in range(2):
        env = _env(**{**exports, "XLA_FLAGS": exports["XLA_FLAGS"] + " --xla_force_host_platform_device_count=1"},
                   PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", SLURM_JOB_ID="5", SLURM_STEP_NODELIST="127.0.0.1",
                   SLURM_NTASKS="2", SLURM_PROCID=str(pid), SLURM_LOCALID="0", SLURM_GPUS_ON_NODE="3")
        procs.append(subprocess.Popen([BASH, *wrapper, sys.executable, "-c", _TASK_PROBE], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-2000:] for o in outs)
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [g["process_index"] for g in got] == [0, 1]
    assert all(g["process_count"] == 2 and g["device_count"] == 2 for g in got)
    # all three 'GPUs' of the node stay visible to the node's one process
    assert all(g["visible"] == "0,1,2" for g in got)


# ----------------------------------------------------------------------------- bench/gpu_run.sh


GPU_RUN = os.path.join(ROOT, "bench", "gpu_run.sh")


def _gpu_run_tree(tmp_path, prepared=True):
    """A copy of bench/gpu_run.sh in a scratch tree (it cds to its parent's parent)."""
    (tmp_path / "bench").mkdir(parents=True)
    shutil.copy(GPU_RUN, tmp_path / "bench" / "gpu_run.sh")
    if prepared:
        (tmp_path / ".whl").mkdir()
        (tmp_path / ".whl" / "x-1-py3-none-any.whl").write_text("")
        (tmp_path / ".ref").mkdir()
        (tmp_path / ".ref" / "ref_bench.py").write_text("")
    return str(tmp_path / "bench" / "gpu_run.sh")


def test_gpu_run_phases_call_the_benchmarks_with_the_issue_settings(tmp_path):
    script = _gpu_run_tree(tmp_path)
    # a stand-in interpreter that records each call's argv on one line
    bindir = _fake(tmp_path, "fakepy", 'echo "CALL $*" >> "$(dirname "$0")/calls.txt"')
    out = tmp_path / "out"
    r = _bash(script, "run", str(out), "bf16", "train", "fp32", env=_env(PYTHON=os.path.join(bindir, "fakepy")))
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "bin" / "calls.txt").read_text().splitlines()
    assert calls[0].startswith("CALL -m pip install") and "--target /tmp/site" in calls[0]
    bf16, train, fp32 = [c for c in calls if "bench/" in c]
    for c in (bf16, fp32):
        assert "bench/compare.py" in c and "--device cuda" in c and "--batch 64" in c
        assert "--ref-bench .ref/ref_bench.py" in c and "--cases all" in c
    assert "--ours-args=--bf16 --ref-args=--amp" in bf16 and "--amp" not in fp32
    assert f"--out {out}/compare_bf16.jsonl" in bf16 and f"--out {out}/compare_fp32.jsonl" in fp32
    assert "bench/train_step.py" in train and "--bf16" in train and "--batch 64" in train
    assert "--profile /tmp/ppfr_gpu_profile" in train and f"--out {out}/train_step_bf16.jsonl" in train
    assert {p.name for p in out.iterdir()} == {"log_bf16.txt", "log_train.txt", "log_fp32.txt"}


def test_gpu_run_errors(tmp_path):
    r = _bash(_gpu_run_tree(tmp_path / "a", prepared=False), "run", str(tmp_path / "out"))
    assert r.returncode == 2 and ".whl/ or .ref/ missing" in r.stderr and "prepare" in r.stderr
    script = _gpu_run_tree(tmp_path / "b")
    r = _bash(script)
    assert r.returncode == 2 and "usage" in r.stderr
    bindir = _fake(tmp_path, "fakepy", "true")
    r = _bash(script, "run", str(tmp_path / "out"), "fp16", env=_env(PYTHON=os.path.join(bindir, "fakepy")))
    assert r.returncode == 2 and "unknown phase 'fp16'" in r.stdout + r.stderr
