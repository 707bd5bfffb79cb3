"""config_lib.validate: every numeric field of every shipped config has a rule, and every bad value
(zero / negative sizes and intervals, NaN / infinite rates, out-of-range probabilities, wrong types)
is refused before anything is built, naming the field and what it may hold."""
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from ppfr_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import arcface  # noqa: E402
import duetface  # noqa: E402
import minusface  # noqa: E402
import privacy  # noqa: E402

TRAINING = [(arcface, v) for v in ("", "demo", "tiny", "ir50", "mobilefacenet", "fd", "demo,match=duetface")] + \
           [(duetface, v) for v in ("client", "server,ir50", "client,demo", "server,tiny")] + \
           [(minusface, v) for v in ("stage1", "stage2,demo", "toy,tiny", "stage2,tiny,n_duplicate=2")]
PRIVACY = ["", "demo", "tiny"]


@pytest.mark.parametrize("mod,variant", TRAINING, ids=[f"{m.__name__}:{v}" for m, v in TRAINING])
def test_every_numeric_field_of_every_config_has_a_rule(mod, variant):
    c = mod.get_config(variant or None)
    assert config_lib.unchecked_numeric_fields(c) == []
    config_lib.check_numeric_fields(c)  # the shipped values are valid


@pytest.mark.parametrize("variant", PRIVACY)
def test_privacy_configs_have_rules_and_pass(variant):
    c = privacy.get_config(variant or None)
    assert config_lib.unchecked_numeric_fields(c) == []
    config_lib.validate_privacy(c)


def _bad_values(r: config_lib.Range):
    out = [True, "3"]
    if r.lo is not None:
        out.append(r.lo if r.lo_open else r.lo - (1 if r.integer else 1e-3))
        out.append(-1)
    if r.hi is not None:
        out.append(r.hi if r.hi_open else r.hi + 1)
    if r.integer:
        out += [2.5, float("nan")]
    else:
        out += [float("nan"), float("inf"), -float("inf")]
    if not r.optional:
        out.append(None)
    return out


def _with(config, path, value):
    """A copy of ``config`` with ``path`` (dotted; ``x[]`` = first element, ``x.*`` = a dict entry) set."""
    d = config.to_dict()
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if leaf == "*":
        node[next(iter(node)) if node else "extra"] = value
    elif leaf.endswith("[]"):
        seq = list(node[leaf[:-2]]) or [0]
        seq[0] = value
        node[leaf[:-2]] = tuple(seq)
    else:
        node[leaf] = value
    return ml_collections.ConfigDict(d)


def _configs_with(path):
    base = path.split("[")[0].rstrip(".*")
    cands = [arcface.get_config("tiny"), duetface.get_config("server,tiny"), minusface.get_config("stage1,tiny"),
             privacy.get_config("tiny")]
    for c in cands:
        node = c.to_dict()
        try:
            for k in base.split("."):
                node = node[k]
        except (KeyError, TypeError):
            continue
        return c
    pytest.skip(f"no shipped config of this checkout has {path} (a rule for a field being added elsewhere)")


CASES = [(path, v) for path, r in config_lib.NUMERIC_FIELDS.items() for v in _bad_values(r)]


@pytest.mark.parametrize("path,value", CASES, ids=[f"{p}={v!r}" for p, v in CASES])
def test_bad_value_is_refused_naming_field_and_range(path, value):
    c = _with(_configs_with(path), path, value)
    shown = path.replace("[]", "[0]").split(".*")[0].replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.{shown}.*: must be (an integer|a finite number)"):
        config_lib.check_numeric_fields(c)


@pytest.mark.parametrize("over,field", [
    ({"log_every_steps": 0}, "log_every_steps"),
    ({"checkpoint_every_steps": 0}, "checkpoint_every_steps"),
    ({"num_epochs": float("nan"), "num_train_steps": 0}, "num_epochs"),
    ({"seed": -1}, "seed"),
    ({"seed": 2 ** 32}, "seed"),
    ({"model.embedding_size": 0}, "model.embedding_size"),
    ({"batch_size": -8}, "batch_size"),
    ({"batch_size": 0, "batch_size_per_device": 0}, "batch_size"),
    ({"optim.lr": float("inf")}, "optim.lr"),
    ({"optim.weight_decay": float("nan")}, "optim.weight_decay"),
    ({"head.sample_rate": 1.5}, "head.sample_rate"),
    ({"head.scale": 0.0}, "head.scale"),
    ({"keep_checkpoints": 0, "keep_best": 0}, "keep_checkpoints"),
    ({"num_epochs": 0.0, "num_train_steps": 0}, "num_epochs"),
])
def test_validate_names_the_field_the_user_set(over, field):
    c = arcface.get_config("tiny")
    for k, v in over.items():
        c = _with(c, k, v)
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.{field.replace('.', '[.]')}:"):
        config_lib.validate(c, 1)


def test_range_descriptions():
    assert config_lib.NUMERIC_FIELDS["seed"].describe() == "an integer in [0, 2**32-1]"
    assert config_lib.NUMERIC_FIELDS["head.sample_rate"].describe() == "a finite number in (0, 1]"
    assert config_lib.NUMERIC_FIELDS["log_every_steps"].describe() == "an integer >= 1"
    assert config_lib.NUMERIC_FIELDS["optim.lr"].describe() == "a finite number > 0"
    assert config_lib.Range(False, 0, math.pi, hi_open=True).describe() == "a finite number in [0, pi)"


def test_cli_prints_one_line_naming_the_field(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ppfr_jax.main", "--config", "configs/arcface.py:tiny",
                        "--workdir", str(tmp_path / "wd"), "--config.log_every_steps=0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "ppfr-train: error: config.log_every_steps: must be an integer >= 1, got 0")
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "wd").exists()  # refused before anything was written


def test_duetface_sub_channels_must_be_distinct():
    c = duetface.get_config("server,tiny")
    c.duetface.sub_channels = (0, 1, 1)
    with pytest.raises(config_lib.ConfigError, match=r"^config\.duetface\.sub_channels: must be distinct"):
        config_lib.validate(c, 1)


def test_backbone_names_come_from_the_one_registry():
    from ppfr_jax import models
    c = arcface.get_config("tiny")
    c.model.backbone = "irse50"  # the old training-only spelling
    with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.backbone: unknown backbone 'irse50' "
                                                     r"\(renamed ir_se50"):
        config_lib.validate(c, 1)
    for name in models.RECOGNIZERS:  # every recogniser the registry has is a valid training backbone
        c.model.backbone = name
        config_lib.validate(c, 1)
    c = duetface.get_config("server,tiny")
    c.duetface.client_backbone = "ir18"
    with pytest.raises(config_lib.ConfigError, match=r"^config\.duetface\.client_backbone: unknown client 'ir18'"):
        config_lib.validate(c, 1)
