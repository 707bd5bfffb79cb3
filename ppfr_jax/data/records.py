"""TFace's record format without TensorFlow: TFRecord framing, CRC32C, random access by offset.

A shard is a sequence of TFRecord records: ``uint64 length``, ``uint32
masked CRC32C(length)``, ``length`` payload bytes (a serialised
``tf.train.Example``), ``uint32 masked CRC32C(payload)``; an index line names
a record by its byte offset in its shard. :class:`ShardReader` reads a payload
at an offset with ``os.pread`` and checks both CRCs (``google-crc32c``).
:func:`write_tface_records` writes TFace's layout (``<name>.txt`` training
index, ``<name>/<name>-%05d.tfrecord`` shards, ``<name>/<name>.index`` key
map); only it needs TensorFlow (``tf.train.Example``, ``TFRecordWriter``),
imported when it is called, through :func:`import_tensorflow`, which also
keeps TensorFlow off the accelerators JAX owns.

Errors: :class:`BadRecordError` (a ``PpfrError`` and ``ValueError``) names
the shard and the offset of a record that is not one, truncated or corrupt.
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Iterable

import google_crc32c
import numpy as np

from ppfr_jax.errors import PpfrError

HEADER = 12  # uint64 length + uint32 masked CRC32C of the length
FOOTER = 4  # uint32 masked CRC32C of the data


def import_tensorflow():
    """-> the ``tensorflow`` module, hidden from GPUs and TPUs (the input pipeline runs on the host CPU)."""
    import tensorflow as tf  # heavy and optional: only the tf.data sources and the writers need it
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass
    return tf


class BadRecordError(PpfrError, ValueError):
    """A training record cannot be used; the message names the file and line/offset."""


# appended to a BadRecordError's message: how to skip such records instead of stopping
SKIP_BAD_HINT = "(--config.data.skip_bad=True skips it)"
SKIP_BAD_HINT_RECORDS = "(skip_bad skips it: --config.data.skip_bad=True in training, --skip-bad in ppfr-records)"


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data`` (``google-crc32c``: hardware-accelerated C)."""
    return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15, add 0xa282ead8."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class ShardReader:
    """Random access to TFRecord-framed records by byte offset (``os.pread``; thread-safe)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    self._fds[path] = fd
        return fd

    def header(self, path: str, offset: int) -> int:
        """Validate the record header at ``offset``; -> payload length. Raises BadRecordError."""
        head = os.pread(self._fd(path), HEADER, offset)
        if len(head) < HEADER:
            raise BadRecordError(f"{path}: offset {offset} is past the end of the shard "
                                 f"({offset + len(head)} bytes)")
        (length,) = struct.unpack("<Q", head[:8])
        (crc,) = struct.unpack("<I", head[8:])
        if masked_crc32c(head[:8]) != crc:
            raise BadRecordError(f"{path}: offset {offset} is not the start of a TFRecord record "
                                 f"(length CRC mismatch)")
        return length

    def read(self, path: str, offset: int) -> bytes:
        """-> the record payload (a serialised ``tf.train.Example``), its CRC32C checked.

        Raises BadRecordError naming the shard and offset: a header that is not a
        record's, a truncated record, or a payload whose CRC does not match (the
        bytes were damaged after writing; TensorFlow's reader says DataLossError).
        """
        length = self.header(path, offset)
        size = os.fstat(self._fd(path)).st_size
        if offset + HEADER + length + FOOTER > size:  # before reading: a damaged length must not allocate
            raise BadRecordError(f"{path}: record at offset {offset} is truncated: needs "
                                 f"{HEADER + length + FOOTER} bytes, the shard has "
                                 f"{size - offset} from there")
        data = os.pread(self._fd(path), length + FOOTER, offset + HEADER)
        if len(data) < length + FOOTER:
            raise BadRecordError(f"{path}: record at offset {offset} is truncated: needs "
                                 f"{HEADER + length + FOOTER} bytes, the shard has "
                                 f"{HEADER + len(data)} from there")
        (crc,) = struct.unpack("<I", data[length:])
        if masked_crc32c(data[:length]) != crc:
            raise BadRecordError(f"{path}: record at offset {offset}: data CRC mismatch, the record's "
                                 f"{length} bytes are corrupt")
        return data[:length]

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

# ----------------------------------------------------------------------------- writing TFace records


def _example(tf, image: bytes, landmarks: np.ndarray | None) -> bytes:
    feats = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}
    if landmarks is not None:
        flat = np.asarray(landmarks, np.float32).reshape(-1)
        feats["landmarks"] = tf.train.Feature(float_list=tf.train.FloatList(value=flat.tolist()))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def write_tface_records(records: Iterable[tuple[str, bytes, int, np.ndarray | None]],
                        out_root: str | os.PathLike, name: str, *,
                        shard_size: int = 500_000) -> dict[str, str]:
    """Write records in TFace's layout.

    Args:
      records: ``(key, encoded_image, label, landmarks (K, 2) normalised or None)``;
        ``key`` is the sample's name in the ``.index`` map (its source path, in TFace).
      out_root: receives ``<name>.txt`` (training index: name, shard, offset, label) and
        ``<name>/<name>-%05d.tfrecord`` + ``<name>/<name>.index`` (key, shard, offset).
      name: dataset name; TFace's loaders pick the tfrecord reader when it contains "TFR".
      shard_size: records per shard (TFace uses 500000).
    Returns:
      {"index": training index path, "dir": shard folder, "map": .index path,
       "count": number of records (as str)}.
    """
    tf = import_tensorflow()
    out_root = os.fspath(out_root)
    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    index_file = os.path.join(out_root, f"{name}.txt")
    map_file = os.path.join(d, f"{name}.index")
    writer, shard, offset, count = None, -1, 0, 0
    with open(index_file, "w", encoding="utf-8") as idx, open(map_file, "w", encoding="utf-8") as mp:
        for key, image, label, lm in records:
            if writer is None or count % shard_size == 0:
                if writer is not None:
                    writer.close()
                shard += 1
                offset = 0
                writer = tf.io.TFRecordWriter(os.path.join(d, f"{name}-{shard:05d}.tfrecord"))
            payload = _example(tf, image, lm)
            writer.write(payload)
            if "\t" in key or "\n" in key:
                raise ValueError(f"record key {key!r} contains a tab or newline")
            mp.write(f"{key}\t{shard}\t{offset}\n")
            idx.write(f"{name}\t{shard}\t{offset}\t{int(label)}\n")
            offset += len(payload) + HEADER + FOOTER
            count += 1
    if writer is not None:
        writer.close()
    return {"index": index_file, "dir": d, "map": map_file, "count": str(count)}
