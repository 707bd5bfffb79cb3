"""insightface RecordIO packs (ppfr_jax.data.recordio): written from the demo faces, read back through TrainIterator."""
import os
import struct

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from ppfr_jax import config_lib, image_io  # noqa: E402
from ppfr_jax.data import pipeline, recordio, sources  # noqa: E402

N = 24


@pytest.fixture(scope="module")
def demo_records():
    src = sources.tface_source(*(lambda p: (p["train_index"], p["train_root"]))(__import__(
        "ppfr_jax.demo_data", fromlist=["demo_paths"]).demo_paths()))
    out = []
    for i in range(N):
        ex = tf.train.Example.FromString(src.read_bytes(i)).features.feature
        out.append((ex["image"].bytes_list.value[0], int(src.labels[i])))
    return out


@pytest.fixture
def pack(tmp_path, demo_records):
    # identities renumbered 0.. so the pack is small
    ids = {lab: j for j, lab in enumerate(dict.fromkeys(l for _, l in demo_records))}
    recs = [(img, ids[lab]) for img, lab in demo_records]
    recordio.write_recordio_pack(recs, tmp_path / "pack")
    return tmp_path / "pack", recs, len(ids)


def _it(src, **kw):
    kw.setdefault("global_batch", 4)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("output_dtype", "uint8")
    return pipeline.TrainIterator(src, **kw)


def _idx(path):
    return [l.split("\t") for l in (path / "train.idx").read_text().splitlines()]


def test_pack_read_back_exactly(pack):
    path, recs, c = pack
    src = recordio.recordio_source(path)
    assert len(src) == N and src.num_classes == c and src.keys.tolist() == list(range(1, N + 1))
    assert (path / "property").read_text() == f"{c},112,112\n"
    np.testing.assert_array_equal(src.labels, [l for _, l in recs])
    assert [src.read_bytes(i) for i in range(N)] == [img for img, _ in recs]
    b = next(_it(src, shuffle=False, flip=False))
    for j in range(4):
        np.testing.assert_array_equal(b["image"][j], image_io.decode_rgb(recs[j][0]))
    assert b["label"].tolist() == [l for _, l in recs[:4]] and "landmarks" not in b
    with pytest.raises(ValueError, match="no landmarks"):
        _it(src, with_landmarks=True)
    # header record 0: flag 2, label [N + 1, N + 1 + C]; identity count from it without property
    os.remove(path / "property")
    assert recordio.recordio_source(path).num_classes == c


def test_multipart_record_and_flag_labels(tmp_path, demo_records):
    magic_float = struct.unpack("<f", struct.pack("<I", recordio.MAGIC))[0]
    img = demo_records[0][0]
    w = recordio.write_recordio_pack([(img, [1.0, magic_float])] + [(demo_records[1][0], 0)], tmp_path / "p")
    raw = open(w["rec"], "rb").read()
    off = int(_idx(tmp_path / "p")[1][1])
    assert struct.unpack_from("<I", raw, off + 4)[0] >> 29 == 1  # split where the magic sat
    src = recordio.recordio_source(tmp_path / "p")
    assert src.labels.tolist() == [1, 0] and src.read_bytes(0) == img and src.check(0) is None


def test_order_resume_and_hosts(pack):
    src = recordio.recordio_source(pack[0])
    a = [next(it) for it in [_it(src, seed=3)] for _ in range(6)]
    b = [next(it) for it in [_it(src, seed=3)] for _ in range(6)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    r = _it(src, seed=3, start_step=4)
    for k in (4, 5):
        np.testing.assert_array_equal(next(r)["image"], a[k]["image"])
    one = _it(src, seed=1, global_batch=6)
    h = [_it(src, seed=1, global_batch=6, process_index=p, process_count=2) for p in (0, 1)]
    for s in range(4):
        i0, i1 = h[0].batch_indices(s), h[1].batch_indices(s)
        assert not set(i0.tolist()) & set(i1.tolist())
        assert sorted(np.concatenate([i0, i1]).tolist()) == sorted(one.batch_indices(s).tolist())
    ep = np.concatenate([one.batch_indices(s) for s in range(4)])
    assert sorted(ep.tolist()) == list(range(N))  # 4 batches of 6 cover the 24 records


def _patch(path, offset, data):
    with open(path / "train.rec", "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic(pack):
    path = pack[0]
    off = int(_idx(path)[3][1])
    _patch(path, off, b"\0\0\0\0")
    with pytest.raises(sources.BadRecordError, match=rf"train.rec record 3 offset {off} .*line 4\): bad magic number 0x00000000"):
        recordio.recordio_source(path)
    src = recordio.recordio_source(path, skip_bad=True)
    assert len(src) == N - 1 and len(src.problems) == 1 and "record 3" in src.problems[0]
    assert len(_it(src).skipped) == 1


def test_truncated_record(pack):
    path = pack[0]
    off = int(_idx(path)[N][1])  # the last image
    nxt = int(_idx(path)[N + 1][1])
    with open(path / "train.rec", "r+b") as f:
        f.truncate(nxt - 10)
    (path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in _idx(path)[:N + 1]))
    with pytest.raises(sources.BadRecordError, match=rf"record {N} offset {off} .*record is truncated"):
        recordio.recordio_source(path)
    assert len(recordio.recordio_source(path, skip_bad=True)) == N - 1


def test_label_out_of_range(pack):
    path, _, c = pack
    off = int(_idx(path)[5][1])
    _patch(path, off + 8 + 4, struct.pack("<f", float(c + 7)))
    with pytest.raises(sources.BadRecordError, match=rf"record 5 offset {off} .*label {c + 7} out of range \[0, {c}\)"):
        recordio.recordio_source(path)
    src = recordio.recordio_source(path, skip_bad=True)
    assert len(src) == N - 1 and "label" in src.problems[0]


def test_idx_entry_past_end(pack):
    path = pack[0]
    lines = _idx(path)
    lines[2][1] = "99999999"
    (path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in lines))
    with pytest.raises(sources.BadRecordError, match=r"record 2 offset 99999999 .*past the end of"):
        recordio.recordio_source(path)
    assert len(recordio.recordio_source(path, skip_bad=True).problems) == 1


def test_config_validation_and_train_source(pack, tmp_path):
    from ppfr_jax import data
    cfg = config_lib.base_config()
    cfg.data.source = "recordio"
    cfg.data.path = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"config.data.path: .*train.rec and train.idx.*lacks \['train.rec', 'train.idx'\]"):
        config_lib.validate(cfg)
    cfg.data.path = str(pack[0])
    config_lib.validate(cfg)
    it, n_cls, n = data.train_source(cfg, 8, 2)
    b = next(it)
    assert (n_cls, n, it.step) == (pack[2], N, 3) and b["image"].shape == (8, 112, 112, 3)


def test_skipped_records_are_reported(pack, tmp_path, capsys):
    """skip_bad drops a bad record and says so: a console line naming it, data/skipped, results.json's count."""
    import json
    import os as _os
    from ppfr_jax import train
    path = pack[0]
    off = int(_idx(path)[3][1])
    _patch(path, off, b"\0\0\0\0")
    cfg = config_lib.load_config_spec(_os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "configs",
                                                    "arcface.py:tiny"))
    cfg.data.source = "recordio"
    cfg.data.path = str(path)
    cfg.data.skip_bad = True
    cfg.data.num_classes = 0
    cfg.num_train_steps = 2
    cfg.eval.pairs = ""
    cfg.eval.every_steps = 0
    res = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "data: 1 bad training record(s) skipped (data.skip_bad=True), 1 in all; " in out, out
    assert "record 3" in out and "bad magic number" in out
    assert res["data_skipped"] == 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data_skipped"] == 1


def test_report_skipped_counts_only_new_messages():
    from ppfr_jax import train
    lines = []

    class It:
        skipped = [f"rec {i}: bad" for i in range(5)]
    assert train._report_skipped(It(), 0, lines.append) == 5
    assert lines == ["data: 5 bad training record(s) skipped (data.skip_bad=True), 5 in all; "
                     "rec 0: bad; rec 1: bad; rec 2: bad (+ 2 more)"]
    assert train._report_skipped(It(), 5, lines.append) == 5 and len(lines) == 1  # nothing new: no line
    assert train._report_skipped(object(), 0, lines.append) == 0  # iterators without the attribute
