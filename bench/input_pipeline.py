"""Training input pipeline throughput on the embedded demo set (TFace tfrecord, 112x112 JPEG q90).

    python bench/input_pipeline.py [--batch 256] [--steps 40] [--threads 1,0]

One JSON line per configuration: images/s, and images/s per CPU core
(threads=N pins tf.data's private pool to N threads, so images/s / N; threads=0
is TF's default pool over all cores, divided by the cores this process may use).
The pipeline: index lookup, record read by offset (os.pread), Example parse, JPEG
decode, random flip (+ landmark mirroring), normalisation to [-1, 1], batching.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit  # noqa: E402
from ppfr_jax.data.pipeline import TrainIterator  # noqa: E402
from ppfr_jax.data.sources import tface_source  # noqa: E402
from ppfr_jax.demo_data import demo_paths  # noqa: E402


def run(src, batch, steps, threads, with_landmarks, dtype):
    it = TrainIterator(src, global_batch=batch, seed=0, with_landmarks=with_landmarks, output_dtype=dtype,
                       threads=threads or None, process_index=0, process_count=1, prefetch=2)
    for _ in range(3):  # warm-up: graph building, thread start, first file reads
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    dt = time.perf_counter() - t0
    return steps * batch / dt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", default="1,0", help="comma list; 0 = TF default pool (all cores)")
    a = p.parse_args()
    paths = demo_paths()
    src = tface_source(paths["train_index"], paths["train_root"])
    cores = len(os.sched_getaffinity(0))
    for threads in (int(t) for t in a.threads.split(",")):
        for with_lm, dtype in ((False, "float32"), (True, "float32"), (False, "uint8")):
            ips = run(src, a.batch, a.steps, threads, with_lm, dtype)
            used = threads if threads else cores
            emit({"bench": "input_pipeline", "dataset": "demo TFR-lfw_demo (2729 x 112x112 JPEG q90)",
                  "batch": a.batch, "steps": a.steps, "threads": threads or "default", "cpu_cores": cores,
                  "landmarks": with_lm, "output_dtype": dtype, "images_per_s": round(ips, 1),
                  "images_per_s_per_core": round(ips / used, 1),
                  "load_average_1min": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
