"""Image feature inversion: a decoder trained to turn what crosses the wire back into the image.

The attacker holds pairs (received image codes -> image) built from its own images (see ``docs/privacy.md``
for the threat model). It first decodes the codes the way the server does (level indices -> grid values,
or the fp16 values of the 16-bit baseline, :func:`wire_values`), standardises each channel with statistics
of its own training set, and trains :class:`InversionDecoder` with a pixel MSE:

    tokens [B, T, D] -> per-token MLP -> [B, g, g, C0] on the patch grid -> stride-2 transposed
    convolutions up to the image size -> 3x3 conv -> sigmoid -> image [B, H, W, 3] in [0, 1]

With the ``patch`` feature strategy the tower drops the first of the g*g patch tokens (TinyLLaVA's quirk),
so T = g*g - 1: the decoder fills that grid cell with a learned vector.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtl_jax import quantizer as qlib


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """The attacker's decoder and its training.

    Attributes:
      num_tokens: tokens per image on the wire (T).
      dim: feature width per token (D).
      image_size: side of the square output image.
      grid: side of the patch grid (g); T must be g*g or g*g - 1, and image_size / g a power of two.
      hidden: width of the per-token MLP.
      channels: channels at the patch grid and after each up-convolution; there must be
        1 + log2(image_size / grid) entries.
      steps, batch_size, learning_rate, weight_decay: AdamW with a cosine schedule on the pixel MSE.
    """

    num_tokens: int
    dim: int
    image_size: int
    grid: int
    hidden: int = 128
    channels: tuple[int, ...] = (32, 16, 8, 8)
    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4

    def __post_init__(self):
        problems = []
        g = self.grid
        if g < 1 or self.num_tokens not in (g * g, g * g - 1):
            problems.append(f"num_tokens={self.num_tokens} must be grid^2 or grid^2 - 1 (grid={g})")
        ratio = self.image_size / g if g > 0 else 0
        if ratio < 1 or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
            problems.append(f"image_size/grid = {self.image_size}/{g} must be a power of two >= 1")
        else:
            ups = int(math.log2(ratio))
            if len(self.channels) != ups + 1:
                problems.append(
                    f"channels needs {ups + 1} entries (patch grid + {ups} up-convolutions), got {self.channels}")
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if problems:
            raise ValueError("invalid InversionConfig:\n  " + "\n  ".join(problems))

    def architecture(self) -> "InversionConfig":
        """This config with the training-loop fields neutralised: the key the jitted steps compile on, so
        runs that differ only in steps, batch size or learning rate share one compilation."""
        return dataclasses.replace(self, steps=1, batch_size=1, learning_rate=0.0)


class InversionDecoder(nn.Module):
    """Standardised wire values ``[B, T, D]`` -> images ``[B, H, W, 3]`` in [0, 1]."""

    config: InversionConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        if tokens.ndim != 3 or tokens.shape[1:] != (cfg.num_tokens, cfg.dim):
            raise ValueError(
                f"InversionDecoder expects [B, {cfg.num_tokens}, {cfg.dim}] tokens, got {tuple(tokens.shape)}."
            )
        x = nn.gelu(nn.Dense(cfg.hidden, name="token_mlp_in")(tokens))
        x = nn.Dense(cfg.channels[0], name="token_mlp_out")(x)
        g = cfg.grid
        if cfg.num_tokens == g * g - 1:
            # The tower's feature selection dropped the first grid cell; it gets a learned filler.
            filler = self.param("dropped_cell", nn.initializers.zeros, (cfg.channels[0],))
            x = jnp.concatenate([jnp.broadcast_to(filler, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        x = x.reshape(x.shape[0], g, g, cfg.channels[0])
        for i, c in enumerate(cfg.channels[1:]):
            x = nn.gelu(nn.ConvTranspose(c, (4, 4), strides=(2, 2), padding="SAME", name=f"up_{i}")(x))
        x = nn.Conv(3, (3, 3), padding="SAME", name="to_rgb")(x)
        return nn.sigmoid(x)


class Standardizer(NamedTuple):
    """Per-channel mean and std of the attacker's training inputs."""

    mean: np.ndarray
    std: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)


def fit_standardizer(values: np.ndarray) -> Standardizer:
    """Channel statistics over all samples and tokens; constant channels keep std 1 (no division by 0)."""
    v = np.asarray(values, np.float64).reshape(-1, np.shape(values)[-1])
    std = v.std(axis=0)
    return Standardizer(v.mean(axis=0).astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32))


def wire_values(codes: np.ndarray, levels: int) -> np.ndarray:
    """What the attacker reads off the wire, as float32: grid values of the indices, or the fp16 values.

    ``levels`` = 0 marks the fp16 baseline (codes are float16 features); otherwise codes are integer
    level indices in [0, levels).
    """
    codes = np.asarray(codes)
    if levels == 0:
        if codes.dtype != np.float16:
            raise ValueError(f"levels=0 (the fp16 baseline) expects float16 codes, got {codes.dtype}.")
        return codes.astype(np.float32)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"levels={levels} expects integer level indices, got {codes.dtype}; use levels=0 for fp16.")
    if codes.size and (codes.min() < 0 or codes.max() >= levels):
        raise ValueError(f"level indices must lie in [0, {levels}), got [{codes.min()}, {codes.max()}].")
    return qlib.grid(levels)[codes.astype(np.int64)]


class TrainedInverter(NamedTuple):
    """A trained attack: decoder params, input standardiser, and the loss per step."""

    config: InversionConfig
    params: Any
    standardizer: Standardizer
    losses: np.ndarray


def learning_rate(cfg: InversionConfig, step: int) -> float:
    """Cosine decay from ``cfg.learning_rate`` to 0 over ``cfg.steps``."""
    return 0.5 * cfg.learning_rate * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))


def _adam(weight_decay: float) -> optax.GradientTransformation:
    # The learning rate is applied outside (a traced scalar), so the schedule never forces a recompile.
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


@functools.partial(jax.jit, static_argnums=0)
def _train_step(arch: InversionConfig, params, opt_state, x, y, lr):
    def loss_fn(p):
        return jnp.mean(jnp.square(InversionDecoder(arch).apply({"params": p}, x) - y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _adam(arch.weight_decay).update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _predict(arch: InversionConfig, params, x):
    return InversionDecoder(arch).apply({"params": params}, x)


def _check_pairs(cfg: InversionConfig, values: np.ndarray, images: np.ndarray) -> None:
    want_v = (cfg.num_tokens, cfg.dim)
    want_i = (cfg.image_size, cfg.image_size, 3)
    if np.ndim(values) != 3 or tuple(np.shape(values)[1:]) != want_v:
        raise ValueError(f"values must be [N, {want_v[0]}, {want_v[1]}], got {np.shape(values)}.")
    if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != want_i or len(images) != len(values):
        raise ValueError(
            f"images must be [N={len(values)}, {want_i[0]}, {want_i[1]}, 3] in [0, 1], got {np.shape(images)}.")
    if len(values) < cfg.batch_size:
        raise ValueError(f"{len(values)} training pairs are fewer than batch_size={cfg.batch_size}.")


def train_inverter(cfg: InversionConfig, values: np.ndarray, images: np.ndarray, key: jax.Array) -> TrainedInverter:
    """Trains the decoder on the attacker's pairs: ``values`` [N, T, D] (wire values), ``images`` [N, H, W, 3].

    Minibatches are drawn without replacement within each pass over the data, from ``key``.
    """
    _check_pairs(cfg, values, images)
    standardizer = fit_standardizer(values)
    x_all = standardizer(values)
    y_all = np.asarray(images, np.float32)
    k_init, k_data = jax.random.split(key)
    arch = cfg.architecture()
    params = InversionDecoder(arch).init(k_init, jnp.zeros((1, cfg.num_tokens, cfg.dim), jnp.float32))["params"]
    opt_state = _adam(cfg.weight_decay).init(params)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_data)).ravel())
    n, per_epoch = len(x_all), len(x_all) // cfg.batch_size
    order = rng.permutation(n)
    losses = []
    for step in range(cfg.steps):
        i = step % per_epoch
        if i == 0 and step:
            order = rng.permutation(n)
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        lr = jnp.float32(learning_rate(cfg, step))
        params, opt_state, loss = _train_step(arch, params, opt_state, x_all[idx], y_all[idx], lr)
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses), np.float32)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError("the inversion decoder's loss became NaN/inf; lower InversionConfig.learning_rate.")
    return TrainedInverter(cfg, params, standardizer, losses)


def reconstruct(inverter: TrainedInverter, values: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The attack on the victim: wire values [N, T, D] -> reconstructed images [N, H, W, 3] in [0, 1]."""
    cfg = inverter.config
    if np.ndim(values) != 3 or tuple(np.shape(values)[1:]) != (cfg.num_tokens, cfg.dim):
        raise ValueError(f"values must be [N, {cfg.num_tokens}, {cfg.dim}], got {np.shape(values)}.")
    x = inverter.standardizer(values)
    out = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        # Pad the last chunk so every call has one shape (one compile).
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(_predict(cfg.architecture(), inverter.params, padded))[:len(chunk)])
    return np.concatenate(out, axis=0)
