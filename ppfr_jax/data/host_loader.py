"""The training record stream without TensorFlow: the same order as the tf.data iterator, read by numpy + PIL.

:class:`RecordStream` is what both loaders share: the per-step record order
(:func:`host_batch_indices`: epoch ``e`` visits ``default_rng([seed,
e]).permutation(N)``, process ``p`` takes slice ``p`` of every global batch),
the resume position and the bookkeeping of ``skip_bad`` (a bad record's slot
takes the next good record in source order). :class:`NumpyTrainIterator` reads
each host batch with ``image_io.decode_rgb`` (PIL) on a thread pool, one batch
ahead; ``pipeline.TrainIterator`` reads the same records through tf.data.

``config.data.loader`` picks one (``ppfr_jax.data.train_source``): ``"tf"``,
``"numpy"`` or ``"auto"`` (tf.data when TensorFlow imports, else numpy: a GPU
or TPU host whose image has jax but no TensorFlow trains on the same data).

The two loaders give the same records in the same order, with the same labels,
landmarks and pixels of every unflipped 112x112 record; they differ in two
draws TensorFlow makes its own way: which records are flipped (here
``default_rng([seed, pos, FLIP_STREAM]).random() < 0.5`` per stream position;
tf.data uses ``tf.random.stateless_uniform``) and the resize of an image of
another size (here PIL's bilinear with antialiasing, tf.data ``tf.image.resize``
with antialias: within a few grey levels). A run is therefore reproducible
with either loader, not across them.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
from PIL import Image

from ppfr_jax import image_io
from ppfr_jax.data import example_proto
from ppfr_jax.data.records import BadRecordError
from ppfr_jax.data.sources import landmark_problem

__all__ = ["RecordStream", "NumpyTrainIterator", "epoch_permutation", "host_batch_indices", "flip_coins", "step_name",
           "OUTPUT_DTYPES"]

OUTPUT_DTYPES = ("float32", "bfloat16", "uint8")
FLIP_STREAM = 0x0F11  # third word of the flip draw's seed, so it is not the epoch permutation's stream


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The record order of one epoch (int64 (n,))."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def host_batch_indices(step: int, n: int, global_batch: int, process_index: int, process_count: int,
                       seed: int, shuffle: bool = True, _cache: dict | None = None):
    """Records of one host's slice of global batch ``step``.

    Returns:
      (indices (L,) int64 into the source, positions (L,) int64 in the global
      stream), L = global_batch // process_count.
    """
    spe = n // global_batch
    epoch, b = divmod(int(step), spe)
    if not shuffle:
        order = None
    elif _cache is not None and _cache.get("epoch") == epoch:
        order = _cache["perm"]
    else:
        order = epoch_permutation(seed, epoch, n)
        if _cache is not None:
            _cache.update(epoch=epoch, perm=order)
    local = global_batch // process_count
    start = b * global_batch + process_index * local
    sel = np.arange(start, start + local, dtype=np.int64)
    idx = sel if order is None else order[sel]
    pos = int(step) * global_batch + process_index * local + np.arange(local, dtype=np.int64)
    return idx.astype(np.int64), pos


def step_name(batch_index: int) -> str:
    """How messages name global batch ``batch_index``: as the console counts training steps (from 1)."""
    return f"{int(batch_index) + 1} (batch index {int(batch_index)})"


def flip_coins(seed: int, positions: np.ndarray) -> np.ndarray:
    """The numpy loader's random flip of each stream position: bool (L,), p = 0.5, a function of (seed, pos)."""
    return np.array([np.random.default_rng([int(seed), int(p), FLIP_STREAM]).random() < 0.5
                     for p in np.asarray(positions).ravel()], bool)


class RecordStream:
    """Record order, resume position and ``skip_bad`` bookkeeping over a :class:`~ppfr_jax.data.sources.Source`.

    Args:
      source: a ``Source`` (``sources.tface_source`` / ``image_folder_source``) or a
        ``recordio.RecordIOSource``.
      global_batch: batch over all processes; a positive multiple of ``process_count``.
      seed: fixes the record order and the flips.
      start_step: first global batch to produce (resume = the step a checkpoint was saved at).
      flip: random horizontal flip (p = 0.5, landmarks mirrored as x -> 1 - x).
      with_landmarks: add ``landmarks`` (B, K, 2); the source must carry them.
      image_size: (H, W) every image is given; others are resized (bilinear). None: as decoded.
      output_dtype: "float32" / "bfloat16" (normalised to [-1, 1]) or "uint8" (0..255).
      skip_bad: skip bad records instead of raising BadRecordError.
      shuffle: False visits records in source order (evaluation-style).
      process_index / process_count: default ``jax.process_index() / jax.process_count()``.
      prefetch: batches prepared ahead.

    Attributes:
      step: the global step of the next batch.
      steps_per_epoch: ``len(source) // global_batch``.
      skipped: messages for records skipped so far (listing problems included).

    Raises:
      ValueError: a global batch the processes do not divide or larger than the source,
        landmarks asked of a source without them, an unknown ``output_dtype``.
    """

    def __init__(self, source, *, global_batch: int, seed: int = 0, start_step: int = 0,
                 flip: bool = True, with_landmarks: bool = False,
                 image_size: tuple[int, int] | None = (112, 112), output_dtype: str = "float32",
                 skip_bad: bool = False, shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2):
        self.source = source
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if global_batch <= 0 or global_batch % self.process_count:
            raise ValueError(f"global_batch {global_batch} must be a positive multiple of the "
                             f"{self.process_count} processes")
        if len(source) < global_batch:
            raise ValueError(f"the source has {len(source)} records, fewer than one global batch "
                             f"({global_batch})")
        if with_landmarks and source.num_landmarks == 0:
            raise ValueError("with_landmarks=True but the source carries no landmarks")
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {sorted(OUTPUT_DTYPES)}, got {output_dtype!r}")
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // self.process_count
        self.seed = int(seed)
        self.step = int(start_step)
        self.flip = flip
        self.with_landmarks = with_landmarks
        self.image_size = tuple(image_size) if image_size is not None else None
        self.output_dtype = output_dtype
        self.skip_bad = skip_bad
        self.shuffle = shuffle
        self.prefetch = prefetch
        self.steps_per_epoch = len(source) // self.global_batch
        self.skipped: list[str] = list(source.problems)
        self._remap = np.arange(len(source), dtype=np.int64)
        self._bad = np.zeros(len(source), bool)
        self._cache: dict = {}

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def state(self) -> dict:
        """Resume information: ``{"step": next step, "skipped": count}``."""
        return {"step": self.step, "skipped": len(self.skipped)}

    def batch_indices(self, step: int) -> np.ndarray:
        """Source indices this host reads for global batch ``step`` (after skip substitution)."""
        return self._indices(step, self._cache)[0]

    def _indices(self, step: int, cache: dict, remap: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(source indices after skip substitution by ``remap`` (default: the current map), stream positions)."""
        idx, pos = host_batch_indices(step, len(self.source), self.global_batch, self.process_index,
                                      self.process_count, self.seed, self.shuffle, cache)
        return (self._remap if remap is None else remap)[idx], pos

    def _bad_batch(self, problems: dict[int, str]) -> None:
        """Records found bad in the batch of ``self.step``: raise BadRecordError, or (skip_bad) remap them."""
        if not self.skip_bad:
            lines = "\n  ".join(problems.values())
            raise BadRecordError(f"bad training record(s) in the batch of step {step_name(self.step)}:\n  {lines}\n"
                                 "(--config.data.skip_bad=True skips bad records)") from None
        for i, msg in problems.items():
            self._bad[i] = True
            self.skipped.append(msg)
        self._rebuild_remap()

    def _rebuild_remap(self) -> None:
        n = len(self.source)
        good = np.flatnonzero(~self._bad)
        if good.size == 0:
            raise BadRecordError("every record of the source is bad")
        # Next good record in source order (wrapping around), so the slot keeps its shape.
        nxt = np.searchsorted(good, np.arange(n), side="left")
        self._remap = good[nxt % good.size]

    loader: str | None = None  # the subclass's name for results.json's data_loader ("tf", "numpy")

    def reposition(self, step: int) -> None:
        """Continue from global batch ``step`` (e.g. after falling back to an older checkpoint)."""
        self.step = int(step)

    def __iter__(self) -> Iterator[dict]:
        return self


class NumpyTrainIterator(RecordStream):
    """Per-host training batches (numpy dicts) read without TensorFlow; see the module doc.

    Args: those of :class:`RecordStream`, and ``threads``: decoding threads (default: the
    CPU count, at most 16; PIL releases the GIL while it decodes).

    Batches: ``image`` (B, H, W, 3) in ``output_dtype``, ``label`` (B,) int32 and, with
    ``with_landmarks``, ``landmarks`` (B, K, 2) float32. A bad record (framing, CRC,
    Example, undecodable image, landmarks) stops it with BadRecordError naming the record
    (``Source.check``'s message), or with ``skip_bad`` is skipped as tf.data's iterator does;
    a failure no record explains on its own (an I/O error that passes) is retried once, then
    raised as RuntimeError naming the record it came from.
    """

    loader = "numpy"

    def __init__(self, source, *, threads: int | None = None, **kw):
        super().__init__(source, **kw)
        self.threads = int(threads or min(16, os.cpu_count() or 1))
        self._pool = None
        self._ahead: dict[int, concurrent.futures.Future] = {}
        self._read_cache: dict = {}

    # -- one record

    def _record(self, i: int, pos: int, flip: bool):
        """-> (image uint8 (H, W, 3), landmarks (K, 2) float32 or None), or raises (any error: bad record)."""
        src = self.source
        data = src.read_bytes(int(i))
        lm = None
        if getattr(src, "kind", "") == "tfrecord":
            feats = example_proto.parse(data).features.feature
            data = feats["image"].bytes_list.value[0]
            if self.with_landmarks and src.landmarks is None:
                vals = np.asarray(feats["landmarks"].float_list.value if "landmarks" in feats else (), np.float32)
                # as tf.data's graph asserts them (Source.check then names the record and the field)
                if vals.size != 2 * src.num_landmarks or landmark_problem(vals) is not None:
                    raise BadRecordError(f"{src.describe(int(i))}: field 'landmarks'")
                lm = vals.reshape(-1, 2)
        if self.with_landmarks and src.landmarks is not None:
            lm = np.asarray(src.landmarks[int(i)], np.float32)
        img = image_io.decode_rgb(data, src.describe(int(i)))
        if self.image_size is not None and img.shape[:2] != self.image_size:
            h, w = self.image_size
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR, reducing_gap=None))
        if flip:
            img = img[:, ::-1]
            if lm is not None:
                lm = np.stack([1.0 - lm[:, 0], lm[:, 1]], axis=1).astype(np.float32)
        return np.ascontiguousarray(img), lm

    def _build(self, step: int, remap: np.ndarray) -> dict:
        """The host batch of ``step`` (read with ``remap``); raises _BatchError naming the failed records."""
        idx, pos = self._indices(step, self._read_cache, remap)
        coins = flip_coins(self.seed, pos) if self.flip else np.zeros(len(pos), bool)
        futs = [self._pool.submit(self._record, i, p, c) for i, p, c in zip(idx, pos, coins)]
        out, failed = [], []
        for i, f in zip(idx, futs):
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001  (any failure names its record below)
                failed.append((int(i), e))
        if failed:
            raise _BatchError(failed)
        images = np.stack([o[0] for o in out])
        if self.output_dtype != "uint8":
            images = (images.astype(np.float32) / 127.5 - 1.0).astype(
                ml_dtypes.bfloat16 if self.output_dtype == "bfloat16" else np.float32)
        batch = {"image": images, "label": np.asarray(self.source.labels[idx], np.int32)}
        if self.with_landmarks:
            batch["landmarks"] = np.stack([o[1] for o in out]).astype(np.float32)
        return batch

    def _submit(self, step: int):
        if step not in self._ahead:
            # _rebuild_remap assigns a new array (and drains what was read ahead): no copy needed
            self._ahead[step] = self._loader.submit(self._build, step, self._remap)

    def __next__(self) -> dict:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="ppfr-decode")
            self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ppfr-batch")
        retried = False
        while True:
            for s in range(self.step, self.step + max(1, int(self.prefetch))):
                self._submit(s)
            fut = self._ahead.pop(self.step)
            try:
                batch = fut.result()
            except _BatchError as e:
                self._drain()
                problems = {i: p for i, p in ((i, self.source.check(i)) for i, _ in e.failed) if p is not None}
                if problems:
                    self._bad_batch(problems)  # raises, or (skip_bad) remaps them
                    continue  # read again with the bad records substituted
                if not retried:  # no record is bad on its own: a passing error (I/O); read the batch once more
                    retried = True
                    continue
                i, err = e.failed[0]
                raise RuntimeError(f"input pipeline failed at step {step_name(self.step)} and no record of that batch is bad "
                                   f"on its own: {self.source.describe(i)}: {type(err).__name__}: {err}") from err
            self.step += 1
            self._submit(self.step + max(1, int(self.prefetch)) - 1)
            return batch

    def reposition(self, step: int) -> None:
        """Continue from global batch ``step`` (what was read ahead is dropped)."""
        self._drain()
        self.step = int(step)

    def _drain(self) -> None:
        """Drop the batches read ahead (the record map changed)."""
        for f in self._ahead.values():
            f.cancel()
        for f in self._ahead.values():
            if not f.cancelled():
                try:
                    f.result()
                except Exception:  # noqa: BLE001  (a read-ahead batch may hold the same bad record)
                    pass
        self._ahead.clear()

    def close(self) -> None:
        """Stop the decoding threads (also at interpreter exit)."""
        self._drain()
        for p in (self._pool, getattr(self, "_loader", None)):
            if p is not None:
                p.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class _BatchError(Exception):
    def __init__(self, failed):
        super().__init__(f"{len(failed)} record(s) failed")
        self.failed = failed
