"""The client/server contract (``ppfr_jax.methods``): the same members for both methods, each half alone.

Shapes only (``jax.eval_shape``): no weights are initialised and nothing is compiled.
"""
from __future__ import annotations

import os
import sys

import jax
import pytest

from ppfr_jax import methods
from ppfr_jax.methods.contract import MissingVariables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import duetface as duetface_config  # noqa: E402
import minusface as minusface_config  # noqa: E402

CONFIGS = {"duetface": lambda: duetface_config.get_config("server,tiny"),
           "minusface": lambda: minusface_config.get_config("stage2,tiny")}


def test_every_deployable_task_has_one_method():
    assert set(methods.METHODS) == set(CONFIGS)
    assert methods.TASK_METHOD == {"duetface": "duetface", "minusface_stage2": "minusface"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_contract_shapes_and_halves(name):
    split = methods.METHODS[name].from_config(CONFIGS[name]())
    assert split.method == name and split.input_names[0] == "images" and len(split.input_names) == 2
    variables = jax.eval_shape(split.init_variables, jax.random.key(0, impl="rbg"))
    client, server = split.split_variables(variables)
    assert jax.tree.structure(client) == jax.tree.structure(split.client_variables(variables))
    assert jax.tree.structure(server) == jax.tree.structure(split.server_variables(variables))
    # no leaf is in both halves
    paths = lambda t: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    assert not paths(client) & paths(server)

    specs = split.input_specs(2)
    assert specs[0].shape == (2, 112, 112, 3)
    sent = jax.eval_shape(split.client_fn, client, *specs)
    assert set(sent) == set(split.output_names) and all(v.shape[0] == 2 for v in sent.values())
    emb = jax.eval_shape(split.server_fn, server, sent)
    assert emb.shape == (2, CONFIGS[name]().model.embedding_size)
    assert all(k.startswith("ppfr.") for k in split.describe())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_missing_half_is_named(name):
    split = methods.METHODS[name].from_config(CONFIGS[name]())
    with pytest.raises(MissingVariables) as e:
        split.split_variables({"params": {}})
    assert e.value.path.startswith(("params/", "frozen/"))  # MinusFace stage 2: frozen/generator/params
    assert isinstance(e.value, KeyError)
