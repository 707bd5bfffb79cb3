"""Read PyTorch ``.pth``/``.ckpt`` files without torch and without running pickled code.

``torch.save`` writes a pickle in which tensors are *calls*: ``GLOBAL
torch._utils._rebuild_tensor_v2`` applied to a storage (a persistent id that
points at raw bytes stored beside the pickle), an offset, a size and a stride.
A normal ``pickle.load`` would import whatever module the file names and call
it, so a checkpoint can run arbitrary code. Here ``find_class`` resolves only
the handful of names needed to rebuild tensors, and resolves each of them to a
function of this module; every other global raises ``UnsafeCheckpointError``
before anything is called.

Two container formats exist:

* zip (torch >= 1.6): ``<dir>/data.pkl`` (the pickle), ``<dir>/data/<key>``
  (one raw storage per key), ``<dir>/byteorder`` (absent means little endian);
  ``<dir>`` is any name. Storage ids: ``('storage', type, key, location, numel)``.
* legacy (torch < 1.6): concatenated pickles -- magic number, protocol
  version (1001), ``sys_info`` (endianness, C type sizes), the object, the
  list of storage keys -- then for every key in that order an int64 element
  count followed by the raw bytes. Storage ids:
  ``('storage', type, key, location, numel, view_metadata)``. Because the
  bytes follow the pickle, tensors are rebuilt lazily and filled in at the end.

Tensors come back as C-contiguous numpy arrays (bfloat16 / float8 as
``ml_dtypes``); ``torch.Size`` as tuple; ``nn.Parameter`` as its array.

Hostile files (SECURITY.md): the pickle runs under ``ppfr_jax.safe_pickle``'s
rules (allowlist, no state setting but on our stand-ins, opcode budget,
collision-proof keys, nesting depth), and a file's cost is bounded by the bytes
it holds. For a file of F bytes: at most ``MAX_INFLATION * F + 1 MiB`` bytes
are decompressed (every zip member's declared size is checked before it is
read, and ``data.pkl`` is at most ``MAX_PICKLE_BYTES``); a storage must hold
exactly the bytes its tensor type and element count say; the tensors handed
back total at most ``2 * S + 16 MiB`` bytes, S the storage bytes read (a
stride-0 or shared-storage view cannot be expanded into gigabytes).
Every failure is :class:`CheckpointReadError` (or :class:`UnsafeCheckpointError`)
naming the file.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ppfr_jax import safe_pickle
from ppfr_jax.errors import PpfrError

__all__ = [
    "CheckpointReadError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "load_state_dict",
    "find_state_dict",
]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 64 << 20  # a zip's data.pkl (a large model's state_dict pickle is ~1 MB)
MAX_INFLATION = 64  # decompressed bytes per byte of file (torch writes members uncompressed: 1)
_SLACK = 16 << 20  # tensors may exceed their storages by this much (small expanded views)


class CheckpointReadError(PpfrError, ValueError):
    """The file is not a readable PyTorch checkpoint (truncated, corrupt, unsupported)."""


class UnsafeCheckpointError(CheckpointReadError, pickle.UnpicklingError):
    """The pickle asks for a global outside the tensor-rebuilding allowlist."""


# --------------------------------------------------------------------------- dtypes

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    # Untyped storages are raw bytes; the tensor's dtype comes with the tensor.
    "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32,
    "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
}


class _Frozen(safe_pickle.StandIn):
    """Base of every object a pickle can reach by name: no BUILD (``safe_pickle`` refuses it).

    Without this a pickle could ``BUILD`` new attributes onto a shared
    stand-in (or a half-built tensor) and change how later objects are read.
    """

    __slots__ = ()


class _StorageType(_Frozen):
    """Stand-in for ``torch.FloatStorage`` & co: only carries the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"<storage type {self.name}>"


class _TorchDType(_Frozen):
    """Stand-in for a ``torch.dtype`` global such as ``torch.bfloat16``."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"<torch.{self.name}>"


class _TensorClass(_Frozen):
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` used as a *type* argument."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


# ------------------------------------------------------------------ storages/tensors

class _Storage(_Frozen):
    """One storage: raw bytes (in the file's byte order) plus its element dtype.

    ``raw`` is None until the bytes are known (legacy files store them after
    the pickle). A legacy *view* shares ``base`` and starts ``byte_offset`` in.
    """

    __slots__ = ("key", "dtype", "numel", "base", "byte_offset", "raw")

    def __init__(self, key: str, dtype: np.dtype, numel: int, base: "_Storage | None" = None,
                 byte_offset: int = 0):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self.base, self.byte_offset = base, int(byte_offset)
        self.raw: np.ndarray | None = None  # uint8, 1-D

    def bytes_(self) -> np.ndarray:
        if self.base is not None:
            root = self.base.bytes_()
            return root[self.byte_offset:self.byte_offset + self.numel * self.dtype.itemsize]
        if self.raw is None:
            raise CheckpointReadError(f"storage {self.key!r} was referenced but its bytes were never read")
        return self.raw


class _TensorRef(_Frozen):
    """A tensor whose bytes may not be read yet; ``materialize`` turns it into numpy."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, size, stride, dtype: np.dtype | None = None):
        if not isinstance(storage, _Storage):
            raise CheckpointReadError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
        self.storage = storage
        self.offset = _as_int(offset, "storage offset")
        self.size = tuple(_as_int(s, "size") for s in size)
        self.stride = tuple(_as_int(s, "stride") for s in stride)
        self.dtype = storage.dtype if dtype is None else dtype
        if len(self.size) != len(self.stride):
            raise CheckpointReadError(f"tensor size {self.size} and stride {self.stride} differ in rank")

    def materialize(self, big_endian: bool, max_bytes: int) -> np.ndarray:
        raw = self.storage.bytes_()
        item = self.dtype.itemsize
        if raw.size % item:
            raise CheckpointReadError(
                f"storage {self.storage.key!r} holds {raw.size} bytes, not a multiple of {self.dtype} size {item}")
        flat = raw.view(self.dtype)
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise CheckpointReadError(f"negative size/stride/offset {self.size}/{self.stride}/{self.offset}")
        numel = 1
        for n in self.size:
            numel *= n
        if numel * item > max_bytes:
            raise CheckpointReadError(
                f"tensor of size {self.size} (stride {self.stride}) of storage {self.storage.key!r} would take "
                f"{numel * item} bytes once copied, more than this file's storages allow (at most twice the "
                f"storage bytes it holds, plus {_SLACK >> 20} MiB, in all)")
        if numel == 0:
            return np.zeros(self.size, self.dtype)
        # Bounds check before as_strided, which would otherwise read arbitrary memory.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= flat.size:
            raise CheckpointReadError(
                f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) reaches element "
                f"{last} of storage {self.storage.key!r} which has {flat.size}")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False)
        out = np.array(view, order="C", copy=True)
        if big_endian and item > 1:
            unit = item // 2 if out.dtype.kind == "c" else item
            shape = out.shape
            out = out.reshape(-1).view(f"u{unit}").byteswap().view(self.dtype).reshape(shape)
        return out


def _as_int(v, what: str) -> int:
    if isinstance(v, (bool, float)) or not isinstance(v, (int, np.integer)):
        raise CheckpointReadError(f"tensor {what} must be an int, got {v!r}")
    return int(v)


# Safe replacements for the allowlisted torch functions. Each only builds a _TensorRef.

def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, _TorchDType):
        raise CheckpointReadError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _TensorRef(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILD_FUNCS or not isinstance(new_type, _TensorClass) or not isinstance(args, tuple):
        raise UnsafeCheckpointError(f"_rebuild_from_type_v2 with {func!r}, {new_type!r} is not allowed")
    return func(*args)


def _torch_size(dims=()):
    dims = tuple(dims)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise CheckpointReadError(f"torch.Size of {dims!r}")
    return dims


_REBUILD_FUNCS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                  _rebuild_parameter_with_state}


def _build_allowlist() -> dict[tuple[str, str], Any]:
    allow: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Size"): _torch_size,
        ("torch", "Tensor"): _TensorClass("torch.Tensor"),
        ("torch._tensor", "Tensor"): _TensorClass("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorClass("torch.nn.Parameter"),
        # plain data: containers and numbers (size-taking constructors are wrapped), numpy arrays/scalars
        # (e.g. a saved best accuracy) rebuilt from plain dtypes and the bytes in the file
        **safe_pickle.builtins_allowlist("set", "frozenset", "slice", "complex", "bytearray"),
        **safe_pickle.numpy_allowlist(),
    }
    for name, dt in _STORAGE_DTYPES.items():
        st = _StorageType(name, dt)
        allow[("torch", name)] = st
        allow[("torch.storage", name)] = st
        allow[("torch.cuda", name)] = st  # legacy GPU saves
    for name, dt in _TORCH_DTYPES.items():
        allow[("torch", name)] = _TorchDType(name, dt)
    return allow


_ALLOWED = _build_allowlist()


class _Budget:
    """What a file of ``file_size`` bytes may cost: decompressed bytes, and tensor bytes handed back."""

    def __init__(self, path: str, file_size: int):
        self.path = path
        self.inflate_left = MAX_INFLATION * file_size + (1 << 20)
        self.stored = 0  # storage bytes read

    def inflate(self, n: int, what: str) -> None:
        if n > self.inflate_left:
            raise CheckpointReadError(
                f"{self.path}: {what} declares {n} bytes; a file of this size may expand to at most "
                f"{MAX_INFLATION}x its size in all (zip bomb?)")
        self.inflate_left -= n

    @property
    def tensor_bytes(self) -> int:
        return 2 * self.stored + _SLACK


def _unpickle(f, path: str, storage_loader=None, what: str = "pickle"):
    def persistent_load(pid):
        if storage_loader is None or not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            tag = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            raise UnsafeCheckpointError(f"{path}: unsupported persistent id {tag!r} "
                                        "(pickled modules/source code are refused)")
        return storage_loader(pid)

    try:
        return safe_pickle.RestrictedUnpickler(f, _ALLOWED, persistent_load=persistent_load).load()
    except CheckpointReadError:
        raise
    except safe_pickle.UnsafePickleError as e:
        raise UnsafeCheckpointError(
            f"{path}: {e} (only tensors, storages and plain containers are read; a whole pickled model or "
            "arbitrary object is refused: save a state_dict instead)") from None
    except Exception as e:  # noqa: BLE001  (a hostile pickle can raise anything a builder raises)
        raise CheckpointReadError(f"{path}: truncated or corrupt {what} ({type(e).__name__}: {e})") from None


def _materialize(obj, big_endian: bool, budget: _Budget):
    """Every tensor reference -> numpy, within the budget; stand-ins -> values (iterative, depth-limited)."""
    used = [0]

    def leaf(o):
        if isinstance(o, _TensorRef):
            out = o.materialize(big_endian, budget.tensor_bytes - used[0])
            used[0] += out.nbytes
            return out
        if isinstance(o, (safe_pickle.NumpyDType, safe_pickle.ArrayBuilder)):
            return o._ppfr_resolve()
        return o

    try:
        return safe_pickle.resolve(obj, leaf=leaf)
    except safe_pickle.PickleReadError as e:
        raise CheckpointReadError(f"{budget.path}: {e}") from None


def _check_storage_pid(pid, n: int, path: str):
    if len(pid) != n:
        raise CheckpointReadError(f"{path}: storage id {pid!r} has {len(pid)} fields, expected {n}")
    _, stype, key, _location, numel = pid[:5]
    if not isinstance(stype, _StorageType):
        raise CheckpointReadError(f"{path}: storage id names type {stype!r}, not a torch storage type")
    return stype, str(key), _as_int(numel, "storage numel")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget, what: str) -> bytes:
    """A zip member's bytes, its declared size charged to the budget *before* anything is decompressed."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointReadError(f"{budget.path}: {what} uses zip compression {info.compress_type}; "
                                  f"torch writes members stored (or deflated)")
    budget.inflate(info.file_size, what)
    with zf.open(info) as f:  # ZipExtFile stops at the declared size and checks the CRC
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise CheckpointReadError(f"{budget.path}: {what} holds {len(data)} bytes, its zip entry says "
                                  f"{info.file_size}")
    return data


def _load_zip(path: str, budget: _Budget) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointReadError(f"{path}: corrupt zip-format checkpoint ({e})") from e
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        names = list(infos)
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1] or \
               [n for n in names if n == "data.pkl"]
        if len(pkls) != 1:
            hint = " (a TorchScript archive?)" if any(n.endswith("constants.pkl") for n in names) else ""
            raise CheckpointReadError(
                f"{path}: zip archive without exactly one '<dir>/data.pkl' (found {pkls}){hint}")
        prefix = pkls[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in infos:
            info = infos[prefix + "byteorder"]
            if info.file_size > 16:
                raise CheckpointReadError(f"{path}: byteorder entry of {info.file_size} bytes")
            order = _read_member(zf, info, budget, "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointReadError(f"{path}: unknown byteorder {order!r}")
            big_endian = order == "big"
        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            stype, key, numel = _check_storage_pid(pid, 5, path)
            if key in storages:
                return storages[key]
            member = f"{prefix}data/{key}"
            info = infos.get(member)
            if info is None:
                raise CheckpointReadError(f"{path}: storage {member!r} is missing from the archive")
            need = numel * stype.dtype.itemsize
            if numel < 0 or info.file_size != need:  # checked before a byte is decompressed
                raise CheckpointReadError(
                    f"{path}: storage {member!r} has {info.file_size} bytes, expected {need} "
                    f"({numel} x {stype.dtype})")
            data = _read_member(zf, info, budget, f"storage {member!r}")
            budget.stored += need
            st = _Storage(key, stype.dtype, numel)
            st.raw = np.frombuffer(data, np.uint8, count=need)
            storages[key] = st
            return st

        pinfo = infos[pkls[0]]
        if pinfo.file_size > MAX_PICKLE_BYTES:
            raise CheckpointReadError(f"{path}: {pkls[0]!r} declares {pinfo.file_size} bytes; this reader takes "
                                      f"pickles of at most {MAX_PICKLE_BYTES >> 20} MiB")
        pickled = _read_member(zf, pinfo, budget, repr(pkls[0]))
        obj = _unpickle(safe_pickle.BoundedReader(io.BytesIO(pickled), len(pickled)), path, load_storage,
                        what=pkls[0])
    return _materialize(obj, big_endian, budget)


def _load_legacy(path: str, budget: _Budget, return_end: bool = False):
    with open(path, "rb") as raw:
        f = safe_pickle.BoundedReader(raw, os.path.getsize(path))
        try:
            magic = _unpickle(f, path, what="header")
        except UnsafeCheckpointError:
            raise
        except CheckpointReadError as e:
            raise CheckpointReadError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy file starting "
                f"with the magic number), or truncated: {e}") from None
        if magic != LEGACY_MAGIC:
            raise CheckpointReadError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy file with the "
                f"magic number; first pickle is {type(magic).__name__})")
        proto = _unpickle(f, path, what="header (protocol version)")
        if proto != LEGACY_PROTOCOL:
            raise CheckpointReadError(f"{path}: unsupported legacy protocol version {proto!r}")
        sys_info = _unpickle(f, path, what="header (sys_info)")
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            stype, key, numel = _check_storage_pid(pid, 6, path)
            view_meta = pid[5]
            root = storages.get(key)
            if root is None:
                root = storages[key] = _Storage(key, stype.dtype, numel)
            if view_meta is None:
                return root
            if not (isinstance(view_meta, tuple) and len(view_meta) == 3):
                raise CheckpointReadError(f"{path}: storage view metadata {view_meta!r}")
            view_key, offset, view_size = view_meta
            view_key = str(view_key)
            if view_key not in storages:
                offset, view_size = _as_int(offset, "view offset"), _as_int(view_size, "view size")
                if offset < 0 or view_size < 0 or offset + view_size > root.numel:
                    raise CheckpointReadError(f"{path}: storage view {view_key!r} out of bounds")
                storages[view_key] = _Storage(view_key, root.dtype, view_size, base=root,
                                              byte_offset=offset * root.dtype.itemsize)
            return storages[view_key]

        obj = _unpickle(f, path, load_storage, what="main pickle")
        keys = _unpickle(f, path, what="storage key list")
        if not isinstance(keys, list):
            raise CheckpointReadError(f"{path}: storage key list is a {type(keys).__name__}")
        int64 = np.dtype("<i8" if little else ">i8")
        for key in keys:
            st = storages.get(str(key))
            if st is None or st.base is not None or st.raw is not None:
                raise CheckpointReadError(f"{path}: storage key {key!r} was not declared by the pickle "
                                          f"(or is listed twice)")
            if f.remaining < 8:
                raise CheckpointReadError(f"{path}: truncated: file ends before storage {key!r}")
            numel = int(np.frombuffer(f.read(8), int64)[0])
            if numel != st.numel:
                raise CheckpointReadError(
                    f"{path}: storage {key!r} records {numel} elements, the pickle declared {st.numel}")
            nbytes = numel * st.dtype.itemsize
            if nbytes > f.remaining:  # before reading: a huge count must not allocate
                raise CheckpointReadError(
                    f"{path}: truncated: storage {key!r} needs {nbytes} bytes, file has {f.remaining} left")
            st.raw = np.frombuffer(f.read(nbytes), np.uint8)
            budget.stored += nbytes
        end = os.path.getsize(path) - f.remaining
    out = _materialize(obj, not little, budget)
    return (out, end) if return_end else out


def _named(e: CheckpointReadError, path: str) -> CheckpointReadError:
    if path in str(e):
        return e
    return type(e)(f"{path}: {e}")


def load_torch_file(path: str | os.PathLike) -> Any:
    """Load a ``torch.save`` file as plain Python + numpy, executing no pickled code.

    Args:
      path: a zip-format (torch >= 1.6) or legacy-format checkpoint.

    Returns:
      The saved object with dicts/OrderedDicts/lists/tuples/scalars/strings kept
      and every tensor or parameter replaced by a C-contiguous ``np.ndarray`` of
      its dtype (bfloat16 -> ``ml_dtypes.bfloat16``).

    Cost, for a file of F bytes (see the module doc): at most ``MAX_INFLATION * F
    + 1 MiB`` bytes decompressed, tensors of at most twice the storage bytes read
    plus 16 MiB, ``safe_pickle.MAX_OPCODES`` pickle opcodes, nesting at most
    ``safe_pickle.MAX_DEPTH`` deep.

    Raises:
      UnsafeCheckpointError: the pickle needs a global, a state or an opcode
        outside the rules (nothing was called).
      CheckpointReadError: truncated, corrupt, unsupported or over a limit (names it).
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        budget = _Budget(path, os.path.getsize(path))
        if zipfile.is_zipfile(path):
            return _load_zip(path, budget)
        with open(path, "rb") as f:
            first = f.read(2)
        if not first:
            raise CheckpointReadError(f"{path}: empty file")
        if first[:1] != b"\x80" and tarfile.is_tarfile(path):
            raise CheckpointReadError(f"{path}: tar-based checkpoint (PyTorch < 0.1.10) is not supported")
        return _load_legacy(path, budget)
    except CheckpointReadError as e:
        raise _named(e, path) from None
    except Exception as e:  # noqa: BLE001  (MemoryError, OverflowError, zlib.error, ...: the file's fault)
        raise CheckpointReadError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


_WRAPPER_KEYS = ("state_dict", "net_state_dict", "model_state_dict", "model", "net", "network",
                 "backbone", "module", "params", "weights", "ema", "state")


def _looks_like_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and any(isinstance(v, np.ndarray) for v in obj.values())
            and not any(isinstance(v, (Mapping, list, tuple)) for v in obj.values()))


def find_state_dict(obj, key: str | None = None, *, path: str = "checkpoint") -> Mapping[str, Any]:
    """Locate the ``{name: array}`` mapping inside a loaded checkpoint.

    ``key`` ('/'-separated for nesting, e.g. ``'model/state_dict'``) selects it
    explicitly; otherwise the object itself, then the usual wrapper keys
    (``state_dict``, ``net_state_dict``, ``model``, ...) recursively, then the
    single state-dict-like value, are tried.
    """
    if key is not None:
        cur = obj
        for part in key.split("/"):
            if not isinstance(cur, Mapping) or part not in cur:
                have = list(cur.keys()) if isinstance(cur, Mapping) else type(cur).__name__
                raise KeyError(f"{path}: key {part!r} (of {key!r}) not found; available: {have}")
            cur = cur[part]
        if not _looks_like_state_dict(cur):
            raise CheckpointReadError(f"{path}: {key!r} is not a mapping of names to tensors")
        return cur

    def search(o, depth):
        if _looks_like_state_dict(o):
            return o
        if not isinstance(o, Mapping) or depth > 3:
            return None
        for k in _WRAPPER_KEYS:
            if k in o:
                hit = search(o[k], depth + 1)
                if hit is not None:
                    return hit
        hits = [h for h in (search(v, depth + 1) for v in o.values()) if h is not None]
        return hits[0] if len(hits) == 1 else None

    found = search(obj, 0)
    if found is None:
        summary = ({k: type(v).__name__ for k, v in obj.items()} if isinstance(obj, Mapping)
                   else type(obj).__name__)
        raise CheckpointReadError(
            f"{path}: no unique state_dict found (top level: {summary}); pass key=... to choose one")
    return found


def load_state_dict(path: str | os.PathLike, key: str | None = None, *,
                    strip_prefix: str | None = "module.") -> dict[str, np.ndarray]:
    """Read the state_dict of a checkpoint: ``{torch_key: np.ndarray}``.

    Args:
      path: ``.pth``/``.ckpt`` file (zip or legacy format).
      key: where the state_dict sits ('/'-separated), default: found
        automatically (see ``find_state_dict``).
      strip_prefix: removed from the keys when *every* key starts with it
        (``'module.'`` from ``DataParallel``); None keeps keys as they are.

    Returns:
      Insertion-ordered dict of arrays; non-tensor entries of the state_dict
      (rare ``_extra_state`` values) are dropped.
    """
    path = os.fspath(path)
    sd = find_state_dict(load_torch_file(path), key, path=path)
    out = {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}
    if strip_prefix and out and all(k.startswith(strip_prefix) for k in out):
        out = {k[len(strip_prefix):]: v for k, v in out.items()}
    return out
