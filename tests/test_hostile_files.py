"""Hostile files against every reader of untrusted input: ``.pth`` (torch_pickle), ``.bin``
(evaluate.load_bin), ``.npz`` (protected files from clients, landmark tables).

The rules (SECURITY.md): no allowed global builds an object that reads memory it does not own;
the work and memory a file costs are bounded by the bytes it holds; every failure is the reader's
own error naming the file. Each crafted file below is a few hundred bytes to a few hundred KB.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppfr_jax import deploy, evaluate, safe_npz, safe_pickle
from ppfr_jax import torch_pickle as tp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- a tiny pickle assembler


def glob(m, n):
    return b"c" + m.encode() + b"\n" + n.encode() + b"\n"


def s(t):
    b = t.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def i(n):
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    d = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(d)]) + d


def by(b):
    return b"C" + bytes([len(b)]) + b


def tup(*x):
    return b"(" + b"".join(x) + b"t"


def call(fn, *a):
    return fn + tup(*a) + b"R"


NONE, TRUE, FALSE = b"N", b"\x88", b"\x89"


def prog(body, proto=2):
    return b"\x80" + bytes([proto]) + body + b"."


def storage(stype="FloatStorage", key="0", numel=1):
    return tup(s("storage"), glob("torch", stype), s(key), s("cpu"), i(numel)) + b"Q"


def rebuild(st_, off, size, stride):
    return call(glob("torch._utils", "_rebuild_tensor_v2"), st_, i(off), tup(*[i(v) for v in size]),
                tup(*[i(v) for v in stride]), FALSE, call(glob("collections", "OrderedDict")))


def write_zip(path, pkl, storages=None, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for k, v in (storages or {}).items():
            z.writestr(f"archive/data/{k}", v)
    return path


def legacy(path, body_pickle: bytes, keys=(), storages=b""):
    with open(path, "wb") as f:
        for x in (tp.LEGACY_MAGIC, tp.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(x, f, protocol=2)
        f.write(body_pickle)
        pickle.dump(list(keys), f, protocol=2)
        f.write(storages)
    return path


def read_pth(path):
    with pytest.raises(tp.CheckpointReadError) as e:
        tp.load_torch_file(path)
    assert str(path) in str(e.value)
    return e.value


# ----------------------------------------------------------------------------- memory safety

# a dtype made an object dtype through BUILD, then a scalar built from file bytes: numpy would
# dereference 0x4141414141414141 (SIGSEGV) if the BUILD reached the real dtype
_DTYPE_SETSTATE = (call(glob("numpy", "dtype"), s("O8"), FALSE, TRUE)
                   + tup(i(3), s("|"), NONE, NONE, NONE, i(-1), i(-1), i(0)) + b"b")
_SEGV_PROGRAMS = {
    "object_dtype_via_build": prog(call(glob("numpy.core.multiarray", "scalar"), _DTYPE_SETSTATE, by(b"A" * 8))),
    "float_dtype_state_with_object_flags": prog(call(
        glob("numpy._core.multiarray", "scalar"),
        call(glob("numpy", "dtype"), s("f8"), FALSE, TRUE) + tup(i(3), s("<"), NONE, NONE, NONE, i(-1), i(-1),
                                                                 i(63)) + b"b", by(b"A" * 8))),
    "object_array_via_reconstruct": prog(
        call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(i(0)), by(b"b"))
        + tup(i(1), tup(i(1)), call(glob("numpy", "dtype"), s("O8"), FALSE, TRUE), FALSE, by(b"A" * 8)) + b"b"),
    "build_onto_numpy_scalar": prog(
        call(glob("numpy.core.multiarray", "scalar"), call(glob("numpy", "dtype"), s("f8"), FALSE, TRUE),
             by(b"\x00" * 8)) + tup(NONE, by(b"A" * 8)) + b"b"),
}


@pytest.mark.parametrize("name", sorted(_SEGV_PROGRAMS))
@pytest.mark.parametrize("fmt", ["pth", "bin"])
def test_no_allowed_global_builds_an_object_that_reads_foreign_memory(tmp_path, name, fmt):
    # in a child process: a regression must fail this test, not kill the test run
    path = tmp_path / f"evil.{fmt}"
    body = _SEGV_PROGRAMS[name]
    if fmt == "pth":
        write_zip(path, body)
        code = "from ppfr_jax import torch_pickle as m; E = m.CheckpointReadError; f = m.load_torch_file"
    else:
        path.write_bytes(body)
        code = "from ppfr_jax import evaluate as m; E = m.BadInputError; f = m.load_bin"
    code += textwrap.dedent(f"""
    try:
        f({str(path)!r})
        print("RETURNED")
    except E as e:
        print("REFUSED", {str(path)!r} in str(e), type(e).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, f"reader crashed (rc {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.split()[:2] == ["REFUSED", "True"], r.stdout + r.stderr[-500:]


# ----------------------------------------------------------------------------- bounded by the file's bytes


def test_stride0_and_shared_storage_expansion_is_refused(tmp_path):
    p = write_zip(tmp_path / "stride0.pth", prog(rebuild(storage("FloatStorage", "0", 4), 0, (2 ** 14, 2 ** 14),
                                                         (0, 0))), {"0": bytes(16)})
    assert os.path.getsize(p) < 1000
    assert "would take 1073741824 bytes" in str(read_pth(p))
    refs = b"".join(s(f"t{k}") + rebuild(storage("FloatStorage", "0", 2 ** 16), 0, (2 ** 16,), (1,))
                    for k in range(512))  # one 256 KiB storage named by 512 tensors: 128 MiB if copied
    p = write_zip(tmp_path / "shared.pth", prog(b"}(" + refs + b"u"), {"0": bytes(2 ** 18)}, zipfile.ZIP_DEFLATED)
    assert "more than this file's storages allow" in str(read_pth(p))
    p = write_zip(tmp_path / "tib.pth", prog(rebuild(storage("FloatStorage", "0", 4), 0, (2 ** 20, 2 ** 20),
                                                     (0, 0))), {"0": bytes(16)})
    read_pth(p)  # 4 TiB asked: the reader's error, not numpy's _ArrayMemoryError


def test_a_few_shared_views_within_the_budget_still_load(tmp_path):
    # real checkpoints do share storages (views, tied weights): small overlaps stay readable
    refs = b"".join(s(f"t{k}") + rebuild(storage("FloatStorage", "0", 256), 0, (256,), (1,)) for k in range(3))
    p = write_zip(tmp_path / "views.pth", prog(b"}(" + refs + b"u"), {"0": np.arange(256, dtype="<f4").tobytes()})
    out = tp.load_torch_file(p)
    assert sorted(out) == ["t0", "t1", "t2"] and all(np.array_equal(v, np.arange(256)) for v in out.values())


def _members_opened(monkeypatch, path):
    """Load ``path`` (expecting the reader's error) and list the zip members it opened to read."""
    reads = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, mode="r", *a, **k):
        if mode == "r":
            reads.append(getattr(name, "filename", name))
        return real_open(self, name, mode, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "open", spy)
        err = read_pth(path)
    return err, reads


def test_zip_bombs_are_refused_before_decompressing(tmp_path, monkeypatch):
    # storage member of 64 MiB zeros declared as one float
    with zipfile.ZipFile(tmp_path / "bomb_storage.pth", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", prog(rebuild(storage("FloatStorage", "0", 1), 0, (1,), (1,))))
        z.writestr("archive/data/0", bytes(64 << 20))
    e, reads = _members_opened(monkeypatch, tmp_path / "bomb_storage.pth")
    assert "has 67108864 bytes, expected 4" in str(e) and "archive/data/0" not in reads
    # honestly declared: 16M floats, 64 MiB of zeros deflated into ~64 KB
    with zipfile.ZipFile(tmp_path / "honest_bomb.pth", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", prog(rebuild(storage("FloatStorage", "0", 2 ** 24), 0, (2 ** 24,), (1,))))
        z.writestr("archive/data/0", bytes(64 << 20))
    assert os.path.getsize(tmp_path / "honest_bomb.pth") < 200_000
    e, reads = _members_opened(monkeypatch, tmp_path / "honest_bomb.pth")
    assert "zip bomb" in str(e) and "archive/data/0" not in reads
    # data.pkl: a valid pickle followed by 65 MiB of zeros
    with zipfile.ZipFile(tmp_path / "bomb_pickle.pth", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02]q\x00." + bytes(65 << 20))
    e, reads = _members_opened(monkeypatch, tmp_path / "bomb_pickle.pth")
    assert "this reader takes pickles of at most" in str(e) and reads == []


@pytest.mark.parametrize("body,expect", [
    (b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 60) + b"x", "a record needs 1152921504606846976 bytes"),  # BINBYTES8
    (b"\x80\x05\x96" + struct.pack("<Q", 2 ** 60) + b"x", "a record needs 1152921504606846976 bytes"),  # BYTEARRAY8
    (b"\x80\x04\x8d" + struct.pack("<Q", 2 ** 60) + b"x", "a record needs 1152921504606846976 bytes"),  # BINUNICODE8
    (prog(call(glob("builtins", "bytearray"), i(2 ** 40))), "bytes/bytearray from int is not allowed"),
    (prog(b"]" + b"r\xff\xff\xff\x7f" + b"0" + b"j\xff\xff\xff\x7f"), None),  # memo index 2**31: the C
    # unpickler would preallocate (and zero) 2**31 pointers; here it is a dict key
])
def test_size_fields_cannot_allocate(tmp_path, body, expect):
    p = write_zip(tmp_path / "alloc.pth", body)
    if expect is None:
        assert tp.load_torch_file(p) == []
        return
    e = read_pth(p)
    assert expect in str(e) and "MemoryError" not in str(e)


def test_bin_reader_bounds(tmp_path):
    p = tmp_path / "alloc.bin"
    p.write_bytes(prog(tup(call(glob("builtins", "bytes"), i(2 ** 40)), b"]")))
    with pytest.raises(evaluate.BadInputError, match=r"alloc\.bin: .*bytes/bytearray from int"):
        evaluate.load_bin(p)
    p.write_bytes(prog(b"]" * 5000 + b"a" * 4999))
    with pytest.raises(evaluate.BadInputError, match=r"alloc\.bin: .*nested more than 256"):
        evaluate.load_bin(p)
    p.write_bytes(prog(call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(i(0)),
                            by(b"b")) + tup(i(1), tup(i(2 ** 40)), call(glob("numpy", "dtype"), s("u1"), FALSE, TRUE),
                                              FALSE, by(b"AAAA")) + b"b"))
    with pytest.raises(evaluate.BadInputError, match=r"alloc\.bin: .*needs 1099511627776 bytes, the pickle holds 4"):
        evaluate.load_bin(p)


def test_legacy_storage_count_cannot_allocate(tmp_path):
    # a tensor over a legacy storage that declares 2**40 floats; the file holds 16 bytes
    body = prog(rebuild(tup(s("storage"), glob("torch", "FloatStorage"), s("0"), s("cpu"), i(2 ** 40), NONE) + b"Q",
                        0, (1,), (1,)))
    p = legacy(tmp_path / "legacy.pt", body, keys=["0"], storages=struct.pack("<q", 2 ** 40) + bytes(16))
    assert "needs 4398046511104 bytes, file has 16 left" in str(read_pth(p))


def test_deep_nesting_is_the_readers_error(tmp_path):
    n = 100_000
    p = write_zip(tmp_path / "deep.pth", prog(b"]" * n + b"a" * (n - 1)))
    assert "nested more than 256 levels" in str(read_pth(p))
    deep_tuple = prog(b"(" * 300 + b"t" * 300)
    p = write_zip(tmp_path / "deep_tuple.pth", deep_tuple)
    read_pth(p)
    ok = write_zip(tmp_path / "ok.pth", prog(b"]" * 200 + b"a" * 199))  # 200 levels: fine
    assert isinstance(tp.load_torch_file(ok), list)


def test_colliding_keys_and_opcode_budget(tmp_path):
    m = 2 ** 61 - 1  # ints that share a hash: a dict of n of them costs n**2
    body = b"}(" + b"".join(i(k * m) + NONE for k in range(1, 20)) + b"u"
    p = write_zip(tmp_path / "coll.pth", prog(body))
    assert "beyond +-2**60" in str(read_pth(p))
    p.unlink()
    body = b"(" + b"".join(i(k * m) for k in range(1, 20)) + b"\x91"  # FROZENSET
    write_zip(p, prog(body, proto=4))
    read_pth(p)
    u = safe_pickle.RestrictedUnpickler(io.BytesIO(prog(b"]" + b"N" * 500)), {}, max_opcodes=100)
    with pytest.raises(safe_pickle.PickleReadError, match="more than 100 opcodes"):
        u.load()


# ----------------------------------------------------------------------------- .npz from clients


def _npy_header(shape, descr="<f4") -> bytes:
    h = {"descr": descr, "fortran_order": False, "shape": shape}
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, h)
    return b.getvalue()


def test_protected_file_cannot_make_the_server_allocate(tmp_path):
    p = tmp_path / "huge.npz"
    with zipfile.ZipFile(p, "w") as z:  # declares 2**40 floats in a 200-byte member
        z.writestr("meta.npy", _npy_header((), "<U2") + "{}".encode("utf-32-le"))
        z.writestr("x_p.npy", _npy_header((2 ** 40,)) + bytes(16))
    with pytest.raises(deploy.DeployError, match=r"huge\.npz: member 'x_p.npy'.*declares"):
        deploy.load_protected(p)
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:  # 100 MiB of zeros, honestly declared
        z.writestr("x_p.npy", _npy_header((25 << 20,)) + bytes(100 << 20))
    with pytest.raises(deploy.DeployError, match=r"huge\.npz: member 'x_p.npy' declares \d+ bytes, more than"):
        deploy.load_protected(p)
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("meta.npy", _npy_header((1,), "|O"))
    with pytest.raises(deploy.DeployError, match=r"huge\.npz: .*dtype object is not read"):
        deploy.load_protected(p)
    arrays = safe_npz.load_npz(_good_npz(tmp_path / "good.npz"))
    assert arrays["a"].shape == (3, 4) and arrays["m"].shape == () and str(arrays["m"]) == "hi"


def _good_npz(path):
    np.savez_compressed(path, a=np.arange(12, dtype=np.float32).reshape(3, 4), m=np.asarray("hi"))
    return path


# ----------------------------------------------------------------------------- fuzzing: only the reader's errors


def _valid_pth(tmp_path) -> bytes:
    from test_torch_pickle import write_torch_zip
    return write_torch_zip(tmp_path / "v.pth", {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                                                "b": np.ones(2, np.int64), "meta": {"epoch": 3, "n": [1, 2.5]}}
                           ).read_bytes()


def _mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, val in edits:
        if not b:
            break
        pos %= len(b)
        if kind == 0:
            b[pos] = val
        elif kind == 1:
            del b[pos:pos + 1 + val % 8]
        else:
            b[pos:pos] = bytes([val]) * (1 + val % 4)
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2 ** 31), st.integers(0, 255)), min_size=1, max_size=6)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _loads_or_names(load, error, path):
    """A damaged file either loads or fails with the reader's own error naming it."""
    try:
        load(path)
    except error as e:
        assert str(path) in str(e)


@FUZZ
@given(edits=EDITS)
def test_fuzz_pth_pickle(tmp_path, edits):
    with zipfile.ZipFile(io.BytesIO(_valid_pth(tmp_path))) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = _mutate(members[pkl], edits)  # re-zipped: the pickle itself is damaged, CRCs are valid
    p = tmp_path / "fuzz.pth"
    with zipfile.ZipFile(p, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    _loads_or_names(tp.load_torch_file, tp.CheckpointReadError, p)


@FUZZ
@given(edits=EDITS)
def test_fuzz_pth_file_bytes(tmp_path, edits):
    p = tmp_path / "fuzz_raw.pth"
    p.write_bytes(_mutate(_valid_pth(tmp_path), edits))
    _loads_or_names(tp.load_torch_file, tp.CheckpointReadError, p)


@FUZZ
@given(body=st.binary(max_size=300))
def test_fuzz_random_pickles_everywhere(tmp_path, body):
    for proto in (2, 4):
        data = b"\x80" + bytes([proto]) + body
        p = tmp_path / "r.pth"
        write_zip(p, data)
        _loads_or_names(tp.load_torch_file, tp.CheckpointReadError, p)
        b = tmp_path / "r.bin"
        b.write_bytes(data)
        _loads_or_names(evaluate.load_bin, evaluate.BadInputError, b)
        q = tmp_path / "r.pt"
        legacy(q, data)
        _loads_or_names(tp.load_torch_file, tp.CheckpointReadError, q)


@FUZZ
@given(edits=EDITS)
def test_fuzz_bin(tmp_path, edits):
    src = tmp_path / "v.bin"
    with open(src, "wb") as f:
        pickle.dump(([b"\xff\xd8jpeg1", b"\xff\xd8jpeg2"], np.array([True])), f, protocol=2)
    p = tmp_path / "fuzz.bin"
    p.write_bytes(_mutate(src.read_bytes(), edits))
    _loads_or_names(evaluate.load_bin, evaluate.BadInputError, p)


@FUZZ
@given(edits=EDITS)
def test_fuzz_protected_npz(tmp_path, edits):
    good = _good_npz(tmp_path / "g.npz").read_bytes()
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    p = tmp_path / "fuzz.npz"
    with zipfile.ZipFile(p, "w") as z:
        for n, b in members.items():
            z.writestr(n, _mutate(b, edits) if n == "a.npy" else b)
    try:
        safe_npz.load_npz(p, error=deploy.DeployError)
        deploy.load_protected(p)
    except deploy.DeployError as e:
        assert str(p) in str(e)


