"""One causal-LM decoder for every supported family: Llama, Qwen2, Phi, Gemma, StableLM and OpenELM.

The families differ only in options of the same pre-norm transformer block, so they share one linen
module parameterised by :class:`DecoderConfig` rather than one copy per family:

============  ======  =========  =========  ==========  ==========  ========  ===========
family        norm    mlp        biases     residual    qk-norm     rotary    embeddings
============  ======  =========  =========  ==========  ==========  ========  ===========
llama         rms     gated silu optional   sequential  -           full      untied
qwen2         rms     gated silu qkv        sequential  -           full      either
phi           layer   gelu_new   all+head   parallel    opt. shared partial   untied
gemma         rms 1+w gated gelu optional   sequential  -           full      tied, x sqrt(D)
stablelm      layer   gated silu opt. qkv   either      opt. per-hd partial   untied
openelm       rms     gated silu none       sequential  rms shared  full      tied
============  ======  =========  =========  ==========  ==========  ========  ===========

OpenELM also varies head counts and FFN width per layer, hence the per-layer tuples in the config.
Reading and writing Hugging Face ``config.json`` files is :mod:`qtl_jax.weights.hf_config`'s job.

The client side of split learning runs only :meth:`Decoder.embed`; the server runs
:meth:`Decoder.__call__` on the (reconstructed) embeddings.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from qtl_jax.models import rope
from qtl_jax.models import scan as layer_scan
from qtl_jax.models.remat import REMAT_POLICIES, remat_module
from qtl_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from qtl_jax.models.attention import dot_product_attention, dot_product_attention_heads_major
from qtl_jax.precision import accum_dtype, upcast

FAMILIES = ("llama", "qwen2", "phi", "gemma", "stablelm", "openelm")
NORMS = ("rms", "layer")
QK_NORMS = ("none", "rms", "layer", "layer_per_head")

# Hugging Face activation names -> jax functions (the tanh forms are all the same approximation).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}



@jax.custom_vjp
def silu_gate(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """``silu(gate) * up`` (the gated MLP of Llama-style decoders) whose backward keeps only ``gate`` and ``up``.

    Autodiff keeps ``sigmoid(gate)``, ``silu(gate)`` and their product besides: three more ``[B, T, F]``
    tensors per layer (1.9 GB over OpenELM-270M's 16 layers at batch 4 and 855 tokens); here the backward
    recomputes them elementwise.
    """
    return jax.nn.silu(gate) * up


def _silu_gate_fwd(gate, up):
    return silu_gate(gate, up), (gate, up)


def _silu_gate_bwd(residuals, g):
    gate, up = residuals
    # 0 * (a gradient value): not folded by XLA, so the recomputation is not merged with the forward's
    # sigmoid (which XLA:CPU would then keep alive until here) and waits for this layer's gradient.
    gate = gate + jnp.zeros((), gate.dtype) * g.reshape(-1)[0].astype(gate.dtype)
    sig = jax.nn.sigmoid(gate)
    d_up = g * (gate * sig)
    d_gate = g * up * (sig * (1 + gate * (1 - sig)))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


silu_gate.defvjp(_silu_gate_fwd, _silu_gate_bwd)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

def _per_layer(value: Any, num_layers: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * num_layers
    value = tuple(int(v) for v in value)
    if len(value) != num_layers:
        raise ValueError(f"{name} has {len(value)} entries but the model has {num_layers} layers")
    return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything that distinguishes the supported causal-LM families.

    Per-layer fields (``num_heads``, ``num_kv_heads``, ``intermediate_size``) are tuples with one entry
    per layer; pass an int to :meth:`make` to repeat it.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    intermediate_size: tuple[int, ...]
    head_dim: int
    norm: str = "rms"
    norm_eps: float = 1e-6
    # Gemma's RMSNorm multiplies by (offset + w) with offset 1, so its stored weights are centred at 0.
    norm_offset: float = 0.0
    norm_bias: bool = False
    activation: str = "silu"
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    parallel_residual: bool = False
    qk_norm: str = "none"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    # Multiplies inputs_embeds (token and image embeddings alike) at the start of __call__ (Gemma).
    embed_scale: float | None = None
    max_position_embeddings: int = 2048
    # (key, value) pairs a checkpoint reader attaches and a writer puts back (qtl_jax.weights.hf_config
    # keeps the bos/eos/pad token ids here); the model never reads them.
    extras: tuple[tuple[str, Any], ...] = ()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    # What a rematerialised block keeps for its backward pass (REMAT_POLICIES); only read when remat is set.
    remat_policy: str = "nothing_saveable"
    # The attention kernel of the training forward (qtl_jax.models.attention.IMPLEMENTATIONS; 'auto' by backend).
    attention: str = "auto"
    # Run the blocks of the training forward as one jax.lax.scan (qtl_jax.models.scan) when they are identical
    # (one head count, KV head count and FFN width for every layer; OpenELM's differ, so it stays unrolled).
    scan_layers: bool = False

    def __post_init__(self):
        problems = []
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
        if self.norm not in NORMS:
            problems.append(f"norm {self.norm!r} is not one of {NORMS}")
        if self.qk_norm not in QK_NORMS:
            problems.append(f"qk_norm {self.qk_norm!r} is not one of {QK_NORMS}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != self.num_layers:
                problems.append(f"{name} must be a tuple with one entry per layer ({self.num_layers}), got {value!r}")
        if not problems:
            for i, (h, k) in enumerate(zip(self.num_heads, self.num_kv_heads)):
                if k <= 0 or h % k:
                    problems.append(f"layer {i}: {h} query heads is not a multiple of {k} key/value heads")
        if problems:
            raise ValueError("invalid DecoderConfig:\n  " + "\n  ".join(problems))
        rope.rotary_dim(self.head_dim, self.partial_rotary_factor)

    @classmethod
    def make(cls, **kwargs: Any) -> "DecoderConfig":
        """Builds a config, repeating int per-layer fields over ``num_layers``."""
        n = kwargs["num_layers"]
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            kwargs[name] = _per_layer(kwargs[name], n, name)
        return cls(**kwargs)

    @property
    def rotary_dim(self) -> int:
        return rope.rotary_dim(self.head_dim, self.partial_rotary_factor)

    @property
    def scans_layers(self) -> bool:
        """Whether the training forward scans its blocks: ``scan_layers`` set and every layer the same shape."""
        return self.scan_layers and layer_scan.uniform(self.num_heads, self.num_kv_heads, self.intermediate_size)


class DenseParams(nn.Module):
    """The parameters of an ``nn.Dense`` (same names, shapes and initialisers), without applying them."""

    features: int
    use_bias: bool
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        return kernel, bias


def fused_dense(
    x: jnp.ndarray, outputs: Sequence[tuple[int, str]], use_bias: bool, dtype: Any, param_dtype: Any
) -> list[jnp.ndarray]:
    """Several ``nn.Dense`` layers on the same input as one GEMM; the parameter tree is unchanged.

    Must be called inside a compact module. Why: at small widths one [N, D] x [D, sum(F)] GEMM runs
    much closer to peak than several narrow ones, and its backward is one GEMM for dx instead of a sum
    of several. Concatenating the kernels costs a copy of the weights, small next to the activations.
    """
    params = [DenseParams(n, use_bias, param_dtype, name=name)(x.shape[-1]) for n, name in outputs]
    kernel = jnp.concatenate([k for k, _ in params], axis=1).astype(dtype)
    y = jnp.dot(x.astype(dtype), kernel)
    if use_bias:
        y = y + jnp.concatenate([b for _, b in params]).astype(dtype)
    splits = list(itertools.accumulate(n for n, _ in outputs))[:-1]
    return jnp.split(y, splits, axis=-1)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32 like the HF implementations."""

    kind: str
    eps: float
    offset: float = 0.0
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = upcast(x)
        if self.kind == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        # With an offset the neutral weight is 0 (Gemma), otherwise 1.
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        y = y * (scale.astype(x32.dtype) + self.offset)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype).astype(x32.dtype)
        return y.astype(self.dtype)


class PerHeadNorm(nn.Module):
    """StableLM's qk-norm: a separate bias-free LayerNorm per head, over ``[B,T,heads,d]``."""

    num_heads: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        heads = [
            Norm("layer", self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name=f"head_{h}")(x[:, :, h])
            for h in range(self.num_heads)
        ]
        return jnp.stack(heads, axis=2)


def _qk_norm(config: DecoderConfig, heads: int, name: str) -> nn.Module | None:
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, name=name)
    if config.qk_norm == "rms":
        return Norm("rms", config.norm_eps, **kw)
    if config.qk_norm == "layer":
        return Norm("layer", config.norm_eps, use_bias=True, **kw)
    if config.qk_norm == "layer_per_head":
        return PerHeadNorm(heads, config.norm_eps, **kw)
    return None


class Attention(nn.Module):
    config: DecoderConfig
    layer: int

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        cos: jnp.ndarray,
        sin: jnp.ndarray,
        allowed: jnp.ndarray,
        kv_cache: tuple[jnp.ndarray, jnp.ndarray] | None = None,
        index: jnp.ndarray | None = None,
    ) -> Any:
        """Without ``kv_cache``: the attention output. With it (heads-major ``[B,K,S,d]`` keys and values
        and the write slot ``index``): ``(output, (keys, values))`` with this chunk's keys/values written
        at ``index`` and the queries attending over the whole cache (``allowed`` is ``[B,T,S]``)."""
        cfg = self.config
        h, kv, d = cfg.num_heads[self.layer], cfg.num_kv_heads[self.layer], cfg.head_dim
        dense = lambda n, bias, name: nn.Dense(  # noqa: E731
            n, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        b, t, _ = x.shape
        q, k, v = fused_dense(
            x, [(h * d, "q_proj"), (kv * d, "k_proj"), (kv * d, "v_proj")], cfg.qkv_bias, cfg.dtype, cfg.param_dtype
        )
        q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)
        # Every family with qk-norm (OpenELM, Phi, StableLM) normalises before RoPE.
        q_norm, k_norm = _qk_norm(cfg, h, "q_norm"), _qk_norm(cfg, kv, "k_norm")
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        if kv_cache is None:
            out = dot_product_attention(q, k, v, allowed, d**-0.5, cfg.attention)
            return dense(cfg.hidden_size, cfg.o_bias, "o_proj")(out)
        cache_k, cache_v = kv_cache
        # Only this chunk is transposed into the cache's heads-major layout; the cache itself is read as is.
        start = (0, 0, index, 0)
        k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), start)
        v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), start)
        out = dot_product_attention_heads_major(q, k.astype(q.dtype), v.astype(q.dtype), allowed, d**-0.5)
        return dense(cfg.hidden_size, cfg.o_bias, "o_proj")(out), (k, v)


class MLP(nn.Module):
    config: DecoderConfig
    layer: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        width = cfg.intermediate_size[self.layer]
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        act = ACTIVATIONS[cfg.activation]
        if cfg.gated_mlp:
            gate, up = fused_dense(x, [(width, "gate_proj"), (width, "up_proj")], cfg.mlp_bias, cfg.dtype,
                                   cfg.param_dtype)
            y = silu_gate(gate, up) if act is jax.nn.silu else act(gate) * up
        else:
            y = act(dense(width, "up_proj")(x))
        return dense(cfg.hidden_size, "down_proj")(y)


class Block(nn.Module):
    """Pre-norm block; parallel form ``x + attn(n(x)) + mlp(n(x))`` for Phi / StableLM's option."""

    config: DecoderConfig
    layer: int

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        cos: jnp.ndarray,
        sin: jnp.ndarray,
        allowed: jnp.ndarray,
        kv_cache: tuple[jnp.ndarray, jnp.ndarray] | None = None,
        index: jnp.ndarray | None = None,
    ) -> Any:
        """The block output, or ``(output, (keys, values))`` when given a ``kv_cache`` (see Attention)."""
        cfg = self.config
        norm = lambda name: Norm(  # noqa: E731
            cfg.norm, cfg.norm_eps, cfg.norm_offset, cfg.norm_bias, cfg.dtype, cfg.param_dtype, name=name
        )
        attn = Attention(cfg, self.layer, name="attn")
        mlp = MLP(cfg, self.layer, name="mlp")
        y = norm("input_norm")(x)
        a = attn(y, cos, sin, allowed, kv_cache, index)
        if kv_cache is not None:
            a, kv_cache = a
        if cfg.parallel_residual:
            out = x + a + mlp(y)
        else:
            x = x + a
            out = x + mlp(norm("post_attention_norm")(x))
        return out if kv_cache is None else (out, kv_cache)


class Decoder(nn.Module):
    """Causal LM: ``embed`` (client side) and ``__call__`` from embeddings to float32 logits."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=cfg.param_dtype)
        block = remat_module(Block, cfg.remat, cfg.remat_policy)
        self.layers = [block(cfg, i, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.norm = Norm(cfg.norm, cfg.norm_eps, cfg.norm_offset, cfg.norm_bias, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=cfg.lm_head_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype
            )

    def embed(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        """Raw table lookup ``[B,T] -> [B,T,D]`` in the param dtype (no Gemma scaling here)."""
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        inputs_embeds: jnp.ndarray,
        attention_mask: jnp.ndarray | None = None,
        position_ids: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """``[B,T,D]`` embeddings, ``[B,T]`` 1/0 padding mask -> ``[B,T,V]`` float32 logits.

        ``position_ids`` default to ``cumsum(mask) - 1`` clipped at 0: the positions HF ``generate``
        uses, which for right padding (and no padding) equal ``arange(T)`` on every real token, and
        for left padding start at 0 on the first real token. Outputs at padded positions are garbage.
        ``segment_ids`` ``[B,T]`` (packed rows): a position attends only to earlier positions of its own segment.
        """
        return self._head(self.final_hidden(inputs_embeds, attention_mask, position_ids, segment_ids))

    def final_hidden(
        self,
        inputs_embeds: jnp.ndarray,
        attention_mask: jnp.ndarray | None = None,
        position_ids: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """As :meth:`__call__` up to the final norm: ``[B,T,D]`` in the compute dtype, what the head reads
        (a loss that never forms the logits, ``qtl_jax.models.cross_entropy.fused_head``, starts here)."""
        cfg = self.config
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, seq, {cfg.hidden_size}], got {inputs_embeds.shape}; "
                "use Decoder.embed to turn token ids into embeddings"
            )
        b, t, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask must be [batch, seq] = {(b, t)}, got {attention_mask.shape}")
        if position_ids is None:
            position_ids = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
        if self.is_initializing() and not cfg.tie_word_embeddings:
            # The untied table is used only by `embed`; create it at init so params are complete.
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))

        x = inputs_embeds.astype(cfg.dtype)
        if cfg.embed_scale is not None:
            # HF rounds the normaliser to the activation dtype first; so do we, for bf16 parity.
            x = x * jnp.asarray(cfg.embed_scale, cfg.dtype)
        cos, sin = rope.cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta, cfg.dtype)
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        allowed = causal[None] & attention_mask.astype(jnp.bool_)[:, None, :]
        if segment_ids is not None:
            if segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids must be [batch, seq] = {(b, t)}, got {segment_ids.shape}")
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if cfg.scans_layers and not self.is_initializing():
            # Init stays unrolled so that it creates the same layers_{i} tree the scan then stacks.
            per_layer = layer_scan.layer_params(self.variables["params"], cfg.num_layers)
            x, _ = layer_scan.scan_layers(Block(cfg, 0, parent=None), per_layer, x, cos, sin, allowed,
                                          remat=cfg.remat, remat_policy=cfg.remat_policy)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, allowed)
        return self.norm(x)

    def _logits(self, x: jnp.ndarray) -> jnp.ndarray:
        return self._head(self.norm(x))

    def _head(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        if cfg.tie_word_embeddings:
            table = self.embed_tokens.embedding.astype(cfg.dtype)
            return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=accum_dtype(cfg.dtype))
        return upcast(self.lm_head(x))

    def forward_cached(
        self,
        inputs_embeds: jnp.ndarray,
        attention_mask: jnp.ndarray,
        cache: "KVCache",
        position_ids: jnp.ndarray | None = None,
        last_only: bool = False,
    ) -> tuple[jnp.ndarray, "KVCache"]:
        """Runs a chunk of ``T`` positions against a :class:`KVCache`: ``(logits, updated cache)``.

        The chunk is written at slots ``[cache.index, cache.index + T)``; each query attends to the
        cached slots holding real tokens (``cache.mask``) up to its own slot. ``position_ids`` default
        to the number of real tokens before each one (``cache.mask`` plus this chunk's
        ``attention_mask``), the positions HF ``generate`` derives from its attention mask, so a
        left-padded prefill followed by one-token steps reproduces HF's greedy search. With
        ``last_only`` only the last position's logits are computed (``[B, 1, V]``), as a prefill needs.
        """
        cfg = self.config
        b, t, d = inputs_embeds.shape
        if d != cfg.hidden_size or attention_mask.shape != (b, t):
            raise ValueError(
                f"forward_cached takes inputs_embeds [batch, seq, {cfg.hidden_size}] and attention_mask [batch, seq]; "
                f"got {inputs_embeds.shape} and {attention_mask.shape}"
            )
        if cache.mask.shape[0] != b or len(cache.keys) != cfg.num_layers:
            raise ValueError(
                f"the cache holds {cache.mask.shape[0]} rows and {len(cache.keys)} layers but the input has {b} rows "
                f"and the model {cfg.num_layers} layers; build it with init_cache(config, batch={b}, ...)"
            )
        chunk_mask = attention_mask.astype(jnp.int32)
        if position_ids is None:
            before = jnp.sum(cache.mask, axis=1, keepdims=True)
            position_ids = jnp.maximum(before + jnp.cumsum(chunk_mask, axis=-1) - 1, 0)
        index = cache.index
        mask = jax.lax.dynamic_update_slice(cache.mask, chunk_mask, (0, index))
        x = inputs_embeds.astype(cfg.dtype)
        if cfg.embed_scale is not None:
            x = x * jnp.asarray(cfg.embed_scale, cfg.dtype)
        cos, sin = rope.cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta, cfg.dtype)
        slots = jnp.arange(cache.max_length)
        causal = slots[None, :] <= (index + jnp.arange(t))[:, None]
        allowed = causal[None] & mask.astype(jnp.bool_)[:, None, :]
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, cos, sin, allowed, (cache.keys[i], cache.values[i]), index)
            keys.append(k)
            values.append(v)
        if last_only:
            x = x[:, -1:]
        return self._logits(x), KVCache(tuple(keys), tuple(values), mask, index + t)


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values of every layer, an explicit pytree passed in and out of the model.

    keys / values: one ``[B, K_l, S, head_dim]`` array per layer (OpenELM varies ``K_l`` per layer), heads-major
      as attention reads them: a decode step then attends over the cache without transposing (copying) it.
    mask: ``[B, S]`` int32, 1 where a slot holds a real (non-padding) token; unwritten slots are 0.
    index: ``[]`` int32, the next slot to write (the same for every row: prompts are left-padded).
    """

    keys: tuple[jnp.ndarray, ...]
    values: tuple[jnp.ndarray, ...]
    mask: jnp.ndarray
    index: jnp.ndarray

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


def init_cache(config: DecoderConfig, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache for ``batch`` rows and ``max_length`` positions (dtype defaults to the compute dtype)."""
    if batch < 1 or max_length < 1:
        raise ValueError(f"init_cache needs batch >= 1 and max_length >= 1, got batch={batch}, max_length={max_length}")
    dtype = config.dtype if dtype is None else dtype
    shape = lambda k: (batch, k, max_length, config.head_dim)  # noqa: E731
    return KVCache(
        keys=tuple(jnp.zeros(shape(k), dtype) for k in config.num_kv_heads),
        values=tuple(jnp.zeros(shape(k), dtype) for k in config.num_kv_heads),
        mask=jnp.zeros((batch, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def head_of(config: DecoderConfig, params: Mapping[str, Any]) -> tuple[jnp.ndarray, jnp.ndarray | None, bool]:
    """The output head in a decoder's params: ``(weight, bias or None, vocab_major)``.

    Tied: the embedding table ``[V, D]`` (``vocab_major``); untied: ``lm_head``'s kernel ``[D, V]`` and bias.
    What :meth:`Decoder.final_hidden`'s output is multiplied by to give the logits.
    """
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"], None, True
    head = params["lm_head"]
    return head["kernel"], head.get("bias"), False


def dtype_from_name(name: str | Any) -> Any:
    """``'bfloat16'`` -> ``jnp.bfloat16``; dtypes pass through."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return name


def init_shapes(config: DecoderConfig) -> dict[str, Any]:
    """Abstract params (``jax.ShapeDtypeStruct`` tree) without allocating weights."""
    model = Decoder(config)
    x = jnp.zeros((1, 1, config.hidden_size), config.dtype)
    return jax.eval_shape(model.init, jax.random.key(0), x, jnp.ones((1, 1), jnp.int32))["params"]


def param_count(params: Mapping[str, Any]) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


__all__: Sequence[str] = (
    "ACTIVATIONS",
    "FAMILIES",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "dot_product_attention",
    "dtype_from_name",
    "head_of",
    "init_cache",
    "init_shapes",
    "param_count",
)
