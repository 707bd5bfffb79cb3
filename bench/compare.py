"""Side by side: our training step against the PyTorch reference's (TFace), same machine, one invocation.

    python bench/compare.py --ref-python /path/to/refvenv/bin/python \\
        --tface /path/to/TFace --torchjpeg /path/to/torchjpeg [--cases all] [--rounds 1] [--out FILE]

For each case, ``--rounds`` times in turn: ours (``bench/train_step.py --cases <case>`` in a
fresh process), then the reference's (``ref_bench.py --cases <case>`` in a fresh process of
``--ref-python``, the reference's own virtual environment). So the two alternate
(ours, ref, ours, ref, ... per case) and see the same machine load as far as that can be
arranged on a shared machine. Both use the same batch, classes, warm-up and timed steps;
torch runs on ``--threads`` threads (default 2 on the CPU), XLA:CPU on its own intra-op
pool, one thread per core this process may use (recorded as ``xla_cpu_threads``).

``--ours-xla-flags`` sets ``XLA_FLAGS`` for our runs only (recorded as ``ours_xla_flags`` and
in each run's ``xla_flags``), e.g. ``--ours-xla-flags=--xla_cpu_experimental_ynn_fusion_type=dot,reduce``.

The reference is never imported here: it runs as a separate process, from sources outside
this checkout (``--tface``, ``--torchjpeg``; see ``../shared/reference/README.md``).

One JSON line per case: ``ours_images_per_s``, ``ref_images_per_s``, ``ratio`` (ours / ref,
both as global batch / median step time; with several rounds the medians are over the timed
steps of all rounds), both medians and minima, ``ratio_min`` (from the minima), the machine,
its load average around each run, the command, and the raw lines of every run under
``ours_runs`` / ``ref_runs``. A run that fails is recorded with its exit status and the
tail of its output, and the comparison goes on with the next case.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_REF_BENCH = os.path.normpath(os.path.join(REPO, "..", "shared", "reference", "ref_bench.py"))
sys.path.insert(0, HERE)

from train_step import ALL_CASES, DEFAULT_CASES  # noqa: E402  (jax imported, no device work)
from _common import cpu_model  # noqa: E402


def run_json(cmd: list[str], out_path: str, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` (which appends JSON lines to ``out_path``) -> its last line as a dict, plus timing/load."""
    if os.path.exists(out_path):
        os.remove(out_path)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-3000:]
    wall = time.perf_counter() - t0
    meta = {"wall_s": round(wall, 1), "load_avg_1min_before": round(load0, 2),
            "load_avg_1min_after": round(os.getloadavg()[0], 2), "argv": shlex.join(cmd)}
    lines = []
    if os.path.exists(out_path):
        with open(out_path) as f:
            lines = [ln for ln in f if ln.strip()]
    if rc != 0 or not lines:
        return {"error": f"exit status {rc}", "output_tail": tail, **meta}
    return {**json.loads(lines[-1]), "_run": meta}


def pooled(runs: list[dict]) -> dict | None:
    """Median/min over the timed steps of all successful runs -> summary, or None."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    times = [t for r in ok for t in r["times_s"]]
    batch = ok[0].get("global_batch", ok[0]["batch_size"])
    med = statistics.median(times)
    return {"images_per_s": batch / med, "median_s": med, "min_s": min(times), "steps": len(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", required=True,
                    help="python of the reference's venv (torch, numpy, scipy, pyyaml)")
    ap.add_argument("--ref-bench", default=DEFAULT_REF_BENCH,
                    help="the reference benchmark script (default: %(default)s)")
    ap.add_argument("--tface", required=True,
                    help="TFace sources (the folder holding recognition/), outside the checkout")
    ap.add_argument("--torchjpeg", required=True, help="torchjpeg sources (the folder holding src/)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma list of {ALL_CASES}, or 'all'")
    ap.add_argument("--rounds", type=int, default=1, help="ours/ref alternations per case")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the reference")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="the reference's device (ours runs on JAX's default backend)")
    ap.add_argument("--ours-args", default="", help="extra arguments for bench/train_step.py, e.g. '--bf16'")
    ap.add_argument("--ours-xla-flags", default=None,
                    help="XLA_FLAGS for our runs only (default: this process's XLA_FLAGS, if any)")
    ap.add_argument("--ref-args", default="", help="extra arguments for ref_bench.py, e.g. '--amp'")
    ap.add_argument("--compile-cache", default=os.path.join(tempfile.gettempdir(), "ppfr_bench_xla_cache"),
                    help="persistent XLA compilation cache for our runs ('' = none; compile time is never timed)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--out", default="", help="also append the JSON lines to this file")
    a = ap.parse_args()
    names = ALL_CASES.split(",") if a.cases == "all" else [c for c in a.cases.split(",") if c]
    unknown = [n for n in names if n not in ALL_CASES.split(",")]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; known: {ALL_CASES}")
    if a.steps < 5:
        print(f"note: --steps {a.steps} < 5: fewer timed steps than the benchmark's definition", file=sys.stderr)
    ref_bench = os.path.abspath(a.ref_bench)
    for path, flag in ((a.ref_python, "--ref-python"), (ref_bench, "--ref-bench"), (a.tface, "--tface"),
                       (a.torchjpeg, "--torchjpeg")):
        if not os.path.exists(path):
            ap.error(f"{flag}: {path!r} does not exist")
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    common = ["--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    machine = {"machine": platform.machine(), "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
               "cores_usable": len(os.sched_getaffinity(0)), "xla_cpu_threads": len(os.sched_getaffinity(0)),
               "torch_threads": a.threads, "node": platform.node()}

    with tempfile.TemporaryDirectory(prefix="ppfr_compare_") as tmp:
        for name in names:
            ours_out, ref_out = os.path.join(tmp, "ours.jsonl"), os.path.join(tmp, "ref.jsonl")
            ours_cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--cases", name, *common,
                        "--num-classes", str(a.classes), "--out", ours_out, *shlex.split(a.ours_args)]
            if a.compile_cache:
                ours_cmd += ["--compile-cache", a.compile_cache]
            ref_cmd = [a.ref_python, ref_bench, "--tface", a.tface, "--torchjpeg", a.torchjpeg, "--cases", name,
                       *common, "--classes", str(a.classes), "--threads", str(a.threads), "--device", a.device,
                       "--out", ref_out, *shlex.split(a.ref_args)]
            ours_env = dict(os.environ)
            if a.ours_xla_flags is not None:
                ours_env["XLA_FLAGS"] = a.ours_xla_flags
            ours_runs, ref_runs = [], []
            for r in range(a.rounds):
                ours_runs.append(run_json(ours_cmd, ours_out, a.timeout, ours_env))
                print(f"[compare] {name} round {r + 1}/{a.rounds}: ours "
                      f"{ours_runs[-1].get('images_per_s', ours_runs[-1].get('error'))}", file=sys.stderr, flush=True)
                ref_runs.append(run_json(ref_cmd, ref_out, a.timeout))
                print(f"[compare] {name} round {r + 1}/{a.rounds}: ref "
                      f"{ref_runs[-1].get('images_per_s', ref_runs[-1].get('error'))}", file=sys.stderr, flush=True)
            o, f = pooled(ours_runs), pooled(ref_runs)
            rec = {"bench": "compare", "case": name, "rounds": a.rounds, "batch": a.batch, "classes": a.classes,
                   "warmup": a.warmup, "steps": a.steps,
                   "ours_images_per_s": o and o["images_per_s"], "ref_images_per_s": f and f["images_per_s"],
                   "ratio": o and f and o["images_per_s"] / f["images_per_s"],
                   "ours_median_s": o and o["median_s"], "ours_min_s": o and o["min_s"],
                   "ref_median_s": f and f["median_s"], "ref_min_s": f and f["min_s"],
                   "ratio_min": o and f and f["min_s"] / o["min_s"],
                   "ours_xla_flags": ours_env.get("XLA_FLAGS", ""), **machine, "command": command,
                   "ours_runs": ours_runs, "ref_runs": ref_runs}
            line = json.dumps(rec)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as fh:
                    fh.write(line + "\n")


if __name__ == "__main__":
    main()
