"""Layout detection and loading: every layout, sharded checkpoints, component pairs, export, errors.

Params loaded from a renamed checkpoint must equal, tensor for tensor, the params loaded from the
llava-hf original (whose logits tests/test_tinyllava.py proves equal to transformers).
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
from qtl_jax.tokenizer import load_tokenizer
from qtl_jax.weights import keymap, layouts, safetensors_io
from qtl_jax.weights.export import export_llava_hf
from qtl_jax.weights import loader
from qtl_jax.weights.loader import load_vision

import checkpoint_files  # tests/ helper
from tolerances import layers_tolerance

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)


def assert_same_params(a, b):
    fa, fb = keymap.flatten(a), keymap.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SigLIP+Qwen2 llava-hf checkpoint as transformers 5.x saves it, and its loaded params."""
    torch.manual_seed(0)
    hf = T.LlavaForConditionalGeneration(
        T.LlavaConfig(vision_config=T.SiglipVisionConfig(**VISION), text_config=T.Qwen2Config(**TEXT),
                      image_token_index=511, vision_feature_layer=-2, vision_feature_select_strategy="full")
    ).eval()
    path = str(tmp_path_factory.mktemp("llava"))
    hf.save_pretrained(path)
    model, params = load_pretrained(path, verbose=False)
    tensors = {k: np.asarray(v) for k, v in safetensors_io.read_dir(path).items()}
    config = json.load(open(os.path.join(path, "config.json")))
    return hf, path, model, params, tensors, config


def test_detects_and_says_which_layout(base, capsys):
    _, path, model, _, tensors, _ = base
    load_pretrained(path)
    assert "detected layout 'llava_hf_legacy'" in capsys.readouterr().out
    assert layouts.detect(tensors).name == "llava_hf_legacy"
    assert model.config.convention == "llava_hf" and model.config.vision_feature_select_strategy == "full"


@pytest.mark.parametrize("nested", [False, True], ids=["flat_vision", "vision_model_prefix"])
def test_llava_hf_newer_naming(base, tmp_path, nested):
    _, _, _, params, tensors, config = base
    vision = "model.vision_tower.vision_model." if nested else "model.vision_tower."
    renamed = checkpoint_files.rename(tensors, [
        ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", vision), ("multi_modal_projector.", "model.multi_modal_projector."),
    ])
    model, loaded = load_pretrained(checkpoint_files.write(str(tmp_path), renamed, config), verbose=False)
    assert layouts.detect(renamed).name == "llava_hf"
    assert_same_params(loaded, params)


def test_sharded_checkpoint(base, tmp_path):
    _, _, _, params, tensors, config = base
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors_io.write_file(str(tmp_path / shard), {k: tensors[k] for k in keys})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    json.dump({"metadata": {}, "weight_map": weight_map}, open(tmp_path / "model.safetensors.index.json", "w"))
    json.dump(config, open(tmp_path / "config.json", "w"))
    _, loaded = load_pretrained(str(tmp_path), verbose=False)
    assert_same_params(loaded, params)


def _factory(tensors, config):
    tensors = checkpoint_files.rename(tensors, [
        ("vision_tower.", "vision_tower._vision_tower.vision_model."),
        ("multi_modal_projector.linear_1.", "connector._connector.0."),
        ("multi_modal_projector.linear_2.", "connector._connector.2."),
    ])
    cfg = {"model_type": "tinyllava", "text_config": config["text_config"], "vision_config": config["vision_config"],
           "connector_type": "mlp2x_gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "patch",
           "tokenizer_padding_side": "right"}
    return tensors, cfg


def test_factory_legacy_and_quantized_layouts(base, tmp_path):
    _, _, _, params, tensors, config = base
    f_tensors, f_cfg = _factory(tensors, config)
    model, factory = load_pretrained(checkpoint_files.write(str(tmp_path / "factory"), f_tensors, f_cfg), verbose=False)
    assert_same_params(factory, params)
    assert (model.config.convention, model.config.vision_feature_select_strategy) == ("factory", "patch")

    # Legacy LLaVA / TinyLLaVABench: LLM at model.* + lm_head, config = the LLM's config + mm_* fields.
    legacy = checkpoint_files.rename(f_tensors, [
        ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
        ("vision_tower._vision_tower.", "model.vision_tower.vision_tower."), ("connector._connector.", "model.mm_projector."),
    ])
    legacy_cfg = {**config["text_config"], "model_type": "llava_qwen2", "mm_projector_type": "mlp2x_gelu",
                  "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                  "mm_vision_tower": "google/siglip-so400m-patch14-384"}
    legacy_dir = checkpoint_files.write(str(tmp_path / "legacy"), legacy, legacy_cfg)
    with pytest.raises(ValueError, match="pass vision_config="):
        load_pretrained(legacy_dir, verbose=False)
    model, loaded = load_pretrained(legacy_dir, vision_config=config["vision_config"], verbose=False)
    assert layouts.detect(legacy).name == "legacy_llava" and model.config.vision_feature_select_strategy == "patch"
    assert_same_params(loaded, params)

    # Official Quantized-TinyLLaVA = Factory + VQ.quantizer_{image,text} projections.
    q = dict(f_tensors)
    rng = np.random.default_rng(0)
    for m in ("image", "text"):
        for p, src in (("in_proj", "in_proj.0"), ("out_proj", "out_proj")):  # in_proj is an nn.Sequential
            q[f"VQ.quantizer_{m}.quantizer.{src}.weight"] = rng.normal(size=(64, 64)).astype(np.float32)
            q[f"VQ.quantizer_{m}.quantizer.{src}.bias"] = rng.normal(size=(64,)).astype(np.float32)
    q_dir = checkpoint_files.write(str(tmp_path / "quantized"), q, {**f_cfg, "vq_type": "FSQ", "discrete_size": 4})
    with pytest.raises(NotImplementedError, match="Quantized-TinyLLaVA .* drop_quantizer=True"):
        load_pretrained(q_dir, verbose=False)
    _, loaded = load_pretrained(q_dir, drop_quantizer=True, verbose=False)
    assert_same_params(loaded, params)
    qp = loader.load_quantizer_params(q_dir)
    np.testing.assert_array_equal(qp["text"]["in_proj"]["kernel"], q["VQ.quantizer_text.quantizer.in_proj.0.weight"].T)
    np.testing.assert_array_equal(qp["image"]["out_proj"]["bias"], q["VQ.quantizer_image.quantizer.out_proj.bias"])
    # They are the params of qtl_jax.quantizer.Quantizer as it is.
    from qtl_jax.quantizer import Quantizer, QuantizerConfig

    quantizer = Quantizer(QuantizerConfig(dim=64, levels=4))
    want = jax.eval_shape(quantizer.init, jax.random.key(0), jnp.zeros((2, 64)))["params"]
    assert keymap.shapes(want) == keymap.shapes(qp["image"])
    q["VQ.quantizer_image.quantizer.width"] = np.ones(1, np.float32)  # e.g. the broken ADSQ's extra parameter
    checkpoint_files.write(q_dir, q, {**f_cfg, "vq_type": "FSQ", "discrete_size": 4})
    with pytest.raises(keymap.WeightMismatchError, match="VQ.quantizer_image.quantizer.width"):
        loader.load_quantizer_params(q_dir)


def test_unknown_layout_and_mismatched_keys_are_reported(base, tmp_path):
    _, _, _, _, tensors, config = base
    with pytest.raises(layouts.UnknownLayoutError, match="cannot tell the checkpoint layout .*'connector._connector"):
        load_pretrained(checkpoint_files.write(str(tmp_path / "odd"), {"encoder.w": np.zeros(2, np.float32)}, config), verbose=False)
    bad = dict(tensors)
    bad["multi_modal_projector.linear_3.weight"] = np.zeros((64, 64), np.float32)
    del bad["language_model.model.norm.weight"]
    with pytest.raises(keymap.WeightMismatchError) as e:
        load_pretrained(checkpoint_files.write(str(tmp_path / "bad"), bad, config), verbose=False)
    msg = str(e.value)
    assert "unmapped" in msg and "multi_modal_projector.linear_3.weight" in msg
    assert "missing" in msg and "llm/norm/scale" in msg
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained("google/siglip-so400m-patch14-384")


@pytest.mark.parametrize("naming", ["llava_hf", "llava_hf_legacy"])
def test_export_round_trip_through_transformers(base, tmp_path, naming):
    hf, _, model, params, _, _ = base
    out = export_llava_hf(model, params, str(tmp_path / naming), naming=naming)
    again = T.LlavaForConditionalGeneration.from_pretrained(out).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (2, 30))
    ids[0, 3:19] = 511
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        a = hf(input_ids=torch.from_numpy(ids), pixel_values=pixels).logits.numpy()
        b = again(input_ids=torch.from_numpy(ids), pixel_values=pixels).logits.numpy()
    assert np.abs(a - b).max() <= 1e-6
    _, reloaded = load_pretrained(out, verbose=False)
    assert_same_params(reloaded, params)


def test_export_of_factory_model_needs_a_real_image_token(base, tmp_path):
    _, _, _, params, tensors, config = base
    f_tensors, f_cfg = _factory(tensors, config)
    model, loaded = load_pretrained(checkpoint_files.write(str(tmp_path / "f"), f_tensors, f_cfg), verbose=False)
    with pytest.raises(ValueError, match="image_token_index=<id"):
        export_llava_hf(model, loaded, str(tmp_path / "out"))
    out = export_llava_hf(model, loaded, str(tmp_path / "out"), image_token_index=511)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["image_token_index"] == 511
    assert cfg["vision_config"]["vision_use_head"] is False


def test_component_checkpoints_start_stage1(base, tmp_path):
    torch.manual_seed(3)
    siglip = T.SiglipModel(T.SiglipConfig(
        vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, vocab_size=100)))
    siglip.save_pretrained(str(tmp_path / "siglip"))  # a full dual encoder: text_model.* must be skipped
    llm = T.Qwen2ForCausalLM(T.Qwen2Config(**TEXT)).eval()
    llm.save_pretrained(str(tmp_path / "llm"))
    with pytest.raises(TypeError, match="key=jax.random.key"):
        load_pretrained((str(tmp_path / "siglip"), str(tmp_path / "llm")), verbose=False)
    model, params = load_pretrained((str(tmp_path / "siglip"), str(tmp_path / "llm")), key=jax.random.key(7), verbose=False)
    # The keyword form (qtl_jax.load_pretrained's stub still requires a positional path; see the report).
    _, same = loader.load_pretrained(vision_dir=str(tmp_path / "siglip"), llm_dir=str(tmp_path / "llm"),
                                     key=jax.random.key(7), verbose=False)
    assert_same_params(same, params)  # the fresh connector is a function of the key
    k = np.asarray(params["connector"]["fc_0"]["kernel"])
    assert k.shape == (32, 64) and 0.015 < k.std() < 0.025 and not np.asarray(params["connector"]["fc_1"]["bias"]).any()
    vcfg, vparams = load_vision(str(tmp_path / "siglip"))
    assert_same_params(vparams, params["vision_tower"])
    np.testing.assert_array_equal(
        np.asarray(params["vision_tower"]["layers_1"]["fc1"]["kernel"]),
        siglip.vision_model.encoder.layers[1].mlp.fc1.weight.detach().numpy().T,
    )
    # Text-only through the composed model equals the plain causal LM in transformers.
    ids = np.random.default_rng(0).integers(0, 500, (2, 12))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = llm(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.asarray(out.logits) - ref).max() <= layers_tolerance(
        ref, width=TEXT["intermediate_size"], layers=TEXT["num_hidden_layers"])  # tests/tolerances.py


def test_tokenizer_loads_offline(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a photo of a cat", "what is in the image?"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                              additional_special_tokens=["<image>"]).save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    ids = loaded("<image>\na photo of a cat")["input_ids"]
    assert ids[0] == loaded.convert_tokens_to_ids("<image>") == 4
    assert loaded.decode(ids) == "<image>\na photo of a cat"
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty") if os.makedirs(tmp_path / "empty") is None else "")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer("meta-llama/Llama-2-7b-hf")


def test_factory_checkpoint_with_openelm_the_papers_llm(base, tmp_path):
    """The paper's model shape in miniature: SigLIP + mlp2x_gelu + OpenELM (per-layer heads, qk-norm,
    GQA, tied embeddings) in the Factory layout, whose LLM keys are language_model.transformer.*."""
    from qtl_jax.models.decoder import init_shapes
    from qtl_jax.weights.hf_config import decoder_config_from_hf
    from qtl_jax.weights.llm_maps import llm_rules

    _, _, _, params, tensors, config = base
    openelm = dict(model_type="openelm", num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=512,
                   num_query_heads=[4, 2], num_kv_heads=[2, 1], ffn_multipliers=[0.5, 1.0], ffn_dim_divisor=16,
                   ffn_with_glu=True, normalize_qk_projections=True, share_input_output_layers=True)
    llm_cfg = decoder_config_from_hf(openelm)
    rng = np.random.default_rng(1)  # random weights of the right shapes: tracing is cheap, compiling init is not
    llm_params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.1, init_shapes(llm_cfg))
    llm_tensors = keymap.export(keymap.flatten(llm_params), llm_rules(llm_cfg))
    assert any(k.startswith("transformer.layers.1.attn.qkv_proj") for k in llm_tensors)
    f_tensors, f_cfg = _factory(tensors, config)
    f_tensors = {k: v for k, v in f_tensors.items() if not k.startswith("language_model.")}
    f_tensors.update({f"language_model.{k}": np.asarray(v) for k, v in llm_tensors.items()})
    model, loaded = load_pretrained(checkpoint_files.write(str(tmp_path), f_tensors, {**f_cfg, "text_config": openelm}), verbose=False)
    assert model.config.llm.family == "openelm" and model.config.llm.num_heads == (4, 2)
    assert_same_params(loaded["llm"], llm_params)
    assert_same_params(loaded["vision_tower"], params["vision_tower"])
    ids = jnp.asarray([[5, -200, 6, 7]])
    out = jax.jit(model.apply)({"params": loaded}, ids, jnp.zeros((1, 32, 32, 3)))
    assert out.logits.shape == (1, 4 + 14, 512) and bool(jnp.isfinite(out.logits).all())
    with pytest.raises(NotImplementedError, match="OpenELM is not in transformers"):
        export_llava_hf(model, loaded, str(tmp_path / "out"), image_token_index=3)


def test_tied_gemma_export_round_trip(tmp_path):
    torch.manual_seed(5)
    hf = T.LlavaForConditionalGeneration(T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**VISION), text_config=T.GemmaConfig(**{**TEXT, "num_key_value_heads": 1}, head_dim=16),
        image_token_index=511, vision_feature_layer=-2, vision_feature_select_strategy="default")).eval()
    hf.save_pretrained(str(tmp_path / "src"))
    model, params = load_pretrained(str(tmp_path / "src"), verbose=False)
    assert model.config.llm.tie_word_embeddings and "lm_head" not in params["llm"]
    again = T.LlavaForConditionalGeneration.from_pretrained(export_llava_hf(model, params, str(tmp_path / "out"))).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 500, (1, 20)))
    ids[0, 2:18] = 511
    pixels = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert (hf(input_ids=ids, pixel_values=pixels).logits - again(input_ids=ids, pixel_values=pixels).logits).abs().max() <= 1e-6
