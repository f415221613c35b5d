"""fp32 logit parity of the Decoder against reference implementations, one tiny random model per family.

References: the ``transformers`` PyTorch classes (Llama, Qwen2, Phi, Gemma, StableLM) and
``mlx_lm.models.openelm`` for OpenELM (not in transformers). Weights are re-drawn at unit scale (HF's
0.02 init would make every logit ~0 and the comparison vacuous), saved with ``save_pretrained`` /
safetensors, and loaded back through :func:`qtl_jax.weights.llm_maps.load_causal_lm`, so the key maps
are exercised too. Each family costs one reference build and one jit.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from qtl_jax.models.decoder import Decoder
from qtl_jax.weights import keymap, safetensors_io
from qtl_jax.weights.hf_config import decoder_config_to_hf
from qtl_jax.weights.llm_maps import llm_rules, load_causal_lm
from tolerances import layers_tolerance, rounding_tolerance

BATCH, SEQ, VOCAB = 3, 20, 160

# name -> (config class, kwargs). Together: GQA, 3 query heads, tied and untied heads, partial rotary,
# qk-norm (shared and per head), parallel and sequential residuals, head_dim != hidden/heads.
# Small rope_theta so the slowest rotary frequency completes a full turn within SEQ tokens.
HF_CASES = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_theta=2.0)),
    "qwen2": (
        transformers.Qwen2Config,
        dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=2.0),
    ),
    "phi": (transformers.PhiConfig, dict(num_key_value_heads=4, qk_layernorm=True, rope_theta=3.0)),
    "gemma": (
        transformers.GemmaConfig,
        dict(num_attention_heads=3, num_key_value_heads=1, head_dim=24, rope_theta=2.0),
    ),
    "stablelm": (
        transformers.StableLmConfig,
        dict(num_key_value_heads=2, qk_layernorm=True, use_qkv_bias=True, rope_theta=4.0),
    ),
    "llama_tied_biased": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rope_theta=2.0),
    ),
    "stablelm_parallel": (
        transformers.StableLmConfig,
        dict(num_key_value_heads=4, use_parallel_residual=True, partial_rotary_factor=0.5, rope_theta=3.0),
    ),
}

OPENELM_CONFIG = dict(
    model_type="openelm",
    num_transformer_layers=3,
    model_dim=64,
    head_dim=16,
    vocab_size=VOCAB,
    num_query_heads=[4, 6, 3],
    num_kv_heads=[2, 3, 1],
    ffn_multipliers=[0.5, 1.0, 1.5],
    ffn_dim_divisor=16,
    ffn_with_glu=True,
    normalize_qk_projections=True,
    share_input_output_layers=True,
    rms_norm_eps=1e-6,
    rope_freq_constant=3.0,
)


def _tolerance(reference, config) -> float:
    """Float32 rounding of two differently ordered implementations (tests/tolerances.py), this config's sizes."""
    width = max(config.hidden_size, int(np.max(config.intermediate_size)), SEQ)
    return layers_tolerance(reference, width=width, layers=config.num_layers)


def _unit_scale(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Weights at the scale a trained model has: O(1) activations, norms around their neutral value."""
    if len(shape) == 2:
        fan_in = 1 if "embed" in name else shape[1]
        return rng.standard_normal(shape) / math.sqrt(fan_in)
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.2 * rng.standard_normal(shape)
    return 0.2 * rng.standard_normal(shape)


def _padding_batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row 0 unpadded, row 1 right-padded by 5, row 2 left-padded by 6."""
    ids = rng.integers(0, VOCAB, (BATCH, SEQ))
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[1, -5:] = 0
    mask[2, :6] = 0
    return ids, mask


def _slowest_period(head_dim: int, factor: float, theta: float) -> float:
    dim = int(head_dim * factor)
    return 2 * math.pi * theta ** ((dim - 2) / dim)


def _forward(model: Decoder):
    """ids -> embed (client side) -> decoder (server side), as TinyLLaVA uses it."""

    def f(params, ids, mask):
        embeds = model.apply({"params": params}, ids, method=Decoder.embed)
        return model.apply({"params": params}, embeds, mask)

    return jax.jit(f)


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    cache: dict = {}

    def get(name: str) -> dict:
        if name not in cache:
            cls, kwargs = HF_CASES[name]
            cfg = cls(
                **{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                          vocab_size=VOCAB), **kwargs}
            )
            torch.manual_seed(0)
            ref_model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
            rng = np.random.default_rng(0)
            with torch.no_grad():
                for pname, p in ref_model.named_parameters():
                    p.copy_(torch.from_numpy(_unit_scale(pname, tuple(p.shape), rng).astype(np.float32)))
            path = str(tmp_path_factory.mktemp(name))
            ref_model.save_pretrained(path)
            ids, mask = _padding_batch(rng)
            # HF generate's positions for a padded batch: counted from the first real token.
            pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
            with torch.no_grad():
                ref = ref_model(
                    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos),
                ).logits.numpy()
            model, params = load_causal_lm(path)
            out = np.asarray(_forward(model)(params, ids, mask))
            cache[name] = dict(path=path, ref_model=ref_model, ids=ids, mask=mask, ref=ref, out=out,
                               model=model, params=params)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_hf_family_logits_match_torch(hf_case, name):
    case = hf_case(name)
    cfg = case["model"].config
    real = case["mask"].astype(bool)
    assert case["out"].shape == case["ref"].shape == (BATCH, SEQ, VOCAB)
    assert case["out"].dtype == np.float32
    # The comparison is only meaningful if logits are far from 0 and rotary angles wrap around.
    assert case["ref"][real].std() > 0.5
    assert SEQ > _slowest_period(cfg.head_dim, cfg.partial_rotary_factor, cfg.rope_theta)
    diff = np.abs(case["out"] - case["ref"])[real].max()
    print(f"{name}: max |jax - torch| {diff:.2e}, logit std {case['ref'][real].std():.2f}")
    tol = _tolerance(case["ref"][real], cfg)
    assert diff <= tol, f"{name}: max |jax - torch| = {diff:.2e} > {tol:.2e}"


@pytest.mark.parametrize("name", ["llama", "phi"])
def test_default_positions_match_hf_forward_for_right_padding(hf_case, name):
    """Without position_ids HF forward uses arange; on right-padded and full rows that equals our default."""
    case = hf_case(name)
    with torch.no_grad():
        ref = case["ref_model"](
            input_ids=torch.from_numpy(case["ids"]), attention_mask=torch.from_numpy(case["mask"])
        ).logits.numpy()
    rows = [0, 1]
    real = case["mask"][rows].astype(bool)
    assert np.abs(case["out"][rows] - ref[rows])[real].max() <= _tolerance(ref[rows][real], case["model"].config)


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_to_hf_and_export_round_trip_through_transformers(hf_case, name):
    """decoder_config_to_hf builds the same transformers model; exported params load strictly and give the same logits."""
    case = hf_case(name)
    config = case["model"].config
    hf_cfg = transformers.AutoConfig.for_model(**decoder_config_to_hf(config))
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    exported = keymap.export(keymap.flatten(jax.tree.map(np.asarray, case["params"])), llm_rules(config))
    state = {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf_model.load_state_dict(state, strict=True)
    pos = np.clip(np.cumsum(case["mask"], -1) - 1, 0, None)
    with torch.no_grad():
        logits = hf_model(
            input_ids=torch.from_numpy(case["ids"]), attention_mask=torch.from_numpy(case["mask"]),
            position_ids=torch.from_numpy(pos),
        ).logits.numpy()
    real = case["mask"].astype(bool)
    assert np.abs(logits - case["ref"])[real].max() <= _tolerance(case["ref"][real], config)


def test_sharded_checkpoint_loads_the_same_params(hf_case, tmp_path):
    case = hf_case("llama_tied_biased")
    case["ref_model"].save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, params = load_causal_lm(str(tmp_path))
    assert model.config == case["model"].config
    jax.tree.map(np.testing.assert_array_equal, params, case["params"])


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_bf16_compute_stays_close_to_fp32(hf_case, name):
    case = hf_case(name)
    model, params = load_causal_lm(case["path"], dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # params stay fp32, only compute is bf16
    out = np.asarray(_forward(model)(params, case["ids"], case["mask"]))
    assert out.dtype == np.float32
    real = case["mask"].astype(bool)
    diff = np.abs(out - case["ref"])[real]
    scale = np.abs(case["ref"][real]).max()
    # Measured (docs/models_llm.md): max 0.035, mean 0.0058 at max |logit| 3.71, i.e. about 1%.
    top1_agree = (out.argmax(-1) == case["ref"].argmax(-1))[real].mean()
    print(f"{name} bf16 vs fp32: max {diff.max():.4f} mean {diff.mean():.4f} max|logit| {scale:.2f} top1 {top1_agree:.3f}")
    # bf16 compute rounds the input of each of the ~8 matmuls on the path of 2 layers to 8 significant bits
    # (relative error <= eps/2, eps = 2^-7, on every CPU alike: the float32 accumulation order is
    # negligible beside it); the errors add: at most 8 * eps/2 = 4 eps of the logit scale, and well under
    # one eps on average.
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    assert diff.max() <= 4 * eps * scale, (diff.max(), diff.mean(), scale)
    assert diff.mean() <= 0.64 * eps * scale
    assert top1_agree >= 0.9


def test_remat_gives_same_logits_and_gradients(hf_case):
    case = hf_case("llama")
    plain, params = load_causal_lm(case["path"])
    remat, _ = load_causal_lm(case["path"], remat=True)
    assert remat.config.remat and not plain.config.remat
    ids, mask = case["ids"], case["mask"]

    def loss_fn(model):
        def loss(p):
            logits = model.apply({"params": p}, model.apply({"params": p}, ids, method=Decoder.embed), mask)
            logp = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
            return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

        return jax.jit(jax.value_and_grad(loss))

    l0, g0 = loss_fn(plain)(params)
    l1, g1 = loss_fn(remat)(params)
    # Remat recomputes the same ops, possibly fused differently: rounding-order differences only.
    depth = 2 * (6 * plain.config.num_layers + 2)  # forward and backward
    width = max(plain.config.hidden_size, max(np.atleast_1d(plain.config.intermediate_size)), SEQ)
    np.testing.assert_allclose(l1, l0, rtol=0, atol=rounding_tolerance(np.float32, width, depth, float(l0)))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=rounding_tolerance(np.float32, width, depth, scale))
    assert float(jnp.abs(g0["layers_0"]["attn"]["q_proj"]["kernel"]).max()) > 0


# ---------------------------------------------------------------------------------------------------
# OpenELM against mlx_lm (Apple's checkpoint names; mlx has no padding mask, so padding is checked by
# comparing padded rows of our batch with mlx on the unpadded sequences).


@pytest.fixture(scope="module")
def openelm_case(tmp_path_factory):
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import openelm

    ref_model = openelm.Model(openelm.ModelArgs.from_dict(OPENELM_CONFIG))
    rng = np.random.default_rng(1)
    weights = {
        name: _unit_scale(name, tuple(p.shape), rng).astype(np.float32)
        for name, p in tree_flatten(ref_model.parameters())
    }
    ref_model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    path = str(tmp_path_factory.mktemp("openelm"))
    safetensors_io.write_file(os.path.join(path, "model.safetensors"), weights)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(OPENELM_CONFIG, f)
    ids, mask = _padding_batch(rng)
    model, params = load_causal_lm(path)
    out = np.asarray(_forward(model)(params, ids, mask))
    return dict(ref_model=ref_model, mx=mx, ids=ids, mask=mask, out=out, model=model, weights=weights)


def test_openelm_checkpoint_names_are_apples(openelm_case):
    names = set(openelm_case["weights"])
    assert "transformer.layers.2.attn.qkv_proj.weight" in names
    assert "transformer.layers.0.ffn.proj_1.weight" in names
    assert not any(n.startswith("lm_head") for n in names)  # tied
    cfg = openelm_case["model"].config
    assert cfg.num_heads == (4, 6, 3) and cfg.num_kv_heads == (2, 3, 1)
    assert cfg.intermediate_size == (32, 64, 96)
    assert openelm_case["weights"]["transformer.layers.1.attn.qkv_proj.weight"].shape == ((6 + 2 * 3) * 16, 64)


def test_openelm_logits_match_mlx(openelm_case):
    case, mx = openelm_case, openelm_case["mx"]
    cfg = case["model"].config
    assert SEQ > _slowest_period(cfg.head_dim, 1.0, cfg.rope_theta)
    worst = 0.0
    for row in range(BATCH):
        real = case["mask"][row].astype(bool)
        ref = np.array(case["ref_model"](mx.array(case["ids"][row][real][None])))[0]
        assert ref.std() > 0.5
        worst = max(worst, float(np.abs(case["out"][row][real] - ref).max()))
    tol = _tolerance(case["out"][case["mask"].astype(bool)], cfg)
    print(f"openelm: max |jax - mlx| {worst:.2e} (tolerance {tol:.2e})")
    assert worst <= tol, f"openelm: max |jax - mlx| = {worst:.2e}"


@pytest.mark.slow
def test_openelm_270m_shapes_match_mlx(tmp_path):
    """Full OpenELM-270M shapes (random weights, ~1 min, ~5 GB RSS): per-layer splits at real sizes.

    The config is Apple's range form (qkv/ffn multipliers as first..last); mlx needs explicit lists,
    derived here independently with Apple's formulas, so the derivation is checked too.
    """
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import openelm

    apple = dict(
        model_type="openelm", num_transformer_layers=16, model_dim=1280, head_dim=64, vocab_size=32000,
        qkv_multipliers=[0.5, 1.0], num_gqa_groups=4, ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=256,
        normalize_qk_projections=True, share_input_output_layers=True, rope_freq_constant=10000,
        max_context_length=2048,
    )
    heads = [12] * 5 + [16] * 7 + [20] * 4
    args = dict(apple, num_query_heads=heads, num_kv_heads=[h // 4 for h in heads],
                ffn_multipliers=[round(0.5 + 3.5 * k / 15, 2) for k in range(16)])
    ref_model = openelm.Model(openelm.ModelArgs.from_dict(args))
    rng = np.random.default_rng(0)
    weights = {}
    for name, p in tree_flatten(ref_model.parameters()):
        shape = tuple(p.shape)
        if len(shape) == 2:  # small embeddings: with a tied head, unit scale would give logits ~ 1e3
            scale = 0.02 if "embed" in name else 1 / math.sqrt(shape[1])
            weights[name] = rng.standard_normal(shape, dtype=np.float32) * scale
        else:
            weights[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    ref_model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    safetensors_io.write_file(str(tmp_path / "model.safetensors"), weights)
    (tmp_path / "config.json").write_text(json.dumps(apple))
    del weights
    ids = rng.integers(0, 32000, (1, 24))
    ref = np.array(ref_model(mx.array(ids)))
    del ref_model
    model, params = load_causal_lm(str(tmp_path))
    assert 271e6 < sum(x.size for x in jax.tree.leaves(params)) < 272e6
    out = np.asarray(_forward(model)(params, ids, np.ones_like(ids)))
    assert ref.std() > 0.3
    assert np.abs(out - ref).max() <= _tolerance(ref, model.config)  # measured 1.3e-05
