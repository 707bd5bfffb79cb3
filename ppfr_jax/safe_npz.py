"""Reading ``.npz`` files from untrusted sources (protected files sent by clients, landmark tables).

``np.load`` trusts a member's ``.npy`` header: it allocates the array the
header declares before reading, and decompresses what the zip entry says, so
a few-hundred-byte file can ask for terabytes. :func:`load_npz` reads each
header first (a few hundred bytes of the member), checks that the declared
array is exactly the member's declared size and that the total stays under
``max_bytes``, and only then decompresses, into an array built from the bytes
read. No pickles (object arrays are refused), no structured dtypes.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

__all__ = ["load_npz", "MAX_INFLATION"]

MAX_INFLATION = 64  # default budget: decompressed bytes per byte of file (+ 1 MiB)
_KINDS = "biufcUS"  # bool, ints, floats, complex, fixed-width text
_MAX_HEADER = 10_000


def load_npz(path: str | os.PathLike, *, max_bytes: int | None = None, error: type[Exception] = ValueError,
             names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` as ``{name: array}``, at bounded cost.

    Args:
      path: the file.
      max_bytes: decompressed bytes allowed in all (default ``MAX_INFLATION *
        file size + 1 MiB``); checked against the declared sizes before any
        member is decompressed.
      error: the exception class raised (its message names the file).
      names: read only these members (others are not decompressed).
    Returns:
      ``{name: C-contiguous array}`` (``.npy`` suffix dropped).
    Raises:
      ``error`` naming the file: not a zip, a member that is not a plain
      ``.npy`` (object / structured dtype, bad header), a declared size that
      does not match the array, more than ``max_bytes``, or a corrupt stream.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise error(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    budget = (MAX_INFLATION * size + (1 << 20)) if max_bytes is None else int(max_bytes)
    out: dict[str, np.ndarray] = {}
    with zf:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if names is not None and key not in names:
                continue
            where = f"{path}: member {info.filename!r}"
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise error(f"{where}: zip compression {info.compress_type} is not read")
            if info.file_size > budget:
                raise error(f"{where} declares {info.file_size} bytes, more than this reader allows for this "
                            f"file ({budget} left)")
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
                    elif version in ((2, 0), (3, 0)):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
                    else:
                        raise ValueError(f".npy format version {version}")
                    header = f.tell()
                    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.hasobject:
                        raise ValueError(f"dtype {dtype} is not read (numbers and text only)")
                    n = 1
                    for s in shape:
                        n *= int(s)
                    nbytes = n * dtype.itemsize
                    if header + nbytes != info.file_size:
                        raise ValueError(f"its header declares {shape} of {dtype} ({nbytes} bytes), the member "
                                         f"holds {info.file_size - header}")
                    budget -= info.file_size
                    raw = f.read(nbytes + 1)
            except error:
                raise
            except Exception as e:  # noqa: BLE001  (zlib / zipfile / numpy header errors: the file's fault)
                raise error(f"{where}: {type(e).__name__}: {e}") from None
            if len(raw) != nbytes:
                raise error(f"{where}: holds {len(raw)} bytes of data, expected {nbytes}")
            arr = np.frombuffer(raw, dtype, count=n).reshape(shape, order="F" if fortran else "C")
            out[key] = np.array(arr, order="C", copy=True)
    return out
