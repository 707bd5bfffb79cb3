"""Reading PyTorch checkpoints without torch: formats, dtypes, strides, safety, errors.

No torch here, so the zip- and legacy-format files are written by hand below
(``write_torch_zip`` / ``write_torch_legacy``): the pickle names the same
globals and persistent ids ``torch.save`` writes (``torch._utils
._rebuild_tensor_v2``, ``torch.FloatStorage``, ``('storage', type, key,
location, numel)``), so the reader sees what it would see from torch. The real
legacy file ``shared/data/models/mobilefacenet_casia_xiaoccer/068.ckpt`` checks
the same reader against torch's own output. Comparisons are exact: reading is
a byte copy, no arithmetic.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ppfr_jax import torch_pickle as tp

# ------------------------------------------------------------------ hand-made torch files

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class Global:
    """Pickled as ``GLOBAL module name`` (what pickling the real torch object emits)."""

    _cache: dict = {}

    def __new__(cls, module, name):
        key = (module, name)
        if key not in cls._cache:
            obj = super().__new__(cls)
            obj.module, obj.name = module, name
            cls._cache[key] = obj
        return cls._cache[key]

    def __reduce__(self):
        return self.name  # a string makes pickle call save_global

    def __call__(self, *args):  # pickle only checks that a reduce function is callable
        raise AssertionError("stand-in, never called")


class Storage:
    """A torch storage: 1-D data of one dtype, stored under ``key`` beside the pickle.

    ``untyped``: pickled as ``torch.UntypedStorage`` (numel = bytes); ``data``
    keeps its element dtype so a big-endian file swaps the right byte groups.
    """

    def __init__(self, data: np.ndarray, key: str, untyped: bool = False, location: str = "cpu"):
        self.data = np.ascontiguousarray(data).reshape(-1)
        self.key, self.untyped, self.location = key, untyped, location

    @property
    def type_global(self):
        return Global("torch", "UntypedStorage" if self.untyped else _STORAGE_NAMES[self.data.dtype])

    @property
    def numel(self):
        return self.data.nbytes if self.untyped else self.data.size


class Tensor:
    """A tensor view of a Storage; reduces like ``torch.Tensor.__reduce_ex__``."""

    def __init__(self, storage, offset, size, stride, fn="_rebuild_tensor_v2", dtype=None, parameter=False):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
        self.fn, self.dtype, self.parameter = fn, dtype, parameter

    def __reduce__(self):
        hooks = collections.OrderedDict()
        if self.fn == "_rebuild_tensor_v3":
            args = (self.storage, self.offset, self.size, self.stride, False, hooks, Global("torch", self.dtype))
        elif self.fn == "_rebuild_tensor":
            args = (self.storage, self.offset, self.size, self.stride)
        else:
            args = (self.storage, self.offset, self.size, self.stride, False, hooks)
        rebuilt = (Global("torch._utils", self.fn), args)
        if self.parameter:
            return Global("torch._utils", "_rebuild_parameter"), (_Reduced(*rebuilt), True, hooks)
        return rebuilt


class _Reduced:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def tensor(arr, key, **kw) -> Tensor:
    """A contiguous tensor with its own storage holding ``arr``."""
    arr = np.asarray(arr)
    stride = tuple(s // arr.itemsize for s in np.ascontiguousarray(arr).strides) if arr.ndim else ()
    return Tensor(Storage(arr, key), 0, arr.shape, stride, **kw)


def torchify(obj, counter=None):
    """Replace every ndarray in a nested structure by a Tensor with a fresh storage key."""
    counter = counter if counter is not None else [0]
    if isinstance(obj, np.ndarray):
        counter[0] += 1
        return tensor(obj, str(counter[0]))
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, torchify(v, counter)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: torchify(v, counter) for k, v in obj.items()}
    if isinstance(obj, list):
        return [torchify(v, counter) for v in obj]
    if isinstance(obj, tuple):
        return tuple(torchify(v, counter) for v in obj)
    return obj


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us emit GLOBALs by hand
    def __init__(self, f, legacy: bool):
        super().__init__(f, protocol=2)
        self.legacy, self.storages = legacy, {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages.setdefault(obj.key, obj)
        pid = ("storage", obj.type_global, obj.key, obj.location, obj.numel)
        return pid + (None,) if self.legacy else pid

    def save_global(self, obj, name=None):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _pickle_with_storages(obj, legacy: bool):
    buf = io.BytesIO()
    p = _TorchPickler(buf, legacy)
    p.dump(obj)
    return buf.getvalue(), p.storages


def write_torch_zip(path, obj, *, archive="archive", byteorder="little"):
    """Write ``obj`` (with Tensor/Storage leaves, or plain ndarrays) as torch>=1.6 zip."""
    data, storages = _pickle_with_storages(torchify(obj), legacy=False)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", data)
        if byteorder is not None:
            z.writestr(f"{archive}/byteorder", byteorder)
        for key, st in storages.items():
            raw = st.data.astype(st.data.dtype.newbyteorder(">")) if byteorder == "big" else st.data
            z.writestr(f"{archive}/data/{key}", raw.tobytes())
        z.writestr(f"{archive}/version", "3\n")
    return path


def write_torch_legacy(path, obj, *, little_endian=True, storage_order=None):
    """Write ``obj`` in the legacy (pre-1.6) format: pickles, then int64 numel + bytes per storage."""
    main, storages = _pickle_with_storages(torchify(obj), legacy=True)
    keys = list(storages) if storage_order is None else storage_order
    end = "<" if little_endian else ">"
    with open(path, "wb") as f:
        pickle.dump(tp.LEGACY_MAGIC, f, protocol=2)
        pickle.dump(tp.LEGACY_PROTOCOL, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": little_endian,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        f.write(main)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            st = storages[key]
            f.write(struct.pack(end + "q", st.data.size))
            f.write(st.data.astype(st.data.dtype.newbyteorder(end)).tobytes())
    return path


# ------------------------------------------------------------------------ the real file

CASIA = "data/models/mobilefacenet_casia_xiaoccer/068.ckpt"
_TSV_DTYPE = {"torch.FloatStorage": np.float32, "torch.LongStorage": np.int64}


def test_real_legacy_checkpoint_loads_exactly(shared_dir):
    path = shared_dir / CASIA
    obj, end = tp._load_legacy(str(path), tp._Budget(str(path), path.stat().st_size), return_end=True)
    assert end == path.stat().st_size  # every storage byte consumed, nothing left over
    assert set(obj) == {"epoch", "net_state_dict"} and obj["epoch"] == 68
    sd = obj["net_state_dict"]
    assert isinstance(sd, collections.OrderedDict)
    rows = [line.rstrip("\n").split("\t") for line in (shared_dir / (CASIA + ".state_dict_keys.tsv")).open()
            if not line.startswith("#")]
    assert list(sd) == [r[0] for r in rows] and len(sd) == 333
    for key, shape, storage in rows:
        want = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
        assert sd[key].shape == want, key
        assert sd[key].dtype == _TSV_DTYPE[storage], key
        assert sd[key].flags.c_contiguous
    assert sum(v.size for v in sd.values()) == 1_019_186
    assert all(np.isfinite(v).all() for v in sd.values())
    assert all(sd[k].min() > 0 for k in sd if k.endswith("running_var"))
    assert sd["conv1.bn.num_batches_tracked"].dtype == np.int64 and sd["conv1.bn.num_batches_tracked"] > 0
    # load_state_dict finds 'net_state_dict' inside the wrapper
    sd2 = tp.load_state_dict(path)
    assert list(sd2) == list(sd)
    np.testing.assert_array_equal(sd2["linear7.conv.weight"], sd["linear7.conv.weight"])


# ------------------------------------------------------------------------ zip format

def test_zip_golden_state_dict_round_trip(tmp_path):
    from conftest import golden_state_dict

    sd = collections.OrderedDict(golden_state_dict("pfld"))
    path = write_torch_zip(tmp_path / "pfld.pth", {"epoch": 3, "state_dict": sd}, archive="pfld_ckpt")
    got = tp.load_state_dict(path)
    assert list(got) == list(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype and got[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(got[k], sd[k], err_msg=k)


def _views_and_dtypes():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(24).astype(np.float32)
    shared = Storage(base, "shared")
    obj = collections.OrderedDict()
    # a transposed (non-contiguous) view: torch (3, 8) contiguous -> .t() has stride (1, 8)
    obj["transposed"] = Tensor(shared, 0, (8, 3), (1, 8))
    # a slice with an offset into the same storage
    obj["sliced"] = Tensor(shared, 5, (2, 4), (8, 1))
    obj["expanded"] = Tensor(shared, 2, (3, 4), (0, 1))  # stride 0 (broadcast / expand)
    obj["legacy_fn"] = Tensor(Storage(np.arange(6, dtype=np.float64), "f64"), 0, (2, 3), (3, 1),
                              fn="_rebuild_tensor")
    obj["param"] = tensor(np.arange(4, dtype=np.float32), "p", parameter=True)
    for i, dt in enumerate([np.float16, ml_dtypes.bfloat16, np.int32, np.int64, np.uint8, np.bool_, np.int8]):
        obj[f"dt_{np.dtype(dt).name}"] = tensor((rng.standard_normal((2, 3)) * 5).astype(dt), f"dt{i}")
    obj["scalar"] = tensor(np.array(7, np.int64), "sc")
    # an untyped storage read through _rebuild_tensor_v3 with an explicit dtype
    raw = np.array([1.5, -2.0, 3.25], np.float32)
    obj["v3"] = Tensor(Storage(raw, "u", untyped=True), 1, (2,), (1,), fn="_rebuild_tensor_v3",
                       dtype="float32")
    expect = {
        "transposed": base.reshape(3, 8).T, "sliced": base[5:21].reshape(2, 8)[:, :4],
        "expanded": np.broadcast_to(base[2:6], (3, 4)), "legacy_fn": np.arange(6.0).reshape(2, 3),
        "param": np.arange(4, dtype=np.float32), "scalar": np.array(7, np.int64), "v3": raw[1:],
    }
    for k, t in obj.items():
        if k.startswith("dt_"):
            expect[k] = t.storage.data.reshape(t.size)
    return obj, expect


@pytest.mark.parametrize("byteorder", ["little", "big", None])
def test_zip_strides_offsets_dtypes(tmp_path, byteorder):
    obj, expect = _views_and_dtypes()
    got = tp.load_torch_file(write_torch_zip(tmp_path / "t.pth", obj, archive="any_name", byteorder=byteorder))
    assert list(got) == list(obj)
    for k, want in expect.items():
        assert got[k].dtype == want.dtype, k
        assert got[k].flags.c_contiguous and got[k].flags.writeable, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)
    got["expanded"][0, 0] = 99  # copies, not views of one another
    assert got["expanded"][1, 0] != 99 and got["sliced"][0, 0] == expect["sliced"][0, 0]


def test_zip_plain_python_values(tmp_path):
    sizes = _Reduced(Global("torch", "Size"), ((2, 3),))
    obj = {"epoch": 12, "lr": 0.1, "name": "ir50", "flags": [True, None, (1, 2.5, "x")],
           "size": sizes, "blob": b"\x00\xffabc", "nested": {"a": collections.OrderedDict(b=np.ones(2, np.float32))},
           # numpy values pickled by numpy itself (not tensors), e.g. a saved best accuracy
           "best_acc": np.float64(0.9925), "np_meta": _NumpyPickled(np.arange(3, dtype=np.int16))}
    got = tp.load_torch_file(write_torch_zip(tmp_path / "p.pth", obj))
    assert got["epoch"] == 12 and got["lr"] == 0.1 and got["name"] == "ir50"
    assert got["flags"] == [True, None, (1, 2.5, "x")]
    assert got["size"] == (2, 3) and got["blob"] == b"\x00\xffabc"
    np.testing.assert_array_equal(got["nested"]["a"]["b"], np.ones(2, np.float32))
    assert got["best_acc"] == 0.9925 and got["best_acc"].dtype == np.float64
    np.testing.assert_array_equal(got["np_meta"], np.arange(3, dtype=np.int16))


class _NumpyPickled:
    """An ndarray pickled the way numpy does it (``_reconstruct`` + BUILD), not as a torch tensor."""

    def __init__(self, arr):
        self.arr = arr

    def __reduce__(self):
        return self.arr.__reduce__()


# ------------------------------------------------------------------------ legacy format

@pytest.mark.parametrize("little_endian", [True, False])
def test_legacy_hand_made(tmp_path, little_endian):
    obj, expect = _views_and_dtypes()
    del obj["v3"], expect["v3"]  # untyped storages do not exist in the legacy format
    got = tp.load_torch_file(write_torch_legacy(tmp_path / "l.pt", obj, little_endian=little_endian))
    for k, want in expect.items():
        assert got[k].dtype == want.dtype, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def test_legacy_storage_view(tmp_path):
    # Old torch pickled storage *views*: view_metadata = (view_key, offset, size).
    base = Storage(np.arange(10, dtype=np.float32), "root")

    class ViewPickler(_TorchPickler):
        def persistent_id(self, obj):
            if isinstance(obj, tuple) and obj and obj[0] == "VIEW":
                self.storages.setdefault("root", base)
                return ("storage", base.type_global, "root", "cpu", 10, ("v1", 4, 3))
            return super().persistent_id(obj)

    buf = io.BytesIO()
    p = ViewPickler(buf, legacy=True)
    p.dump({"w": Tensor(("VIEW",), 1, (2,), (1,))})
    path = tmp_path / "view.pt"
    with open(path, "wb") as f:
        for x in (tp.LEGACY_MAGIC, tp.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(x, f, protocol=2)
        f.write(buf.getvalue())
        pickle.dump(["root"], f, protocol=2)
        f.write(struct.pack("<q", 10) + base.data.tobytes())
    np.testing.assert_array_equal(tp.load_torch_file(path)["w"], np.array([5.0, 6.0], np.float32))


# ------------------------------------------------------------------------ state_dict lookup

@pytest.mark.parametrize("wrap", ["plain", "state_dict", "net_state_dict", "model", "nested", "module"])
def test_load_state_dict_finds_it(tmp_path, wrap):
    sd = collections.OrderedDict([("conv.weight", np.ones((2, 1, 3, 3), np.float32)),
                                  ("bn.num_batches_tracked", np.array(3, np.int64))])
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 1, "optimizer": {"lr": 0.1}},
        "net_state_dict": {"epoch": 68, "net_state_dict": sd},
        "model": {"model": sd, "args": ["x"]},
        "nested": {"checkpoint": {"model": {"state_dict": sd}}},
        "module": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
    }[wrap]
    got = tp.load_state_dict(write_torch_zip(tmp_path / "s.pth", obj))
    assert list(got) == list(sd)
    if wrap == "module":
        assert list(tp.load_state_dict(tmp_path / "s.pth", strip_prefix=None)) == ["module." + k for k in sd]


def test_load_state_dict_explicit_key_and_ambiguity(tmp_path):
    a = {"w": np.zeros(2, np.float32)}
    b = {"w": np.ones(2, np.float32)}
    path = write_torch_zip(tmp_path / "two.pth", {"student": a, "teacher": b})
    with pytest.raises(tp.CheckpointReadError, match="no unique state_dict.*student"):
        tp.load_state_dict(path)
    np.testing.assert_array_equal(tp.load_state_dict(path, key="teacher")["w"], b["w"])
    with pytest.raises(KeyError, match="'nope'"):
        tp.load_state_dict(path, key="nope")


# ------------------------------------------------------------------------ malicious pickles

def _evil_payloads(marker):
    cmd = f"touch {marker}"
    return {
        "os.system": (Global("os", "system"), (cmd,)),
        "posix.system": (os.system, (cmd,)),  # what pickle itself emits for os.system
        "builtins.eval": (Global("builtins", "eval"), (f"open({str(marker)!r}, 'w').close()",)),
        "builtins.exec": (Global("builtins", "exec"), (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": (Global("subprocess", "Popen"), (["touch", str(marker)],)),
        "torch.load": (Global("torch", "load"), (str(marker),)),
    }


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("name", list(_evil_payloads("m")))
def test_malicious_pickle_is_refused(tmp_path, fmt, name):
    marker = tmp_path / "pwned"
    fn, args = _evil_payloads(marker)[name]
    # hidden inside an otherwise normal checkpoint, after a real tensor
    obj = {"state_dict": collections.OrderedDict(w=np.ones(2, np.float32)), "hook": _Reduced(fn, args)}
    path = tmp_path / "evil.pth"
    (write_torch_zip if fmt == "zip" else write_torch_legacy)(path, obj)
    with pytest.raises(tp.UnsafeCheckpointError, match=name.replace(".", r"\.")) as e:
        tp.load_torch_file(path)
    assert str(path) in str(e.value)
    with pytest.raises(tp.UnsafeCheckpointError):
        tp.load_state_dict(path)
    assert not marker.exists()


def test_payload_is_live_with_plain_pickle(tmp_path):
    """Control: the same bytes DO run code under pickle.loads, so the refusal above is what stops it."""
    marker = tmp_path / "ran"
    data, _ = _pickle_with_storages(_Reduced(*_evil_payloads(marker)["posix.system"]), legacy=False)
    pickle.loads(data)
    assert marker.exists()


def test_build_onto_allowlisted_objects_is_refused(tmp_path):
    # BUILD would let a pickle rewrite the shared FloatStorage stand-in for later loads.
    buf = io.BytesIO()
    p = _TorchPickler(buf, legacy=False)
    p.save_global(Global("torch", "FloatStorage"))
    p.save({"dtype": "object"})
    p.write(pickle.BUILD + pickle.STOP)
    path = tmp_path / "build.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + buf.getvalue())
    with pytest.raises(tp.UnsafeCheckpointError, match="set state"):
        tp.load_torch_file(path)
    # the stand-in is untouched: a normal file still reads float32
    ok = tp.load_torch_file(write_torch_zip(tmp_path / "ok.pth", {"w": np.ones(2, np.float32)}))
    assert ok["w"].dtype == np.float32


def test_persistent_id_other_than_storage_is_refused(tmp_path):
    class ModulePickler(_TorchPickler):
        def persistent_id(self, obj):
            return ("module", "MyNet", "net.py", "import os") if obj == "SRC" else super().persistent_id(obj)

    buf = io.BytesIO()
    ModulePickler(buf, legacy=True).dump(["SRC"])
    path = tmp_path / "module.pt"
    with open(path, "wb") as f:
        for x in (tp.LEGACY_MAGIC, tp.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(x, f, protocol=2)
        f.write(buf.getvalue())
        pickle.dump([], f, protocol=2)
    with pytest.raises(tp.UnsafeCheckpointError, match="'module'"):
        tp.load_torch_file(path)


# ------------------------------------------------------------------------ corrupt files

def _good_legacy(tmp_path):
    return write_torch_legacy(tmp_path / "good.pt", {"a": np.arange(100, dtype=np.float32),
                                                     "b": np.arange(10, dtype=np.int64)})


@pytest.mark.parametrize("cut", [10, 60, 200, -8, -1])
def test_truncated_legacy_names_file(tmp_path, cut):
    data = open(_good_legacy(tmp_path), "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:cut])
    with pytest.raises(tp.CheckpointReadError, match="cut.pt"):
        tp.load_torch_file(path)


def test_truncated_zip_names_file(tmp_path):
    data = write_torch_zip(tmp_path / "z.pth", {"a": np.arange(1000, dtype=np.float32)}).read_bytes()
    path = tmp_path / "zcut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(tp.CheckpointReadError, match="zcut.pth"):
        tp.load_torch_file(path)


def test_zip_storage_too_short_or_missing(tmp_path):
    path = write_torch_zip(tmp_path / "short.pth", {"a": np.arange(10, dtype=np.float32)})
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["archive/data/1"] = members["archive/data/1"][:12]
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(tp.CheckpointReadError, match="has 12 bytes, expected 40"):
        tp.load_torch_file(path)
    del members["archive/data/1"]
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(tp.CheckpointReadError, match="missing"):
        tp.load_torch_file(path)


def test_out_of_bounds_strides_are_refused(tmp_path):
    st = Storage(np.arange(4, dtype=np.float32), "s")
    path = write_torch_zip(tmp_path / "oob.pth", {"w": Tensor(st, 1, (2, 3), (3, 1))})
    with pytest.raises(tp.CheckpointReadError, match="reaches element 6 of storage 's' which has 4"):
        tp.load_torch_file(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"a": 1}, protocol=2)])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    with pytest.raises(tp.CheckpointReadError, match="junk.bin"):
        tp.load_torch_file(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tp.load_torch_file("/nonexistent/nope.pth")
