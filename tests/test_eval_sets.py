"""Named verification sets (``config.eval.sets``, issue 19): how they are named and found, what validation
says when one is missing, lazily decoded sets equal to decoded ones, and the engine's per-set results."""
import json
import os
import sys

import numpy as np
import pytest

from ppfr_jax import config_lib, evaluate
from ppfr_jax.demo_data import demo_paths
from ppfr_jax.evaluate import sets as sets_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import arcface  # noqa: E402
import duetface  # noqa: E402
import minusface  # noqa: E402


@pytest.fixture(scope="module")
def demo_bin():
    return evaluate.load_bin(demo_paths()["eval_bin"])


def _write_bins(folder, demo_bin, names=("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"), pairs=20):
    """Small .bin files cut from the demo DevTest set, each from different pairs."""
    images, same = demo_bin
    for i, n in enumerate(names):
        lo = i * pairs
        evaluate.save_bin(os.path.join(folder, f"{n}.bin"), images[2 * lo:2 * (lo + pairs)], same[lo:lo + pairs])


def _bad_bin(folder, demo_bin):
    """20 demo pairs as a .bin whose image 7 does not decode."""
    images, same = demo_bin
    imgs = list(images[:40])
    imgs[7] = b"not an image"
    path = folder / "bad.bin"
    evaluate.save_bin(path, imgs, same[:20])
    return path


def _pairs_folder(folder, demo_bin):
    """An LFW-style image folder of three aligned demo faces (Ann 1, Ann 2, Bob 1)."""
    images, _ = demo_bin
    root = folder / "lfw"
    for k, rel in enumerate(("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Bob/Bob_0001.jpg")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(images[k])
    return root


# ----------------------------------------------------------------------------- naming and lookup


def test_default_is_the_one_devtest_set_and_paper_configs_name_five():
    assert config_lib.eval_set_specs(arcface.get_config("demo")) == {"devtest": "demo"}
    assert config_lib.eval_set_specs(arcface.get_config("tiny")) == {}
    for c in (arcface.get_config("ir50"), duetface.get_config("server,ir50"), minusface.get_config("stage2,ir50")):
        c.eval.root = "/data/bins"
        assert config_lib.eval_set_specs(c) == {n: f"/data/bins/{n}.bin"
                                                for n in ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")}
        assert c.eval.pairs == ""


def test_relative_sets_sit_beside_a_recordio_pack_and_entries_can_be_named():
    c = arcface.get_config("ir50")
    c.data.source, c.data.path = "recordio", "/data/faces_emore"
    assert config_lib.eval_set_specs(c)["agedb_30"] == "/data/faces_emore/agedb_30.bin"
    c.eval.root = "/elsewhere"  # eval.root wins
    assert config_lib.eval_set_specs(c)["lfw"] == "/elsewhere/lfw.bin"
    c.eval.sets = ("dev=demo", "/abs/x.bin", "cplfw=", "pairs=/p/pairs.txt")
    assert config_lib.eval_set_specs(c) == {"dev": "demo", "x": "/abs/x.bin", "pairs": "/p/pairs.txt"}


@pytest.mark.parametrize("sets,message", [
    (("a/lfw.bin", "b/lfw.bin"), r"two sets are named 'lfw' .*name one with 'name=path'"),
    (("my set=x.bin",), r"set name 'my set' .*letters, digits"),
    ((3,), r"entries are strings"),
])
def test_bad_entries_name_eval_sets(sets, message):
    c = arcface.get_config("demo")
    c.eval.sets = sets
    with pytest.raises(config_lib.ConfigError, match=r"^config\.eval\.sets: " + message):
        config_lib.eval_set_specs(c)


def test_validation_names_a_missing_benchmark_and_passes_when_all_are_there(tmp_path, demo_bin):
    c = arcface.get_config("ir50")
    c.eval.root = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"^config\.eval\.sets: set 'lfw': '.*/lfw\.bin' does not exist "
                                                     r"\(relative names are looked up under .*eval\.root"):
        config_lib.validate(c, 1)
    _write_bins(tmp_path, demo_bin)
    config_lib.validate(c, 1)
    os.remove(tmp_path / "cplfw.bin")
    with pytest.raises(config_lib.ConfigError, match=r"set 'cplfw'"):
        config_lib.validate(c, 1)
    c.eval.sets = ("lfw.bin", "cfp_fp.bin")  # only the sets one has
    config_lib.validate(c, 1)


# ----------------------------------------------------------------------------- lazy decoding


def test_lazy_set_decodes_to_the_same_pixels_and_embeddings(demo_bin, tmp_path):
    eager = evaluate.load_set("demo")
    lazy = evaluate.load_set("demo", lazy=True)
    assert isinstance(lazy.images, sets_mod.LazyImages)
    assert lazy.images.shape == eager.images.shape
    np.testing.assert_array_equal(lazy.pairs, eager.pairs)
    li, ls = lazy.interleaved()
    ei, es = eager.interleaved()
    assert isinstance(li, sets_mod.LazyImages) and li.shape == ei.shape
    np.testing.assert_array_equal(li.decode(100, 230), ei[100:230])
    np.testing.assert_array_equal(ls, es)
    # the SphereFace crop of ppfr-eval's CASIA model, applied as each batch is decoded
    from ppfr_jax.evaluate.recognizers import fit_to_input
    crop = fit_to_input(li, (112, 96))
    assert isinstance(crop, sets_mod.LazyImages) and crop.shape == (len(ei), 112, 96, 3)
    np.testing.assert_array_equal(crop.decode(0, 50), fit_to_input(ei, (112, 96))[:50])
    # the one embedding loop takes either: same rows, same bits
    f = lambda x: x.astype(np.float32).mean(axis=(1, 2)) * np.arange(1, 4, dtype=np.float32)  # noqa: E731
    np.testing.assert_array_equal(evaluate.embed(f, li, flip="sum", batch_size=96),
                                  evaluate.embed(f, ei, flip="sum", batch_size=96))


def test_lazy_set_finds_a_bad_image_at_load_and_skips_it_like_the_eager_one(tmp_path, demo_bin):
    path = _bad_bin(tmp_path, demo_bin)
    with pytest.raises(evaluate.BadInputError, match=r"bad\.bin: image 7"):
        evaluate.load_set(str(path), lazy=True)
    lazy = evaluate.load_set(str(path), lazy=True, skip_bad=True)
    eager = evaluate.load_set(str(path), skip_bad=True)
    assert len(lazy.pairs) == len(eager.pairs) == 19 and len(lazy.skipped) == len(eager.skipped) == 1
    assert "bad.bin: image 7: cannot decode image" in lazy.skipped[0]
    np.testing.assert_array_equal(np.asarray(lazy.interleaved()[0]), eager.interleaved()[0])


def test_lazy_pairs_set_reads_like_the_eager_one(tmp_path, demo_bin):
    root = _pairs_folder(tmp_path, demo_bin)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\nAnn 1 2\nAnn 1 Bob 1\n")
    eager = evaluate.load_set(str(pairs))
    lazy = evaluate.load_set(str(pairs), lazy=True)
    assert isinstance(lazy.images, sets_mod.LazyImages) and lazy.images.shape == (3, 112, 112, 3)
    np.testing.assert_array_equal(np.asarray(lazy.interleaved()[0]), eager.interleaved()[0])
    (root / "Bob/Bob_0001.jpg").write_bytes(b"truncated")
    with pytest.raises(evaluate.BadInputError, match=r"Bob_0001\.jpg"):
        evaluate.load_set(str(pairs), lazy=True)


# ----------------------------------------------------------------------------- the engine


@pytest.mark.slow
def test_engine_evaluates_every_named_set(tmp_path, demo_bin, capsys):
    from ppfr_jax import train
    _write_bins(tmp_path, demo_bin, names=("lfw", "agedb_30"))
    c = arcface.get_config("tiny")
    c.num_train_steps = 2
    c.checkpoint_every_steps = 1
    c.eval.every_steps = 1
    c.eval.root = str(tmp_path)
    c.eval.sets = ("lfw.bin", "agedb=agedb_30.bin")
    wd = str(tmp_path / "run")
    r = train.train_and_evaluate(c, wd)
    out = capsys.readouterr().out
    assert list(r["eval_sets"]) == ["lfw", "agedb"]
    for v in r["eval_sets"].values():
        assert v["pairs"] == 20 and 0 <= v["accuracy"] <= 1 and v["std"] >= 0 and 0 <= v["threshold"] <= 4
    assert r["eval_mean_accuracy"] == pytest.approx(np.mean([v["accuracy"] for v in r["eval_sets"].values()]))
    assert r["devtest_accuracy"] is None  # no set is named devtest
    lfw = r["eval_sets"]["lfw"]
    assert (f"step 2: verification accuracy lfw {100 * lfw['accuracy']:.2f}% ± {100 * lfw['std']:.2f}, agedb "
            in out) and f"mean {100 * r['eval_mean_accuracy']:.2f}%" in out
    assert json.load(open(os.path.join(wd, "results.json")))["eval_sets"] == r["eval_sets"]
    # the evaluator alone gives the recorded figures
    from ppfr_jax import methods
    from ppfr_jax.evaluate.evaluator import EvalSuite
    task, variables, _ = methods.load_for_inference(wd)
    again = EvalSuite.from_config(c, task.embed).run(variables)
    for n in ("lfw", "agedb"):
        assert again["sets"][n]["accuracy"] == pytest.approx(r["eval_sets"][n]["accuracy"], abs=1e-9)
    # run again: finished, prints the recorded figures, writes nothing
    before = open(os.path.join(wd, "results.json")).read()
    train.train_and_evaluate(c, wd)
    out = capsys.readouterr().out
    assert "already finished at step 2" in out and f"lfw {100 * lfw['accuracy']:.2f}%" in out
    assert open(os.path.join(wd, "results.json")).read() == before


def test_ppfr_eval_scores_a_lazy_set_with_skipped_images(tmp_path, demo_bin):
    from ppfr_jax.evaluate.recognizers import Recognizer, evaluate_set
    path = _bad_bin(tmp_path, demo_bin)
    f = lambda x: x.astype(np.float32).mean(axis=(1, 2))  # noqa: E731
    rec = Recognizer(apply_fn=f, preprocess=lambda x: x, input_hw=(112, 112), template="arcface", flip=None)
    lazy = evaluate_set(rec, evaluate.load_set(str(path), lazy=True, skip_bad=True))
    eager = evaluate_set(rec, evaluate.load_set(str(path), skip_bad=True))
    assert lazy["num_pairs"] == eager["num_pairs"] == 19 and len(lazy["skipped"]) == 1
    assert lazy["accuracy_mean"] == eager["accuracy_mean"]


def test_a_lazy_pairs_set_keeps_the_files_it_checked(tmp_path, demo_bin):
    root = _pairs_folder(tmp_path, demo_bin)
    (tmp_path / "pairs.txt").write_text("2\nAnn 1 2\nAnn 1 Bob 1\n")
    lazy = evaluate.load_set(str(tmp_path / "pairs.txt"), lazy=True)
    before = np.asarray(lazy.interleaved()[0])
    (root / "Bob/Bob_0001.jpg").unlink()  # moved away after the run started: the run does not stop
    np.testing.assert_array_equal(np.asarray(lazy.interleaved()[0]), before)


def test_eval_pairs_and_eval_sets_together_are_refused():
    c = arcface.get_config("demo")
    c.eval.sets = ("demo",)
    with pytest.raises(config_lib.ConfigError, match=r"^config\.eval\.pairs: 'demo' would be ignored: .*"
                                                     r"add 'devtest=demo' to eval\.sets"):
        config_lib.validate(c, 1)
    c.eval.pairs = ""
    config_lib.validate(c, 1)
    assert config_lib.eval_set_specs(c) == {"demo": "demo"}


def test_eval_logging_names_and_console_line():
    from ppfr_jax import train
    one = {"sets": {"devtest": {"accuracy": 0.8, "std": 0.05, "threshold": 1.2, "pairs": 600}}, "mean_accuracy": 0.8}
    assert train._eval_line(7, one) == "step 7: DevTest verification accuracy 80.00% ± 5.00"  # bench/log_curve.py
    assert train._eval_scalars(one) == {"eval/devtest/accuracy": 0.8, "eval/devtest/std": 0.05,
                                        "eval/devtest/threshold": 1.2, "eval/mean_accuracy": 0.8,
                                        "eval/devtest_accuracy": 0.8, "eval/devtest_std": 0.05}
    two = {"sets": {"lfw": {"accuracy": 0.99, "std": 0.01, "threshold": 1.4, "pairs": 6000},
                    "cfp_fp": {"accuracy": 0.9, "std": 0.02, "threshold": 1.5, "pairs": 7000}}, "mean_accuracy": 0.945}
    assert train._eval_line(9, two) == ("step 9: verification accuracy lfw 99.00% ± 1.00, cfp_fp 90.00% ± 2.00; "
                                        "mean 94.50%")
    assert set(train._eval_scalars(two)) == {"eval/lfw/accuracy", "eval/lfw/std", "eval/lfw/threshold",
                                             "eval/cfp_fp/accuracy", "eval/cfp_fp/std", "eval/cfp_fp/threshold",
                                             "eval/mean_accuracy"}


def test_a_finished_run_written_before_named_sets_is_printed_not_rewritten(tmp_path, capsys):
    import types
    from ppfr_jax import train
    c = arcface.get_config("ir50")  # now names five sets; the old run recorded the demo DevTest only
    (tmp_path / "results.json").write_text(json.dumps({"steps": 100, "wall_s": 86400.0, "devtest_accuracy": 0.91,
                                                       "devtest_std": 0.02}))
    before = (tmp_path / "results.json").read_text()
    rec = train._finished_results(str(tmp_path), c, 100, types.SimpleNamespace(num_steps=100), None, None)
    out = capsys.readouterr().out
    assert rec["wall_s"] == 86400.0 and (tmp_path / "results.json").read_text() == before
    assert "DevTest verification accuracy 91.00% ± 2.00" in out and "nothing was changed" in out
    assert "the sets ['lfw', 'cfp_fp', 'agedb_30', 'calfw', 'cplfw'] of this config were not evaluated" in out


def test_ppfr_verify_takes_the_threshold_of_a_run_verified_on_named_sets(tmp_path):
    from ppfr_jax.cli.verify import resolve_threshold
    (tmp_path / "results.json").write_text(json.dumps({"devtest_threshold": None, "eval_sets": {
        "lfw": {"accuracy": 0.99, "std": 0.0, "threshold": 1.2, "pairs": 6000}}}))
    t, where = resolve_threshold(str(tmp_path), None)
    assert t == pytest.approx(1 - 1.2 / 2) and where.endswith("eval_sets.lfw.threshold (squared L2)")
