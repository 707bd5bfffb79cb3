"""Training data for the engine: ``train_source(config, global_batch, start_step)``.

Dispatches on ``config.data.source``: ``synthetic`` (:mod:`.synthetic`, no
TensorFlow), ``demo`` / ``image_folder`` / ``tfrecord`` (:mod:`.sources` listed,
``recordio``: insightface packs, :mod:`.recordio`,
:mod:`.pipeline` read through tf.data) and ``tfds`` (:mod:`.tfds`). TensorFlow
is imported only when a tf.data source is asked for, so ``import
ppfr_jax.data`` and the model/training core work without it; so do
:mod:`.records` (TFRecord framing, CRC32C, ``ShardReader``) and
``BadRecordError``. The other names below (``tface_source``,
``TrainIterator``, ...) load their module, and TensorFlow, on first use.

Every source yields per-host numpy batches ``{'image': uint8 (B_local, 112,
112, 3), 'label': int32 (B_local,)[, 'landmarks': float32 (B_local, K, 2)]}``
starting at ``start_step`` (exact resume position), B_local = global_batch //
process_count.
"""
from __future__ import annotations

import importlib

from ppfr_jax.data.records import BadRecordError, ShardReader, crc32c, masked_crc32c, write_tface_records
from ppfr_jax.data.recordio import RecordIOSource, recordio_source, write_recordio_pack
from ppfr_jax.data.synthetic import synthetic_batches

__all__ = ["BadRecordError", "RecordIOSource", "recordio_source", "write_recordio_pack", "ShardReader", "crc32c", "masked_crc32c", "synthetic_batches", "train_source",
           "write_tface_records"]

# name -> submodule that imports TensorFlow; loaded on first access (PEP 562)
_LAZY = {
    **dict.fromkeys(["IMAGE_EXTENSIONS", "LANDMARK_RANGE", "MAX_LABEL", "Source", "image_folder_source",
                     "image_folder_to_tface", "landmark_problem", "read_tface_index", "source_from_config",
                     "tface_source"], "sources"),
    **dict.fromkeys(["TrainIterator", "epoch_permutation", "host_batch_indices"], "pipeline"),
    **dict.fromkeys(["TfdsIterator", "tfds_train_iterator"], "tfds"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def train_source(config, global_batch: int, start_step: int):
    """-> (iterator of per-host numpy batches, num_classes, dataset_size).

    Batches hold uint8 images (normalised on the device), int32 labels and,
    with ``config.data.landmarks``, float32 landmarks (B, K, 2).

    Raises:
      ValueError: an unknown ``config.data.source`` or an incomplete one;
      BadRecordError: a source whose listing finds bad data (names file and line).
    """
    d = config.data
    if d.source == "synthetic":
        n = int(d.num_classes)
        return synthetic_batches(config, global_batch, start_step, n), n, max(global_batch * 10, 1)
    common = dict(global_batch=global_batch, seed=int(config.seed), start_step=start_step,
                  flip=bool(d.get("flip", True)), output_dtype=d.get("host_dtype", "uint8"))
    if d.source == "tfds":
        from ppfr_jax.data.tfds import TfdsIterator  # TensorFlow (+ tensorflow_datasets) enters here
        it = TfdsIterator(d.tfds_name, d.get("tfds_split", "train"), data_dir=d.get("path") or None,
                          shuffle_buffer=int(d.get("shuffle_buffer", 2048)), **common)
        return it, it.num_classes, it.dataset_size
    from ppfr_jax.data.pipeline import TrainIterator  # TensorFlow enters here
    from ppfr_jax.data.sources import source_from_config
    src = source_from_config(config)
    it = TrainIterator(src, with_landmarks=bool(d.get("landmarks", False)),
                       skip_bad=bool(d.get("skip_bad", False)), **common)
    return it, src.num_classes, len(src)
