"""Helpers shared by the methods' client/server contracts (the contract itself: ``ppfr_jax.methods``).

``take(variables, "params/duetface")`` walks a variable tree and raises
``MissingVariables`` (a ``KeyError``) naming the first missing key, so a
checkpoint of the wrong kind of run is reported by path, not by a bare key.
"""
from __future__ import annotations

from typing import Any, Mapping

from ppfr_jax.errors import PpfrError


class MissingVariables(PpfrError, KeyError):
    """A variable tree lacks a sub-tree the method's split needs; ``.path`` names it ('params/duetface')."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"the variables have no {self.path!r}"


def take(tree: Mapping[str, Any], path: str) -> Any:
    """``tree[a][b]...`` for ``path = 'a/b/...'``; raises ``MissingVariables(path)`` when a key is missing."""
    node: Any = tree
    for k in path.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise MissingVariables(path)
        node = node[k]
    return node
