"""Face verification: the k-fold protocol, the one embedding loop, verification sets, recognizers, the evaluator.

- :mod:`.protocol`: ``verify``, ``calculate_roc``, ``tpr_at_fpr`` (numpy only);
- :mod:`.sets`: ``load_set`` ("demo" | .bin | pairs.txt -> ``VerificationSet``), safe ``.bin`` reader;
- :mod:`.embedding`: ``embed(apply_fn, images, *, flip, batch_size, sharding=None)``;
- :mod:`.recognizers`: ``Recognizer``, ``MODELS`` (``ppfr-eval --model``), ``evaluate_set``;
- :mod:`.evaluator`: ``VerificationEvaluator(embed_fn, set).run(variables)``, and ``EvalSuite`` (every set of
  ``config.eval``), what training logs;
- :mod:`.ijb`: IJB-B / IJB-C 1:1 template verification (``evaluate_ijb``, ``evaluate_features``).

The protocol and the set readers import without JAX (and nothing here imports
TensorFlow); the JAX-using names load their module on first access, so
``import ppfr_jax.evaluate.protocol`` stays numpy-only. ``ppfr-eval`` is
``ppfr_jax.cli.eval``.
"""
from __future__ import annotations

import importlib

from ppfr_jax.evaluate.protocol import (THRESHOLDS, calculate_roc, kfold_splits, l2_normalize, roc_curve,
                                        tpr_at_fpr, verify)
from ppfr_jax.evaluate.sets import (BadInputError, LazyImages, Pair, VerificationSet, decode_images,
                                    demo_eval_landmarks, load_bin, load_bin_set, load_pairs_set, load_set, read_pairs,
                                    save_bin)

__all__ = ["THRESHOLDS", "BadInputError", "EvalSuite", "IJBError", "LazyImages", "MODELS", "Pair", "Recognizer", "VerificationEvaluator",
           "VerificationSet", "WithVariables", "calculate_roc", "decode_images", "demo_eval_landmarks", "embed",
           "evaluate_features", "evaluate_ijb", "evaluate_set", "fit_to_input", "kfold_splits", "l2_normalize",
           "load_bin", "load_bin_set", "load_pairs_set", "load_set", "read_pairs", "register_model", "roc_curve",
           "save_bin", "tpr_at_fpr", "verify"]

# name -> submodule that imports JAX; loaded on first access (PEP 562)
_LAZY = {
    "embed": "embedding", "WithVariables": "embedding",
    "Recognizer": "recognizers", "MODELS": "recognizers", "register_model": "recognizers",
    "fit_to_input": "recognizers", "evaluate_set": "recognizers",
    "VerificationEvaluator": "evaluator", "EvalSuite": "evaluator",
    "IJBError": "ijb", "evaluate_ijb": "ijb", "evaluate_features": "ijb",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
