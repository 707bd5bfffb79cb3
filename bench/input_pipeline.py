"""Training input pipeline throughput on the embedded demo set (TFace tfrecord, 112x112 JPEG q90).

    python bench/input_pipeline.py [--batch 256] [--steps 40] [--threads 1,0] [--sources tfrecord,recordio]
                                   [--loaders tf,numpy]

``recordio``: the same 2729 faces (the same JPEG bytes) written as an insightface
MXNet RecordIO pack (``write_recordio_pack``, into a temporary folder) and read by
``recordio_source``: no Example parse, no landmarks.

``--loaders``: ``tf`` (tf.data's ``TrainIterator``) and ``numpy`` (``NumpyTrainIterator``, PIL
decoding on a thread pool, no TensorFlow: ``config.data.loader``).

One JSON line per configuration: images/s, and images/s per CPU core
(threads=N pins tf.data's private pool, or the numpy loader's decoding pool, to N threads, so
images/s / N; threads=0 is the loader's default over all cores, divided by the cores this
process may use).
The pipeline: index lookup, record read by offset (os.pread), Example parse, JPEG
decode, random flip (+ landmark mirroring), normalisation to [-1, 1], batching.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit  # noqa: E402
from ppfr_jax.data import example_proto, loader_class  # noqa: E402
from ppfr_jax.data.recordio import recordio_source, write_recordio_pack  # noqa: E402
from ppfr_jax.data.sources import tface_source  # noqa: E402
from ppfr_jax.demo_data import demo_paths  # noqa: E402


def run(src, batch, steps, threads, with_landmarks, dtype, loader="tf"):
    it = loader_class(loader)(src, global_batch=batch, seed=0, with_landmarks=with_landmarks, output_dtype=dtype,
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
    p.add_argument("--sources", default="tfrecord,recordio", help="comma list of tfrecord, recordio")
    p.add_argument("--loaders", default="tf,numpy", help="comma list of tf, numpy (config.data.loader)")
    a = p.parse_args()
    paths = demo_paths()
    tfr = tface_source(paths["train_index"], paths["train_root"])
    cores = len(os.sched_getaffinity(0))
    tmp = tempfile.TemporaryDirectory()
    for name in a.sources.split(","):
        if name == "tfrecord":
            src, configs = tfr, ((False, "float32"), (True, "float32"), (False, "uint8"))
            dataset = "demo TFR-lfw_demo (2729 x 112x112 JPEG q90)"
        else:
            recs = ((example_proto.parse(tfr.read_bytes(i)).features.feature["image"].bytes_list.value[0],
                     int(tfr.labels[i])) for i in range(len(tfr)))
            write_recordio_pack(recs, tmp.name, num_classes=tfr.num_classes)
            src, configs = recordio_source(tmp.name), ((False, "float32"), (False, "uint8"))
            dataset = "demo faces as an insightface pack (2729 x 112x112 JPEG q90, train.rec/.idx)"
        for loader, threads in ((lo, int(t)) for lo in a.loaders.split(",") for t in a.threads.split(",")):
            for with_lm, dtype in configs:
                ips = run(src, a.batch, a.steps, threads, with_lm, dtype, loader)
                used = threads if threads else cores
                emit({"bench": "input_pipeline", "loader": loader, "source": name, "dataset": dataset,
                      "batch": a.batch, "steps": a.steps, "threads": threads or "default", "cpu_cores": cores,
                      "landmarks": with_lm, "output_dtype": dtype, "images_per_s": round(ips, 1),
                      "images_per_s_per_core": round(ips / used, 1),
                      "load_average_1min": round(os.getloadavg()[0], 2)})

if __name__ == "__main__":
    main()
