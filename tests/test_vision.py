"""Vision tower and connector parity against transformers (fp32, tiny random-init models, offline)."""

import numpy as np
import pytest
import torch
import transformers as T
import jax
import jax.numpy as jnp

from qtl_jax.models.connector import Connector, ConnectorConfig, connector_rules
from qtl_jax.models.vision import (
    VisionConfig,
    VisionTower,
    normalize_strategy,
    num_feature_tokens,
    select_features,
    vision_rules,
)
from qtl_jax.weights import keymap
from tolerances import rounding_tolerance, layers_tolerance

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


def tol(reference) -> float:
    """Float32 rounding of two differently ordered ViTs (tests/tolerances.py): the patch embedding
    reduces 8*8*3 = 192 values, the layers at most 64 (MLP width)."""
    return layers_tolerance(reference.numpy() if hasattr(reference, "numpy") else reference, width=192,
                            layers=TINY["num_hidden_layers"])


def _hf_tower(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**TINY)).eval()
    return T.CLIPVisionModel(T.CLIPVisionConfig(**TINY)).eval()


def _load(hf_model, cfg):
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    model = VisionTower(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))
    flat = keymap.convert(state, vision_rules(cfg), keymap.shapes(abstract["params"]), name=cfg.kind)
    return model, {"params": keymap.unflatten(flat)}


@pytest.fixture(scope="module", params=["siglip", "clip"])
def tower(request):
    hf = _hf_tower(request.param)
    cfg = VisionConfig.from_hf(hf.config.to_dict())
    model, params = _load(hf, cfg)
    pixels = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW for HF
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels), output_hidden_states=True)
    hidden, last = jax.jit(model.apply)(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    return request.param, cfg, ref, hidden, last


def test_config_from_hf(tower):
    kind, cfg, *_ = tower
    assert cfg.kind == kind
    assert cfg.layer_norm_eps == (1e-6 if kind == "siglip" else 1e-5)
    assert cfg.hidden_act == ("gelu_pytorch_tanh" if kind == "siglip" else "quick_gelu")
    assert VisionConfig.from_hf(cfg.to_hf()) == cfg


def test_every_hidden_state_matches_hf(tower):
    kind, cfg, ref, hidden, last = tower
    assert len(hidden) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    for i, (ours, theirs) in enumerate(zip(hidden, ref.hidden_states)):
        assert np.abs(np.asarray(ours) - theirs.numpy()).max() <= tol(theirs), f"{kind} hidden_states[{i}]"
    # The post-LayerNorm output: SigLIP's last_hidden_state; CLIP only normalises its class token (pooler).
    if kind == "siglip":
        assert np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max() <= tol(ref.last_hidden_state)
    else:
        assert np.abs(np.asarray(last[:, 0]) - ref.pooler_output.numpy()).max() <= tol(ref.pooler_output)


def test_feature_selection_token_counts_and_values(tower):
    kind, cfg, ref, hidden, _ = tower
    # 32 px / 8 px patches = 16 patches; CLIP adds its class token.
    full_tokens = 16 if kind == "siglip" else 17
    full = select_features(hidden, -2, "full")
    patch = select_features(hidden, -2, "patch")
    assert full.shape == (3, full_tokens, 32) and num_feature_tokens(cfg, "full") == full_tokens
    # 'patch' drops token 0: CLIP's class token, but a real patch for SigLIP (the Factory's 729 -> 728).
    assert patch.shape == (3, full_tokens - 1, 32) and num_feature_tokens(cfg, "patch") == full_tokens - 1
    np.testing.assert_allclose(np.asarray(full), ref.hidden_states[-2].numpy(), atol=tol(ref.hidden_states[-2]), rtol=0)
    np.testing.assert_allclose(np.asarray(patch), ref.hidden_states[-2][:, 1:].numpy(), atol=tol(ref.hidden_states[-2]), rtol=0)
    # Layer indexing is HF's: 0 is the embeddings, -1 the last layer before the post-LayerNorm.
    np.testing.assert_allclose(np.asarray(select_features(hidden, 0, "full")), ref.hidden_states[0].numpy(), atol=tol(ref.hidden_states[0]), rtol=0)
    np.testing.assert_allclose(np.asarray(select_features(hidden, -1, "full")), ref.hidden_states[-1].numpy(), atol=tol(ref.hidden_states[-1]), rtol=0)


def test_siglip_so400m_token_count():
    cfg = VisionConfig()  # SigLIP-so400m-patch14-384 shapes
    assert num_feature_tokens(cfg, "full") == 729 and num_feature_tokens(cfg, "patch") == 728


def test_strategy_names_and_errors():
    assert normalize_strategy("default") == normalize_strategy("patch") == "patch"
    assert normalize_strategy("cls_patch") == normalize_strategy("full") == "full"
    with pytest.raises(ValueError, match="unknown vision feature strategy"):
        normalize_strategy("cls")
    with pytest.raises(ValueError, match="out of range"):
        select_features((jnp.zeros((1, 2, 3)),) * 3, 3, "full")
    with pytest.raises(ValueError, match="not a SigLIP or CLIP"):
        VisionConfig.from_hf({"model_type": "dinov2"})


def test_siglip_head_is_ignored_explicitly_and_unknown_keys_are_reported():
    hf = _hf_tower("siglip")
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("head.") for k in state)  # vision_use_head=True by default
    cfg = VisionConfig.from_hf(hf.config.to_dict())
    abstract = jax.eval_shape(VisionTower(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    expected = keymap.shapes(abstract["params"])
    state["encoder.layers.9.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    del state["encoder.layers.0.layer_norm1.bias"]
    with pytest.raises(keymap.WeightMismatchError) as e:
        keymap.convert(state, vision_rules(cfg), expected)
    msg = str(e.value)
    assert "layers_9/fc1/kernel" in msg and "layers_0/layer_norm1/bias" in msg and "head." not in msg


def test_pixel_layout_is_checked():
    cfg = VisionConfig(**TINY)
    model = VisionTower(cfg)
    with pytest.raises(ValueError, match="channels-last"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="32x32"):
        model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("ctype,depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_connector_matches_torch(ctype, depth):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(24, 40)]
    for _ in range(depth - 1):
        layers += [torch.nn.GELU(), torch.nn.Linear(40, 40)]
    ref = torch.nn.Sequential(*layers)
    cfg = ConnectorConfig(ctype, vision_hidden_size=24, hidden_size=40)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = Connector(cfg)
    x = np.random.default_rng(0).normal(size=(2, 5, 24)).astype(np.float32) * 3
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 24)))
    flat = keymap.convert(state, connector_rules(cfg, "sequential"), keymap.shapes(abstract["params"]))
    ours = model.apply({"params": keymap.unflatten(flat)}, jnp.asarray(x))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x)).numpy()
    # Two (or one) GEMMs of length <= 40 (tests/tolerances.py).
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=rounding_tolerance(np.float32, 40, 2, np.abs(theirs).max()), rtol=0)
    assert keymap.export(flat, connector_rules(cfg, "sequential")).keys() == state.keys()


def test_connector_init_and_errors():
    cfg = ConnectorConfig("mlp2x_gelu", vision_hidden_size=64, hidden_size=512)
    p = Connector(cfg).init(jax.random.key(3), jnp.zeros((1, 64)))["params"]
    k = np.asarray(p["fc_0"]["kernel"])
    assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
    assert not np.asarray(p["fc_0"]["bias"]).any() and not np.asarray(p["fc_1"]["bias"]).any()
    with pytest.raises(ValueError, match="unsupported connector_type"):
        ConnectorConfig("mlp2x_relu")
    with pytest.raises(ValueError, match="mlp2x_gelu only"):
        connector_rules(ConnectorConfig("mlp3x_gelu"), "llava_hf")
