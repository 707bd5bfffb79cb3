"""Training input pipeline (tf.data). The only module of ppfr_jax that imports TensorFlow.

Sources (each a random-access list of records ``(image, label[, landmarks])``):

- :func:`image_folder_source`: ``root/<identity>/<image>``, one folder per
  identity; labels are the ranks of the identity folders in sorted order.
- :func:`tface_source`: TFace's training format. Shards
  ``<data_root>/<name>/<name>-%05d.tfrecord`` hold TFRecord-framed
  ``tf.train.Example`` protos with the encoded image under ``"image"`` (and,
  written by this module, optional ``"landmarks"``: 2K floats, normalised
  (x, y) pairs); the index ``<index_root>/<name>.txt`` has one line per
  sample, ``name<TAB>shard<TAB>offset<TAB>label`` (exactly what TFace's
  ``IndexParser`` reads; ``offset`` is the byte offset of the record in its
  shard). A three-field form ``shard_file offset label`` is accepted too.
  :func:`write_tface_records` / :func:`image_folder_to_tface` write it (also
  TFace's ``<name>/<name>.index`` ``key<TAB>shard<TAB>offset`` map).
- :func:`tfds_train_iterator`: a TFDS dataset with an image and a
  ``ClassLabel`` feature (streamed, not random access).

Order and sharding. Epoch ``e`` visits the records in
``np.random.default_rng([seed, e]).permutation(N)``, cut into
``N // global_batch`` global batches (the remainder of an epoch is dropped,
as torch's ``drop_last``). Process ``p`` of ``P`` (``jax.process_index/count``)
takes slice ``p`` of every global batch (``global_batch // P`` records), so a
step's global batch is the same whatever the number of hosts, and step ``s``
alone fixes what every host reads: resuming is ``start_step=s``. The random
horizontal flip of a record is a function of ``(seed, its position in the
global stream)``, so it is reproducible too.

Each local batch is a dict of numpy arrays: ``image`` (B, H, W, 3) (float32
in [-1, 1] by default, or uint8 / bfloat16, see ``output_dtype``), ``label``
(B,) int32 and, with ``with_landmarks=True``, ``landmarks`` (B, K, 2) float32
normalised (x = column, y = row; see ``ppfr_jax.align``; points beyond the
crop, e.g. the jaw, fall slightly outside [0, 1] and are kept). A flip maps
``x -> 1 - x`` and keeps the point order, so after a flip WFLW point 96 (the
image-left eye before the flip) is on the image-right side. The landmark ROI
of DuetFace (a convex hull) does not depend on the order.

Bad data. Listing a source checks what is cheap (empty identity folders,
index lines pointing past a shard's end, record headers); bad images and
truncated records met while training stop the iterator with
:class:`BadRecordError` naming the file and index line / offset. With
``skip_bad=True`` a bad record is skipped instead: its slot is filled with
the next good record in source order (same identity, usually), so batch
shapes and the meaning of ``start_step`` do not change; the iterator's
``skipped`` list counts and names them.

Output batches become global ``jax.Array`` s with :func:`make_global_batch`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import struct
import sys
import threading
from typing import Callable, Iterable, Iterator, Sequence

import google_crc32c
import jax
import numpy as np
import tensorflow as tf

from ppfr_jax import image_io, safe_npz
from ppfr_jax.errors import PpfrError

# The input pipeline runs on the host CPU; TensorFlow must not claim accelerators JAX owns.
try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # already initialised, or no such device type
    pass

IMAGE_EXTENSIONS = image_io.EXTENSIONS
_HEADER = 12  # uint64 length + uint32 masked CRC32C of the length
_FOOTER = 4  # uint32 masked CRC32C of the data
MAX_LABEL = 2 ** 31 - 1  # labels are int32 on the device
# normalised landmark coordinates: the crop is [0, 1]; points beyond it (the jaw) are kept, garbage is not
LANDMARK_RANGE = (-1.0, 2.0)


class BadRecordError(PpfrError, ValueError):
    """A training record cannot be used; the message names the file and line/offset."""


# ----------------------------------------------------------------------------- TFRecord framing


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
        head = os.pread(self._fd(path), _HEADER, offset)
        if len(head) < _HEADER:
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
        if offset + _HEADER + length + _FOOTER > size:  # before reading: a damaged length must not allocate
            raise BadRecordError(f"{path}: record at offset {offset} is truncated: needs "
                                 f"{_HEADER + length + _FOOTER} bytes, the shard has "
                                 f"{size - offset} from there")
        data = os.pread(self._fd(path), length + _FOOTER, offset + _HEADER)
        if len(data) < length + _FOOTER:
            raise BadRecordError(f"{path}: record at offset {offset} is truncated: needs "
                                 f"{_HEADER + length + _FOOTER} bytes, the shard has "
                                 f"{_HEADER + len(data)} from there")
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


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    """A random-access list of N training records.

    Attributes:
      kind: ``"files"`` (one encoded image per file) or ``"tfrecord"``.
      files: image paths (files) or shard paths (tfrecord).
      file_id: (N,) int32, record -> ``files`` entry.
      offsets: (N,) int64 byte offsets in the shard (tfrecord; zeros for files).
      labels: (N,) int32 in [0, num_classes).
      num_classes: number of classes (max label + 1).
      landmarks: (N, K, 2) float32 normalised side landmarks (files), or None.
      record_landmarks: K > 0 when each record carries a ``landmarks`` feature.
      index_path / index_lines: where each record was declared (tfrecord), for messages.
      problems: what listing skipped (``skip_bad=True``), one message each.
      class_names: identity folder names (files), else None.
    """

    kind: str
    files: list[str]
    file_id: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    num_classes: int
    landmarks: np.ndarray | None = None
    record_landmarks: int = 0
    index_path: str | None = None
    index_lines: np.ndarray | None = None
    problems: list[str] = dataclasses.field(default_factory=list)
    class_names: list[str] | None = None

    def __post_init__(self):
        self._reader = ShardReader() if self.kind == "tfrecord" else None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_landmarks(self) -> int:
        if self.landmarks is not None:
            return int(self.landmarks.shape[1])
        return int(self.record_landmarks)

    def describe(self, i: int) -> str:
        """Human-readable location of record ``i`` (file, or shard + offset + index line)."""
        f = self.files[int(self.file_id[i])]
        if self.kind == "files":
            return f
        where = f"{f} offset {int(self.offsets[i])}"
        if self.index_path is not None and self.index_lines is not None:
            where += f" ({self.index_path} line {int(self.index_lines[i])})"
        return where

    def read_bytes(self, i: int) -> bytes:
        """Raw bytes of record ``i``: the encoded image (files) or the serialised Example."""
        path = self.files[int(self.file_id[i])]
        if self.kind == "files":
            with open(path, "rb") as fh:
                return fh.read()
        try:
            return self._reader.read(path, int(self.offsets[i]))
        except BadRecordError as e:
            raise BadRecordError(f"{e} [{self.describe(i)}]") from None

    def check(self, i: int) -> str | None:
        """Check record ``i`` as training reads it; -> the first problem, or None.

        The problem names the record (file, or shard + offset + index line) and the
        field: the TFRecord framing (header and data CRC32C), the Example, its
        ``image`` (decoded by ``image_io.decode_rgb``, as training does) and
        ``landmarks`` (count, finite, within ``LANDMARK_RANGE``).
        """
        where = self.describe(i)
        try:
            path = self.files[int(self.file_id[i])]
            if self.kind == "files":
                with open(path, "rb") as fh:
                    data = fh.read()
            else:
                data = self._reader.read(path, int(self.offsets[i]))
        except (BadRecordError, OSError) as e:
            return f"{where}: {e}"
        if self.kind == "tfrecord":
            try:
                feats = tf.train.Example.FromString(data).features.feature
            except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and the like)
                return f"{where}: not a tf.train.Example ({type(e).__name__}: {e})"
            if "image" not in feats or len(feats["image"].bytes_list.value) != 1:
                return f"{where}: field 'image': missing, or not exactly one bytes value"
            if self.record_landmarks:
                vals = feats["landmarks"].float_list.value if "landmarks" in feats else []
                if len(vals) != 2 * self.record_landmarks:
                    return f"{where}: field 'landmarks': {len(vals)} floats, expected {2 * self.record_landmarks}"
                problem = landmark_problem(np.asarray(vals, np.float32))
                if problem:
                    return f"{where}: field 'landmarks': {problem}"
            data = feats["image"].bytes_list.value[0]
        elif self.landmarks is not None:
            problem = landmark_problem(self.landmarks[i])
            if problem:
                return f"{where}: landmarks: {problem}"
        try:
            image_io.decode_rgb(data, "image")
        except image_io.ImageDecodeError as e:
            return f"{where}: field 'image': {str(e).removeprefix('image: ')}"
        return None


def landmark_problem(lm: np.ndarray) -> str | None:
    """Why normalised landmarks are unusable (non-finite, or outside ``LANDMARK_RANGE``), or None."""
    lm = np.asarray(lm, np.float32)
    if not np.isfinite(lm).all():
        return "non-finite values"
    lo, hi = LANDMARK_RANGE
    if lm.size and (lm.min() < lo or lm.max() > hi):
        return f"values in [{lm.min():.3g}, {lm.max():.3g}], outside the normalised range [{lo}, {hi}]"
    return None


def _list_images(folder: str, extensions: Sequence[str]) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(tuple(extensions)))


def image_folder_source(root: str | os.PathLike, *, skip_bad: bool = False,
                        landmarks: str | os.PathLike | None = None,
                        extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Source:
    """List ``root/<identity>/<image>``.

    Args:
      root: folder with one sub-folder per identity (files directly in ``root`` are ignored).
      skip_bad: skip empty identity folders and images without landmarks (counted in
        ``source.problems``) instead of raising.
      landmarks: optional ``.npz`` with ``paths`` (relative to ``root``, ``/``-separated)
        and ``landmarks`` (M, K, 2) normalised coordinates.
    Returns:
      a :class:`Source`; labels are ranks of the (non-empty) identity folders in sorted order.
    Raises:
      BadRecordError naming an empty identity folder or an image without landmarks.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    with os.scandir(root) as it:
        identities = sorted(e.name for e in it if e.is_dir())
    if not identities:
        raise BadRecordError(f"{root}: no identity sub-folders (expected root/<identity>/<image>)")
    files, labels, names, problems = [], [], [], []
    for name in identities:
        imgs = _list_images(os.path.join(root, name), extensions)
        if not imgs:
            msg = f"{os.path.join(root, name)}: identity folder contains no images ({'/'.join(extensions)})"
            if not skip_bad:
                raise BadRecordError(msg + " (pass skip_bad=True to skip it)")
            problems.append(msg)
            continue
        lab = len(names)
        names.append(name)
        files.extend(os.path.join(root, name, f) for f in imgs)
        labels.extend([lab] * len(imgs))
    lm = None
    if landmarks is not None:
        z = safe_npz.load_npz(landmarks, error=BadRecordError, names=("paths", "landmarks"))
        if "paths" not in z or "landmarks" not in z:
            raise BadRecordError(f"{landmarks}: needs arrays 'paths' and 'landmarks', has {sorted(z)}")
        table = {str(p): i for i, p in enumerate(z["paths"])}
        arr = np.asarray(z["landmarks"], np.float32)
        if arr.ndim != 3 or arr.shape[2] != 2:
            raise BadRecordError(f"{landmarks}: 'landmarks' must be (M, K, 2), got {arr.shape}")
        if len(z["paths"]) != len(arr):
            raise BadRecordError(f"{landmarks}: {len(z['paths'])} paths but {len(arr)} landmark rows")
        keep, rows = [], []
        for j, f in enumerate(files):
            rel = pathlib.Path(f).relative_to(root).as_posix()
            r = table.get(rel)
            problem = None if r is None else landmark_problem(arr[r])
            if r is None or problem:
                msg = (f"{f}: no landmarks for it in {landmarks}" if r is None else
                       f"{f}: landmarks (row {r} of {landmarks}): {problem}")
                if not skip_bad:
                    raise BadRecordError(msg + " (pass skip_bad=True to skip it)")
                problems.append(msg)
                continue
            keep.append(j)
            rows.append(r)
        files = [files[j] for j in keep]
        labels = [labels[j] for j in keep]
        lm = arr[np.asarray(rows, np.int64)] if rows else np.zeros((0,) + arr.shape[1:], np.float32)
    n = len(files)
    if n == 0:
        raise BadRecordError(f"{root}: no usable images")
    return Source(kind="files", files=files, file_id=np.arange(n, dtype=np.int32),
                  offsets=np.zeros(n, np.int64), labels=np.asarray(labels, np.int32),
                  num_classes=len(names), landmarks=lm, problems=problems, class_names=names)


def read_tface_index(index_path: str | os.PathLike, data_root: str | os.PathLike | None = None):
    """Parse a TFace training index.

    Lines: ``name<TAB>shard<TAB>offset<TAB>label`` (shard file
    ``<data_root>/<name>/<name>-%05d.tfrecord``) or ``shard_file offset label``
    (relative to ``data_root``). ``data_root`` defaults to the index's folder.

    Returns:
      (shard paths list, rows (M, 4) int64 = [shard id, offset, label, line number]).
    Raises:
      BadRecordError naming the index file and line of a malformed row.
    """
    index_path = os.fspath(index_path)
    root = os.fspath(data_root) if data_root is not None else os.path.dirname(os.path.abspath(index_path))
    shard_ids: dict[str, int] = {}
    shards: list[str] = []
    rows = []
    with open(index_path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            try:
                if len(parts) == 4:
                    name, shard, offset, label = parts
                    path = os.path.join(root, name, f"{name}-{int(shard):05d}.tfrecord")
                elif len(parts) == 3:
                    rel, offset, label = parts
                    path = rel if os.path.isabs(rel) else os.path.join(root, rel)
                else:
                    raise ValueError(f"expected 4 fields (name shard offset label) or 3 "
                                     f"(shard_file offset label), got {len(parts)}")
                offset, label = int(offset), int(label)
                if offset < 0:
                    raise ValueError(f"field 'offset': must be >= 0, got {offset}")
                if not 0 <= label <= MAX_LABEL:
                    raise ValueError(f"field 'label': must be in [0, {MAX_LABEL}], got {label}")
            except ValueError as e:
                raise BadRecordError(f"{index_path} line {line_no}: {e}: {line!r}") from None
            sid = shard_ids.get(path)
            if sid is None:
                sid = shard_ids[path] = len(shards)
                shards.append(path)
            rows.append((sid, offset, label, line_no))
    if not rows:
        raise BadRecordError(f"{index_path}: index file has no records")
    return shards, np.asarray(rows, np.int64)


def tface_source(index_path: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                 skip_bad: bool = False, check_headers: bool | None = None) -> Source:
    """Open a TFace tfrecord dataset through its index file (see :func:`read_tface_index`).

    Checks every shard exists and every offset lies inside its shard; with
    ``check_headers`` (default: when there are at most 2M records) it also
    reads each record's 12-byte header, which finds offsets that do not start
    a record and records truncated by the end of the shard.

    Raises:
      BadRecordError naming the index file, line, shard and offset (or, with
      ``skip_bad=True``, drops such lines and lists them in ``source.problems``).
    """
    index_path = os.fspath(index_path)
    shards, rows = read_tface_index(index_path, data_root)
    sizes = []
    for s in shards:
        try:
            sizes.append(os.path.getsize(s))
        except OSError:
            first = int(rows[rows[:, 0] == len(sizes), 3][0])
            raise BadRecordError(f"{index_path} line {first}: shard {s} not found") from None
    sizes = np.asarray(sizes, np.int64)
    problems = []
    bad = rows[:, 1] + _HEADER + _FOOTER > sizes[rows[:, 0]]
    if check_headers is None:
        check_headers = len(rows) <= 2_000_000
    reader = ShardReader()
    if check_headers:
        for j in np.flatnonzero(~bad):
            sid, off = int(rows[j, 0]), int(rows[j, 1])
            try:
                length = reader.header(shards[sid], off)
            except BadRecordError:
                bad[j] = True
                continue
            if off + _HEADER + length + _FOOTER > sizes[sid]:
                bad[j] = True
    for j in np.flatnonzero(bad):
        sid, off, _, line_no = (int(v) for v in rows[j])
        why = (f"offset {off} points past the end of shard {shards[sid]} ({sizes[sid]} bytes)"
               if off + _HEADER + _FOOTER > sizes[sid] else
               _header_problem(reader, shards[sid], off, int(sizes[sid])))
        msg = f"{index_path} line {line_no}: {why}"
        if not skip_bad:
            reader.close()
            raise BadRecordError(msg + " (pass skip_bad=True to skip it)")
        problems.append(msg)
    reader.close()
    rows = rows[~bad]
    if len(rows) == 0:
        raise BadRecordError(f"{index_path}: no usable records")
    src = Source(kind="tfrecord", files=shards, file_id=rows[:, 0].astype(np.int32),
                 offsets=rows[:, 1].copy(), labels=rows[:, 2].astype(np.int32),
                 num_classes=int(rows[:, 2].max()) + 1, index_path=index_path,
                 index_lines=rows[:, 3].copy(), problems=problems)
    # The first record tells whether the records carry landmarks, and how many.
    ex = tf.train.Example.FromString(src.read_bytes(0)).features.feature
    if "image" not in ex:
        raise BadRecordError(f"{src.describe(0)}: Example has no 'image' feature (keys: {sorted(ex)})")
    if "landmarks" in ex:
        n = len(ex["landmarks"].float_list.value)
        if n % 2:
            raise BadRecordError(f"{src.describe(0)}: 'landmarks' has an odd number of floats ({n})")
        src.record_landmarks = n // 2
    return src


def _header_problem(reader: ShardReader, path: str, off: int, size: int) -> str:
    try:
        length = reader.header(path, off)
    except BadRecordError as e:
        return str(e)
    return (f"record at offset {off} of shard {path} is truncated: needs {_HEADER + length + _FOOTER} "
            f"bytes, the shard ends {size - off} bytes after it")


# ----------------------------------------------------------------------------- writing TFace records


def _example(image: bytes, landmarks: np.ndarray | None) -> bytes:
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
            payload = _example(image, lm)
            writer.write(payload)
            if "\t" in key or "\n" in key:
                raise ValueError(f"record key {key!r} contains a tab or newline")
            mp.write(f"{key}\t{shard}\t{offset}\n")
            idx.write(f"{name}\t{shard}\t{offset}\t{int(label)}\n")
            offset += len(payload) + _HEADER + _FOOTER
            count += 1
    if writer is not None:
        writer.close()
    return {"index": index_file, "dir": d, "map": map_file, "count": str(count)}


def image_folder_to_tface(image_root: str | os.PathLike, out_root: str | os.PathLike, name: str, *,
                          landmarks: str | os.PathLike | None = None, shard_size: int = 500_000,
                          skip_bad: bool = False) -> dict[str, str]:
    """Convert ``image_root/<identity>/<image>`` to TFace records (the encoded bytes are kept as they are).

    Every image is decoded once first, so a corrupt file fails here (or is
    skipped with ``skip_bad``), not in the middle of training.
    """
    src = image_folder_source(image_root, skip_bad=skip_bad, landmarks=landmarks)
    root = os.fspath(image_root)

    def gen():
        for i in range(len(src)):
            problem = src.check(i)
            if problem is not None:
                if not skip_bad:
                    raise BadRecordError(problem + " (pass skip_bad=True to skip it)")
                src.problems.append(problem)
                continue
            rel = pathlib.Path(src.files[i]).relative_to(root).as_posix()
            lm = src.landmarks[i] if src.landmarks is not None else None
            yield rel, src.read_bytes(i), int(src.labels[i]), lm

    out = write_tface_records(gen(), out_root, name, shard_size=shard_size)
    out["skipped"] = str(len(src.problems))
    return out


# ----------------------------------------------------------------------------- order


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


def _decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 (H, W, 3) by ``image_io.decode_rgb``, the decoder every reader uses
    (evaluation, alignment, the client): same pixels in training and evaluation (see its doc)."""
    img = tf.numpy_function(_decode_py, [data], tf.uint8, stateful=False)
    with tf.control_dependencies([tf.debugging.assert_positive(tf.size(img), message="undecodable image")]):
        img = tf.identity(img)
    img.set_shape([None, None, 3])
    return img


_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "uint8": tf.uint8}


def _flip_coin(seed: int, pos: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64), pos])) < 0.5


class TrainIterator:
    """Iterator of per-host training batches (numpy dicts) with a resumable position.

    Args:
      source: a :class:`Source`.
      global_batch: batch over all processes; must be divisible by ``process_count``.
      seed: fixes the record order and the flips.
      start_step: first global batch to produce (resume = the step a checkpoint was saved at).
      flip: random horizontal flip (p = 0.5, landmarks mirrored as x -> 1 - x).
      with_landmarks: add ``landmarks`` (B, K, 2); the source must carry them.
      image_size: (H, W) every image must have; others are resized (bilinear). None: no check.
      output_dtype: "float32" / "bfloat16" (normalised to [-1, 1]) or "uint8" (raw 0..255,
        4x less host-to-device traffic; normalise on the device).
      skip_bad: skip bad records (see module doc) instead of raising BadRecordError.
      shuffle: False visits records in source order (evaluation-style).
      process_index / process_count: default ``jax.process_index() / jax.process_count()``.
      prefetch: batches prepared ahead.
      threads: size of tf.data's private thread pool (None: TF's default, all cores).

    Attributes:
      step: the global step of the next batch.
      steps_per_epoch: ``len(source) // global_batch``.
      skipped: messages for records skipped so far (listing problems included).
    """

    def __init__(self, source: Source, *, global_batch: int, seed: int = 0, start_step: int = 0,
                 flip: bool = True, with_landmarks: bool = False,
                 image_size: tuple[int, int] | None = (112, 112), output_dtype: str = "float32",
                 skip_bad: bool = False, shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2, threads: int | None = None):
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
        if output_dtype not in _DTYPES:
            raise ValueError(f"output_dtype must be one of {sorted(_DTYPES)}, got {output_dtype!r}")
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
        self.threads = threads
        self.steps_per_epoch = len(source) // self.global_batch
        self.skipped: list[str] = list(source.problems)
        self._remap = np.arange(len(source), dtype=np.int64)
        self._bad = np.zeros(len(source), bool)
        self._cache: dict = {}
        self._it = None

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def state(self) -> dict:
        """Resume information: ``{"step": next step, "skipped": count}``."""
        return {"step": self.step, "skipped": len(self.skipped)}

    def batch_indices(self, step: int) -> np.ndarray:
        """Source indices this host reads for global batch ``step`` (after skip substitution)."""
        idx, _ = host_batch_indices(step, len(self.source), self.global_batch, self.process_index,
                                    self.process_count, self.seed, self.shuffle, self._cache)
        return self._remap[idx]

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
        seed, flip, size, dtype = self.seed, self.flip, self.image_size, _DTYPES[self.output_dtype]
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
                feats = tf.io.parse_single_example(data, spec)
                img_bytes = feats["image"]
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
            img = _decode_image(img_bytes)
            if size is not None:
                img = tf.cond(tf.reduce_all(tf.shape(img)[:2] == size), lambda: img,
                              lambda: tf.cast(tf.round(tf.clip_by_value(
                                  tf.image.resize(img, size, antialias=True), 0, 255)), tf.uint8))
                img.set_shape(list(size) + [3])
            if flip:
                coin = _flip_coin(seed, pos)
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
            idx, pos = host_batch_indices(int(step), len(self.source), self.global_batch, self.process_index,
                                          self.process_count, self.seed, self.shuffle, cache)
            return remap[idx], pos

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

    def __iter__(self) -> Iterator[dict]:
        return self

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
            raise RuntimeError(f"input pipeline failed at step {self.step} and no record of that "
                               f"batch is bad on its own: {err.message.splitlines()[0]}") from err
        if not self.skip_bad:
            lines = "\n  ".join(problems.values())
            raise BadRecordError(f"bad training record(s) in the batch of step {self.step}:\n  {lines}\n"
                                 "(pass skip_bad=True to skip bad records)") from None
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


def make_train_iterator(source: Source, **kwargs) -> TrainIterator:
    """Shorthand for :class:`TrainIterator`."""
    return TrainIterator(source, **kwargs)


# ----------------------------------------------------------------------------- TFDS


class TfdsIterator:
    """Per-host batches from a TFDS dataset (streamed; resume replays ``start_step`` batches).

    Each process reads its own even part of the split
    (``tfds.split_for_jax_process``), shuffled with a buffer seeded by
    ``(seed, process_index)`` and repeated; deterministic, so ``start_step``
    reproduces the stream (by skipping, which reads the skipped records).
    """

    def __init__(self, name: str, split: str = "train", *, global_batch: int, seed: int = 0,
                 start_step: int = 0, data_dir: str | None = None, image_key: str = "image",
                 label_key: str = "label", flip: bool = True,
                 image_size: tuple[int, int] | None = (112, 112), output_dtype: str = "float32",
                 shuffle_buffer: int = 2048, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2):
        import tensorflow_datasets as tfds
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if global_batch <= 0 or global_batch % self.process_count:
            raise ValueError(f"global_batch {global_batch} must be a positive multiple of the "
                             f"{self.process_count} processes")
        builder = tfds.builder(name, data_dir=data_dir)
        feats = builder.info.features
        if image_key not in feats or label_key not in feats:
            raise ValueError(f"TFDS {name}: needs features {image_key!r} and {label_key!r}, has {list(feats)}")
        if not hasattr(feats[label_key], "num_classes"):
            raise ValueError(f"TFDS {name}: feature {label_key!r} is not a ClassLabel")
        self.num_classes = int(feats[label_key].num_classes)
        self.dataset_size = int(builder.info.splits[split].num_examples)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // self.process_count
        self.steps_per_epoch = self.dataset_size // self.global_batch
        self.step = int(start_step)
        self.skipped: list[str] = []
        sub = tfds.split_for_jax_process(split, process_index=self.process_index,
                                         process_count=self.process_count)
        ds = builder.as_dataset(split=sub, shuffle_files=False,
                                decoders={image_key: tfds.decode.SkipDecoding()})
        ds = ds.repeat().shuffle(shuffle_buffer, seed=(int(seed) * 1_000_003 + self.process_index) % (2 ** 31),
                                 reshuffle_each_iteration=True)
        ds = ds.skip(self.step * self.local_batch)
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.range(self.step * self.local_batch, 2 ** 62)))
        dtype = _DTYPES[output_dtype]
        pid = self.process_index
        n_classes = self.num_classes
        self.name = name

        @tf.autograph.experimental.do_not_convert
        def element(ex, pos):
            img = _decode_image(ex[image_key])
            if image_size is not None:
                img = tf.cast(tf.round(tf.clip_by_value(
                    tf.image.resize(img, image_size, antialias=True), 0, 255)), tf.uint8)
            if flip:
                img = tf.cond(_flip_coin(seed * 1009 + pid, pos), lambda: tf.reverse(img, [1]), lambda: img)
            img = img if dtype == tf.uint8 else tf.cast(tf.cast(img, tf.float32) / 127.5 - 1.0, dtype)
            label = tf.cast(ex[label_key], tf.int32)
            with tf.control_dependencies([tf.debugging.assert_non_negative(label, message="label < 0"),
                                          tf.debugging.assert_less(label, n_classes, message="label >= classes")]):
                label = tf.identity(label)
            return {"image": img, "label": label}

        ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(prefetch)
        self._it = ds.as_numpy_iterator()

    def state(self) -> dict:
        return {"step": self.step, "skipped": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            b = next(self._it)
        except tf.errors.OpError as e:  # a damaged image or an out-of-range label (the graph checks both)
            raise BadRecordError(f"TFDS {self.name}: a record of the batch of step {self.step} is bad: "
                                 f"{e.message.splitlines()[0]}") from None
        self.step += 1
        return b


def tfds_train_iterator(name: str, split: str = "train", **kwargs) -> TfdsIterator:
    """Shorthand for :class:`TfdsIterator`."""
    return TfdsIterator(name, split, **kwargs)


# ----------------------------------------------------------------------------- global arrays


def make_global_batch(local_batch: dict, mesh_sharding: jax.sharding.Sharding) -> dict:
    """Per-host numpy batch -> global ``jax.Array`` s sharded like ``mesh_sharding``.

    Args:
      local_batch: dict (any pytree) of arrays, leading axis = this host's
        ``global_batch // process_count`` rows.
      mesh_sharding: e.g. ``NamedSharding(mesh, P("data"))``; rows are split
        over the data axis (a rank-1 spec applies to every leaf's first axis).
    Returns:
      the same pytree of global arrays with leading axis = global batch.
    """
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(mesh_sharding, np.asarray(x)), local_batch)


# ----------------------------------------------------------------------------- config entry point


def source_from_config(config) -> Source | None:
    """``config.data`` -> Source (None for "tfds", which streams)."""
    d = config.data
    skip_bad = bool(d.get("skip_bad", False))
    if d.source == "demo":
        from ppfr_jax.demo_data import demo_paths
        p = demo_paths()
        return tface_source(p["train_index"], p["train_root"], skip_bad=skip_bad)
    if d.source == "tfrecord":
        index = d.get("index") or (d.path if os.path.isfile(d.path) else "")
        if not index:
            raise ValueError("config.data: source='tfrecord' needs data.index (the TFace .txt index) "
                             "or data.path pointing at it")
        root = d.path if d.path and os.path.isdir(d.path) else None
        return tface_source(index, root, skip_bad=skip_bad)
    if d.source == "image_folder":
        return image_folder_source(d.path, skip_bad=skip_bad, landmarks=d.get("landmarks_path") or None)
    if d.source == "tfds":
        return None
    raise ValueError(f"config.data.source={d.source!r} has no input pipeline here")


def train_source(config, global_batch: int, start_step: int):
    """Entry point for ``ppfr_jax.train``: -> (iterator of per-host numpy batches, num_classes, dataset_size).

    Batches hold uint8 images (normalised on the device), int32 labels and,
    with ``config.data.landmarks``, float32 landmarks (B, K, 2).
    """
    d = config.data
    common = dict(global_batch=global_batch, seed=int(config.seed), start_step=start_step,
                  flip=bool(d.get("flip", True)), output_dtype=d.get("host_dtype", "uint8"))
    src = source_from_config(config)
    if src is None:
        it = TfdsIterator(d.tfds_name, d.get("tfds_split", "train"), data_dir=d.get("path") or None,
                          shuffle_buffer=int(d.get("shuffle_buffer", 2048)), **common)
        return it, it.num_classes, it.dataset_size
    it = TrainIterator(src, with_landmarks=bool(d.get("landmarks", False)),
                       skip_bad=bool(d.get("skip_bad", False)), **common)
    return it, src.num_classes, len(src)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m ppfr_jax.input_pipeline to-tfrecord --images DIR --out DIR --name TFR-x``."""
    p = argparse.ArgumentParser(prog="python -m ppfr_jax.input_pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("to-tfrecord", help="convert an image folder (one folder per identity) to TFace records")
    c.add_argument("--images", required=True)
    c.add_argument("--out", required=True, help="output root (gets <name>.txt and <name>/)")
    c.add_argument("--name", required=True, help="dataset name, e.g. TFR-mydata")
    c.add_argument("--landmarks", default=None, help="npz with paths (relative to --images) and landmarks (M,K,2)")
    c.add_argument("--shard-size", type=int, default=500_000)
    c.add_argument("--skip-bad", action="store_true")
    v = sub.add_parser("verify", help="check every record of a TFace index as training reads it (index line, "
                                      "framing and data CRC32C, Example fields, image decode, landmarks)")
    v.add_argument("--index", required=True)
    v.add_argument("--data-root", default=None)
    a = p.parse_args(argv)
    if a.cmd == "to-tfrecord":
        out = image_folder_to_tface(a.images, a.out, a.name, landmarks=a.landmarks,
                                    shard_size=a.shard_size, skip_bad=a.skip_bad)
        print(f"wrote {out['count']} records to {out['dir']}, index {out['index']} "
              f"(skipped {out['skipped']})")
        return 0
    src = tface_source(a.index, a.data_root, skip_bad=True, check_headers=True)
    bad = [m for m in (src.check(i) for i in range(len(src))) if m is not None]
    for m in src.problems + bad:
        print(m)
    print(f"{len(src)} records listed, {len(src.problems)} bad index lines, {len(bad)} bad records"
          + (f"; first: {(src.problems + bad)[0]}" if src.problems or bad else ""))
    return 1 if (src.problems or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
