"""Pieces shared by ``configs/stage1.py`` and ``configs/stage2.py``: the full config skeleton and presets.

Every field the training loop reads exists here, so ``--config.a.b=value`` overrides work on any of them
(``lock_config=True`` rejects typos). Optional paths are ``placeholder(str)``: None until set.

Parameter paths the regex rules see (``qtl_jax.rules``; first full match wins) are those of the two
partitions' trees, prefixed by the partition name (``qtl_jax.split.step.make_split_optimizers``)::

    client/vision_tower/..., client/connector/..., client/embed_tokens/embedding,
    client/{image,text}_quantizer/in_proj/...
    server/llm/... (llm/embed_tokens is the tied output head), server/{image,text}_quantizer/out_proj/...
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Biases, norm scales/biases (LayerNorm 'scale'/'bias', RMSNorm 'weight'/'scale') are not decayed, as
# in HF Trainer (TinyLLaVA): ALL_LAYERNORM_LAYERS and every bias.
NO_DECAY = (r".*bias", r".*norm[^/]*/(scale|weight)")

# Stage 1 (paper): connector + both quantizers train; the vision tower and the whole LLM (its input table
# on the client included) are frozen.
STAGE1_GROUPS = (
    (r"client/vision_tower/.*", "frozen"),
    (r"client/embed_tokens/.*", "frozen"),
    (r"server/llm/.*", "frozen"),
    (r".*", 1.0),
)
# Stage 2 (paper): the LLM is fine-tuned too (with the client's copy of its input table); tower frozen.
STAGE2_GROUPS = (
    (r"client/vision_tower/.*", "frozen"),
    (r".*", 1.0),
)
# Everything trains (the demo starts from random weights).
ALL_GROUPS = ((r".*", 1.0),)


def paper_model() -> ml_collections.ConfigDict:
    """OpenELM-270M-Instruct + SigLIP-so400m from local converted checkpoints (nothing is downloaded)."""
    m = ml_collections.ConfigDict()
    # 'components': vision_dir + llm_dir (stage 1); 'random': the dims below, random init (demo).
    m.source = "components"
    m.vision_dir = config_dict.placeholder(str)  # e.g. /ckpt/siglip-so400m-patch14-384 (safetensors + config.json)
    m.llm_dir = config_dict.placeholder(str)  # e.g. /ckpt/OpenELM-270M-Instruct
    m.tokenizer_dir = config_dict.placeholder(str)  # e.g. /ckpt/Llama-2-7b-hf tokenizer files
    m.connector_type = "mlp2x_gelu"
    m.vision_feature_layer = -2
    m.vision_feature_select_strategy = "patch"
    m.max_length = 2048
    m.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    m.remat = False  # rematerialise blocks in the backward pass (memory for compute)
    # Only read when source='random'.
    m.vision = ml_collections.ConfigDict(dict(
        kind="siglip", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14))
    m.llm = ml_collections.ConfigDict(dict(
        family="openelm", vocab_size=32000, hidden_size=1280, num_layers=16, num_heads=16, num_kv_heads=4,
        intermediate_size=3072, head_dim=64, tie_word_embeddings=True))
    # Image processor (SigLIP: resize to the tower's size, rescale 1/255, normalise mean/std 0.5).
    m.image_mean = (0.5, 0.5, 0.5)
    m.image_std = (0.5, 0.5, 0.5)
    return m


def demo_model() -> ml_collections.ConfigDict:
    """A tiny SigLIP-style ViT (64 px, patch 8) + a 4-layer llama-style decoder (d=128), random init."""
    m = paper_model()
    m.source = "random"
    m.max_length = 160
    m.vision = ml_collections.ConfigDict(dict(
        kind="siglip", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=64, patch_size=8))
    # vocab_size is set from the shapes tokenizer at run time (0 = take the tokenizer's size).
    m.llm = ml_collections.ConfigDict(dict(
        family="llama", vocab_size=0, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_size=256, head_dim=32, tie_word_embeddings=True))
    return m


def base_config() -> ml_collections.ConfigDict:
    """The skeleton every stage config fills in."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = 1
    c.model = paper_model()

    # One quantizer config for both modalities (the paper uses the same L for image and text).
    c.quantizer = ml_collections.ConfigDict(dict(
        levels=4, scaling="batch", bound="linear", dist_weight=0.25, clip_sigma=3.0, ema_momentum=0.99))

    # Where the weights come from besides model.source: a previous stage's workdir (its latest checkpoint's
    # params, quantizers included) or a converted Hugging Face checkpoint directory.
    c.init = ml_collections.ConfigDict()
    c.init.from_workdir = config_dict.placeholder(str)
    c.init.checkpoint = config_dict.placeholder(str)

    c.data = ml_collections.ConfigDict()
    # 'llava': a dataset built by qtl_jax.data.llava_tfds (data.dataset_dir); 'shapes': the built-in corpus,
    # prepared on the fly under data.data_dir (default <workdir>/data).
    c.data.kind = "llava"
    c.data.dataset_dir = config_dict.placeholder(str)
    c.data.data_dir = config_dict.placeholder(str)
    c.data.split = "train"
    c.data.template = "pretrain"
    c.data.num_epochs = 1
    c.data.worker_count = 0
    c.data.read_threads = 2
    # Shapes corpus sizes (data.kind='shapes'); 'kind' picks the pretrain (captions) or instruct stream.
    c.data.shapes = ml_collections.ConfigDict(dict(
        stream="pretrain", seed=0, n_pretrain=2000, n_instruct=2000, text_only_fraction=0.1))

    c.global_batch_size = 64
    # -1: num_epochs over the dataset (floor(examples / global_batch_size) per epoch).
    c.total_steps = -1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-4
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_ratio = 0.02
    c.optimizer.schedule = "cosine"
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.accum_steps = 1
    c.optimizer.param_groups = STAGE1_GROUPS
    c.optimizer.no_decay = NO_DECAY

    # Device sub-meshes: 0 devices for either side shares all devices between client and server.
    c.mesh = ml_collections.ConfigDict(dict(client_devices=0, server_devices=0, client_fsdp=1, server_fsdp=1))
    # (regex, tactic) rules: 'fsdp' shards a parameter's largest divisible dim over the fsdp axis.
    c.sharding = ((r".*", "fsdp"),)

    c.split = ml_collections.ConfigDict()
    c.split.mode = "split"  # 'split' (two programs, codes over the link) or 'fused' (one program)
    c.split.codec_method = "ans"
    c.split.measure_every = 1  # measure wire bytes every n-th step (host entropy coding costs time)
    c.split.downlink_dtype = "float32"

    c.log_every = 1
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.checkpoint_fallback = True  # newest checkpoint corrupt: report it, move it aside, resume from an older intact one
    c.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True  # evaluate at the end of the stage (demo_eval)
    c.eval.dataset_dir = config_dict.placeholder(str)
    c.eval.split = "validation"
    c.eval.template = "llama"
    c.eval.num_examples = 256
    c.eval.batch_size = 32
    # For data.kind='shapes': a held-out corpus drawn with this seed (never the training seed).
    c.eval.shapes_seed = 1000
    c.eval.shapes_stream = "instruct"

    # For tests: poison_step: the batch of this step (0-based) has NaN pixels (-1: never); step_delay:
    # seconds to sleep after each step (so a test can kill a run midway).
    c.debug = ml_collections.ConfigDict(dict(poison_step=-1, step_delay=0.0))
    return c


def demo_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The shared part of both demo variants: tiny model, shapes data, tiny meshes, frequent checkpoints."""
    c.model = demo_model()
    c.data.kind = "shapes"
    c.data.read_threads = 2
    c.mesh.client_devices = 0
    c.mesh.server_devices = 0
    c.sharding = ((r".*", "replicate"),)
    c.split.measure_every = 1
    c.checkpoint_every = 100
    c.log_every = 1
    c.eval.num_examples = 256
    c.eval.batch_size = 64
    return c


def tiny_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Test-sized demo: the demo's code path with a 1-layer tower and decoder, 32 px images, seconds per run."""
    demo_overrides(c)
    c.model.max_length = 96
    c.model.vision = ml_collections.ConfigDict(dict(
        kind="siglip", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8))
    c.model.llm = ml_collections.ConfigDict(dict(
        family="llama", vocab_size=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
        intermediate_size=64, head_dim=16, tie_word_embeddings=True))
    c.optimizer.param_groups = ALL_GROUPS
    c.global_batch_size = 8
    c.total_steps = 6
    c.checkpoint_every = 3
    c.data.shapes.n_pretrain = 64
    c.data.shapes.n_instruct = 64
    c.eval.num_examples = 16
    c.eval.batch_size = 8
    c.progress_bar = False
    return c
