"""configs/*.py: the presets, big_vision-style argument parsing, and the paper's exact shapes in paper_random."""

from __future__ import annotations

import math

import jax
import pytest

from configs import common, stage1, stage2
from configs import eval as eval_config

# Apple's OpenELM-270M config.json fields that determine its shapes (the per-layer lists are derived).
OPENELM_270M_APPLE = dict(
    model_type="openelm", num_transformer_layers=16, model_dim=1280, head_dim=64, vocab_size=32000,
    qkv_multipliers=[0.5, 1.0], num_gqa_groups=4, ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=256,
    normalize_qk_projections=True, share_input_output_layers=True, rope_freq_constant=10000,
    max_context_length=2048,
)


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("module", [stage1, eval_config], ids=["train", "eval"])
def test_paper_random_has_the_published_parameter_counts(module):
    """OpenELM-270M: 271,527,168 parameters; SigLIP-so400m-patch14-384 without its pooling head: 412,987,248
    (transformers' SiglipVisionModel, vision_use_head=False); 729 patches, 728 image tokens with 'patch'.
    Counted from abstract shapes (jax.eval_shape): nothing is allocated."""
    from qtl_jax.models.connector import ConnectorConfig
    from qtl_jax.models.decoder import DecoderConfig
    from qtl_jax.models.tinyllava import TinyLlavaConfig, abstract_params
    from qtl_jax.models.vision import VisionConfig

    m = module.get_config("paper_random").model
    assert m.source == "random"
    vision = VisionConfig(**m.vision)
    llm = DecoderConfig.make(**m.llm)
    cfg = TinyLlavaConfig(vision=vision, connector=ConnectorConfig(m.connector_type, vision.hidden_size, llm.hidden_size),
                          llm=llm, vision_feature_layer=m.vision_feature_layer,
                          vision_feature_select_strategy=m.vision_feature_select_strategy)
    counts = {k: _count(v) for k, v in abstract_params(cfg).items()}
    assert counts["llm"] == 271_527_168
    assert counts["vision_tower"] == 412_987_248
    assert (vision.num_patches, cfg.num_image_tokens) == (729, 728)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size, vision.num_attention_heads,
            vision.image_size, vision.patch_size) == (27, 1152, 4304, 16, 384, 14)
    assert (llm.num_layers, llm.hidden_size, llm.head_dim, llm.vocab_size, llm.qk_norm, llm.norm, llm.norm_eps,
            llm.tie_word_embeddings) == (16, 1280, 64, 32000, "rms", "rms", 1e-6, True)


def test_openelm_dims_are_what_apples_config_derives():
    """The preset's per-layer tuples equal what reading Apple's config.json gives (make_divisible rounding)."""
    import numpy as np

    from qtl_jax.weights.hf_config import decoder_config_from_hf, make_divisible

    apple = decoder_config_from_hf(OPENELM_270M_APPLE)
    llm = common.paper_model().llm
    assert tuple(llm.num_heads) == apple.num_heads == (12,) * 5 + (16,) * 7 + (20,) * 4
    assert tuple(llm.num_kv_heads) == apple.num_kv_heads == (3,) * 5 + (4,) * 7 + (5,) * 4
    multipliers = [round(float(v), 2) for v in np.linspace(0.5, 4.0, 16)]
    assert tuple(llm.intermediate_size) == apple.intermediate_size == tuple(make_divisible(v * 1280, 256)
                                                                             for v in multipliers)


def test_paper_random_runs_a_few_steps_on_the_shapes_corpus_at_384_px():
    for module, groups in ((stage1, common.STAGE1_GROUPS), (stage2, common.STAGE2_GROUPS)):
        c = module.get_config("paper_random")
        assert (c.global_batch_size, c.total_steps, c.data.kind) == (4, 4, "shapes")
        assert c.model.vision.image_size == 384 and c.model.llm.vocab_size == 32000
        # The stage's own frozen/trainable split and recipe stay; only the data and the size change.
        paper = module.get_config()
        assert c.optimizer.param_groups == groups == paper.optimizer.param_groups
        assert (c.optimizer.lr, c.data.template, c.model.max_length) == (
            paper.optimizer.lr, paper.data.template, paper.model.max_length)
    assert stage2.get_config("paper_random").model == stage1.get_config("paper_random").model
    assert stage2.get_config("paper_random").init.from_workdir is None
    e = eval_config.get_config("paper_random")
    assert e.checkpoint is None and e.shapes_benchmarks.enabled and e.shapes_benchmarks.image_size == 384
    assert (e.generation, e.batch_size) == ("kv_cache", 1)  # the paper's decoding


def test_presets_share_one_definition():
    for preset in ("demo", "tiny"):
        a, b = stage1.get_config(preset), stage2.get_config(preset)
        assert a.model == b.model and a.data.shapes.n_pretrain == b.data.shapes.n_pretrain
    assert stage1.get_config("tiny").model == common.tiny_model()
    tiny_eval = eval_config.get_config("tiny").model
    assert tiny_eval.llm == common.tiny_model().llm and tiny_eval.vision == common.tiny_model().vision
    assert stage2.get_config("tiny").init.from_workdir is None
    assert stage2.get_config("demo").init.from_workdir == "/tmp/qtl_demo/stage1"
    assert (stage1.get_config("demo").total_steps, stage2.get_config("demo").total_steps) == (150, 300)


def test_parse_arg_follows_big_vision():
    def parsed(arg, **spec):
        return common.parse_arg(arg, **spec).to_dict()

    assert parsed(None, preset="", fast=False) == {"preset": "", "fast": False}
    assert parsed("demo", preset="", fast=False) == {"preset": "demo", "fast": False}
    assert parsed("fast", preset="", fast=False) == {"preset": "", "fast": True}
    assert parsed("preset=tiny,fast=false,n=3", preset="", fast=True, n=1) == {"preset": "tiny", "fast": False, "n": 3}
    with pytest.raises(ValueError, match=r"unknown config argument 'nope' in 'nope=1'; known: preset"):
        common.parse_arg("nope=1", preset="")
    with pytest.raises(ValueError, match=r"fast='maybe': use true or false"):
        common.parse_arg("fast=maybe", fast=False)


@pytest.mark.parametrize("module", [stage1, stage2, eval_config], ids=["stage1", "stage2", "eval"])
def test_unknown_preset_names_the_known_ones(module):
    with pytest.raises(ValueError, match=r"unknown config variant 'nope'.*demo, tiny, paper_random"):
        module.get_config("nope")


@pytest.mark.parametrize("module, entry", [(stage1, "train.py"), (stage2, "train.py"), (eval_config, "eval.py")],
                         ids=["stage1", "stage2", "eval"])
def test_each_config_docstring_starts_with_its_commands(module, entry):
    name = module.__name__.split(".")[-1]
    doc = module.__doc__
    first = doc.split("\n\n")[1].strip()
    assert first.startswith(f"python {entry} --config=configs/{name}.py --workdir="), first
    for preset in ("demo", "tiny", "paper_random"):
        assert f"python {entry} --config=configs/{name}.py:{preset} --workdir=" in doc
