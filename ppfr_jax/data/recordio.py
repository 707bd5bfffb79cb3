"""insightface's MXNet RecordIO training packs (``train.rec`` + ``train.idx`` + ``property``) without mxnet.

Framing (dmlc-core ``recordio.cc``): a record is ``uint32 magic 0xced7230a``,
``uint32 lrecord`` (``cflag = lrecord >> 29``, ``length = lrecord & (2**29 - 1)``),
``length`` payload bytes, zero-padded to a multiple of 4. cflag 0 is a whole
record; 1 / 2 / 3 start / continue / end a record the writer split where the
payload held the magic at a 4-byte-aligned position (the magic is put back
between the parts). The payload starts with mxnet's ``IRHeader`` ``'<IfQQ'``
(flag, label, id, id2; 24 bytes); ``flag > 0`` float32 labels follow it and
the label is the first. ``.idx`` lines are ``key<TAB>offset``.

Which records are images follows insightface ``recognition/arcface_torch/
dataset.py`` (``MXFaceDataset``): record 0 with ``flag > 0`` is the header, its
``label[0]`` one past the last image key (images are keys ``1 ..
int(label[0]) - 1``), ``label[1] - label[0]`` the identity count (identity
records follow the images); record 0 with ``flag == 0``: every ``.idx`` key
is an image. The identity count is ``property``'s first field
(``num_classes,112,112``), else the header's, else max label + 1.

:func:`recordio_source` lists a pack as a :class:`RecordIOSource` (the
``Source`` interface ``pipeline.TrainIterator`` reads: same order, resume,
host sharding and ``skip_bad``; no landmarks). This module needs no
TensorFlow. Errors: ``BadRecordError`` naming the ``.rec`` file, the record
key and its byte offset.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import threading
from typing import Iterable, Sequence

import numpy as np

from ppfr_jax import image_io
from ppfr_jax.data.records import SKIP_BAD_HINT, BadRecordError

__all__ = ["MAGIC", "RecordIOSource", "read_idx", "recordio_source", "unpack", "write_recordio_pack"]

MAGIC = 0xCED7230A
_LEN_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")  # flag, label, id, id2
_MAGIC_BYTES = struct.pack("<I", MAGIC)


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def read_idx(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse ``train.idx`` -> (keys (M,) int64, offsets (M,) int64, line numbers (M,) int64), in line order.

    Raises:
      BadRecordError naming the file and line of a malformed line, a negative offset or a repeated key.
    """
    idx_path = os.fspath(idx_path)
    keys, offs, lines, seen = [], [], [], {}
    with open(idx_path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError(f"expected 2 fields (key offset), got {len(parts)}")
                k, o = int(parts[0]), int(parts[1])
                if o < 0:
                    raise ValueError(f"offset must be >= 0, got {o}")
                if k in seen:
                    raise ValueError(f"key {k} repeats line {seen[k]}")
            except ValueError as e:
                raise BadRecordError(f"{idx_path} line {n}: {e}: {line.rstrip()!r}") from None
            seen[k] = n
            keys.append(k), offs.append(o), lines.append(n)
    if not keys:
        raise BadRecordError(f"{idx_path}: no records")
    return np.asarray(keys, np.int64), np.asarray(offs, np.int64), np.asarray(lines, np.int64)


def unpack(payload: bytes) -> tuple[int, np.ndarray, bytes]:
    """A record payload -> (flag, labels (max(flag, 1),) float32, image bytes), as ``mx.recordio.unpack``.

    Raises ValueError when the payload is shorter than its header and labels.
    """
    if len(payload) < _IR.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, _, _ = _IR.unpack_from(payload)
    if flag == 0:
        return 0, np.asarray([label], np.float32), payload[_IR.size:]
    end = _IR.size + 4 * flag
    if len(payload) < end:
        raise ValueError(f"IRHeader flag {flag} needs {end} bytes, the payload has {len(payload)}")
    return flag, np.frombuffer(payload, np.float32, flag, _IR.size).copy(), payload[end:]


class _Reader:
    """Records by offset (``os.pread``; thread-safe, one descriptor)."""

    def __init__(self, path: str):
        self.path = path
        self._fd = None
        self._lock = threading.Lock()

    def fd(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, offset: int, where: str) -> bytes:
        """-> the whole payload of the record at ``offset`` (parts joined). Raises BadRecordError naming ``where``."""
        fd = self.fd()
        size = os.fstat(fd).st_size
        out, pos, first = [], int(offset), True
        while True:
            head = os.pread(fd, 8, pos)
            if len(head) < 8:
                raise BadRecordError(f"{where}: offset {pos} is past the end of the file ({size} bytes)")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise BadRecordError(f"{where}: bad magic number 0x{magic:08x} at offset {pos} "
                                     f"(expected 0x{MAGIC:08x}): not the start of a record")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                raise BadRecordError(f"{where}: part at offset {pos} has cflag {cflag}, "
                                     f"{'a record starts with 0 or 1' if first else 'expected 2 or 3'}")
            if pos + 8 + length > size:
                raise BadRecordError(f"{where}: record is truncated: the part at offset {pos} needs "
                                     f"{8 + length} bytes, the file has {size - pos} from there")
            out.append(os.pread(fd, length, pos + 8))
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(out)
            pos += 8 + _pad4(length)
            first = False

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclasses.dataclass
class RecordIOSource:
    """A listed insightface pack: the ``sources.Source`` interface over ``train.rec`` records.

    Attributes:
      files: ``[rec_path]``; file_id (N,) zeros; offsets (N,) int64 byte offsets;
      keys: (N,) int64 record keys; labels: (N,) int32 in [0, num_classes);
      num_classes: identity count (``property`` / header / max label + 1);
      idx_path, idx_lines: where each record was declared; problems: what listing skipped.
    """

    files: list[str]
    offsets: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    num_classes: int
    idx_path: str
    idx_lines: np.ndarray
    problems: list[str] = dataclasses.field(default_factory=list)
    kind: str = "recordio"
    landmarks: None = None
    num_landmarks: int = 0

    def __post_init__(self):
        self.file_id = np.zeros(len(self.labels), np.int32)
        self._reader = _Reader(self.files[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def describe(self, i: int) -> str:
        return (f"{self.files[0]} record {int(self.keys[i])} offset {int(self.offsets[i])} "
                f"({self.idx_path} line {int(self.idx_lines[i])})")

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of record ``i`` (IRHeader and labels stripped). Raises BadRecordError."""
        try:
            return unpack(self._reader.read(int(self.offsets[i]), self.describe(i)))[2]
        except ValueError as e:
            if isinstance(e, BadRecordError):
                raise
            raise BadRecordError(f"{self.describe(i)}: {e}") from None

    def check(self, i: int) -> str | None:
        """Check record ``i`` as training reads it (framing, header, label, decode); -> the problem or None."""
        where = self.describe(i)
        try:
            flag, lab, img = unpack(self._reader.read(int(self.offsets[i]), where))
        except BadRecordError as e:
            return str(e)
        except ValueError as e:
            return f"{where}: {e}"
        problem = _label_problem(float(lab[0]), self.num_classes)
        if problem:
            return f"{where}: {problem}"
        try:
            image_io.decode_rgb(img, "image")
        except image_io.ImageDecodeError as e:
            return f"{where}: field 'image': {str(e).removeprefix('image: ')}"
        return None


def _label_problem(label: float, num_classes: int) -> str | None:
    if not np.isfinite(label) or label != int(label):
        return f"label {label!r} is not an integer"
    if not 0 <= label < num_classes:
        return f"label {int(label)} out of range [0, {num_classes})"
    return None


def recordio_source(path: str | os.PathLike, *, skip_bad: bool = False) -> RecordIOSource:
    """List the pack in folder ``path`` (``train.rec``, ``train.idx``, optional ``property``).

    Reads every image record's framing and IRHeader (its label) at listing.

    Raises:
      FileNotFoundError: ``train.rec`` or ``train.idx`` missing.
      BadRecordError naming ``train.rec``, the record key and offset: an ``.idx`` entry past the
      end of the file, a bad magic number, a truncated record, a label out of range, an image key
      missing from the ``.idx`` (with ``skip_bad``: skipped and listed in ``problems``); a bad
      header record 0, a malformed ``.idx`` or ``property``, or disagreeing identity counts always raise.
    """
    path = os.fspath(path)
    rec, idx = os.path.join(path, "train.rec"), os.path.join(path, "train.idx")
    for f in (rec, idx):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"recordio pack {path!r}: {os.path.basename(f)} not found")
    keys, offs, lines = read_idx(idx)
    pos = {int(k): j for j, k in enumerate(keys)}
    reader = _Reader(rec)
    header_classes = None
    if 0 in pos:
        j0 = pos[0]
        where0 = f"{rec} record 0 offset {int(offs[j0])} ({idx} line {int(lines[j0])})"
        try:
            flag0, lab0, _ = unpack(reader.read(int(offs[j0]), where0))
        except BadRecordError:
            reader.close()
            raise
        except ValueError as e:
            raise BadRecordError(f"{where0}: header record: {e}") from None
    else:
        flag0 = 0
    if flag0 > 0:
        end = int(lab0[0])
        image_keys = np.arange(1, end, dtype=np.int64)
        if flag0 >= 2 and lab0[1] > lab0[0]:
            header_classes = int(lab0[1]) - int(lab0[0])
    else:
        image_keys = keys.copy()
    num_classes = None
    prop = os.path.join(path, "property")
    if os.path.isfile(prop):
        text = open(prop, encoding="utf-8").read().strip()
        try:
            num_classes = int(text.split(",")[0])
            if num_classes <= 0:
                raise ValueError
        except ValueError:
            raise BadRecordError(f"{prop}: expected 'num_classes,height,width', got {text!r}") from None
        if header_classes is not None and header_classes != num_classes:
            raise BadRecordError(f"{prop} says {num_classes} identities, the header record 0 of {rec} "
                                 f"says {header_classes} (label {lab0.tolist()})")
    elif header_classes is not None:
        num_classes = header_classes
    problems, rows = [], []
    size = os.path.getsize(rec)
    for k in image_keys:
        k = int(k)
        j = pos.get(k)
        if j is None:
            msg = f"{rec} record {k}: image key (1 .. {len(image_keys)}) has no line in {idx}"
        else:
            off = int(offs[j])
            where = f"{rec} record {k} offset {off} ({idx} line {int(lines[j])})"
            msg = None
            if off + 8 > size:
                msg = f"{where}: .idx entry points past the end of {rec} ({size} bytes)"
            else:
                try:
                    _, lab, _ = unpack(reader.read(off, where))
                    label = float(lab[0])
                    rows.append((k, off, int(lines[j]), label))
                except BadRecordError as e:
                    msg = str(e)
                except ValueError as e:
                    msg = f"{where}: {e}"
        if msg is not None:
            if not skip_bad:
                reader.close()
                raise BadRecordError(msg + " " + SKIP_BAD_HINT)
            problems.append(msg)
    reader.close()
    if not rows:
        raise BadRecordError(f"{rec}: no usable image records")
    labels = np.asarray([r[3] for r in rows], np.float64)
    if num_classes is None:
        finite = labels[np.isfinite(labels)]
        num_classes = int(finite.max()) + 1 if finite.size else 1
    keep = []
    for r in rows:
        problem = _label_problem(r[3], num_classes)
        if problem:
            msg = f"{rec} record {r[0]} offset {r[1]} ({idx} line {r[2]}): {problem}"
            if not skip_bad:
                raise BadRecordError(msg + " " + SKIP_BAD_HINT)
            problems.append(msg)
        else:
            keep.append(r)
    if not keep:
        raise BadRecordError(f"{rec}: no usable image records")
    a = np.asarray([r[:3] for r in keep], np.int64)
    return RecordIOSource(files=[rec], offsets=a[:, 1].copy(), keys=a[:, 0].copy(),
                          labels=np.asarray([r[3] for r in keep], np.int32), num_classes=int(num_classes),
                          idx_path=idx, idx_lines=a[:, 2].copy(), problems=problems)


def _frame(payload: bytes) -> bytes:
    """dmlc-core ``RecordIOWriter::WriteRecord``: split where the magic sits at an aligned position, pad to 4."""
    out, dptr, n = [], 0, len(payload)
    for i in range(0, n - n % 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            out.append(struct.pack("<II", MAGIC, ((1 if dptr == 0 else 2) << 29) | (i - dptr)) + payload[dptr:i])
            dptr = i + 4
    out.append(struct.pack("<II", MAGIC, ((3 if dptr else 0) << 29) | (n - dptr)) + payload[dptr:])
    out.append(b"\0" * (_pad4(n) - n))
    return b"".join(out)


def _pack(label, image: bytes, rid: int) -> bytes:
    """``mx.recordio.pack``: a number -> flag 0; a sequence -> flag = its length, floats after the header."""
    if np.ndim(label) == 0:
        return _IR.pack(0, float(label), rid, 0) + image
    arr = np.asarray(label, np.float32).reshape(-1)
    return _IR.pack(arr.size, 0.0, rid, 0) + arr.tobytes() + image


def write_recordio_pack(records: Iterable[tuple[bytes, float | Sequence[float]]], out_dir: str | os.PathLike, *,
                        num_classes: int | None = None, image_hw: tuple[int, int] = (112, 112)) -> dict[str, str]:
    """Write an insightface pack: ``train.rec``, ``train.idx``, ``property``.

    Layout as insightface's packs: record 0 the header (flag 2, label ``[N + 1, N + 1 + C]``),
    images at keys 1..N (``(image_bytes, label)``: a number is stored as IRHeader.label, flag 0; a
    sequence as flag-many floats after the header), identity records at keys N+1..N+C
    (label ``[first key, one past last key]`` of that identity's images: exact when the records
    come grouped by identity). C = ``num_classes`` or max label + 1.

    Returns {"rec", "idx", "property", "count"} (paths, and N as str).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    recs = [(bytes(img), lab) for img, lab in records]
    n = len(recs)
    first = [float(np.asarray(lab, np.float32).reshape(-1)[0]) for _, lab in recs]
    c = int(num_classes) if num_classes is not None else int(max(first)) + 1 if first else 0
    spans = {}
    for k, lab in enumerate(first, 1):
        s = spans.setdefault(int(lab), [k, k + 1])
        s[1] = k + 1
    payloads = [_pack([n + 1, n + 1 + c], b"", 0)]
    payloads += [_pack(lab, img, k) for k, (img, lab) in enumerate(recs, 1)]
    payloads += [_pack(spans.get(i, [0, 0]), b"", n + 1 + i) for i in range(c)]
    paths = {"rec": os.path.join(out_dir, "train.rec"), "idx": os.path.join(out_dir, "train.idx"),
             "property": os.path.join(out_dir, "property")}
    off = 0
    with open(paths["rec"], "wb") as r, open(paths["idx"], "w", encoding="utf-8") as x:
        for k, p in enumerate(payloads):
            framed = _frame(p)
            r.write(framed)
            x.write(f"{k}\t{off}\n")
            off += len(framed)
    with open(paths["property"], "w", encoding="utf-8") as f:
        f.write(f"{c},{image_hw[0]},{image_hw[1]}\n")
    return {**paths, "count": str(n)}
