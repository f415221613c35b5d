"""Whole-model parity: tiny random-init transformers LLaVA models, saved, loaded with load_pretrained.

fp32 logits must match PyTorch within float32 rounding (a tolerance derived in tests/tolerances.py) on every real
(attention_mask == 1) position of a batch with several images, padding on both sides and a text-only sample.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from qtl_jax import load_pretrained
from qtl_jax.models.tinyllava import TinyLlava, compute_layout, scatter
from qtl_jax.weights import safetensors_io

import checkpoint_files  # tests/ helper
from tolerances import layers_tolerance



def tol(reference) -> float:
    """Float32 rounding of two differently ordered implementations (tests/tolerances.py): reductions of at
    most 192 values (the 8x8x3 patch embedding) through the 3 ViT layers, the connector and 2 LLM layers."""
    return layers_tolerance(reference, width=192, layers=VISION["num_hidden_layers"] + 1 + TEXT["num_hidden_layers"])

IMAGE_ID = 511
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
TEXT_CONFIGS = {
    "qwen2": lambda: T.Qwen2Config(**TEXT, num_key_value_heads=2),
    "llama": lambda: T.LlamaConfig(**TEXT, num_key_value_heads=2),
    "phi": lambda: T.PhiConfig(**TEXT, partial_rotary_factor=0.5),
    "gemma": lambda: T.GemmaConfig(**TEXT, num_key_value_heads=1, head_dim=16),
}
# (vision tower, LLM, llava-hf feature strategy): the four combinations the issue names.
CASES = [("siglip", "qwen2", "full"), ("clip", "llama", "default"), ("siglip", "phi", "full"), ("siglip", "gemma", "full")]


def build_llava(vision: str, llm: str, strategy: str, seed: int = 0) -> T.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vc = T.SiglipVisionConfig(**VISION) if vision == "siglip" else T.CLIPVisionConfig(**VISION)
    cfg = T.LlavaConfig(
        vision_config=vc, text_config=TEXT_CONFIGS[llm](), image_token_index=IMAGE_ID, vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    return T.LlavaForConditionalGeneration(cfg).eval()


def hf_batch(t_img: int, seed: int = 0):
    """3 samples: two images (no padding), one image (right padding), text only (left padding)."""
    rng = np.random.default_rng(seed)
    n = 2 * t_img + 12
    ids = rng.integers(0, 500, (3, n))
    mask = np.ones((3, n), np.int64)
    ids[0, 2 : 2 + t_img] = IMAGE_ID
    ids[0, 4 + t_img : 4 + 2 * t_img] = IMAGE_ID
    ids[1, 3 : 3 + t_img] = IMAGE_ID
    mask[1, -6:] = 0
    mask[2, :5] = 0
    pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW, as HF takes them
    return ids, mask, pixels


def hf_logits(model, ids, mask, pixels, **kw):
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=torch.from_numpy(pixels),
            **kw,
        ).logits.numpy()


def nhwc(pixels):
    return jnp.asarray(pixels.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def llava_cases(tmp_path_factory):
    """Builds, saves and loads each case once per module, on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            vision, llm, strategy = case
            hf = build_llava(vision, llm, strategy)
            path = str(tmp_path_factory.mktemp(f"{vision}_{llm}"))
            hf.save_pretrained(path)
            model, params = load_pretrained(path, verbose=False)
            cache[case] = (case, hf, path, model, params, {})
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}+{c[1]}")
def test_llava_hf_logits_match_transformers(llava_cases, case):
    (vision, llm, strategy), hf, _, model, params, cache = llava_cases(case)
    t_img = 16  # SigLIP 'full': 16 patches; CLIP 'default': 16 patches + class token, minus token 0
    assert model.config.num_image_tokens == t_img
    ids, mask, pixels = hf_batch(t_img)
    ref = hf_logits(hf, ids, mask, pixels)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask))
    cache["logits"] = np.asarray(out.logits)
    assert out.logits.shape == ref.shape == (3, ids.shape[1], 512)
    real = mask.astype(bool)
    diff = np.abs(np.asarray(out.logits)[real] - ref[real]).max()
    assert diff <= tol(ref[real]), f"{vision}+{llm}: max |logits - torch| = {diff:.2e}"
    np.testing.assert_array_equal(np.asarray(out.attention_mask), mask)
    assert np.asarray(out.layout.is_image).sum() == 3 * t_img


FACTORY_RENAMES = [
    ("vision_tower.", "vision_tower._vision_tower.vision_model."),
    ("multi_modal_projector.linear_1.", "connector._connector.0."),
    ("multi_modal_projector.linear_2.", "connector._connector.2."),
]


@pytest.fixture(scope="module")
def factory_case(tmp_path_factory):
    """The SigLIP+Qwen2 llava-hf model rewritten as a TinyLLaVA Factory checkpoint ('patch' strategy)."""
    hf = build_llava("siglip", "qwen2", "full", seed=1)
    src = str(tmp_path_factory.mktemp("src"))
    hf.save_pretrained(src)
    llava_cfg = json.load(open(os.path.join(src, "config.json")))
    factory_cfg = {
        "model_type": "tinyllava",
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "text_config": llava_cfg["text_config"],
        "vision_config": llava_cfg["vision_config"],
        "connector_type": "mlp2x_gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch",
        "image_token_index": -200,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048,
    }
    tensors = checkpoint_files.rename(safetensors_io.read_dir(src), FACTORY_RENAMES)
    path = checkpoint_files.write(str(tmp_path_factory.mktemp("factory")), tensors, factory_cfg)
    return hf, path, tensors, {}


def factory_batch(t_img: int):
    """Factory convention: one -200 per image; sample 0 has two images, sample 2 is text only."""
    rng = np.random.default_rng(2)
    n = 20
    ids = rng.integers(0, 500, (3, n))
    mask = np.ones((3, n), np.int64)
    ids[0, 2] = ids[0, 9] = -200
    ids[1, 4] = -200
    mask[1, -5:] = 0
    mask[2, -3:] = 0
    # The same samples in the llava-hf convention: each -200 repeated t_img times, right padded.
    rows = []
    for r, m in zip(ids, mask):
        row = []
        for tok in r[m.astype(bool)]:
            row += [IMAGE_ID] * t_img if tok == -200 else [int(tok)]
        rows.append(row)
    width = max(map(len, rows))
    hf_ids = np.zeros((3, width), np.int64)
    hf_mask = np.zeros((3, width), np.int64)
    for i, row in enumerate(rows):
        hf_ids[i, : len(row)] = row
        hf_mask[i, : len(row)] = 1
    pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    return ids, mask, hf_ids, hf_mask, pixels


def test_factory_layout_matches_transformers_default_strategy(factory_case):
    hf, path, _, cache = factory_case
    model, params = load_pretrained(path, max_images_per_sample=2, verbose=False)
    cfg = model.config
    assert (cfg.convention, cfg.vision_feature_select_strategy, cfg.image_token_index) == ("factory", "patch", -200)
    # 'patch' drops token 0 -- for SigLIP a real patch: 16 -> 15 tokens per image.
    assert cfg.num_image_tokens == 15
    ids, mask, hf_ids, hf_mask, pixels = factory_batch(15)
    # llava-hf's 'default' strategy drops token 0 exactly like the Factory's 'patch'.
    ref = hf_logits(hf, hf_ids, hf_mask, pixels, vision_feature_select_strategy="default")
    labels = np.where(mask.astype(bool), ids, -100)
    labels[:, :1] = -100
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask), jnp.asarray(labels))
    assert out.logits.shape == (3, 20 + 2 * 14, 512)  # static: text length + (T_img - 1) per image slot
    logits, merged_mask = np.asarray(out.logits), np.asarray(out.attention_mask)
    cache["float32"] = logits  # reused by the bf16 test
    np.testing.assert_array_equal(merged_mask[:, : hf_mask.shape[1]], hf_mask)
    assert not merged_mask[:, hf_mask.shape[1] :].any()
    real = hf_mask.astype(bool)
    diff = np.abs(logits[:, : hf_mask.shape[1]][real] - ref[real]).max()
    assert diff <= tol(ref[real]), f"factory: max |logits - torch| = {diff:.2e}"
    # Labels: -100 over the image positions and padding; text labels moved to their merged position.
    merged_labels = np.asarray(out.labels)
    expected = np.where((hf_ids == IMAGE_ID) | ~real, -100, hf_ids)
    expected[:, :1] = -100
    np.testing.assert_array_equal(merged_labels[:, : hf_mask.shape[1]], expected)
    assert (merged_labels[:, hf_mask.shape[1] :] == -100).all()


def test_bf16_stays_close_to_fp32(factory_case):
    _, path, _, cache = factory_case
    ids, mask, _, hf_mask, pixels = factory_batch(15)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        if dtype in cache:
            outs[dtype] = cache[dtype]
            continue
        model, params = load_pretrained(path, dtype=dtype, max_images_per_sample=2, verbose=False)
        assert jax.tree.leaves(params)[0].dtype == jnp.float32  # params stay fp32
        outs[dtype] = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask)).logits)
    real = np.zeros(outs["float32"].shape[:2], bool)
    real[:, : hf_mask.shape[1]] = hf_mask.astype(bool)
    diff = np.abs(outs["bfloat16"][real] - outs["float32"][real])
    scale = np.abs(outs["float32"][real]).max()
    agree = (outs["bfloat16"][real].argmax(-1) == outs["float32"][real].argmax(-1)).mean()
    print(f"bf16 vs fp32 logits: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}, max |logit| {scale:.2f}, "
          f"argmax agreement {agree:.3f}")
    # Measured: max 6.2e-3 (mean 9.0e-4) on logits up to 0.72 in size; argmax agreement 0.989.
    assert diff.max() <= 0.05 * scale, (diff.max(), scale)
    assert (outs["bfloat16"][real].argmax(-1) == outs["float32"][real].argmax(-1)).mean() > 0.9


def _layout_cfg(padding_side="right", **kw):
    from qtl_jax.models.tinyllava import TinyLlavaConfig
    from qtl_jax.models.connector import ConnectorConfig
    from qtl_jax.models.decoder import DecoderConfig
    from qtl_jax.models.vision import VisionConfig

    vision = VisionConfig(**VISION)  # SigLIP, 16 patches
    llm = DecoderConfig.make(family="llama", vocab_size=512, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                             intermediate_size=16, head_dim=4)
    return TinyLlavaConfig(vision, ConnectorConfig("mlp2x_gelu", 32, 8), llm, padding_side=padding_side, **kw)


def test_layout_left_padding_is_the_right_padded_layout_shifted():
    ids = np.array([[5, -200, 6, 7, 0, 0], [8, 9, -200, 10, 11, 12]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    # Under jit (one compile each) rather than eagerly: the eager path compiles every primitive.
    right, left = (
        jax.jit(lambda i, m, side=side: compute_layout(_layout_cfg(side, vision_feature_select_strategy="full"), i, m, i,
                                                       num_images=2))(ids, mask)
        for side in ("right", "left")
    )
    n = np.asarray(right.attention_mask).sum(1)
    np.testing.assert_array_equal(n, [19, 21])
    length = right.source.shape[1]
    assert length == 6 + 15
    for b in range(2):
        for field in ("source", "is_image", "image_index", "image_token", "text_index", "position_ids", "labels"):
            r, l = np.asarray(getattr(right, field))[b], np.asarray(getattr(left, field))[b]
            np.testing.assert_array_equal(l[length - n[b] :], r[: n[b]], err_msg=field)
    r = right
    # Sample 0: token 5, then image 0 (16 tokens), then 6, 7; zero-vector padding (last table row) after.
    np.testing.assert_array_equal(np.asarray(r.source)[0, :19], [0] + list(12 + np.arange(16)) + [2, 3])
    assert (np.asarray(r.source)[0, 19:] == 12 + 2 * 16).all()
    np.testing.assert_array_equal(np.asarray(r.image_index)[1, 2:18], 1)
    np.testing.assert_array_equal(np.asarray(r.image_token)[1, 2:18], np.arange(16))
    np.testing.assert_array_equal(np.asarray(r.position_ids)[0], list(range(19)) + [0, 0])
    np.testing.assert_array_equal(np.asarray(r.labels)[0, :19], [5] + [-100] * 16 + [6, 7])


def test_layout_has_no_data_dependent_loop():
    """No while loop in the traced layout: on a GPU, XLA runs one from the host and syncs with the device
    each iteration (jnp.searchsorted's default method was such a loop; docs/performance.md)."""
    ids = np.array([[5, -200, 6, 7, 0, 0], [8, 9, -200, 10, 11, 12]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    cfg = _layout_cfg(vision_feature_select_strategy="full")
    jaxpr = str(jax.make_jaxpr(lambda i, m: compute_layout(cfg, i, m, i, num_images=2))(ids, mask))
    assert " while[" not in jaxpr


def test_layout_truncates_to_max_length_and_checks_counts():
    ids = np.array([[5, -200, 6, 7]])
    cut = compute_layout(_layout_cfg(max_length=10, vision_feature_select_strategy="full"), ids, num_images=1)
    assert cut.source.shape == (1, 10) and np.asarray(cut.attention_mask).all()
    with pytest.raises(ValueError, match="2 image placeholders .* but 1 images"):
        compute_layout(_layout_cfg(), np.array([[-200, -200, 3]]), num_images=1)
    with pytest.raises(ValueError, match="raise max_images_per_sample"):
        compute_layout(_layout_cfg(), np.array([[-200, -200, 3]]), num_images=2)
    with pytest.raises(ValueError, match="inside the vocabulary"):
        _layout_cfg(convention="llava_hf")


def test_layout_by_sample_row_gives_each_placeholder_its_own_row():
    """images_by_sample: sample i's placeholder takes image row i; a text-only sample's row is never read."""
    ids = np.array([[8, 9, 10, 11], [5, -200, 6, 7], [4, -200, 3, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    cfg = _layout_cfg(vision_feature_select_strategy="full")
    by_row = jax.jit(lambda i, m: compute_layout(cfg, i, m, num_images=3, images_by_sample=True))(ids, mask)
    # The same as placeholder order with the text-only sample's row taken out of the image table.
    ranked = jax.jit(lambda i, m: compute_layout(cfg, i, m, num_images=2))(ids, mask)
    text_rows, t_img = ids.size, 16
    np.testing.assert_array_equal(np.asarray(by_row.image_index), np.where(np.asarray(ranked.image_index) >= 0,
                                                                           np.asarray(ranked.image_index) + 1, -1))
    image = np.asarray(by_row.is_image) > 0
    src = np.asarray(by_row.source)
    np.testing.assert_array_equal(src[1][image[1]], text_rows + 1 * t_img + np.arange(t_img))
    np.testing.assert_array_equal(src[2][image[2]], text_rows + 2 * t_img + np.arange(t_img))
    assert not ((src >= text_rows) & (src < text_rows + t_img)).any()  # row 0 (text only) is unused
    for field in ("attention_mask", "position_ids", "text_index", "image_token"):
        np.testing.assert_array_equal(getattr(by_row, field), getattr(ranked, field), err_msg=field)
    with pytest.raises(ValueError, match=r"samples \[0, 1\] have several image placeholders"):
        compute_layout(cfg, np.array([[5, -200, -200, 7]] * 2), num_images=2, images_by_sample=True)
    with pytest.raises(ValueError, match="one image row per sample"):
        compute_layout(cfg, ids, mask, num_images=2, images_by_sample=True)


def test_scatter_gradients_reach_both_vector_sets():
    ids = np.array([[5, -200, 6, 7]])
    cfg = _layout_cfg(vision_feature_select_strategy="full")
    img, txt = jnp.ones((1, 16, 3)), jnp.ones((1, 4, 3))
    loss = lambda a, b: scatter(a, b, compute_layout(cfg, jnp.asarray(ids), num_images=1)).sum()  # noqa: E731
    g_img, g_txt = jax.jit(jax.grad(loss, argnums=(0, 1)))(img, txt)
    np.testing.assert_array_equal(np.asarray(g_img), 1.0)
    np.testing.assert_array_equal(np.asarray(g_txt)[0, :, 0], [1, 0, 1, 1])  # the placeholder's vector is unused


def test_client_and_server_halves_compose_to_apply(llava_cases):
    _, hf, _, model, params, cache = llava_cases(CASES[0])
    ids, mask, pixels = hf_batch(16)
    if "logits" not in cache:  # run alone: compute the whole-model logits here
        cache["logits"] = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask)).logits)

    @jax.jit
    def split(params, ids, pixels, mask):
        v = {"params": params}
        # Client: image vectors, text vectors and the layout -- the three things that cross the wire.
        image_vectors = model.apply(v, pixels, method=TinyLlava.encode_images)
        text_vectors = model.apply(v, ids, method=TinyLlava.embed_tokens)
        layout = model.apply(v, ids, mask, num_images=3, method=TinyLlava.layout)
        # Server: scatter + decoder.
        return image_vectors, text_vectors, model.apply(v, scatter(image_vectors, text_vectors, layout), layout, method=TinyLlava.decode)

    image_vectors, text_vectors, logits = split(params, jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask))
    assert image_vectors.shape == (3, 16, 64) and text_vectors.shape == (3, ids.shape[1], 64)
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits)[real] - cache["logits"][real]).max() <= tol(cache["logits"][real])


def test_text_only_batch_matches_transformers(llava_cases):
    _, hf, _, model, params, _ = llava_cases(CASES[1])
    ids, mask, _ = hf_batch(16)
    ids = np.where(ids == IMAGE_ID, 7, ids)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), None, jnp.asarray(mask))
    real = mask.astype(bool)
    assert np.abs(np.asarray(out.logits)[real] - ref[real]).max() <= tol(ref[real])


def test_dtype_and_remat_reach_tower_connector_and_decoder():
    from qtl_jax.models.tinyllava import abstract_params, dummy_inputs

    def jaxpr(cfg):
        model = TinyLlava(cfg)
        ids, pixels = dummy_inputs(cfg)
        loss = lambda p: model.apply({"params": p}, ids, pixels).logits.sum()  # noqa: E731
        return str(jax.make_jaxpr(loss)(abstract_params(cfg)))

    plain, remat = jaxpr(_layout_cfg()), jaxpr(_layout_cfg(remat=True))
    # One rematerialised block (jax.checkpoint's primitive) per vision layer (3) and decoder layer (1).
    assert plain.count("remat2[") == 0 and remat.count("remat2[") == 3 + 1
    cfg = _layout_cfg(dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract_params(cfg)))
    ids, pixels = dummy_inputs(cfg)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg))
    vectors = jax.eval_shape(lambda p: TinyLlava(cfg).apply({"params": p}, pixels, method=TinyLlava.encode_images), params)
    assert vectors.dtype == jnp.bfloat16 and "bf16" in jaxpr(cfg)


def test_factory_gemma_scales_image_features_as_transformers_4_did(llava_cases, tmp_path):
    """The Factory trained Gemma on transformers 4.x, whose GemmaModel multiplied *all* inputs_embeds
    (images too) by sqrt(hidden); transformers 5.x scales only inside the token embedding."""
    _, hf, path, llava_model, _, _ = llava_cases(CASES[3])
    assert not llava_model.config.scales_images  # llava-hf convention: as transformers 5.x
    llava_cfg = json.load(open(os.path.join(path, "config.json")))
    cfg = {"model_type": "tinyllava", "text_config": llava_cfg["text_config"], "vision_config": llava_cfg["vision_config"],
           "connector_type": "mlp2x_gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "patch"}
    factory_dir = checkpoint_files.write(str(tmp_path), checkpoint_files.rename(safetensors_io.read_dir(path), FACTORY_RENAMES), cfg)
    model, params = load_pretrained(factory_dir, verbose=False)
    assert model.config.scales_images
    ids = np.array([[5, -200, 6, 7, 8]])
    pixels = np.random.default_rng(4).normal(size=(1, 3, 32, 32)).astype(np.float32)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), nhwc(pixels)).logits)[0, : 4 + 15]
    with torch.no_grad():
        feats = hf.model.get_image_features(
            pixel_values=torch.from_numpy(pixels), vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output[0]
        embed = hf.model.language_model.embed_tokens  # scales text by sqrt(64) itself
        embeds = torch.cat([embed(torch.tensor([5])), feats * 64**0.5, embed(torch.tensor([6, 7, 8]))])[None]
        ref = hf.lm_head(hf.model.language_model(inputs_embeds=embeds).last_hidden_state)[0].numpy()
    assert np.abs(ours - ref).max() <= tol(ref)


def test_papers_model_composes_at_full_size():
    """SigLIP-so400m/14-384 + mlp2x_gelu + OpenELM-270M, shapes only (jax.eval_shape: nothing allocated)."""
    from qtl_jax.models.connector import ConnectorConfig
    from qtl_jax.models.tinyllava import TinyLlavaConfig, abstract_params
    from qtl_jax.models.vision import VisionConfig
    from qtl_jax.weights.hf_config import decoder_config_from_hf

    openelm_270m = dict(model_type="openelm", num_transformer_layers=16, model_dim=1280, head_dim=64, vocab_size=32000,
                        qkv_multipliers=[0.5, 1.0], num_gqa_groups=4, ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=256,
                        normalize_qk_projections=True, share_input_output_layers=True)
    cfg = TinyLlavaConfig(VisionConfig(), ConnectorConfig("mlp2x_gelu", 1152, 1280), decoder_config_from_hf(openelm_270m))
    params = abstract_params(cfg)
    counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in params.items()}
    # Vision: transformers' SiglipVisionModel(so400m, vision_use_head=False) has exactly 412,987,248.
    assert counts == {"vision_tower": 412_987_248, "connector": 3_115_520, "llm": 271_527_168}
    assert cfg.num_image_tokens == 728
    ids = jnp.zeros((2, 64), jnp.int32).at[:, 3].set(-200)
    out = jax.eval_shape(lambda p: TinyLlava(cfg).apply({"params": p}, ids, jnp.zeros((2, 384, 384, 3)), labels=ids), params)
    assert out.logits.shape == (2, 64 + 727, 32000) and out.labels.shape == (2, 791)
