"""Training data (ppfr_jax.data): sources, TFace format, order, bad data, ``ppfr-records``."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from conftest import host_iterator, write_face_folder  # noqa: E402
from ppfr_jax import data  # noqa: E402
from ppfr_jax.cli import records as records_cli  # noqa: E402
from ppfr_jax.data import pipeline, sources  # noqa: E402
from ppfr_jax.data import records as framing  # noqa: E402
from ppfr_jax.data import tfds as data_tfds  # noqa: E402

S = 16  # tiny images keep every test fast


def _jpeg(rng, size=S):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """3 identities x 5 images + side landmarks (3 points each)."""
    return write_face_folder(tmp_path, 5, S)


@pytest.fixture
def records(folder, tmp_path):
    root, lm = folder
    out = sources.image_folder_to_tface(root, tmp_path / "tfr", "TFR-tiny", landmarks=lm, shard_size=6)
    return out


def _it(src, **kw):
    return host_iterator(pipeline.TrainIterator, src, S, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- sources and format


def test_image_folder_labels_sorted(folder):
    root, _ = folder
    src = sources.image_folder_source(root)
    assert src.class_names == ["alice", "bob", "carol"] and src.num_classes == 3 and len(src) == 15
    assert [os.path.basename(os.path.dirname(f)) for f in src.files[:5]] == ["alice"] * 5
    np.testing.assert_array_equal(src.labels, np.repeat([0, 1, 2], 5))


def test_converter_writes_tface_format(records, folder):
    root, _ = folder
    # training index: name, shard, offset, label (tab separated), 6 records per shard
    lines = open(records["index"]).read().splitlines()
    assert len(lines) == 15 and lines[0].split("\t") == ["TFR-tiny", "0", "0", "0"]
    assert lines[6].split("\t")[1:3] == ["1", "0"]
    assert sorted(os.listdir(records["dir"])) == ["TFR-tiny-00000.tfrecord", "TFR-tiny-00001.tfrecord",
                                                   "TFR-tiny-00002.tfrecord", "TFR-tiny.index"]
    assert open(records["map"]).readline().split("\t") == ["alice/0.jpg", "0", "0\n"]
    # TF's own sequential reader sees the same records at the offsets we index (framing = len + 16)
    src = sources.tface_source(records["index"])
    assert src.record_landmarks == 3 and src.num_classes == 3
    seq = [r.numpy() for r in tf.data.TFRecordDataset(src.files[0])]
    assert [src.read_bytes(i) for i in range(6)] == seq
    # ...and each Example holds the original file bytes under "image" (TFace's reader key)
    ex = tf.train.Example.FromString(src.read_bytes(7)).features.feature
    assert ex["image"].bytes_list.value[0] == (root / "bob" / "2.jpg").read_bytes()  # alice 0-4, bob 0-4


def test_three_field_index(records, tmp_path):
    src4 = sources.tface_source(records["index"])
    idx3 = tmp_path / "three.txt"
    with open(idx3, "w") as f:
        for i in range(len(src4)):
            f.write(f"tfr/TFR-tiny/{os.path.basename(src4.files[src4.file_id[i]])} {src4.offsets[i]} "
                    f"{src4.labels[i]}\n")
    src3 = sources.tface_source(idx3)
    assert [src3.read_bytes(i) for i in range(15)] == [src4.read_bytes(i) for i in range(15)]


def test_crc32c_known_value():
    assert framing.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


# ----------------------------------------------------------------------------- order, resume, hosts


def test_deterministic_resumable_and_epoch_covering(records):
    src = sources.tface_source(records["index"])
    a = _take(_it(src, seed=3), 6)
    b = _take(_it(src, seed=3), 6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    c = _take(_it(src, seed=4), 3)
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    # resume at step 4 == steps 4, 5 of the uninterrupted run
    r = _it(src, seed=3, start_step=4)
    for k in (4, 5):
        np.testing.assert_array_equal(next(r)["image"], a[k]["image"])
    assert r.state()["step"] == 6
    # an epoch (3 batches of 4 out of 15) visits distinct records
    it = _it(src, seed=3)
    assert it.steps_per_epoch == 3
    ep = np.concatenate([it.batch_indices(s) for s in range(3)])
    assert len(set(ep.tolist())) == 12


def test_hosts_split_the_global_batch(records):
    src = sources.tface_source(records["index"])
    one = _take(_it(src, seed=1, global_batch=6), 2)
    h0 = _take(_it(src, seed=1, global_batch=6, process_index=0, process_count=2), 2)
    h1 = _take(_it(src, seed=1, global_batch=6, process_index=1, process_count=2), 2)
    for g, x, y in zip(one, h0, h1):
        assert x["image"].shape[0] == 3
        np.testing.assert_array_equal(np.concatenate([x["image"], y["image"]]), g["image"])
        np.testing.assert_array_equal(np.concatenate([x["label"], y["label"]]), g["label"])
    with pytest.raises(ValueError, match="multiple"):
        _it(src, global_batch=5, process_count=2)


# ----------------------------------------------------------------------------- decoding, flip, landmarks


def test_normalization_flip_and_landmarks(records, folder):
    src = sources.tface_source(records["index"])
    raw = _take(_it(src, seed=7, flip=False, with_landmarks=True, output_dtype="uint8"), 3)
    flo = _take(_it(src, seed=7, flip=False, with_landmarks=True), 3)
    fl = _take(_it(src, seed=7, flip=True, with_landmarks=True), 3)
    n_flipped = 0
    for r, f0, f1 in zip(raw, flo, fl):
        assert r["image"].dtype == np.uint8 and f0["image"].dtype == np.float32
        np.testing.assert_allclose(f0["image"], r["image"] / 127.5 - 1.0, atol=1e-6)
        assert f0["image"].min() >= -1 and f0["image"].max() <= 1
        assert f0["landmarks"].shape == (4, 3, 2)
        for i in range(4):
            if np.array_equal(f1["image"][i], f0["image"][i]):
                np.testing.assert_array_equal(f1["landmarks"][i], f0["landmarks"][i])
            else:
                n_flipped += 1
                np.testing.assert_array_equal(f1["image"][i], f0["image"][i][:, ::-1])
                np.testing.assert_allclose(f1["landmarks"][i, :, 0], 1 - f0["landmarks"][i, :, 0], atol=1e-6)
                np.testing.assert_array_equal(f1["landmarks"][i, :, 1], f0["landmarks"][i, :, 1])
    assert 0 < n_flipped < 12
    # decoding matches PIL bit for bit (evaluation decodes with PIL)
    root, lm = folder
    i0 = _it(src, seed=7).batch_indices(0)[0]
    ex = tf.train.Example.FromString(src.read_bytes(int(i0))).features.feature
    pil = np.asarray(Image.open(io.BytesIO(ex["image"].bytes_list.value[0])).convert("RGB"))
    np.testing.assert_array_equal(raw[0]["image"][0], pil)
    # the record's landmarks are the side file's
    with np.load(lm) as z:
        table = dict(zip(z["paths"], z["landmarks"]))
    key = open(records["map"]).read().splitlines()[i0].split("\t")[0]
    np.testing.assert_allclose(raw[0]["landmarks"][0], table[key])


def test_image_folder_with_side_landmarks_and_resize(folder):
    root, lm = folder
    src = sources.image_folder_source(root, landmarks=lm)
    b = next(_it(src, with_landmarks=True, flip=False, image_size=(8, 8)))
    assert b["image"].shape == (4, 8, 8, 3) and b["landmarks"].shape == (4, 3, 2)
    b = next(_it(src, output_dtype="bfloat16"))
    assert str(b["image"].dtype) == "bfloat16"
    with pytest.raises(ValueError, match="no landmarks"):
        _it(sources.image_folder_source(root), with_landmarks=True)


def test_make_global_batch():
    import jax
    from jax.sharding import Mesh
    from ppfr_jax import sharding
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = {"image": np.zeros((len(jax.devices()) * 2, 4, 4, 3), np.float32),
             "label": np.arange(len(jax.devices()) * 2, dtype=np.int32)}
    g = sharding.make_global_batch(local, mesh)
    assert g["image"].shape == local["image"].shape
    assert len(g["label"].addressable_shards) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(g["label"]), local["label"])


def test_demo_set_through_the_pipeline():
    from ppfr_jax.demo_data import demo_paths
    p = demo_paths()
    src = sources.tface_source(p["train_index"], p["train_root"])
    assert len(src) == 2729 and src.num_classes == 115 and src.record_landmarks == 98
    b = next(_it(src, global_batch=8, image_size=(112, 112), with_landmarks=True))
    assert b["image"].shape == (8, 112, 112, 3) and b["landmarks"].shape == (8, 98, 2)
    # Normalised to the crop, not clipped: the jaw contour often runs past the 112x112 crop's bottom.
    assert -0.25 < b["landmarks"].min() and b["landmarks"].max() < 1.25


def test_train_source_from_config():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(source="demo", path="", index="", flip=True,
                                                          skip_bad=False, landmarks=True)))
    it, n_cls, n = data.train_source(cfg, 8, 5)
    b = next(it)
    assert n_cls == 115 and n == 2729 and it.step == 6
    assert b["image"].dtype == np.uint8 and b["label"].dtype == np.int32 and b["landmarks"].shape == (8, 98, 2)


# ----------------------------------------------------------------------------- bad input


def test_empty_identity_folder(folder):
    root, _ = folder
    (root / "dave").mkdir()
    with pytest.raises(sources.BadRecordError, match=r"faces/dave: identity folder contains no images"):
        sources.image_folder_source(root)
    src = sources.image_folder_source(root, skip_bad=True)
    assert src.num_classes == 3 and len(src.problems) == 1
    assert len(_it(src).skipped) == 1


def test_corrupt_jpeg_names_the_file(folder):
    root, _ = folder
    bad = root / "bob" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    src = sources.image_folder_source(root)
    it = _it(src, seed=0)
    step = next(s for s in range(3) if src.files.index(str(bad)) in it.batch_indices(s))
    for _ in range(step):
        next(it)
    with pytest.raises(sources.BadRecordError, match=rf"step {step + 1} \(batch index {step}\):\n.*bob/2.jpg: field 'image': cannot decode"):
        next(it)
    # opt-in skip: full batches continue, the bad file is counted once
    it = _it(src, seed=0, skip_bad=True)
    batches = _take(it, 6)
    assert all(b["image"].shape == (4, S, S, 3) for b in batches)
    assert len(it.skipped) == 1 and "bob/2.jpg" in it.skipped[0]
    # the substitute is the next record in source order: same identity here
    assert src.labels[it._remap[src.files.index(str(bad))]] == src.labels[src.files.index(str(bad))]


def test_corrupt_jpeg_inside_a_record(folder, tmp_path):
    root, _ = folder
    bad = root / "alice" / "0.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 60)
    out = sources.image_folder_to_tface(root, tmp_path / "r2", "TFR-b", skip_bad=True)
    assert out["skipped"] == "1" and out["count"] == "14"
    with pytest.raises(sources.BadRecordError, match="alice/0.jpg: field 'image': cannot decode"):
        sources.image_folder_to_tface(root, tmp_path / "r3", "TFR-c")
    # a record written with a bad image anyway is named by shard, offset and index line
    recs = [("a", b"\xff\xd8junk", 0, None)] + [(f"k{i}", _jpeg(np.random.default_rng(i)), 0, None) for i in range(5)]
    w = framing.write_tface_records(recs, tmp_path / "r4", "TFR-d")
    src = sources.tface_source(w["index"])
    it = _it(src, seed=0, shuffle=False)
    with pytest.raises(sources.BadRecordError, match=r"TFR-d-00000.tfrecord offset 0 \(.*TFR-d.txt line 1\): field 'image': cannot decode"):
        next(it)


def test_truncated_tfrecord(records):
    shard = os.path.join(records["dir"], "TFR-tiny-00002.tfrecord")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    lines = open(records["index"]).read().splitlines()
    last_off = lines[-1].split("\t")[2]
    with pytest.raises(sources.BadRecordError, match=rf"TFR-tiny.txt line 15: record at offset {last_off} of shard "
                                                r".*TFR-tiny-00002.tfrecord is truncated"):
        sources.tface_source(records["index"])
    src = sources.tface_source(records["index"], skip_bad=True)
    assert len(src) == 14 and len(src.problems) == 1
    # without the listing check, the read itself names shard, offset and line
    src = sources.tface_source(records["index"], check_headers=False)
    with pytest.raises(sources.BadRecordError, match=rf"offset {last_off} is truncated.*line 15"):
        src.read_bytes(14)
    it = _it(src, seed=0, shuffle=False, global_batch=5)
    next(it), next(it)
    with pytest.raises(sources.BadRecordError, match=rf"TFR-tiny-00002.tfrecord: record at offset {last_off} is truncated"):
        next(it)


def test_index_line_past_shard_end(records):
    lines = open(records["index"]).read().splitlines()
    f = lines[3].split("\t")
    lines[3] = "\t".join([f[0], f[1], "999999", f[3]])
    open(records["index"], "w").write("\n".join(lines) + "\n")
    with pytest.raises(sources.BadRecordError, match=r"TFR-tiny.txt line 4: offset 999999 points past the end of shard"):
        sources.tface_source(records["index"])
    src = sources.tface_source(records["index"], skip_bad=True)
    assert len(src) == 14 and "line 4" in src.problems[0]


def test_index_offset_not_at_a_record(records):
    lines = open(records["index"]).read().splitlines()
    f = lines[2].split("\t")
    lines[2] = "\t".join([f[0], f[1], str(int(f[2]) + 3), f[3]])
    open(records["index"], "w").write("\n".join(lines) + "\n")
    with pytest.raises(sources.BadRecordError, match=r"line 3: .*is not the start of a TFRecord record"):
        sources.tface_source(records["index"])


def test_malformed_index_lines(records, tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("TFR-tiny\t0\t0\t0\nTFR-tiny\t0\tzero\t0\n")
    with pytest.raises(sources.BadRecordError, match=r"x.txt line 2"):
        sources.tface_source(p)
    p.write_text("TFR-nope\t0\t0\t0\n")
    with pytest.raises(sources.BadRecordError, match=r"x.txt line 1: shard .*TFR-nope-00000.tfrecord not found"):
        sources.tface_source(p)


# ----------------------------------------------------------------------------- TFDS


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices({"image": rng.integers(0, 255, (24, S, S, 3), dtype=np.uint8),
                                             "label": np.arange(24) % 4})
    try:
        b = tfds.dataset_builders.TfDataBuilder(
            name="ppfr_tiny", config="c", version="1.0.0", data_dir=str(tmp_path), split_datasets={"train": ds},
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(S, S, 3)),
                                                 "label": tfds.features.ClassLabel(num_classes=4)}))
        b.download_and_prepare()
    except Exception as e:  # e.g. a TFDS install missing its optional dependencies
        pytest.skip(f"cannot build a local TFDS dataset here: {type(e).__name__}: {e}")
    kw = dict(data_dir=str(tmp_path), global_batch=4, image_size=(S, S), process_count=1, process_index=0)
    it = data_tfds.TfdsIterator("ppfr_tiny/c", "train", seed=1, **kw)
    a = _take(it, 4)
    assert it.num_classes == 4 and it.dataset_size == 24 and a[0]["image"].shape == (4, S, S, 3)
    r = data_tfds.TfdsIterator("ppfr_tiny/c", "train", seed=1, start_step=2, **kw)
    np.testing.assert_array_equal(next(r)["image"], a[2]["image"])


# ----------------------------------------------------------------------------- honest inputs: every field checked


def _flip_payload_byte(records, line_no):
    """Flip one bit inside the JPEG of the record of index line ``line_no`` (framing left intact)."""
    f = open(records["index"]).read().splitlines()[line_no - 1].split("\t")
    shard = os.path.join(records["dir"], f"{f[0]}-{int(f[1]):05d}.tfrecord")
    off = int(f[2])
    data = bytearray(open(shard, "rb").read())
    pos = data.index(b"\xff\xda", off) + 40  # inside the entropy-coded data
    data[pos] ^= 0x10
    open(shard, "wb").write(bytes(data))
    return shard, off


def test_payload_crc_is_checked_in_verify_and_training(records, capsys):
    shard, off = _flip_payload_byte(records, 2)
    # TensorFlow's own reader refuses the shard: so must we, naming the record
    with pytest.raises(tf.errors.DataLossError):
        for _ in tf.data.TFRecordDataset(shard):
            pass
    src = sources.tface_source(records["index"])  # listing reads headers only
    problem = src.check(1)
    assert f"offset {off}" in problem and "line 2" in problem and "data CRC mismatch" in problem
    assert [i for i in range(len(src)) if src.check(i)] == [1]
    with pytest.raises(sources.BadRecordError, match=rf"offset {off}.*line 2"):
        src.read_bytes(1)
    it = _it(src, seed=0, shuffle=False, flip=False)
    with pytest.raises(sources.BadRecordError, match=rf"step 1 \(batch index 0\):\n.*offset {off} \(.*line 2\): .*data CRC mismatch"):
        next(it)
    assert records_cli.main(["verify", "--index", records["index"]]) == 1
    out = capsys.readouterr().out
    assert "1 bad records" in out and f"first: {shard} offset {off}" in out


def test_crc32c_is_tensorflows(records):
    # the framing CRCs TensorFlow wrote are the ones we compute (google-crc32c)
    f = open(records["index"]).read().splitlines()[0].split("\t")
    shard = os.path.join(records["dir"], f"{f[0]}-{int(f[1]):05d}.tfrecord")
    raw = open(shard, "rb").read()
    (length,) = np.frombuffer(raw[:8], "<u8")
    payload = raw[12:12 + int(length)]
    assert framing.masked_crc32c(raw[:8]) == int(np.frombuffer(raw[8:12], "<u4")[0])
    assert framing.masked_crc32c(payload) == int(np.frombuffer(raw[12 + int(length):16 + int(length)], "<u4")[0])


@pytest.mark.parametrize("label,msg", [("-1", "field 'label': must be in"), (str(2 ** 31), "field 'label': must be in"),
                                       ("3.5", "invalid literal"), ("x", "invalid literal")])
def test_index_labels_are_checked(records, label, msg):
    lines = open(records["index"]).read().splitlines()
    f = lines[4].split("\t")
    lines[4] = "\t".join(f[:3] + [label])
    open(records["index"], "w").write("\n".join(lines) + "\n")
    with pytest.raises(sources.BadRecordError, match=rf"TFR-tiny.txt line 5: {msg}"):
        sources.tface_source(records["index"])


def test_bad_landmarks_are_named(folder, tmp_path):
    root, lm_path = folder
    with np.load(lm_path) as z:
        paths, lms = z["paths"], z["landmarks"].copy()
    lms[2, 1, 0] = np.nan
    lms[7, 0, 1] = 40.0  # pixels, not normalised
    np.savez(tmp_path / "bad_lm.npz", paths=paths, landmarks=lms)
    with pytest.raises(sources.BadRecordError, match=r"alice/2.jpg: landmarks \(row 7 .*\): values in \[0.1\d*, 40\]"):
        sources.image_folder_source(root, landmarks=tmp_path / "bad_lm.npz")
    src = sources.image_folder_source(root, landmarks=tmp_path / "bad_lm.npz", skip_bad=True)
    assert len(src) == 13 and any("carol/2.jpg: landmarks (row 2" in p and "non-finite" in p for p in src.problems)
    # the same values written into records: verify and training name the record and the field
    recs = [(str(p), (root / str(p)).read_bytes(), 0, lm) for p, lm in zip(paths, lms)]
    out = framing.write_tface_records(recs, tmp_path / "r", "TFR-lm")
    src = sources.tface_source(out["index"])
    assert "line 3): field 'landmarks': non-finite values" in src.check(2)
    assert "field 'landmarks': values in" in src.check(7)
    it = _it(src, seed=0, shuffle=False, flip=False, with_landmarks=True)
    with pytest.raises(sources.BadRecordError, match=r"step 1 \(batch index 0\):\n.*line 3\): field 'landmarks': non-finite"):
        next(it)
    it = _it(src, seed=0, shuffle=False, flip=False, with_landmarks=True, skip_bad=True)
    b = _take(it, 3)
    assert all(np.isfinite(x["landmarks"]).all() and np.abs(x["landmarks"]).max() <= 2 for x in b)
    assert len(it.skipped) == 2
    # the numpy loader checks them as tf.data's graph does
    with pytest.raises(sources.BadRecordError, match=r"step 1 \(batch index 0\):\n.*line 3\): field 'landmarks': non-finite"):
        next(_numpy_it(src, seed=0, shuffle=False, flip=False, with_landmarks=True))
    nit = _numpy_it(src, seed=0, shuffle=False, flip=False, with_landmarks=True, skip_bad=True)
    for x, y in zip(b, _take(nit, 3)):
        np.testing.assert_array_equal(x["landmarks"], y["landmarks"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert nit.skipped == it.skipped


def test_data_package_imports_without_tensorflow():
    # the engine, the record framing, the sources and the numpy loader need no TensorFlow; tf.data loads it
    code = ("import sys, ppfr_jax.data, ppfr_jax.data.records, ppfr_jax.data.synthetic, ppfr_jax.train; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "from ppfr_jax import data; data.BadRecordError, data.synthetic_batches; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "data.tface_source, data.NumpyTrainIterator, data.loader_class('numpy'); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported by the sources or the numpy loader'; "
            "data.TrainIterator; assert 'tensorflow' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_records_cli_names_a_bad_index(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("TFR-x\t0\tnot-an-offset\t3\n")
    assert records_cli.main(["verify", "--index", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppfr-records: error: ") and "bad.txt line 1" in err
    assert records_cli.main(["verify", "--index", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_deprecated_input_pipeline_module_still_works(tmp_path):
    """Scripts written against ppfr_jax.input_pipeline (moved to ppfr_jax.data / ppfr-records) keep running, warned."""
    import importlib
    import subprocess
    import sys

    import ppfr_jax.data.pipeline as new_pipeline
    import ppfr_jax.data.sources as new_sources
    with pytest.warns(DeprecationWarning, match="ppfr_jax.input_pipeline is deprecated: import from ppfr_jax.data"):
        old = importlib.reload(importlib.import_module("ppfr_jax.input_pipeline"))
    assert old.TrainIterator is new_pipeline.TrainIterator and old.tface_source is new_sources.tface_source
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "ppfr_jax.input_pipeline", "verify", "--index",
                        str(tmp_path / "missing.txt")], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "ppfr-records: error:" in p.stderr and "missing.txt" in p.stderr, p.stderr[-1500:]


# ----------------------------------------------------------------------------- the numpy loader beside tf.data


def _numpy_it(src, **kw):
    from ppfr_jax.data import host_loader
    return host_iterator(host_loader.NumpyTrainIterator, src, S, **kw)


@pytest.mark.parametrize("dtype", ["uint8", "float32", "bfloat16"])
def test_numpy_loader_reads_what_tf_data_reads(records, dtype):
    """Same records, order, labels, landmarks and pixels (no flip: the flip draws differ by design)."""
    src = sources.tface_source(records["index"])
    kw = dict(seed=7, start_step=3, flip=False, with_landmarks=True, output_dtype=dtype)
    a, b = _it(src, **kw), _numpy_it(src, **kw)
    for _ in range(6):
        x, y = next(a), next(b)
        assert set(x) == set(y) == {"image", "label", "landmarks"}
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert a.state() == b.state() == {"step": 9, "skipped": 0}
    # two hosts read the same global batch with either loader
    h = [_numpy_it(src, seed=7, flip=False, output_dtype=dtype, process_index=p, process_count=2) for p in (0, 1)]
    whole = next(_it(src, seed=7, flip=False, output_dtype=dtype))
    np.testing.assert_array_equal(np.concatenate([next(i)["label"] for i in h]), whole["label"])


def test_numpy_loader_names_and_skips_a_bad_record_as_tf_data_does(records):
    shard, off = _flip_payload_byte(records, 2)
    src = sources.tface_source(records["index"])
    with pytest.raises(sources.BadRecordError, match=rf"step 1 \(batch index 0\):\n.*offset {off} \(.*line 2\): .*data CRC mismatch"):
        next(_numpy_it(src, seed=0, shuffle=False, flip=False))
    a = _it(src, seed=0, shuffle=False, flip=False, skip_bad=True)
    b = _numpy_it(src, seed=0, shuffle=False, flip=False, skip_bad=True)
    for _ in range(5):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert a.skipped == b.skipped and len(b.skipped) == 1 and f"offset {off}" in b.skipped[0]


def test_example_messages_are_tensorflows():
    from ppfr_jax.data import example_proto
    feats = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"jpeg bytes"])),
             "landmarks": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, -0.25])),
             "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[2 ** 40]))}
    tf_bytes = tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()
    assert example_proto.features(tf_bytes) == {"image": [b"jpeg bytes"], "landmarks": [0.5, -0.25], "label": [2 ** 40]}
    ours = example_proto.serialize({"image": b"jpeg bytes", "landmarks": [0.5, -0.25], "label": [2 ** 40]})
    assert tf.train.Example.FromString(ours) == tf.train.Example.FromString(tf_bytes)


def test_numpy_loader_read_ahead_skips_and_resizes_as_tf_data(folder, records, tmp_path):
    # bad records in batches already read ahead (prefetch 4): the same substitutes as tf.data
    src = sources.tface_source(records["index"])
    for line in (6, 10):  # records of steps 1 and 2 (batch 4, source order)
        _flip_payload_byte(records, line)
    src = sources.tface_source(records["index"])
    a = _it(src, seed=0, shuffle=False, flip=False, skip_bad=True)
    b = _numpy_it(src, seed=0, shuffle=False, flip=False, skip_bad=True, prefetch=4)
    for _ in range(4):
        np.testing.assert_array_equal(next(a)["label"], next(b)["label"])
    assert a.skipped == b.skipped and len(b.skipped) == 2
    # images of other sizes: both resize to image_size (PIL's antialiased bilinear vs tf.image.resize)
    root, _ = folder
    rng = np.random.default_rng(1)
    for k, (w, h) in enumerate([(37, 41), (64, 64), (30, 25)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "bob" / f"big{k}.png")
    src = sources.image_folder_source(root)
    x = next(_it(src, seed=0, shuffle=False, flip=False, global_batch=18, output_dtype="uint8"))
    y = next(_numpy_it(src, seed=0, shuffle=False, flip=False, global_batch=18, output_dtype="uint8"))
    d = np.abs(x["image"].astype(int) - y["image"].astype(int))
    assert x["image"].shape == y["image"].shape == (18, S, S, 3)
    assert d.max() <= 12 and d.mean() < 1.0, (d.max(), d.mean())  # resamplers differ in their filter support


@pytest.mark.slow
def test_resume_with_another_loader_says_so(tmp_path):
    """The loader is recorded in each checkpoint; a resume with the other one says what changes."""
    wd = str(tmp_path / "run")
    base = [sys.executable, "-m", "ppfr_jax.main", "--config", "configs/arcface.py:demo", "--workdir", wd,
            "--config.batch_size=8", "--config.eval.pairs=", "--config.checkpoint_every_steps=2"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r1 = subprocess.run(base + ["--config.num_train_steps=2", "--config.data.loader=numpy"], cwd=root,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert "data: reading the records with the numpy loader (data.loader=numpy)" in r1.stdout
    r2 = subprocess.run(base + ["--config.num_train_steps=4"], cwd=root, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "note: steps 1-2 of this run were read by the 'numpy' loader, the rest by 'tf'" in r2.stdout
    assert "--config.data.loader=numpy keeps the first" in r2.stdout
    import json
    assert json.load(open(os.path.join(wd, "results.json")))["data_loader"] == "tf"
