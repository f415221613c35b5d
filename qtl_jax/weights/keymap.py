"""Declarative, invertible key maps between checkpoint tensors and Flax parameter paths.

A key map is a list of :class:`Rule` s. Each rule pairs a checkpoint-key *template* with one or more
Flax-path templates and a per-tensor :class:`Transform`. Templates use ``{name}`` placeholders
(digits by default, ``{name:regex}`` otherwise), so the same table converts in both directions:
``convert`` reads a checkpoint into params, ``export`` writes params back under checkpoint names.

Loading is strict on purpose: every checkpoint tensor must be consumed (or explicitly ignored by a
rule whose target is ``None``) and every parameter filled with the right shape; otherwise one
:class:`WeightMismatchError` lists everything that is wrong at once, not the first problem only.

Flax paths are ``/``-joined keys of the nested ``params`` dict, e.g. ``layers_0/attn/q_proj/kernel``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Array = np.ndarray
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


@dataclasses.dataclass(frozen=True)
class Context:
    """What a transform may depend on: the placeholder values of the match and the model config."""

    values: Mapping[str, str]
    config: Any = None

    def int(self, name: str) -> int:
        return int(self.values[name])


class Transform:
    """Maps one checkpoint tensor to one (or, for splits, several) parameters, and back."""

    def forward(self, x: Array, ctx: Context) -> Array | tuple[Array, ...]:
        raise NotImplementedError

    def inverse(self, x: Array | tuple[Array, ...], ctx: Context) -> Array:
        raise NotImplementedError


class _Identity(Transform):
    def forward(self, x, ctx):
        return x

    def inverse(self, x, ctx):
        return x

    def __repr__(self):
        return "IDENTITY"


class _Linear(Transform):
    """torch ``Linear.weight`` (out, in) <-> flax ``Dense.kernel`` (in, out)."""

    def forward(self, x, ctx):
        return np.swapaxes(x, -1, -2)

    def inverse(self, x, ctx):
        return np.swapaxes(x, -1, -2)

    def __repr__(self):
        return "LINEAR"


class _Conv2d(Transform):
    """torch ``Conv2d.weight`` (O, I, kh, kw) <-> flax ``Conv.kernel`` (kh, kw, I, O)."""

    def forward(self, x, ctx):
        return np.transpose(x, (2, 3, 1, 0))

    def inverse(self, x, ctx):
        return np.transpose(x, (3, 2, 0, 1))

    def __repr__(self):
        return "CONV2D"


IDENTITY: Transform = _Identity()
LINEAR: Transform = _Linear()
CONV2D: Transform = _Conv2d()


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """Splits a fused tensor (e.g. a fused qkv projection) along ``axis`` into ``sizes(ctx)`` pieces.

    ``axis`` refers to the checkpoint tensor; ``then`` is applied to each piece afterwards.
    """

    axis: int
    sizes: Callable[[Context], Sequence[int]]
    then: Transform = IDENTITY

    def forward(self, x, ctx):
        sizes = list(self.sizes(ctx))
        if sum(sizes) != x.shape[self.axis]:
            raise ValueError(f"cannot split axis {self.axis} of size {x.shape[self.axis]} into {sizes}")
        pieces = np.split(x, np.cumsum(sizes)[:-1], axis=self.axis)
        return tuple(self.then.forward(p, ctx) for p in pieces)

    def inverse(self, x, ctx):
        return np.concatenate([self.then.inverse(p, ctx) for p in x], axis=self.axis)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``source`` checkpoint-key template -> ``target`` flax-path template(s), through ``transform``.

    ``target=None`` marks tensors that are knowingly not used (rotary caches, unused heads); they
    count as consumed but are never exported.
    """

    source: str
    target: str | tuple[str, ...] | None
    transform: Transform = IDENTITY

    @property
    def targets(self) -> tuple[str, ...]:
        if self.target is None:
            return ()
        return (self.target,) if isinstance(self.target, str) else tuple(self.target)


def _compile(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{m.group(2) or r'[0-9]+'})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class WeightMismatchError(ValueError):
    """A checkpoint and a model do not correspond; the message lists every problem found."""


def _report(title: str, problems: dict[str, list[str]], limit: int = 25) -> str:
    lines = [title]
    for kind, items in problems.items():
        if items:
            lines.append(f"  {kind} ({len(items)}):")
            lines += [f"    {s}" for s in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


def convert(
    checkpoint: Mapping[str, Array],
    rules: Sequence[Rule],
    expected: Mapping[str, tuple[int, ...]],
    *,
    config: Any = None,
    dtype: Any = np.float32,
    name: str = "checkpoint",
) -> dict[str, Array]:
    """Converts checkpoint tensors to flat flax params ``{path: array}`` following ``rules``.

    ``expected`` maps every flax path the model has to its shape (e.g. from ``flatten(jax.eval_shape(
    model.init, ...))``). Raises one :class:`WeightMismatchError` listing unmapped checkpoint keys,
    params no tensor filled, shape mismatches and conflicts.
    """
    compiled = [(_compile(r.source), r) for r in rules]
    out: dict[str, Array] = {}
    problems: dict[str, list[str]] = {
        "checkpoint tensors no rule maps (unmapped)": [],
        "parameters no checkpoint tensor fills (missing)": [],
        "shape mismatches": [],
        "rules that point at parameters the model does not have": [],
        "parameters filled twice": [],
    }
    for key in sorted(checkpoint):
        for pattern, rule in compiled:
            m = pattern.fullmatch(key)
            if m:
                break
        else:
            problems["checkpoint tensors no rule maps (unmapped)"].append(key)
            continue
        if rule.target is None:
            continue
        ctx = Context(m.groupdict(), config)
        try:
            values = rule.transform.forward(np.asarray(checkpoint[key]), ctx)
        except ValueError as e:
            problems["shape mismatches"].append(f"{key}: {e}")
            continue
        values = values if isinstance(values, tuple) else (values,)
        for template, value in zip(rule.targets, values, strict=True):
            path = _fill(template, ctx.values)
            if path not in expected:
                problems["rules that point at parameters the model does not have"].append(f"{key} -> {path}")
            elif tuple(value.shape) != tuple(expected[path]):
                problems["shape mismatches"].append(
                    f"{key} -> {path}: checkpoint {tuple(value.shape)} vs model {tuple(expected[path])}"
                )
            elif path in out:
                problems["parameters filled twice"].append(f"{key} -> {path}")
            else:
                out[path] = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
    problems["parameters no checkpoint tensor fills (missing)"] = sorted(set(expected) - set(out))
    if any(problems.values()):
        raise WeightMismatchError(_report(f"{name} does not match the model:", problems))
    return out


def export(
    params: Mapping[str, Array], rules: Sequence[Rule], *, config: Any = None, name: str = "model"
) -> dict[str, Array]:
    """Inverse of :func:`convert`: flat flax params -> checkpoint tensors named by the rules' sources."""
    compiled = [(tuple(_compile(t) for t in r.targets), r) for r in rules if r.targets]
    out: dict[str, Array] = {}
    used: set[str] = set()
    for path in sorted(params):
        if path in used:
            continue
        for patterns, rule in compiled:
            m = patterns[0].fullmatch(path)
            if m:
                break
        else:
            continue
        ctx = Context(m.groupdict(), config)
        paths = [_fill(t, ctx.values) for t in rule.targets]
        absent = [p for p in paths if p not in params]
        if absent:
            raise WeightMismatchError(f"{name}: cannot export {rule.source}: missing {absent}")
        value = rule.transform.inverse(
            tuple(np.asarray(params[p]) for p in paths) if len(paths) > 1 else np.asarray(params[paths[0]]), ctx
        )
        out[_fill(rule.source, ctx.values)] = value
        used.update(paths)
    left = sorted(set(params) - used)
    if left:
        raise WeightMismatchError(_report(f"{name}: no export rule for:", {"parameters": left}))
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested param dict -> ``{"a/b/c": leaf}``."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested param dict."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat ``{path: shape}`` of a param tree or of ``jax.eval_shape`` output."""
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def with_prefix(rules: Iterable[Rule], source_prefix: str = "", target_prefix: str = "") -> list[Rule]:
    """The same rules under a checkpoint-key prefix and/or a flax-path prefix (layout composition)."""
    return [
        Rule(
            source_prefix + r.source,
            None if r.target is None else tuple(target_prefix + t for t in r.targets),
            r.transform,
        )
        for r in rules
    ]
