"""The tf.data training iterator: a per-step record order (exact resume) over a :class:`~ppfr_jax.data.sources.Source`.

Order: epoch ``e`` visits the records in ``np.random.default_rng([seed,
e]).permutation(N)``, cut into ``N // global_batch`` global batches (the
remainder is dropped). Process ``p`` of ``P`` takes slice ``p`` of every
global batch, so step ``s`` alone fixes what every host reads (resume =
``start_step=s``) and the global batch does not depend on ``P``. The random
flip of a record is a function of ``(seed, its position in the stream)``.

Batches (numpy): ``image`` (B, H, W, 3) float32 / bfloat16 in [-1, 1] or
uint8 (``output_dtype``), ``label`` (B,) int32 and, with ``with_landmarks``,
``landmarks`` (B, K, 2) float32 normalised (a flip maps x -> 1 - x, order kept).
Images are decoded by ``image_io.decode_rgb``, as in evaluation. A bad record
stops the iterator with ``BadRecordError`` naming it; with ``skip_bad`` its
slot takes the next good record in source order (shapes and steps unchanged).
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from ppfr_jax import image_io
from ppfr_jax.data.host_loader import RecordStream, epoch_permutation, host_batch_indices, step_name  # noqa: F401
from ppfr_jax.data.records import BadRecordError, import_tensorflow
from ppfr_jax.data.sources import LANDMARK_RANGE, Source

tf = import_tensorflow()


# ----------------------------------------------------------------------------- tf.data


_UNDECODABLE = np.zeros((0, 0, 3), np.uint8)


def _decode_py(data) -> np.ndarray:
    if isinstance(data, np.ndarray):  # eager numpy_function: a 0-d object array
        data = data.item()
    try:
        return image_io.decode_rgb(bytes(data))
    except image_io.ImageDecodeError:
        # an empty image fails the assertion below: a plain op error (TF would otherwise log the Python
        # traceback); TrainIterator then names the record with Source.check
        return _UNDECODABLE


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 (H, W, 3) by ``image_io.decode_rgb``, the decoder every reader uses
    (evaluation, alignment, the client): same pixels in training and evaluation (see its doc)."""
    img = tf.numpy_function(_decode_py, [data], tf.uint8, stateful=False)
    with tf.control_dependencies([tf.debugging.assert_positive(tf.size(img), message="undecodable image")]):
        img = tf.identity(img)
    img.set_shape([None, None, 3])
    return img


DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "uint8": tf.uint8}


def flip_coin(seed: int, pos: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64), pos])) < 0.5


class TrainIterator(RecordStream):
    """Iterator of per-host training batches (numpy dicts) with a resumable position, read by tf.data.

    Args: those of :class:`~ppfr_jax.data.host_loader.RecordStream` (source, global_batch, seed,
    start_step, flip, with_landmarks, image_size, output_dtype, skip_bad, shuffle, process_index,
    process_count, prefetch), and ``threads``: size of tf.data's private thread pool (None: TF's
    default, all cores). :class:`~ppfr_jax.data.host_loader.NumpyTrainIterator` reads the same
    records in the same order without TensorFlow.

    Attributes:
      step: the global step of the next batch.
      steps_per_epoch: ``len(source) // global_batch``.
      skipped: messages for records skipped so far (listing problems included).
    """

    loader = "tf"

    def __init__(self, source: Source, *, threads: int | None = None, **kw):
        super().__init__(source, **kw)
        self.threads = threads
        self._it = None

    def reposition(self, step: int) -> None:
        """Continue from global batch ``step`` (the tf.data pipeline is rebuilt there)."""
        self._it = None
        self.step = int(step)

    # -- tf.data graph

    def _element_fn(self) -> Callable:
        src = self.source
        labels = tf.constant(src.labels)
        k = src.num_landmarks
        side_lm = tf.constant(src.landmarks) if (self.with_landmarks and src.landmarks is not None) else None
        if src.kind == "files":
            paths = tf.constant(src.files)
        else:
            spec = {"image": tf.io.FixedLenFeature([], tf.string)}
            if self.with_landmarks and src.landmarks is None:
                spec["landmarks"] = tf.io.FixedLenFeature([2 * k], tf.float32)

            def read_py(i):
                try:
                    return np.array(src.read_bytes(int(i)), dtype=object)
                except BadRecordError:  # an empty payload fails parsing below; check() names the record
                    return np.array(b"", dtype=object)
        seed, flip, size, dtype = self.seed, self.flip, self.image_size, DTYPES[self.output_dtype]
        with_lm = self.with_landmarks

        @tf.autograph.experimental.do_not_convert
        def element(idx, pos):
            out = {"label": tf.gather(labels, idx)}
            lm = None
            if src.kind == "files":
                img_bytes = tf.io.read_file(tf.gather(paths, idx))
            else:
                data = tf.numpy_function(read_py, [idx], tf.string, stateful=False)
                data.set_shape([])
                # recordio: read_bytes is the encoded image itself; tfrecord: a tf.train.Example
                feats = {} if src.kind == "recordio" else tf.io.parse_single_example(data, spec)
                img_bytes = data if src.kind == "recordio" else feats["image"]
                if "landmarks" in feats:
                    lm = tf.reshape(feats["landmarks"], [k, 2])
                    # a bad value stops the batch; TrainIterator then names the record (Source.check)
                    lo, hi = LANDMARK_RANGE
                    with tf.control_dependencies([
                            tf.debugging.assert_greater_equal(lm, lo, message="landmarks"),
                            tf.debugging.assert_less_equal(lm, hi, message="landmarks")]):
                        lm = tf.debugging.check_numerics(lm, "landmarks")
            if side_lm is not None:
                lm = tf.gather(side_lm, idx)
            img = decode_image(img_bytes)
            if size is not None:
                img = tf.cond(tf.reduce_all(tf.shape(img)[:2] == size), lambda: img,
                              lambda: tf.cast(tf.round(tf.clip_by_value(
                                  tf.image.resize(img, size, antialias=True), 0, 255)), tf.uint8))
                img.set_shape(list(size) + [3])
            if flip:
                coin = flip_coin(seed, pos)
                img = tf.cond(coin, lambda: tf.reverse(img, [1]), lambda: img)
                if lm is not None:
                    lm = tf.cond(coin, lambda: tf.stack([1.0 - lm[:, 0], lm[:, 1]], axis=1), lambda: lm)
            if dtype == tf.uint8:
                out["image"] = img
            else:
                out["image"] = tf.cast(tf.cast(img, tf.float32) / 127.5 - 1.0, dtype)
            if with_lm:
                out["landmarks"] = tf.cast(lm, tf.float32)
            return out

        return element

    def dataset(self, start_step: int | None = None) -> tf.data.Dataset:
        """The tf.data pipeline from ``start_step`` (no error diagnosis; :meth:`__next__` adds it)."""
        start = self.step if start_step is None else int(start_step)
        remap = self._remap.copy()
        local = self.local_batch
        cache: dict = {}  # its own: this runs on a tf.data thread

        # A numpy_function over a range rather than from_generator: same numpy order,
        # without a Python generator that tf.data must finalise at interpreter exit.
        def indices_py(step):
            return self._indices(int(step), cache, remap)

        @tf.autograph.experimental.do_not_convert
        def indices(step):
            # stateful: keeps tf.data's map_parallelization from running it concurrently
            idx, pos = tf.numpy_function(indices_py, [step], (tf.int64, tf.int64), stateful=True)
            idx.set_shape([local])
            pos.set_shape([local])
            return idx, pos

        ds = tf.data.Dataset.range(start, 2 ** 62).map(indices)  # sequential: the cache is not locked
        ds = ds.unbatch()
        ds = ds.map(self._element_fn(), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(local, drop_remainder=True)
        ds = ds.prefetch(self.prefetch)
        opts = tf.data.Options()
        opts.deterministic = True
        opts.threading.max_intra_op_parallelism = 1
        if self.threads:
            opts.threading.private_threadpool_size = int(self.threads)
        return ds.with_options(opts)

    # -- iteration with diagnosis

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._it = self.dataset().as_numpy_iterator()
            try:
                batch = next(self._it)
            except tf.errors.OpError as e:
                self._it = None
                self._handle_error(e)
                continue  # rebuilt with the bad records substituted
            self.step += 1
            return batch

    def _handle_error(self, err: tf.errors.OpError) -> None:
        idx = self.batch_indices(self.step)
        problems = {}
        for i in dict.fromkeys(int(v) for v in idx):
            p = self.source.check(i)
            if p is not None:
                problems[i] = p
        if not problems:
            raise RuntimeError(f"input pipeline failed at step {step_name(self.step)} and no record of that "
                               f"batch is bad on its own: {err.message.splitlines()[0]}") from err
        self._bad_batch(problems)
