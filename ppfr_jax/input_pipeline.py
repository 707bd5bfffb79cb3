"""Deprecated: the old home of the input pipeline, kept so scripts written against it still run.

The pipeline now lives in ``ppfr_jax.data`` (``records``: TFRecord framing and
writers; ``sources``: TFace / RecordIO / image-folder sources; ``pipeline``:
``TrainIterator``), and ``python -m ppfr_jax.input_pipeline verify|to-tfrecord``
is the ``ppfr-records`` command (``ppfr_jax.cli.records``). Importing this
module warns (``DeprecationWarning``) and re-exports the old names; it imports
TensorFlow (through ``ppfr_jax.data.pipeline``), as the old module did.
"""
from __future__ import annotations

import sys
import warnings

from ppfr_jax.data.pipeline import TrainIterator
from ppfr_jax.data.records import BadRecordError, ShardReader, write_tface_records
from ppfr_jax.data.sources import image_folder_to_tface, tface_source

warnings.warn("ppfr_jax.input_pipeline is deprecated: import from ppfr_jax.data (TrainIterator, tface_source, "
              "write_tface_records, BadRecordError) and run 'ppfr-records' instead of "
              "'python -m ppfr_jax.input_pipeline'", DeprecationWarning, stacklevel=2)

__all__ = ["BadRecordError", "ShardReader", "TrainIterator", "image_folder_to_tface", "tface_source",
           "write_tface_records"]

if __name__ == "__main__":
    from ppfr_jax.cli import records
    print("python -m ppfr_jax.input_pipeline is deprecated: run 'ppfr-records' (same sub-commands)", file=sys.stderr)
    sys.exit(records.main(sys.argv[1:]))
