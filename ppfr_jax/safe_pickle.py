"""Unpickling files from untrusted sources with a bounded cost: the base of the ``.pth`` reader
(``ppfr_jax.torch_pickle``) and the ``.bin`` reader (``ppfr_jax.evaluate.load_bin``).

:class:`RestrictedUnpickler` runs a pickle (a program) so that: globals
resolve only to the caller's allowlist of our own builders and stand-ins;
BUILD (state setting) is refused on anything else, as are NEWOBJ / OBJ / INST
and the extension registry; numpy arrays are rebuilt only from plain numeric
dtypes and bytes in the file; opcodes are capped (``MAX_OPCODES``) and reads
bounded (:class:`BoundedReader`); dict keys and set elements must be cheap to
hash (:func:`check_hashable`); :func:`resolve` turns stand-ins into values
and refuses nesting deeper than :data:`MAX_DEPTH`, iteratively.

Errors: :class:`UnsafePickleError` (a forbidden construct) and
:class:`PickleReadError` (a damaged or oversized file), raised as the caller's
error class with the file named. What the rules guarantee: SECURITY.md; how
they are enforced: README, Differences from the reference, Weight import.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
from typing import Any, Callable, Mapping

import numpy as np

from ppfr_jax.errors import PpfrError

MAX_OPCODES = 4_000_000  # a torch state_dict uses ~30 per tensor; ~400 MB of Python objects at most
MAX_DEPTH = 256  # nesting of containers; Python's recursion limit (1000) stays out of reach downstream
MAX_HASHED_INT = 1 << 60
_PLAIN_KINDS = "biufc"  # bool, signed, unsigned, float, complex


class UnsafePickleError(PpfrError, pickle.UnpicklingError):
    """The pickle asks for something outside the rules (a global, a state, an opcode)."""


class PickleReadError(PpfrError, ValueError):
    """The pickle is malformed or over a limit."""


class StandIn:
    """Base of every object a restricted pickle can reach by name: identity-hashed, no state by default.

    Subclasses that accept one BUILD define ``_ppfr_setstate(state)``; those that
    stand for a value built later define ``_ppfr_resolve()``.
    """

    __slots__ = ()

    def __setstate__(self, state):  # pragma: no cover - BUILD goes through RestrictedUnpickler.load_build
        raise UnsafePickleError(f"the pickle tries to set state on {self!r}")


class BoundedReader(io.RawIOBase):
    """A read-only view of ``limit`` bytes of a binary file: ``read(n)`` past them raises at once.

    Without it, a pickle opcode declaring a 2**60-byte string makes ``file.read``
    allocate that much before finding the file shorter.
    """

    def __init__(self, f, limit: int):
        self._f, self._left = f, int(limit)

    def readable(self):
        return True

    def read(self, n=-1):
        if n is None or n < 0:
            n = self._left
        if n > self._left:
            raise PickleReadError(f"truncated: a record needs {n} bytes, {self._left} remain")
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, size=-1):
        line = self._f.readline(self._left if size is None or size < 0 else min(size, self._left))
        self._left -= len(line)
        return line

    @property
    def remaining(self) -> int:
        return self._left


# ----------------------------------------------------------------------------- hashing and depth


def check_hashable(key, what: str = "dict key") -> None:
    """Refuse keys whose hashes an attacker can make collide (see README, Weight import)."""
    stack = [(key, 0)]
    while stack:
        k, d = stack.pop()
        if k is None or isinstance(k, (str, bytes, bool, float, StandIn)):
            continue
        if isinstance(k, int):
            if -MAX_HASHED_INT < k < MAX_HASHED_INT:
                continue
            raise PickleReadError(f"{what} {k} is beyond +-2**60 (such ints can be made to share a hash)")
        if isinstance(k, tuple) and d < 8:
            stack.extend((x, d + 1) for x in k)
            continue
        raise PickleReadError(f"{what} of type {type(k).__name__} is not accepted (str, bytes, numbers, "
                              f"None and tuples of them are)")


# ----------------------------------------------------------------------------- numpy, rebuilt safely


def plain_dtype(spec) -> np.dtype:
    """A numeric numpy dtype (bool/int/uint/float/complex, no fields), from a dtype stand-in or a string."""
    if isinstance(spec, NumpyDType):
        return spec.dtype
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, (str, np.dtype)):
        raise UnsafePickleError(f"numpy dtype from {type(spec).__name__} is not allowed (a dtype string is)")
    try:
        dt = np.dtype(spec)
    except TypeError as e:
        raise PickleReadError(f"not a numpy dtype: {spec!r} ({e})") from None
    if dt.kind not in _PLAIN_KINDS or dt.fields is not None or dt.subdtype is not None or dt.hasobject:
        raise UnsafePickleError(f"numpy dtype {dt!r} is not allowed (only bool, int, uint, float and complex)")
    return dt


class NumpyDType(StandIn):
    """``numpy.dtype(spec, align, copy)`` from a pickle, plus the one BUILD numpy writes after it."""

    __slots__ = ("dtype", "_built")

    def __init__(self, spec, align=False, copy=False):
        self.dtype = plain_dtype(spec)
        self._built = False

    def _ppfr_setstate(self, state):
        # numpy's own state for a plain dtype: (3, byteorder, None, None, None, -1, -1, 0); only the
        # byte order may differ. Anything else (fields, flags, object-ness) is refused.
        canon = self.dtype.__reduce__()[2]
        if (self._built or not isinstance(state, tuple) or len(state) != len(canon) or state[0] not in (3, 4)
                or state[1] not in ("<", ">", "|", "=") or tuple(state[2:]) != tuple(canon[2:])):
            raise UnsafePickleError(f"numpy dtype state {state!r} is not the plain state of {self.dtype!r}")
        self._built = True
        if state[1] in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])

    def _ppfr_resolve(self):
        return self.dtype

    def __repr__(self):
        return f"<dtype {self.dtype}>"


class _NdarrayType(StandIn):
    """``numpy.ndarray`` as a pickle names it: only usable as ``_reconstruct``'s first argument."""

    __slots__ = ()

    def __repr__(self):
        return "<numpy.ndarray>"


NDARRAY = _NdarrayType()


def _raw_bytes(data) -> bytes:
    if isinstance(data, str):  # Python 2 pickles, read with encoding='latin1'
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise UnsafePickleError(f"numpy data from {type(data).__name__} is not allowed (bytes are)")


def _shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                               for s in shape) or len(shape) > 64:
        raise PickleReadError(f"bad numpy shape {shape!r}")
    return shape


def _array_from_bytes(raw: bytes, dtype: np.dtype, shape, order: str = "C") -> np.ndarray:
    n = 1
    for s in shape:
        n *= s
    if n * dtype.itemsize != len(raw):
        raise PickleReadError(f"numpy array {shape} of {dtype} needs {n * dtype.itemsize} bytes, the pickle "
                              f"holds {len(raw)}")
    return np.frombuffer(raw, dtype, count=n).reshape(shape, order=order).copy(order="C")


class ArrayBuilder(StandIn):
    """``numpy.core.multiarray._reconstruct(ndarray, shape, dtype)`` + the BUILD with the array's state."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def _ppfr_setstate(self, state):
        if self.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError(f"numpy array state {type(state).__name__} is not allowed")
        if len(state) == 5:
            state = state[1:]
        shape, dtype, fortran, raw = state
        if not isinstance(fortran, bool):
            raise PickleReadError("bad numpy array state (fortran flag)")
        if isinstance(raw, list):
            raise UnsafePickleError("numpy object arrays are not allowed")
        self.array = _array_from_bytes(_raw_bytes(raw), plain_dtype(dtype), _shape(shape), "F" if fortran else "C")

    def _ppfr_resolve(self):
        if self.array is None:
            raise PickleReadError("numpy array rebuilt without its data")
        return self.array


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not NDARRAY:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} is not allowed")
    return ArrayBuilder()


def _scalar(dtype, data=None):
    dt = plain_dtype(dtype)
    raw = _raw_bytes(data)
    if len(raw) != dt.itemsize:
        raise PickleReadError(f"numpy scalar of {dt} needs {dt.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dt, count=1)[0].copy()


def _frombuffer(buf, dtype, shape, order):
    if order not in ("C", "F"):
        raise PickleReadError(f"bad numpy order {order!r}")
    return _array_from_bytes(_raw_bytes(buf), plain_dtype(dtype), _shape(shape), order)


def numpy_allowlist() -> dict[tuple[str, str], Any]:
    """What a pickle of plain numpy arrays and scalars names, mapped to the safe builders above."""
    out: dict[tuple[str, str], Any] = {("numpy", "dtype"): NumpyDType, ("numpy", "ndarray"): NDARRAY}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        out[(f"{core}.multiarray", "scalar")] = _scalar
        out[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return out


# ----------------------------------------------------------------------------- plain builtins, bounded


def _bytes(source=b"", encoding=None, errors=None):
    if isinstance(source, (int, float)) or not isinstance(source, (bytes, bytearray, str, list)):
        raise UnsafePickleError(f"bytes/bytearray from {type(source).__name__} is not allowed "
                                f"(an int would allocate that many bytes)")
    if isinstance(source, str):
        return source.encode(encoding or "latin1", errors or "strict")
    return bytes(source)


def _bytearray(source=b"", encoding=None, errors=None):
    return bytearray(_bytes(source, encoding, errors))


def _set(items=()):
    items = list(items)
    for k in items:
        check_hashable(k, "set element")
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


def _ordered_dict(items=()):
    out = collections.OrderedDict()
    for kv in (items.items() if isinstance(items, dict) else items):
        if not (isinstance(kv, (tuple, list)) and len(kv) == 2):
            raise PickleReadError("OrderedDict from something other than (key, value) pairs")
        check_hashable(kv[0])
        out[kv[0]] = kv[1]
    return out


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles write ``bytes`` as _codecs.encode(str, 'latin1').
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode of {type(text).__name__} with encoding {encoding!r} is not allowed")
    return text.encode(encoding)


def builtins_allowlist(*names: str) -> dict[tuple[str, str], Any]:
    """Safe versions of the named builtins (``bytes``, ``bytearray``, ``set``, ``frozenset``, ``list``,
    ``tuple``, ``bool``, ``int``, ``float``, ``complex``, ``slice``) and ``_codecs.encode``,
    ``collections.OrderedDict``."""
    table = {
        ("builtins", "bytes"): _bytes, ("builtins", "bytearray"): _bytearray,
        ("builtins", "set"): _set, ("builtins", "frozenset"): _frozenset,
        ("builtins", "list"): lambda items=(): list(items),
        ("builtins", "tuple"): lambda items=(): tuple(items),
        ("builtins", "bool"): lambda x=False: bool(x) if isinstance(x, (bool, int)) else _refuse("bool", x),
        ("builtins", "int"): lambda x=0: int(x) if isinstance(x, (bool, int)) else _refuse("int", x),
        ("builtins", "float"): lambda x=0.0: float(x) if isinstance(x, (int, float)) else _refuse("float", x),
        ("builtins", "complex"): lambda re=0.0, im=0.0: complex(re, im) if all(
            isinstance(v, (int, float)) for v in (re, im)) else _refuse("complex", re),
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): _codecs_encode,
        ("collections", "OrderedDict"): _ordered_dict,
    }
    return {k: v for k, v in table.items() if k[0] != "builtins" or k[1] in names}


def _refuse(name, x):
    raise UnsafePickleError(f"builtins.{name} of {type(x).__name__} is not allowed")


# ----------------------------------------------------------------------------- the unpickler

_D = pickle._Unpickler.dispatch  # noqa: SLF001  (the pure-Python opcode table; see README, Weight import)
_REFUSED_OPCODES = {pickle.INST: "INST", pickle.OBJ: "OBJ", pickle.NEWOBJ: "NEWOBJ", pickle.NEWOBJ_EX: "NEWOBJ_EX",
                    pickle.EXT1: "EXT1", pickle.EXT2: "EXT2", pickle.EXT4: "EXT4"}


class _CountingDispatch(dict):
    """The opcode table, counting every opcode run against the budget."""

    def __init__(self, table, limit: int):
        super().__init__(table)
        self.limit = self.left = int(limit)

    def __getitem__(self, key):
        self.left -= 1
        if self.left < 0:
            raise PickleReadError(f"the pickle runs more than {self.limit} opcodes, this reader's limit")
        return super().__getitem__(key)


class RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001
    """Pure-Python unpickler with an allowlist, no state setting but on stand-ins, and a budget.

    Args:
      file: binary file object (wrap untrusted files in :class:`BoundedReader`).
      allowed: ``{(module, name): object}`` for ``find_class``.
      persistent_load: ``pid -> object`` or None (persistent ids refused).
      encoding: for Python 2 ``str`` (see ``pickle.Unpickler``).
      max_opcodes: opcode budget.
    Raises (from ``load``): UnsafePickleError, PickleReadError, or whatever
      ``persistent_load`` raises; callers map them to their own errors.
    """

    dispatch = dict(_D)

    def __init__(self, file, allowed: Mapping[tuple[str, str], Any], *, persistent_load=None,
                 encoding: str = "latin1", max_opcodes: int = MAX_OPCODES):
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._persistent = persistent_load
        self.dispatch = _CountingDispatch(type(self).dispatch, max_opcodes)

    def find_class(self, module, name):
        if self.proto < 3:  # Python 2 names (__builtin__.set, copy_reg, ...), as pickle.Unpickler maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(f"refusing to load global {module}.{name}: not in this reader's allowlist")
        return obj

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickleError("persistent ids are not allowed in this file")
        return self._persistent(pid)

    # -- opcodes whose default behaviour is unsafe or unbounded

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if hasattr(inst, "_ppfr_setstate"):
            inst._ppfr_setstate(state)
        elif (type(inst) is collections.OrderedDict and isinstance(state, dict)
              and all(isinstance(k, str) and not k.startswith("__") for k in state)):
            inst.__dict__.update(state)  # torch's state_dict._metadata
        else:
            raise UnsafePickleError(f"the pickle tries to set state on {type(inst).__name__} "
                                    f"{inst!r:.60}")
    dispatch[pickle.BUILD[0]] = load_build

    def load_setitem(self):
        stack = self.stack
        value = stack.pop()
        key = stack.pop()
        check_hashable(key)
        _target_dict(stack[-1])[key] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        d = _target_dict(self.stack[-1])
        for i in range(0, len(items), 2):
            check_hashable(items[i])
            d[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        d = {}
        for i in range(0, len(items), 2):
            check_hashable(items[i])
            d[items[i]] = items[i + 1]
        self.append(d)
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, set):
            raise UnsafePickleError(f"ADDITEMS onto {type(target).__name__}")
        for x in items:
            check_hashable(x, "set element")
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        for x in items:
            check_hashable(x, "set element")
        self.append(frozenset(items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_appends(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, list):
            raise UnsafePickleError(f"APPENDS onto {type(target).__name__}")
        target.extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_append(self):
        value = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, list):
            raise UnsafePickleError(f"APPEND onto {type(target).__name__}")
        target.append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_bytearray8(self):
        # the default allocates the declared length before reading: read first, then copy
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise PickleReadError(f"truncated: BYTEARRAY8 of {n} bytes")
        self.append(bytearray(data))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def _refused(self):
        raise UnsafePickleError("the pickle uses an opcode this reader refuses (object construction by "
                                "class or the extension registry)")
    for _op in _REFUSED_OPCODES:
        dispatch[_op[0]] = _refused
    del _op


def _target_dict(d):
    if not isinstance(d, dict):
        raise UnsafePickleError(f"SETITEM onto {type(d).__name__}")
    return d


def resolve(obj, *, max_depth: int = MAX_DEPTH, leaf: Callable[[Any], Any] | None = None):
    """Replace every stand-in with its value (``_ppfr_resolve``, or ``leaf(obj)``) throughout ``obj``.

    Lists and dicts are updated in place (keeping their identity and attributes,
    e.g. torch's ``_metadata``), tuples rebuilt. Iterative; refuses nesting
    deeper than ``max_depth`` (PickleReadError).
    """
    leaf = leaf or (lambda o: o._ppfr_resolve() if hasattr(o, "_ppfr_resolve") else o)
    order: list = []
    seen: dict[int, Any] = {}
    stack = [(obj, 0, False)]
    while stack:  # post-order: children before parents
        o, d, done = stack.pop()
        if done:
            order.append(o)
            continue
        if id(o) in seen:
            continue
        seen[id(o)] = o
        ks = _resolve_children(o)
        if ks is None:
            order.append(o)
            continue
        if d >= max_depth:
            raise PickleReadError(f"objects nested more than {max_depth} levels deep")
        stack.append((o, d, True))
        stack.extend((c, d + 1, False) for c in ks)
    out: dict[int, Any] = {}
    get = lambda o: out.get(id(o), o)  # noqa: E731
    for o in order:
        if isinstance(o, dict):
            for k in list(o.keys()):
                o[k] = get(o[k])
            out[id(o)] = o
        elif isinstance(o, list):
            o[:] = [get(v) for v in o]
            out[id(o)] = o
        elif isinstance(o, tuple):
            out[id(o)] = tuple(get(v) for v in o)
        elif isinstance(o, (set, frozenset)):
            out[id(o)] = o
        else:
            out[id(o)] = leaf(o)
    # a tuple inside a cycle was rebuilt after the list that holds it: point the list at the new one
    for o in order:
        if isinstance(o, dict):
            for k in list(o.keys()):
                o[k] = get(o[k])
        elif isinstance(o, list):
            o[:] = [get(v) for v in o]
    return get(obj)


def _resolve_children(o):
    if isinstance(o, dict):
        return list(o.values())
    if isinstance(o, (list, tuple)):
        return o
    if isinstance(o, (set, frozenset)):
        return []
    return None
