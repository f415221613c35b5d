"""Regex rules over parameter paths: the one way configs say which parameters get what.

Freezing, learning-rate groups, weight-decay masks and sharding tactics are all declared in configs as
ordered ``(regex, value)`` lists; the first regex that *fully* matches a parameter's ``/``-joined path
decides (big_vision style). Keeping this in one place means a model never hard-codes what is trained or
how it is laid out, and a typo in a rule is caught: :func:`assign` reports rules that match nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax

T = TypeVar("T")
Rules = Sequence[tuple[str, Any]]


def path_str(path: tuple) -> str:
    """A pytree key path as ``a/b/c`` (the names users write rules against)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def assign(tree: Any, rules: Rules, *, default: Any = None, strict: bool = True, what: str = "rule") -> Any:
    """Returns a tree like ``tree`` whose leaves are the value of the first rule matching their path.

    Leaves no rule matches get ``default`` (or, if ``default`` is None and ``strict``, an error naming
    them). With ``strict``, a rule that matches no leaf at all is an error too: it is almost always a typo.
    """
    compiled = [(re.compile(p), v) for p, v in rules]
    used = [False] * len(compiled)
    unmatched = []

    def pick(path, _):
        name = path_str(path)
        for i, (pattern, value) in enumerate(compiled):
            if pattern.fullmatch(name):
                used[i] = True
                return value
        unmatched.append(name)
        return default

    out = jax.tree_util.tree_map_with_path(pick, tree)
    if strict:
        dead = [rules[i][0] for i, u in enumerate(used) if not u]
        if dead:
            raise ValueError(f"{what}s that match no parameter (typo?): {dead}")
        if default is None and unmatched:
            raise ValueError(f"parameters no {what} matches: {unmatched[:20]}; add a catch-all ('.*', ...) rule")
    return out


def select(tree: Any, patterns: Sequence[str]) -> Any:
    """A boolean tree: True where the path fully matches any of ``patterns``."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(lambda p, _: any(c.fullmatch(path_str(p)) for c in compiled), tree)


def paths(tree: Any) -> list[str]:
    """Every leaf path of ``tree``: handy for writing rules."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def summarize(tree: Any, labels: Any) -> Mapping[str, int]:
    """Parameter count per label, for logging what a config trains."""
    counts: dict[str, int] = {}
    for (_, leaf), label in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree_util.tree_leaves(labels)):
        counts[str(label)] = counts.get(str(label), 0) + int(getattr(leaf, "size", 1))
    return counts
