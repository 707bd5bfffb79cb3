"""Training data for the engine: ``train_source(config, global_batch, start_step)``.

Dispatches on ``config.data.source``: ``synthetic`` (:mod:`.synthetic`),
``demo`` / ``image_folder`` / ``tfrecord`` (:mod:`.sources` listed) and
``recordio`` (insightface packs, :mod:`.recordio`), read by
``config.data.loader`` (:func:`loader_class`: tf.data's :mod:`.pipeline`, or
:mod:`.host_loader`'s numpy + PIL threads without TensorFlow; ``"auto"``
picks tf.data when TensorFlow imports), and ``tfds`` (:mod:`.tfds`, tf.data).
``import ppfr_jax.data``, the sources, the numpy loader and the
model/training core work without TensorFlow; it is imported only by
:mod:`.pipeline`, :mod:`.tfds` and the record writers. The other names below
(``tface_source``, ``TrainIterator``, ...) load their module on first use.

Every source yields per-host numpy batches ``{'image': uint8 (B_local, 112,
112, 3), 'label': int32 (B_local,)[, 'landmarks': float32 (B_local, K, 2)]}``
starting at ``start_step`` (exact resume position), B_local = global_batch //
process_count.
"""
from __future__ import annotations

import importlib

from ppfr_jax.errors import PpfrError
from ppfr_jax.data.records import BadRecordError, ShardReader, crc32c, masked_crc32c, write_tface_records
from ppfr_jax.data.recordio import RecordIOSource, recordio_source, write_recordio_pack
from ppfr_jax.data.synthetic import synthetic_batches

__all__ = ["BadRecordError", "RecordIOSource", "recordio_source", "write_recordio_pack", "ShardReader", "crc32c", "masked_crc32c", "synthetic_batches", "train_source",
           "write_tface_records"]

# name -> submodule, loaded on first access (PEP 562); pipeline and tfds import TensorFlow
_LAZY = {
    **dict.fromkeys(["IMAGE_EXTENSIONS", "LANDMARK_RANGE", "MAX_LABEL", "Source", "image_folder_source",
                     "image_folder_to_tface", "landmark_problem", "read_tface_index", "source_from_config",
                     "tface_source"], "sources"),
    **dict.fromkeys(["TrainIterator"], "pipeline"),
    **dict.fromkeys(["NumpyTrainIterator", "RecordStream", "epoch_permutation", "host_batch_indices", "flip_coins"],
                    "host_loader"),
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
    from ppfr_jax.data.sources import source_from_config
    src = source_from_config(config)
    it = loader_class(d.get("loader", "auto"))(src, with_landmarks=bool(d.get("landmarks", False)),
                                                skip_bad=bool(d.get("skip_bad", False)), **common)
    return it, src.num_classes, len(src)


TF_IMPORT_ERROR = ""  # why loader_class("auto") fell back to numpy, for the engine's console line


class LoaderUnavailable(PpfrError, ImportError):
    """``config.data.loader='tf'`` where TensorFlow does not import."""


def loader_class(loader: str = "auto"):
    """``config.data.loader`` -> the iterator class for listed sources.

    ``"tf"``: :class:`~ppfr_jax.data.pipeline.TrainIterator` (tf.data; TensorFlow is imported here);
    ``"numpy"``: :class:`~ppfr_jax.data.host_loader.NumpyTrainIterator` (numpy + PIL threads, no
    TensorFlow); ``"auto"``: tf.data when TensorFlow imports, else numpy (same records in the same
    order; the flips are drawn differently: see :mod:`.host_loader`).

    Raises:
      ValueError: an unknown loader; LoaderUnavailable (an ImportError) naming
      ``data.loader=numpy`` for ``"tf"`` without TensorFlow.
    """
    if loader not in ("auto", "tf", "numpy"):
        raise ValueError(f"config.data.loader: must be 'auto', 'tf' or 'numpy', got {loader!r}")
    global TF_IMPORT_ERROR
    if loader != "numpy":
        try:
            from ppfr_jax.data.pipeline import TrainIterator  # TensorFlow enters here
            return TrainIterator
        except Exception as e:  # noqa: BLE001  (not installed, or a broken install: protobuf TypeErrors and the like)
            TF_IMPORT_ERROR = f"{type(e).__name__}: {e}"
            if loader == "tf":
                raise LoaderUnavailable(f"config.data.loader='tf' needs TensorFlow ({TF_IMPORT_ERROR}); install it "
                                        "(pip install tensorflow-cpu) or use --config.data.loader=numpy") from None
    from ppfr_jax.data.host_loader import NumpyTrainIterator
    return NumpyTrainIterator
