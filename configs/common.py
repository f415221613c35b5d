"""Pieces the configs share: the training config skeleton, the model sections and the presets.

A preset is chosen after a colon, ``--config=configs/stage1.py:demo`` (:func:`parse_arg`, big_vision's
convention); no preset is the paper's setting. The training presets (:func:`train_presets`):

* ``demo``: the 64 px demo model from random init on the built-in shapes corpus, everything trains;
* ``tiny``: the demo's code path at test size (seconds per run);
* ``paper_random``: the paper's exact shapes (OpenELM-270M + SigLIP-so400m at 384 px) with random
  weights, 4 steps at batch 4 on the shapes corpus.

Every field the training loop reads exists here, so ``--config.a.b=value`` overrides work on any of them
(``lock_config=True`` rejects typos). Optional paths are ``placeholder(str)``: None until set.

Parameter paths the regex rules see (``qtl_jax.rules``; first full match wins) are those of the two
partitions' trees, prefixed by the partition name (``qtl_jax.split.step.make_split_optimizers``)::

    client/vision_tower/..., client/connector/..., client/embed_tokens/embedding,
    client/{image,text}_quantizer/in_proj/...
    server/llm/... (llm/embed_tokens is the tied output head), server/{image,text}_quantizer/out_proj/...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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


# OpenELM-270M's per-layer shapes, as Apple's config.json derives them (qkv_multipliers 0.5..1.0 with 4 GQA
# groups; ffn_multipliers round(linspace(0.5, 4.0, 16), 2) x 1280 rounded by make_divisible to multiples of
# 256). tests/test_configs.py checks them against qtl_jax.weights.hf_config reading Apple's fields.
OPENELM_270M_HEADS = (12,) * 5 + (16,) * 7 + (20,) * 4
OPENELM_270M_KV_HEADS = (3,) * 5 + (4,) * 7 + (5,) * 4
OPENELM_270M_FFN = (768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120)


def paper_model() -> ml_collections.ConfigDict:
    """OpenELM-270M-Instruct + SigLIP-so400m from local converted checkpoints (nothing is downloaded)."""
    m = ml_collections.ConfigDict()
    # 'components': vision_dir + llm_dir (stage 1); 'random': the dims below, random init.
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
    # What a rematerialised block keeps (qtl_jax.models.remat.REMAT_POLICIES); read only when remat is set.
    m.remat_policy = "nothing_saveable"
    # Target rows per chunk of the fused output-head + cross-entropy (never [B, T, V] logits); 0 = the default.
    m.loss_chunk_rows = 0
    # Attention kernel (qtl_jax.models.attention): 'auto' = cuDNN on GPU (bf16), XLA's on TPU, the hand-written
    # VJP on CPU; or 'custom' / 'xla' / 'cudnn'.
    m.attention = "auto"
    # Run identical layers as one jax.lax.scan (qtl_jax.models.scan): the vision tower's, and the decoder's when
    # every layer has the same shape (OpenELM's do not). Same parameter tree and function; compiles one layer.
    m.scan_layers = False
    # Only read when source='random'. SigLIP-so400m-patch14-384: 27 x 27 = 729 patches (728 with 'patch').
    m.vision = ml_collections.ConfigDict(dict(
        kind="siglip", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14))
    # OpenELM-270M: 271,527,168 parameters. RMSNorm (eps 1e-6), gated SiLU and RoPE base 10000 are the
    # decoder's defaults.
    m.llm = ml_collections.ConfigDict(dict(
        family="openelm", vocab_size=32000, hidden_size=1280, num_layers=16, num_heads=OPENELM_270M_HEADS,
        num_kv_heads=OPENELM_270M_KV_HEADS, intermediate_size=OPENELM_270M_FFN, head_dim=64, qk_norm="rms",
        tie_word_embeddings=True))
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


def tiny_model() -> ml_collections.ConfigDict:
    """Test-sized: a 1-layer tower at 32 px and a 1-layer decoder (d=32); seconds per run."""
    m = demo_model()
    m.max_length = 96
    m.vision = ml_collections.ConfigDict(dict(
        kind="siglip", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8))
    m.llm = ml_collections.ConfigDict(dict(
        family="llama", vocab_size=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
        intermediate_size=64, head_dim=16, tie_word_embeddings=True))
    return m


def paper_quantizer() -> ml_collections.ConfigDict:
    """The paper's quantizer (method.md §3): L=4, batch statistics, ±3 std linear bound, distortion 0.25,
    N(0, 0.02²) projections (``init='normal'``; ``'identity'`` and its per-modality ``init_*_mean`` /
    ``init_*_std`` calibration: docs/quantizer.md)."""
    return ml_collections.ConfigDict(dict(
        levels=4, scaling="batch", bound="linear", dist_weight=0.25, clip_sigma=3.0, ema_momentum=0.99,
        init="normal", init_image_mean=0.0, init_image_std=1.0, init_text_mean=0.0, init_text_std=1.0))


def base_config() -> ml_collections.ConfigDict:
    """Every field the training loop reads, set to the paper's stage-1 recipe (stage 2 changes a few)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = 1
    c.model = paper_model()

    # One quantizer config for both modalities (the paper uses the same L for image and text).
    c.quantizer = paper_quantizer()

    # Where the weights come from besides model.source: a previous stage's workdir (its latest checkpoint's
    # params, quantizers included) or a converted Hugging Face checkpoint directory.
    c.init = ml_collections.ConfigDict()
    c.init.from_workdir = config_dict.placeholder(str)
    c.init.checkpoint = config_dict.placeholder(str)
    # Regexes over the partition/path names of optimizer.param_groups that init.from_workdir does not load:
    # they keep this run's initialisation, e.g. ('.*_quantizer/.*',) for new quantizers on a 16-bit run.
    c.init.dont_load = ()

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
    # Each batch is padded to its longest sample (as TinyLLaVA Factory pads) rounded up to the first of these
    # lengths (input positions, an image placeholder counting one) that holds it, so jit compiles at most one
    # program per bucket; model.max_length stays the truncation limit and the last bucket. () = always max_length.
    c.data.length_buckets = (32, 64, 128, 256, 512, 1024)
    # Packs the batch's samples into rows of model.max_length merged positions (first fit; positions restart and
    # attention stays within each sample) instead of one sample per row. The paper's statistics are unchanged:
    # the image tensor is still per sample, and the text quantizer weighs its rows into the official tensor of
    # the same samples (qtl_jax.models.quantized.packed_text_weights). In-process server half only.
    c.data.pack = False
    # Shapes corpus sizes (data.kind='shapes'); 'stream' picks the pretrain (captions) or instruct stream.
    # probe_fraction: the share of stage-2 samples that are POPE/MME-format yes/no probes, probe_turns questions
    # each, in the formats of probe_formats taken in turn (comma-separated; '' = POPE half of the time, the four
    # MME perception subtasks the other half; docs/data_shapes.md). blank=True: every training image flat grey,
    # the same text (an image-blind control run).
    c.data.shapes = ml_collections.ConfigDict(dict(
        stream="pretrain", seed=0, n_pretrain=2000, n_instruct=2000, text_only_fraction=0.1, probe_fraction=0.0,
        probe_turns=1, probe_formats="", blank=False))

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
    # Host workers that code the measured steps' messages while the devices run the next programs
    # (qtl_jax.split.meter); 0 codes them inside the step (all of that time on the step's critical path).
    c.split.codec_threads = 2
    # Whether those workers are 'threads' or 'processes' ('auto': processes on an accelerator, threads on CPU).
    # The ANS coder holds Python's GIL for each call: on threads a measurement delays the loop's dispatch of
    # the next programs by up to one call (~5 ms) at a time and the threads do not code in parallel; processes
    # avoid both and cost a copy of the indices (docs/performance.md, "On an H200").
    c.split.codec_pool = "auto"
    # What the server sends back (qtl_jax.split.downlink): 'fp32' (the paper), 'bf16', or 'quantized':
    # unbiased stochastic rounding to 2**bits - 1 levels, per-'token' or per-'channel' scales, entropy
    # coded; optional error feedback (residual kept by the server per client) and top-k (fraction kept).
    c.split.downlink = "fp32"
    c.split.downlink_bits = 4
    c.split.downlink_scale = "token"
    c.split.downlink_error_feedback = False
    c.split.downlink_topk = 1.0
    # Replaced by split.downlink (fp32 | bf16 | quantized); setting it is an error that says so.
    c.split.downlink_dtype = config_dict.placeholder(str)
    # SplitFed (several clients against one server, qtl_jax.split.fedavg): every fedavg_every = K steps each
    # client uploads its client model and gets the example-weighted average of the round's clients back
    # (0: never, each client keeps its own model). A round waits at most fedavg_timeout_s for missing
    # clients, then averages those who came. Clients and server must use the same K.
    c.split.fedavg_every = 0
    c.split.fedavg_timeout_s = 120.0
    # Where the server half runs: address None = in this process; host:port = a qtl_jax.split.server over gRPC.
    c.split.server = ml_collections.ConfigDict(dict(
        address=config_dict.placeholder(str), tls="none", ca_cert=config_dict.placeholder(str),
        cert=config_dict.placeholder(str), key=config_dict.placeholder(str), token_file=config_dict.placeholder(str),
        server_name="localhost", client_id="client-0", rpc_timeout_s=300.0, retries=3, max_message_mb=64.0))

    c.log_every = 1
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.checkpoint_fallback = True  # newest checkpoint corrupt: report it, move it aside, resume from an older intact one
    c.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True  # evaluate at the end of the stage (demo_eval)
    c.eval.dataset_dir = config_dict.placeholder(str)
    c.eval.split = "validation"
    c.eval.template = "pretrain"
    c.eval.num_examples = 256
    c.eval.batch_size = 32
    # For data.kind='shapes': a held-out corpus drawn with this seed (never the training seed).
    c.eval.shapes_seed = 1000
    c.eval.shapes_stream = "pretrain"

    # For tests: poison_step: the batch of this step (0-based) has NaN pixels (-1: never); step_delay:
    # seconds to sleep after each step (so a test can kill a run midway).
    c.debug = ml_collections.ConfigDict(dict(poison_step=-1, step_delay=0.0))
    return c


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
    """``get_config``'s one string argument as named, typed values (big_vision's ``parse_arg`` convention).

    ``configs/x.py:demo`` gives the first ``spec`` entry the value ``'demo'``; ``:a=1,b=two`` sets entries by
    name; a lone name of a boolean entry (``:flag``) sets it True. Values take the type of their default in
    ``spec``; a name not in ``spec`` is an error naming the known ones.
    """
    arg = (arg or "").strip()
    if arg and "," not in arg and "=" not in arg:
        arg = f"{arg}=True" if isinstance(spec.get(arg), bool) else f"{next(iter(spec))}={arg}"
    values = ml_collections.ConfigDict(dict(spec), type_safe=False)
    for item in filter(None, arg.split(",")):
        name, _, raw = item.partition("=")
        if name not in spec:
            raise ValueError(f"unknown config argument {name!r} in {arg!r}; known: {', '.join(spec)}.")
        default = spec[name]
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", ""):
                raise ValueError(f"config argument {name}={raw!r}: use true or false.")
            values[name] = raw.lower() == "true"
        else:
            values[name] = type(default)(raw)
    return values


def apply_preset(c: ml_collections.ConfigDict, arg: str | None,
                 presets: Mapping[str, Callable[[ml_collections.ConfigDict], None]]) -> ml_collections.ConfigDict:
    """Applies the preset ``arg`` names (``--config=configs/x.py:<preset>``) to ``c``; none: ``c`` as it is."""
    preset = parse_arg(arg, preset="").preset
    if preset and preset not in presets:
        raise ValueError(f"unknown config variant {preset!r}; use no variant (the paper's setting) or one of: "
                         f"{', '.join(presets)}.")
    if preset:
        presets[preset](c)
    return c


def _demo(c: ml_collections.ConfigDict) -> None:
    # From random initialisation every part trains: the paper freezes parts because they are pretrained.
    c.model = demo_model()
    c.data.kind = "shapes"
    c.data.shapes.n_pretrain = 4000
    c.data.shapes.n_instruct = 4000
    c.global_batch_size = 32
    c.optimizer.param_groups = ALL_GROUPS
    c.sharding = ((r".*", "replicate"),)
    c.checkpoint_every = 100
    c.eval.batch_size = 64


def _tiny(c: ml_collections.ConfigDict) -> None:
    # The demo's code path at toy size, for tests.
    _demo(c)
    c.model = tiny_model()
    c.data.shapes.n_pretrain = 64
    c.data.shapes.n_instruct = 64
    c.global_batch_size = 8
    c.total_steps = 6
    c.checkpoint_every = 3
    c.optimizer.lr = 1e-3
    c.eval.num_examples = 16
    c.eval.batch_size = 8
    c.progress_bar = False


def _paper_random(c: ml_collections.ConfigDict) -> None:
    # The published shapes with random weights, a few steps on the shapes corpus rendered at the tower's
    # 384 px: the paper's configuration with nothing downloaded (to run, benchmark and test it). The stage's
    # own frozen/trainable split stays. Random weights have nothing to evaluate.
    c.model.source = "random"
    c.data.kind = "shapes"
    c.data.shapes.n_pretrain = 64
    c.data.shapes.n_instruct = 64
    c.global_batch_size = 4
    c.total_steps = 4
    c.eval.enabled = False


def train_presets(**stage: Callable[[ml_collections.ConfigDict], None]) -> dict[str, Callable]:
    """The training presets ``demo``, ``tiny`` and ``paper_random``; ``stage`` adds a stage's own changes
    to a preset (e.g. ``demo=`` its learning rate and step count), applied after the shared ones."""
    shared = {"demo": _demo, "tiny": _tiny, "paper_random": _paper_random}
    unknown = set(stage) - set(shared)
    if unknown:
        raise ValueError(f"no shared preset {sorted(unknown)}; presets: {', '.join(shared)}.")

    def compose(name: str) -> Callable[[ml_collections.ConfigDict], None]:
        def apply(c: ml_collections.ConfigDict) -> None:
            shared[name](c)
            if name in stage:
                stage[name](c)

        return apply

    return {name: compose(name) for name in shared}
