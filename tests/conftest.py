"""Shared test fixtures: golden data access, tolerances, fake CPU devices.

``PPFR_GOLDEN_DIR`` selects the golden set (default: ``tests/golden``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

# Multi-device tests use fake CPU devices; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The commands add CPU speed settings of their own (ppfr_jax.cli.apply_cpu_defaults: an XLA:CPU flag, and a
# restart with a glibc malloc tunable); tests that compare a command's subprocess with an in-process run bit for
# bit need both on the same flags, so the suite turns them off (tests/test_cli_xla_defaults.py checks them).
os.environ.setdefault("PPFR_CPU_DEFAULTS", "0")
# Many tests (and the subprocesses of the resume / multi-process tests) compile the
# same programs: a persistent cache turns repeats into loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TESTS = pathlib.Path(__file__).parent
GOLDEN_DIR = pathlib.Path(os.environ.get("PPFR_GOLDEN_DIR", TESTS / "golden"))
SHARED = (TESTS.parent.parent / "shared").resolve()


def golden_path(name: str) -> pathlib.Path:
    p = GOLDEN_DIR / name
    if not p.exists():
        pytest.skip(f"golden file {p} not present (PPFR_GOLDEN_DIR={GOLDEN_DIR})")
    return p


def load_golden(name: str) -> dict:
    """Load ``<golden>/<name>.npz`` into a dict of numpy arrays."""
    with np.load(golden_path(name + ".npz")) as z:
        return {k: z[k] for k in z.files}


def golden_state_dict(model: str) -> dict:
    """Regenerate the deterministic PyTorch state_dict of ``weights_<model>.json``."""
    spec = importlib.util.spec_from_file_location("golden_weights", golden_path("golden_weights.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    manifest = golden_path(f"weights_{model}.json")
    seed = json.loads(manifest.read_text())["seed"]
    return mod.state_dict_from_manifest(str(manifest), seed)


def suggested_atol(file: str, array: str) -> float:
    """The golden README's tolerance (10x observed float32-vs-float64 error)."""
    man = json.loads(golden_path("manifest.json").read_text())
    if not file.endswith(".npz"):
        file += ".npz"
    try:
        return float(man["tolerance_f32_vs_f64"][file][array]["suggested_atol"])
    except KeyError:
        raise KeyError(f"no tolerance row for {file}:{array} in manifest.json") from None


def assert_summarised_close(g: dict, name: str, actual_nchw: np.ndarray, atol: float, mean_atol: float | None = None):
    """Compare an output the golden set stores summarised (sample values + channel means)."""
    actual_nchw = np.asarray(actual_nchw)
    assert tuple(actual_nchw.shape) == tuple(g[name + "__shape"]), (actual_nchw.shape, g[name + "__shape"])
    flat = actual_nchw.reshape(-1)
    np.testing.assert_allclose(flat[g[name + "__sample_index"]], g[name + "__sample_value"], rtol=0, atol=atol,
                               err_msg=f"{name}: sampled values")
    means = actual_nchw.astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(means, g[name + "__channel_mean"], rtol=0,
                               atol=atol if mean_atol is None else mean_atol, err_msg=f"{name}: channel means")


def block_mean_recognizer(flip):
    """A cheap stand-in recogniser for ``evaluate.register_model``: 8x8 block means of the pixels."""
    from ppfr_jax import evaluate

    def apply_fn(x):
        b = x.shape[0]
        return x.reshape(b, 14, 8, 14, 8, 3).mean(axis=(2, 4)).reshape(b, -1)
    return evaluate.Recognizer(apply_fn=apply_fn, preprocess=lambda x: x.astype(np.float32) / 127.5 - 1.0,
                               input_hw=(112, 112), flip=flip)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared/data not found beside the checkout ({SHARED}); real-data tests need it")
    return SHARED


# ----------------------------------------------------------------------------- training-data fixtures


def write_face_folder(tmp_path, per_identity: int, size: int = 16, seed: int = 0):
    """``tmp_path/faces/{carol,alice,bob}/<i>.jpg``: random ``size``x``size`` JPEGs (quality 95), and
    ``tmp_path/lm.npz`` side landmarks (3 points each, in [0.1, 0.9]); -> (faces root, npz path)."""
    import io
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = tmp_path / "faces"
    paths, lms = [], []
    for name in ("carol", "alice", "bob"):
        (root / name).mkdir(parents=True)
        for i in range(per_identity):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
            (root / name / f"{i}.jpg").write_bytes(buf.getvalue())
            paths.append(f"{name}/{i}.jpg")
            lms.append(rng.uniform(0.1, 0.9, (3, 2)))
    np.savez(tmp_path / "lm.npz", paths=np.array(paths), landmarks=np.array(lms, np.float32))
    return root, tmp_path / "lm.npz"


def host_iterator(cls, src, size: int = 16, **kw):
    """A training iterator (``TrainIterator`` / ``NumpyTrainIterator``) of one host, batch 4, ``size``^2 images."""
    kw.setdefault("global_batch", 4)
    kw.setdefault("image_size", (size, size))
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return cls(src, **kw)
