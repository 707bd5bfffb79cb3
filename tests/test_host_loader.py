"""The numpy training loader (ppfr_jax.data.host_loader) and tf.train.Example without TensorFlow.

Nothing here needs TensorFlow: the sources are image folders and the embedded demo
records; runs "without TensorFlow" put a ``tensorflow`` module that raises ImportError
first on the path of a subprocess. The comparison with tf.data is in tests/test_data.py.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import host_iterator, write_face_folder
from ppfr_jax import config_lib
from ppfr_jax.data import example_proto, host_loader, loader_class, sources
from ppfr_jax.config_lib import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16


@pytest.fixture
def folder(tmp_path):
    """3 identities x 6 images (16x16 JPEG) + side landmarks (3 points each)."""
    return write_face_folder(tmp_path, 6, S)


def _it(src, **kw):
    return host_iterator(host_loader.NumpyTrainIterator, src, S, **kw)


def _no_tf_env(tmp_path):
    block = tmp_path / "block_tf"
    block.mkdir(exist_ok=True)
    (block / "tensorflow.py").write_text("raise ImportError(\"No module named 'tensorflow' (blocked by the test)\")\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(block), ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def test_flips_mirror_the_unflipped_stream(folder):
    root, lm = folder
    src = sources.image_folder_source(root, landmarks=lm)
    plain = _it(src, seed=5, flip=False, with_landmarks=True, output_dtype="uint8")
    flipped = _it(src, seed=5, flip=True, with_landmarks=True, output_dtype="uint8")
    again = _it(src, seed=5, flip=True, with_landmarks=True, output_dtype="uint8")
    n_flipped = n = 0
    for _ in range(12):  # 48 records, 2+ epochs
        a, b, c = next(plain), next(flipped), next(again)
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(b["image"], c["image"])  # a function of (seed, position)
        for k in range(4):
            if np.array_equal(a["image"][k], b["image"][k]):
                np.testing.assert_array_equal(a["landmarks"][k], b["landmarks"][k])
            else:
                n_flipped += 1
                np.testing.assert_array_equal(a["image"][k][:, ::-1], b["image"][k])
                np.testing.assert_allclose(b["landmarks"][k][:, 0], 1.0 - a["landmarks"][k][:, 0], atol=1e-6)
                np.testing.assert_array_equal(b["landmarks"][k][:, 1], a["landmarks"][k][:, 1])
            n += 1
    assert 12 <= n_flipped <= 36, n_flipped  # p = 0.5 over 48 draws
    coins = host_loader.flip_coins(0, np.arange(1000))
    assert 450 < coins.sum() < 550 and not np.array_equal(coins, host_loader.flip_coins(1, np.arange(1000)))


def test_order_resume_and_dtypes(folder):
    root, _ = folder
    src = sources.image_folder_source(root)
    it = _it(src, seed=2, flip=True, output_dtype="uint8")
    first = [next(it) for _ in range(6)]
    assert it.state() == {"step": 6, "skipped": 0}
    resumed = _it(src, seed=2, flip=True, output_dtype="uint8", start_step=3)
    for want in first[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    # an epoch (18 records // 4 = 4 batches) visits 16 distinct records, in the shared order
    idx = np.concatenate([it.batch_indices(s) for s in range(4)])
    assert len(set(idx.tolist())) == 16
    np.testing.assert_array_equal(idx, host_loader.epoch_permutation(2, 0, 18)[:16])
    f32 = next(_it(src, seed=2, flip=True, output_dtype="float32"))
    bf16 = next(_it(src, seed=2, flip=True, output_dtype="bfloat16"))
    assert f32["image"].dtype == np.float32 and f32["image"].shape == (4, S, S, 3)
    np.testing.assert_allclose(f32["image"], first[0]["image"] / 127.5 - 1.0, atol=1e-6)
    assert str(bf16["image"].dtype) == "bfloat16"
    np.testing.assert_allclose(bf16["image"].astype(np.float32), f32["image"], atol=1e-2)
    assert f32["label"].dtype == np.int32
    with pytest.raises(ValueError, match="output_dtype must be one of"):
        _it(src, output_dtype="float16")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _it(src, global_batch=64)


def test_resizes_other_sizes(folder, tmp_path):
    root, _ = folder
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "bob" / "big.png")
    src = sources.image_folder_source(root)
    it = _it(src, seed=0, flip=False, shuffle=False, global_batch=19, output_dtype="uint8")
    b = next(it)
    assert b["image"].shape == (19, S, S, 3)
    i = [k for k, f in enumerate(src.files) if f.endswith("big.png")][0]
    np.testing.assert_array_equal(b["image"][i], np.full((S, S, 3), (200, 10, 10), np.uint8))


def test_a_bad_image_is_named_or_skipped(folder):
    root, _ = folder
    (root / "alice" / "2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    src = sources.image_folder_source(root)
    bad = [k for k, f in enumerate(src.files) if f.endswith(os.path.join("alice", "2.jpg"))][0]
    it = _it(src, seed=0, flip=False, shuffle=False, global_batch=6)
    with pytest.raises(sources.BadRecordError, match=r"step 1 \(batch index 0\):\n.*alice.2\.jpg.*\n\(--config\.data\.skip_bad=True"):
        next(it)
    it = _it(src, seed=0, flip=False, shuffle=False, global_batch=6, skip_bad=True)
    batches = [next(it) for _ in range(3)]
    assert len(it.skipped) == 1 and "2.jpg" in it.skipped[0] and it.state()["skipped"] == 1
    assert bad not in it.batch_indices(0) and bad + 1 in it.batch_indices(0)  # its slot takes the next record
    assert all(b["image"].shape == (6, S, S, 3) for b in batches)


def test_a_passing_read_error_is_retried_and_a_lasting_one_named(folder, monkeypatch):
    root, _ = folder
    src = sources.image_folder_source(root)
    read, calls = src.read_bytes, []

    def flaky(i):
        calls.append(i)
        if i == 1 and calls.count(1) == 1:
            raise OSError(5, "Input/output error")
        return read(i)

    monkeypatch.setattr(src, "read_bytes", flaky)
    it = _it(src, seed=0, flip=False, shuffle=False, skip_bad=True, prefetch=1)
    b = next(it)
    assert it.skipped == [] and list(it.batch_indices(0)) == [0, 1, 2, 3] and calls.count(1) == 2
    np.testing.assert_array_equal(b["label"], src.labels[:4])

    def broken(i):
        if i == 1:
            raise OSError(5, "Input/output error")
        return read(i)

    monkeypatch.setattr(src, "read_bytes", broken)
    with pytest.raises(RuntimeError, match=r"step 1 \(batch index 0\) and no record of that batch is bad on its own: .*alice.1\.jpg: "
                                           r"OSError: \[Errno 5\] Input/output error"):
        next(_it(src, seed=0, flip=False, shuffle=False, skip_bad=True))


def test_reposition_drops_what_was_read_ahead(folder):
    root, _ = folder
    src = sources.image_folder_source(root)
    it = _it(src, seed=4, prefetch=3, output_dtype="uint8")
    next(it), next(it)
    it.reposition(1)
    want = [next(_it(src, seed=4, output_dtype="uint8", start_step=s)) for s in (1, 2)]
    for w in want:
        np.testing.assert_array_equal(next(it)["image"], w["image"])
    assert it.step == 3


def test_metric_writer_without_clu(tmp_path, monkeypatch):
    """clu.metric_writers imports TensorFlow: where it cannot import, the engine writes metrics.jsonl."""
    import clu
    from ppfr_jax import train
    monkeypatch.setitem(sys.modules, "clu.metric_writers", None)  # `from clu import metric_writers` -> ImportError
    monkeypatch.delattr(clu, "metric_writers", raising=False)
    said = []
    c = config_lib.base_config()
    writer, hooks = train._metric_writer_and_hooks(str(tmp_path), c, 10, said.append)
    assert isinstance(writer, train.JsonlMetricWriter) and hooks == []
    assert "TensorBoard summaries need TensorFlow" in said[0] and "metrics.jsonl instead" in said[0]
    writer.write_hparams({"optim.lr": 0.1})
    writer.write_scalars(3, {"train/loss": np.float32(2.5), "train/accuracy": 0.25})
    writer.write_scalars(4, {"eval/devtest/accuracy": 0.75})
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines == [{"step": 3, "train/loss": 2.5, "train/accuracy": 0.25}, {"step": 4, "eval/devtest/accuracy": 0.75}]
    assert json.load(open(tmp_path / "hparams.json")) == {"optim.lr": 0.1}
    quiet = train.JsonlMetricWriter(str(tmp_path / "other"), just_logging=True)  # processes > 0 write nothing
    quiet.write_scalars(1, {"x": 1.0})
    assert not (tmp_path / "other").exists()


def test_demo_records_without_tensorflow(tmp_path):
    """The demo's TFRecords list and read with TensorFlow blocked; ``auto`` picks the numpy loader."""
    code = (
        "import sys, numpy as np, ml_collections\n"
        "from ppfr_jax.data import sources, loader_class, host_loader\n"
        "src = sources.source_from_config(ml_collections.ConfigDict(dict(data=dict(source='demo'))))\n"
        "assert loader_class('auto') is host_loader.NumpyTrainIterator\n"
        "it = loader_class('auto')(src, global_batch=64, seed=0, with_landmarks=True, output_dtype='uint8')\n"
        "b = next(it)\n"
        "assert 'tensorflow' not in sys.modules or sys.modules['tensorflow'] is None\n"
        "print(len(src), src.num_classes, b['image'].shape, b['image'].dtype, b['landmarks'].shape, int(b['image'].std() > 10))\n"
        "from ppfr_jax.errors import PpfrError\n"
        "try:\n"
        "    loader_class('tf')\n"
        "except ImportError as e:\n"
        "    print('ERR', isinstance(e, PpfrError), e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=_no_tf_env(tmp_path), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "2729 115 (64, 112, 112, 3) uint8 (64, 98, 2) 1", r.stdout
    assert lines[1].startswith("ERR True ")  # a PpfrError: ppfr-train prints it as one line, no traceback
    assert "config.data.loader='tf' needs TensorFlow" in lines[1] and "--config.data.loader=numpy" in lines[1]


@pytest.mark.slow
def test_training_runs_without_tensorflow(tmp_path):
    """The README's kind of run on a host without TensorFlow: the demo records, 2 steps, results.json."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "ppfr_jax.main", "--config", "configs/arcface.py:demo", "--workdir", str(wd),
           "--config.num_train_steps=2", "--config.batch_size=8", "--config.log_every_steps=1"]
    r = subprocess.run(cmd, env=_no_tf_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    res = json.load(open(wd / "results.json"))
    assert res["steps"] == 2 and res["config"]["data"]["loader"] == "auto" and res["data_loader"] == "numpy"
    assert "data: reading the records with the numpy loader (data.loader=auto: TensorFlow does not import" in r.stdout
    assert 0.0 <= res["devtest_accuracy"] <= 1.0  # the demo's DevTest pairs, evaluated at the end
    assert "step 2/2 loss" in r.stdout and "writing" in r.stdout and "metrics.jsonl instead" in r.stdout
    lines = [json.loads(x) for x in open(wd / "metrics.jsonl")]  # clu's writer needs TensorFlow: JSON lines
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2]
    assert all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)
    assert any("eval/devtest/accuracy" in x or any(k.startswith("eval/") for k in x) for x in lines)


def test_privacy_attack_runs_without_tensorflow(tmp_path):
    """``run_privacy`` on a host without TensorFlow: metrics.jsonl and images/ instead of TensorBoard."""
    wd = tmp_path / "privacy"
    code = f"""
import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from conftest import block_mean_recognizer
from ppfr_jax import config_lib, evaluate, privacy
evaluate.register_model("_pixels")(lambda checkpoint: block_mean_recognizer(flip=None))
c = config_lib.load_config_spec({os.path.join(ROOT, 'configs', 'privacy.py')!r} + ":tiny,rows=raw,recognizer_model=_pixels,recognizer=-")
privacy.run_privacy(c, {str(wd)!r})
"""
    r = subprocess.run([sys.executable, "-c", code], env=_no_tf_env(tmp_path), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "metrics.jsonl instead" in r.stdout
    rows = json.loads((wd / "privacy.json").read_text())["rows"]
    assert [x["method"] for x in rows] == ["raw"] and 0.0 <= rows[0]["attacker_accuracy"] <= 1.0
    lines = [json.loads(x) for x in open(wd / "metrics.jsonl")]
    assert any(k.startswith("privacy/raw") for x in lines for k in x), lines
    assert np.isfinite(lines[0]["step"]) and not list(wd.glob("events.out.tfevents.*"))
    pngs = sorted(p.name for p in (wd / "images").glob("*.png"))
    assert pngs == ["privacy_raw_step0_0.png"], pngs
    assert np.asarray(Image.open(wd / "images" / pngs[0])).shape == (3 * 112 + 2 * 2, 3 * 112 + 2 * 2, 3)


def test_tfrecord_index_alone_is_enough(tmp_path):
    c = config_lib.base_config()
    c.data.source, c.data.index = "tfrecord", str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"data\.index.*missing\.txt.*does not exist"):
        config_lib.validate(c, 1)
    (tmp_path / "missing.txt").write_text("")
    config_lib.validate(c, 1)  # data.path is not needed beside data.index
    c.data.index = ""
    with pytest.raises(ConfigError, match=r"data\.path.*needs data\.index .* or data\.path"):
        config_lib.validate(c, 1)


def test_loader_config_values():
    c = config_lib.base_config()
    c.data.loader = "torch"
    with pytest.raises(ConfigError, match=r"data\.loader.*'auto', 'tf', 'numpy'.*'torch'"):
        config_lib.validate(c, 1)
    with pytest.raises(ValueError, match="config.data.loader: must be 'auto', 'tf' or 'numpy', got 'torch'"):
        loader_class("torch")
    assert loader_class("numpy") is host_loader.NumpyTrainIterator
    c = config_lib.base_config()
    c.data.source, c.data.tfds_name, c.data.loader = "tfds", "mnist", "numpy"
    with pytest.raises(ConfigError, match=r"data\.loader.*data\.source='tfds' streams through tf\.data"):
        config_lib.validate(c, 1)


def test_example_messages_without_tensorflow(tmp_path):
    payload = example_proto.serialize({"image": b"\x89PNG...", "landmarks": [0.25, 1.5, -0.5, 0.0]})
    assert example_proto.features(payload) == {"image": [b"\x89PNG..."], "landmarks": [0.25, 1.5, -0.5, 0.0]}
    ex = example_proto.parse(payload)
    assert ex.features.feature["image"].bytes_list.value[0] == b"\x89PNG..."
    assert example_proto.features(example_proto.serialize({"label": [3, -1]})) == {"label": [3, -1]}
    assert example_proto.features(example_proto.serialize({"lm": np.array([0.5, 2.0], np.float32)})) == {"lm": [0.5, 2.0]}
    with pytest.raises(TypeError, match="feature 'x'"):
        example_proto.serialize({"x": ["a"]})
    from google.protobuf.message import DecodeError
    with pytest.raises(DecodeError):
        example_proto.parse(b"\xff\xff\xff")
