"""Training sources: random-access lists of records ``(image, label[, landmarks])``, checked when listed.

- :func:`image_folder_source`: ``root/<identity>/<image>``; labels are the
  ranks of the (non-empty) identity folders in sorted order; optional side
  landmarks from an ``.npz`` (``paths``, ``landmarks`` (M, K, 2)).
- :func:`tface_source`: TFace's format through its index
  (:func:`read_tface_index`: ``name<TAB>shard<TAB>offset<TAB>label``, or
  ``shard_file offset label``); records may carry ``landmarks`` (2K floats).
- :func:`image_folder_to_tface` converts the first into the second.

Landmarks are normalised (x = column, y = row) in ``LANDMARK_RANGE``; labels
are int32 in ``[0, MAX_LABEL]``. Listing checks what is cheap (empty folders,
index lines, offsets, record headers); :meth:`Source.check` checks one record
as training reads it. Errors: :class:`BadRecordError` naming the file and
index line / offset (``skip_bad=True``: skipped and listed in ``problems``).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import numpy as np

from ppfr_jax import image_io, safe_npz
from ppfr_jax.demo_data import demo_paths
from ppfr_jax.data import example_proto
from ppfr_jax.data.records import (FOOTER, HEADER, SKIP_BAD_HINT, SKIP_BAD_HINT_RECORDS, BadRecordError,
                                   ShardReader, write_tface_records)

__all__ = ["BadRecordError", "IMAGE_EXTENSIONS", "LANDMARK_RANGE", "MAX_LABEL", "Source", "image_folder_source",
           "image_folder_to_tface", "landmark_problem", "read_tface_index", "source_from_config", "tface_source"]

IMAGE_EXTENSIONS = image_io.EXTENSIONS
MAX_LABEL = 2 ** 31 - 1  # labels are int32 on the device
# normalised landmark coordinates: the crop is [0, 1]; points beyond it (the jaw) are kept, garbage is not
LANDMARK_RANGE = (-1.0, 2.0)


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
                feats = example_proto.parse(data).features.feature
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
                raise BadRecordError(msg + " " + SKIP_BAD_HINT_RECORDS)
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
                    raise BadRecordError(msg + " " + SKIP_BAD_HINT_RECORDS)
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
    bad = rows[:, 1] + HEADER + FOOTER > sizes[rows[:, 0]]
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
            if off + HEADER + length + FOOTER > sizes[sid]:
                bad[j] = True
    for j in np.flatnonzero(bad):
        sid, off, _, line_no = (int(v) for v in rows[j])
        why = (f"offset {off} points past the end of shard {shards[sid]} ({sizes[sid]} bytes)"
               if off + HEADER + FOOTER > sizes[sid] else
               _header_problem(reader, shards[sid], off, int(sizes[sid])))
        msg = f"{index_path} line {line_no}: {why}"
        if not skip_bad:
            reader.close()
            raise BadRecordError(msg + " " + SKIP_BAD_HINT)
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
    try:
        ex = example_proto.parse(src.read_bytes(0)).features.feature
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and the like)
        raise BadRecordError(f"{src.describe(0)}: not a tf.train.Example ({type(e).__name__}: {e})") from None
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
    return (f"record at offset {off} of shard {path} is truncated: needs {HEADER + length + FOOTER} "
            f"bytes, the shard ends {size - off} bytes after it")


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
                    raise BadRecordError(problem + " " + SKIP_BAD_HINT_RECORDS)
                src.problems.append(problem)
                continue
            rel = pathlib.Path(src.files[i]).relative_to(root).as_posix()
            lm = src.landmarks[i] if src.landmarks is not None else None
            yield rel, src.read_bytes(i), int(src.labels[i]), lm

    out = write_tface_records(gen(), out_root, name, shard_size=shard_size)
    out["skipped"] = str(len(src.problems))
    return out


def source_from_config(config) -> Source | None:
    """``config.data`` -> Source (None for "tfds", which streams).

    Raises:
      ValueError: a source without an input pipeline here, or "tfrecord" without an index.
    """
    d = config.data
    skip_bad = bool(d.get("skip_bad", False))
    if d.source == "demo":
        p = demo_paths()
        return tface_source(p["train_index"], p["train_root"], skip_bad=skip_bad)
    if d.source == "tfrecord":
        index = d.get("index") or (d.path if os.path.isfile(d.path) else "")
        if not index:
            raise ValueError("config.data: source='tfrecord' needs data.index (the TFace .txt index) "
                             "or data.path pointing at it")
        root = d.path if d.path and os.path.isdir(d.path) else None
        return tface_source(index, root, skip_bad=skip_bad)
    if d.source == "recordio":
        from ppfr_jax.data.recordio import recordio_source
        return recordio_source(d.path, skip_bad=skip_bad)
    if d.source == "image_folder":
        return image_folder_source(d.path, skip_bad=skip_bad, landmarks=d.get("landmarks_path") or None)
    if d.source == "tfds":
        return None
    raise ValueError(f"config.data.source={d.source!r} has no input pipeline here")
