"""Generation: KV cache, parity with transformers' greedy search, bucketing, sampling, quantizers, CLI.

Tiny random-init transformers LLaVA models are built offline, saved, and loaded with load_pretrained.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import transformers as T
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qtl_jax import generate as gen
from qtl_jax import load_pretrained
from qtl_jax.data.constants import IMAGE_TOKEN_INDEX
from qtl_jax.data.templates import get_template
from qtl_jax.models.decoder import Decoder, DecoderConfig, init_cache
from qtl_jax.weights import safetensors_io
from tolerances import layers_tolerance

IMAGE_ID = 511
T_IMG = 16  # SigLIP 32x32 / patch 8, 'full' strategy
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)


def build_llava(seed: int = 0) -> T.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T.LlavaConfig(
        vision_config=T.SiglipVisionConfig(**VISION), text_config=T.Qwen2Config(**TEXT, num_key_value_heads=2),
        image_token_index=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="full",
    )
    model = T.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Random init puts every logit within ~0.1 of the others; sharper logits keep argmax away from fp ties.
        model.lm_head.weight.mul_(8.0)
        # And its attention is nearly uniform, so positions would hardly matter; sharpen it so that a wrong
        # position id (e.g. one counting the padding) changes the tokens.
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                p.mul_(6.0)
    return model


FACTORY_RENAMES = [
    ("vision_tower.", "vision_tower._vision_tower.vision_model."),
    ("multi_modal_projector.linear_1.", "connector._connector.0."),
    ("multi_modal_projector.linear_2.", "connector._connector.2."),
]


def write_factory(src: str, dst: str) -> str:
    """Rewrites a saved llava-hf directory as a TinyLLaVA Factory checkpoint (one -200 per image)."""
    llava_cfg = json.load(open(os.path.join(src, "config.json")))
    tensors = {}
    for k, v in safetensors_io.read_dir(src).items():
        for old, new in FACTORY_RENAMES:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        tensors[k] = np.asarray(v)
    os.makedirs(dst, exist_ok=True)
    safetensors_io.write_file(os.path.join(dst, "model.safetensors"), tensors)
    cfg = {
        "model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"],
        "text_config": llava_cfg["text_config"], "vision_config": llava_cfg["vision_config"],
        "connector_type": "mlp2x_gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "full",
        "image_token_index": -200, "tokenizer_padding_side": "right",
    }
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def build_tokenizer():
    """Byte-level BPE with Llama-style specials; '</s>' ends answers (the 'llama' template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [
        "A chat between a curious user and an artificial intelligence assistant.",
        "USER: What is in the image? ASSISTANT: A red square and a blue circle.",
        "USER: How many shapes are there? ASSISTANT: Two shapes, left and right.",
    ] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<image>"],
    )


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    hf = build_llava()
    path = str(tmp_path_factory.mktemp("llava_hf"))
    hf.save_pretrained(path)
    model, params = load_pretrained(path, verbose=False)
    return hf, path, model, params


@pytest.fixture(scope="module")
def factory(llava, tmp_path_factory):
    """The same weights as a Factory checkpoint with a tokenizer and image processor config (CLI-ready)."""
    _, src, _, _ = llava
    path = write_factory(src, str(tmp_path_factory.mktemp("factory")))
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    T.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    model, params = load_pretrained(path, verbose=False)
    return path, model, params, tokenizer


def hf_batch(seed: int = 0):
    """Left-padded llava-hf batch: image rows of two lengths and a text-only row; 2 images."""
    rng = np.random.default_rng(seed)
    n = T_IMG + 10
    ids = rng.integers(1, 500, (3, n))
    mask = np.ones((3, n), np.int64)
    ids[0, 2 : 2 + T_IMG] = IMAGE_ID
    mask[1, :4] = 0
    ids[1, :4] = 0
    ids[1, 5 : 5 + T_IMG] = IMAGE_ID
    mask[2, : n - 7] = 0
    ids[2, : n - 7] = 0
    pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    return ids, mask, pixels


def hf_generate(hf, ids, mask, pixels, max_new_tokens, eos=None):
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels), do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=0, eos_token_id=eos,
        )
    return out[:, ids.shape[1] :].numpy()


def nhwc(pixels):
    return pixels.transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------
# KV cache in the decoder


def test_decoder_cache_matches_full_forward():
    """Chunked prefill + one-token steps through the cache give the full forward's logits (fp32)."""
    cfg = DecoderConfig.make(
        family="openelm", vocab_size=97, hidden_size=32, num_layers=2, num_heads=(4, 2), num_kv_heads=(2, 1),
        intermediate_size=(64, 48), head_dim=8, qk_norm="rms", tie_word_embeddings=True,
    )
    model = Decoder(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x, mask)["params"]
    full = jax.jit(model.apply)({"params": params}, x, mask)

    @jax.jit
    def cached(params, x, mask):
        cache = init_cache(cfg, 2, 16)
        outs = []
        for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 9)):
            logits, cache = model.apply({"params": params}, x[:, lo:hi], mask[:, lo:hi], cache, method=Decoder.forward_cached)
            outs.append(logits)
        return jnp.concatenate(outs, axis=1), cache

    logits, cache = cached(params, x, mask)
    real = np.asarray(mask, bool)
    # The cache changes the attention's reduction lengths and order only (tests/tolerances.py).
    tol = layers_tolerance(np.asarray(full)[real], width=max(cfg.hidden_size, max(cfg.intermediate_size)),
                           layers=cfg.num_layers)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full)[real], atol=tol, rtol=0)
    assert int(cache.index) == 9
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, :9], mask)
    assert not np.asarray(cache.mask)[:, 9:].any()
    assert [k.shape for k in cache.keys] == [(2, 2, 16, 8), (2, 1, 16, 8)]  # heads-major
    with pytest.raises(ValueError, match="cache holds 3 rows"):
        model.apply({"params": params}, x, mask, init_cache(cfg, 3, 16), method=Decoder.forward_cached)


# ----------------------------------------------------------------------------------------------------
# Parity with transformers


def test_greedy_matches_transformers_generate(llava):
    """Token for token, left-padded batch with images and a text-only row, with and without an eos."""
    hf, _, model, params = llava
    ids, mask, pixels = hf_batch()
    ref = hf_generate(hf, ids, mask, pixels, max_new_tokens=8)
    out = gen.generate(
        model, params, input_ids=ids, attention_mask=mask, pixel_values=nhwc(pixels), max_new_tokens=8,
        stop_token_ids=(),
    )
    np.testing.assert_array_equal(out.sequences, ref)
    np.testing.assert_array_equal(out.lengths, [8, 8, 8])
    assert out.text is None

    eos = int(ref[0, 2])  # row 0 stops after 3 tokens; others wherever this token first appears (if at all)
    ref_eos = hf_generate(hf, ids, mask, pixels, max_new_tokens=8, eos=eos)
    out = gen.generate(
        model, params, input_ids=ids, attention_mask=mask, pixel_values=nhwc(pixels), max_new_tokens=8,
        stop_token_ids=[eos], pad_token_id=0,
    )
    width = ref_eos.shape[1]  # HF stops early once every row is done
    np.testing.assert_array_equal(out.sequences[:, :width], ref_eos)
    assert not out.sequences[:, width:].any()
    expected = [int(np.argmax(r == eos)) + 1 if (r == eos).any() else 8 for r in ref]
    np.testing.assert_array_equal(out.lengths, expected)
    assert out.lengths[0] == 3


# ----------------------------------------------------------------------------------------------------
# Cached batched decoding == uncached per-sample argmax decoding (Factory convention)


def uncached_greedy(model, params, rows, pixels, steps):
    """Reference: the whole model on a right-padded batch of prompt + generated tokens, argmax at each
    row's last real position; one fixed shape, so one compile."""
    width = max(len(r) for r in rows) + steps
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    apply = jax.jit(model.apply)
    lengths = [len(r) for r in rows]
    new = []
    for _ in range(steps):
        out = apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
        last = np.asarray(out.attention_mask).sum(axis=1) - 1
        tokens = np.asarray(jnp.argmax(out.logits, axis=-1))[np.arange(len(rows)), last]
        new.append(tokens)
        for i, n in enumerate(lengths):
            ids[i, n], mask[i, n] = tokens[i], 1
            lengths[i] += 1
    return np.stack(new, axis=1)


def test_batched_cached_equals_uncached_argmax(factory):
    """Left-padded bucketed cached generation == right-padded full-forward argmax decoding."""
    _, model, params, _ = factory
    assert model.config.convention == "factory" and model.config.padding_side == "right"
    rng = np.random.default_rng(3)
    rows = [
        [5, 9, IMAGE_TOKEN_INDEX, 7, 8, 12, 40],
        [IMAGE_TOKEN_INDEX, 3],
        [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43],
    ]
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    width = max(len(r) for r in rows)
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for i, r in enumerate(rows):  # right padding: generate left-aligns internally
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    out = gen.generate(model, params, input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=5,
                       stop_token_ids=())
    np.testing.assert_array_equal(out.sequences, uncached_greedy(model, params, rows, images, 5))


# ----------------------------------------------------------------------------------------------------
# Bucketing: no recompilation inside a bucket


def test_prompts_in_one_bucket_do_not_recompile(llava):
    _, _, model, params = llava
    rng = np.random.default_rng(5)
    programs = gen.compiled_programs()

    def run(n, max_new):
        ids = rng.integers(1, 500, (2, n))
        return gen.generate(model, params, input_ids=ids, max_new_tokens=max_new, stop_token_ids=(), buckets=(8, 16, 32, 64))

    run(9, 4)  # text 16, cache 32
    sizes = {k: f._cache_size() for k, f in programs.items()}
    run(13, 6)  # different prompt length and max_new_tokens, same buckets
    run(16, 3)
    assert {k: f._cache_size() for k, f in programs.items()} == sizes
    run(20, 4)  # text bucket 32: new shapes
    assert programs["prefill"]._cache_size() == sizes["prefill"] + 1
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        run(60, 8)


def test_cache_is_sized_to_prompt_plus_new_tokens():
    # The demo benchmark's shapes: an 81-token prompt lands in the 96 bucket (not 128), and 96 + 32 new
    # tokens need exactly 128 slots (the next power of two after padding used to give 256).
    assert gen.bucket(81, gen.DEFAULT_BUCKETS) == 96
    assert gen.cache_length(96, 32, gen.DEFAULT_BUCKETS) == 128
    assert gen.cache_length(96, 33, gen.DEFAULT_BUCKETS) == 144  # a multiple of CACHE_MULTIPLE
    assert gen.cache_length(16, 4, (8, 16, 32, 64)) == 32
    assert gen.cache_length(8, 2, (8, 16, 32, 64)) == 16  # the next bucket when it is shorter
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        gen.cache_length(60, 8, (8, 16, 32, 64))


# ----------------------------------------------------------------------------------------------------
# Sampling


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0, np.nan]), min_size=1, max_size=9))
def test_greedy_token_is_argmax_with_ties_and_nan(values):
    logits = jnp.asarray(np.tile(np.asarray(values, np.float32), (2, 1)))
    assert np.array_equal(np.asarray(gen.greedy_token(logits)), np.asarray(jnp.argmax(logits, axis=-1)))


@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=12),
    top_p=st.floats(0.01, 1.0),
)
@example(logits=[-3.080237036584237e-39, 0.0], top_p=0.5)  # a subnormal: one tie for XLA:CPU (CI, session 25)
@example(logits=[-0.0, 0.0], top_p=0.5)
def test_top_p_mask_is_the_smallest_nucleus(logits, top_p):
    logits = np.asarray(logits, np.float32)
    keep = np.asarray(gen.top_p_mask(jnp.asarray(logits), top_p))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    # A most probable token always survives. Ties are judged on XLA's probabilities, not on numpy's order of
    # the logits: XLA:CPU flushes subnormal logits to zero and sorts -0.0 before +0.0, so logits numpy ranks
    # (-3e-39 < 0.0) or keeps in index order (-0.0, 0.0) are one tie there and either may come first.
    assert keep[probs == probs.max()].any()
    kept_mass = probs[keep].sum()
    assert kept_mass >= min(top_p, 1.0) - 1e-5 or keep.all()
    # Minimal: dropping the least probable kept token would fall below top_p.
    smallest = probs[keep].min()
    if keep.sum() > 1:
        assert kept_mass - smallest < top_p + 1e-5
    # Every kept token is at least as probable as every dropped one.
    if (~keep).any():
        assert probs[keep].min() >= probs[~keep].max() - 1e-7


def test_sample_token_follows_the_truncated_distribution():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: gen.sample_token(logits[None], k, 1.0, 0.7)[0])(keys))
    freq = np.bincount(draws, minlength=4) / draws.size
    # Nucleus {0, 1} (0.5 < 0.7 <= 0.8) renormalised: 0.625 / 0.375; 3 sigma ~ 0.023.
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    hot = np.asarray(jax.vmap(lambda k: gen.sample_token(logits[None], k, 100.0, 1.0)[0])(keys))
    assert np.bincount(hot, minlength=4).min() > 800  # high temperature: near uniform


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(llava):
    _, _, model, params = llava
    ids = np.random.default_rng(7).integers(1, 500, (2, 9))
    kw = dict(input_ids=ids, max_new_tokens=6, stop_token_ids=())
    greedy = gen.generate(model, params, **kw).sequences
    a = gen.generate(model, params, temperature=1.5, rng=jax.random.key(1), **kw).sequences
    b = gen.generate(model, params, temperature=1.5, rng=jax.random.key(1), **kw).sequences
    c = gen.generate(model, params, temperature=1.5, rng=jax.random.key(2), **kw).sequences
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    nucleus = gen.generate(model, params, temperature=1.5, top_p=1e-6, rng=jax.random.key(3), **kw).sequences
    np.testing.assert_array_equal(nucleus, greedy)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors(llava):
    _, _, model, params = llava
    ids = np.ones((2, 5), np.int32)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        gen.generate(model, params)
    with pytest.raises(ValueError, match="holes"):
        gen.generate(model, params, input_ids=ids, attention_mask=[[1, 0, 1, 1, 1], [1] * 5])
    with pytest.raises(ValueError, match="no real token"):
        gen.generate(model, params, input_ids=ids, attention_mask=[[0] * 5, [1] * 5])
    with pytest.raises(ValueError, match="needs an explicit PRNG key"):
        gen.generate(model, params, input_ids=ids, temperature=0.7)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        gen.generate(model, params, input_ids=ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        gen.generate(model, params, input_ids=ids, top_p=0.0)
    with pytest.raises(ValueError, match="0 images were given"):
        gen.generate(model, params, input_ids=np.full((1, T_IMG), IMAGE_ID))
    with pytest.raises(ValueError, match="channels last"):
        gen.generate(model, params, input_ids=np.full((1, T_IMG), IMAGE_ID), pixel_values=np.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        gen.generate(model, params, prompts=["hi"])


# ----------------------------------------------------------------------------------------------------
# Templated answers, stop handling, quantizers, CLI


def _examples():
    rng = np.random.default_rng(11)
    image = lambda: PIL.Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))  # noqa: E731
    return [
        (image(), "What is in the image?"),
        (image(), "How many shapes are there?"),
        (image(), "Describe the image."),
        (None, "What is a circle?"),
    ]


def test_generate_answers_is_independent_of_batching(factory):
    path, model, params, tokenizer = factory
    from qtl_jax.data.image_processing import ImageProcessor

    processor = ImageProcessor.from_hf(path)
    template = get_template("llama")
    examples = _examples()
    calls = []
    kw = dict(max_new_tokens=6)
    four = gen.generate_answers(model, params, tokenizer, template, processor, examples, 4, progress=calls.append, **kw)
    two = gen.generate_answers(model, params, tokenizer, template, processor, examples, 2, **kw)
    assert calls == [4]
    assert four == two and len(four) == 4 and all(isinstance(a, str) for a in four)
    # The same thing by hand: the template's prompt, generate on token ids, the tokenizer's decode.
    prompts = [template.prompt(q, has_image=im is not None) for im, q in examples]
    pixels = np.stack([processor(im) for im, _ in examples[:3]])
    out = gen.generate(model, params, tokenizer, prompts=prompts, pixel_values=pixels, max_new_tokens=6,
                       stop_token_ids=gen.stop_token_ids_for(template, tokenizer))
    assert [t.strip() for t in out.text] == four
    assert gen.stop_token_ids_for(template, tokenizer) == [tokenizer.convert_tokens_to_ids("</s>")]


def test_decode_text_drops_stop_token_and_cuts_at_stop_string(factory):
    tokenizer = factory[3]
    ids = tokenizer("a red square and a blue circle", add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    rows = np.asarray([ids + [eos, 7], ids + [5, 5]])
    stops = gen._stop_ids([eos], tokenizer)
    text = gen._decode_text(tokenizer, rows, np.asarray([len(ids) + 1, len(ids)]), stops, [" and"])
    assert text == ["a red square", "a red square"]
    assert gen._decode_text(tokenizer, rows[:1], np.asarray([len(ids) + 1]), stops, []) == ["a red square and a blue circle"]


def test_quantized_prompt_matches_the_quantized_forward(factory):
    """The prompt goes through the split quantizers: the first token is the argmax of G1's fused forward."""
    from qtl_jax.models import quantized
    from qtl_jax.quantizer import QuantizerConfig

    _, model, params, _ = factory
    qcfg = quantized.QuantizedTinyLlavaConfig(model.config, QuantizerConfig(dim=64, levels=4), QuantizerConfig(dim=64, levels=8))
    split, stats = quantized.init_split_params(qcfg, jax.random.key(4), pretrained=params)
    # Stronger projections than the N(0, 0.02^2) init, so that quantization visibly changes the vectors.
    for side, name in (("client", "in_proj"), ("server", "out_proj")):
        for m in ("image", "text"):
            p = split[side][f"{m}_quantizer"][name]
            p["kernel"] = jnp.eye(64) + 0.3 * jax.random.normal(jax.random.key(len(m)), (64, 64))
    qmodel, qparams, quantizers = gen.split_model(qcfg, split, stats)
    # The text-only prompt first: the image belongs to row 1, not to the first image slot.
    ids = np.asarray([[0, 0, 33, 34, 35, 36, 37], [5, 9, IMAGE_TOKEN_INDEX, 7, 8, 12, 40]], np.int32)
    mask = np.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7], np.int32)
    image = np.random.default_rng(8).normal(size=(1, 32, 32, 3)).astype(np.float32)
    out = gen.generate(qmodel, qparams, input_ids=ids, attention_mask=mask, pixel_values=image, max_new_tokens=3,
                       stop_token_ids=(), quantizers=quantizers)
    batch = {
        "input_ids": ids, "attention_mask": mask, "labels": np.full(ids.shape, -100, np.int32),
        "pixel_values": np.concatenate([np.zeros_like(image), image]), "has_image": np.asarray([0, 1]),
    }
    logits, layout, _ = jax.jit(quantized.forward, static_argnums=(0, 4))(qcfg, split, stats, batch, False)
    last = np.asarray(layout.attention_mask).sum(axis=1) - 1
    expected = np.asarray(jnp.argmax(logits, axis=-1))[np.arange(2), last]
    np.testing.assert_array_equal(out.sequences[:, 0], expected)
    # The quantizers matter here: the same prompts unquantized give other tokens (so the check above has teeth).
    plain = gen.generate(model, params, input_ids=ids, attention_mask=mask, pixel_values=image, max_new_tokens=3,
                         stop_token_ids=())
    assert (plain.sequences != out.sequences).any()
    with pytest.raises(ValueError, match="split params"):
        gen.split_model(qcfg, params)


def test_chat_cli_answers_from_a_checkpoint(factory, tmp_path, capsys):
    from qtl_jax import chat
    from qtl_jax.data.image_processing import ImageProcessor

    path, model, params, tokenizer = factory
    image, question = _examples()[0]
    file = str(tmp_path / "img.png")
    image.save(file)
    answer = chat.main([f"--checkpoint={path}", f"--image={file}", f"--prompt={question}", "--max_new_tokens=6", "--stats"])
    captured = capsys.readouterr()
    assert captured.out == answer + "\n"
    assert "tokens/s" in captured.err
    expected = gen.generate_answers(
        model, params, tokenizer, get_template("llama"), ImageProcessor.from_hf(path), [(image, question)], 1,
        max_new_tokens=6,
    )
    assert answer == expected[0]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        chat.main([f"--checkpoint={tmp_path}", f"--image={file}", "--prompt=hi"])


def test_chat_cli_answers_from_a_train_workdir(tmp_path, capsys):
    """An Orbax workdir: the latest checkpoint's quantized model, its tokenizer, template and processor."""
    from configs import eval as eval_config
    from configs import stage2
    from qtl_jax import chat
    from qtl_jax.eval import model as model_lib
    from qtl_jax.split.step import PartitionState, TrainState
    from qtl_jax.train.checkpoint import Checkpointer
    from qtl_jax.train.loop import config_to_json

    tiny = model_lib.load_random(eval_config.get_config("tiny"), jax.random.key(0))
    train_cfg = stage2.get_config("tiny")
    train_cfg.model = eval_config.get_config("tiny").model
    params = jax.tree.map(lambda x: x + 0.01, tiny.params)
    state = TrainState(step=jnp.int32(3), client=PartitionState(params["client"], {}, {}),
                       server=PartitionState(params["server"], {}, {}), rng=jax.random.PRNGKey(1))
    workdir = str(tmp_path / "run")
    ckpt = Checkpointer(workdir)
    ckpt.save(state, {}, config_to_json(train_cfg))
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_to_json(train_cfg), f)
    assert chat.is_train_workdir(workdir)

    size = tiny.base.vision.image_size
    file = str(tmp_path / "img.png")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(file)
    answer = chat.main([f"--checkpoint={workdir}", f"--image={file}", "--prompt=What shape is it?", "--max_new_tokens=4"])
    assert capsys.readouterr().out == answer + "\n"
    model, qparams, quantizers = gen.split_model(tiny.qconfig, params, tiny.batch_stats)
    template = get_template(train_cfg.data.template)
    expected = gen.generate_answers(model, qparams, tiny.tokenizer, template, tiny.image_processor,
                                    [(PIL.Image.open(file).convert("RGB"), "What shape is it?")], 1, max_new_tokens=4,
                                    quantizers=quantizers)
    assert answer == expected[0]
    assert answer  # the random tiny model says something ('Position curious Below Below')
