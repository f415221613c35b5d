r"""Evaluation: the paper's benchmarks on local files in the LLaVA / TinyLLaVA eval-kit layout.

Paper setting (method.md §6): greedy decoding, one question at a time (batch_size=1: with the paper's
scaling='batch' quantizer the scaling statistics come from the one example), the ``llama`` template::

    python eval.py --config=configs/eval.py --workdir=/runs/eval \
        --config.checkpoint=/runs/stage2 --config.benchmark_dir=/data/llava_eval

``benchmark_dir`` holds LLaVA's ``playground/data/eval`` folders (MME, pope, scienceqa, textvqa, vqav2, gqa,
mm-vet, MMMU); each benchmark's files are configurable under ``--config.benchmarks.<name>.*``. Not run here
(no weights or benchmark data on this machine).

Demo (``configs/eval.py:demo``): the stage-2 demo model (``/tmp/qtl_demo/stage2``, from
``python train.py --config=configs/stage2.py:demo``) on the built-in shapes benchmarks (MME, POPE,
ScienceQA-IMG, VQAv2, TextVQA layouts; 32 questions each, generated tokens
re-quantized as the from-scratch demo model was trained), then the bits sweep L = 2..32 + the 16-bit
baseline::

    python eval.py --config=configs/eval.py:demo --workdir=/tmp/qtl_demo/eval

Measured on this 2-core CPU machine (shared with five other jobs): 4 min 19 s for the evaluation and the
sweep; at the trained L=4: MME perception 50.0, POPE F1 66.6 (always "yes"), ScienceQA-IMG 38.5, TextVQA
55.0, VQAv2 40.3 (32 questions each; docs/evaluation.md has the output, the sweep table and the plot).
``:tiny`` is the same path with a random tiny model (tests).
"""

import ml_collections

from configs import common

# LLaVA's playground/data/eval layout (folder and file names of the LLaVA-1.5 eval kit).
LLAVA_BENCHMARKS = {
    "mme": dict(kind="mme", root="MME", question_file="llava_mme.jsonl", image_folder="MME_Benchmark_release_version",
                gt_folder="MME_Benchmark_release_version"),
    "pope": dict(kind="pope", root="pope", question_file="llava_pope_test.jsonl", image_folder="val2014",
                 annotation_dir="coco"),
    "scienceqa": dict(kind="scienceqa", root="scienceqa", question_file="llava_test_CQM-A.json",
                      image_folder="images/test", split="test", single_pred_prompt=True),
    "textvqa": dict(kind="textvqa", root="textvqa", question_file="llava_textvqa_val_v051_ocr.jsonl",
                    image_folder="train_images", annotation_file="TextVQA_0.5.1_val.json"),
    "vqav2": dict(kind="vqav2", root="vqav2", question_file="llava_vqav2_mscoco_test-dev2015.jsonl",
                  image_folder="test2015", annotation_file=""),
    "gqa": dict(kind="gqa", root="gqa", question_file="llava_gqa_testdev_balanced.jsonl", image_folder="data/images",
                annotation_file="data/testdev_balanced_questions.json"),
    "mmvet": dict(kind="mmvet", root="mm-vet", question_file="llava-mm-vet.jsonl", image_folder="images"),
    "mmmu": dict(kind="mmmu", root="MMMU", question_file="llava_mmmu_val.jsonl", image_folder="images"),
}

# The files qtl_jax.data.benchmark_files writes (relative to benchmark_dir).
SHAPES_BENCHMARKS = {
    "mme": dict(kind="mme", root="mme", question_file="llava_mme.jsonl", image_folder="MME_Benchmark_release_version",
                gt_folder="MME_Benchmark_release_version"),
    "pope": dict(kind="pope", root="pope", question_file="llava_pope_test.jsonl", image_folder="images",
                 annotation_dir="coco"),
    "scienceqa": dict(kind="scienceqa", root="scienceqa", question_file="llava_test_CQM-A.json",
                      image_folder="images/test", split="test", single_pred_prompt=True),
    "vqav2": dict(kind="vqav2", root="vqa", question_file="llava_vqa_shapes.jsonl", image_folder="images",
                  annotation_file="annotations.json"),
    "textvqa": dict(kind="textvqa", root="vqa", question_file="llava_textvqa_shapes.jsonl", image_folder="images",
                    annotation_file="textvqa_val.json"),
}


def _benchmarks(table) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({name: dict(spec) for name, spec in table.items()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # A train.py workdir or a converted Hugging Face directory; unset = random init from c.model (smoke tests).
    c.checkpoint = ml_collections.config_dict.placeholder(str)
    c.tokenizer_dir = ml_collections.config_dict.placeholder(str)
    c.template = "llama"
    c.dtype = "float32"
    # Image normalisation for Hugging Face directories without preprocessor_config.json (SigLIP's).
    c.image_mean = (0.5, 0.5, 0.5)
    c.image_std = (0.5, 0.5, 0.5)
    # Quantizer settings for Hugging Face / random models (a train.py workdir brings its own).
    c.quantizer = ml_collections.ConfigDict(dict(
        levels=4, scaling="batch", bound="linear", dist_weight=0.25, clip_sigma=3.0, ema_momentum=0.99))
    c.model = common.demo_model()  # only read without a checkpoint
    c.levels = 0  # evaluate at this L instead of the trained one (0: as trained)

    c.benchmark_dir = ml_collections.config_dict.placeholder(str)
    c.benchmarks = _benchmarks(LLAVA_BENCHMARKS)
    c.shapes_benchmarks = ml_collections.ConfigDict(dict(
        enabled=False, seed=0, image_size=64, n_mme=30, n_pope=50, n_scienceqa=200, n_vqa=200))

    # 'kv_cache': the paper (only the prompt is quantized); 'requantized': generated tokens go through the
    # quantizers too (models trained from scratch through them, like the demo; qtl_jax/eval/requantized.py).
    c.generation = "kv_cache"
    c.batch_size = 1
    c.max_new_tokens = 128
    c.max_examples = 0  # per benchmark; 0 = every question
    c.progress = True

    c.sweep = ml_collections.ConfigDict(dict(
        enabled=False, levels=(2, 4, 8, 16, 32), baseline=True, bytes_samples=16, selection_max_samples=200_000))

    # --- Scoring answer files without a model (issue 15) ---------------------------------------------
    # score_only=True: no model is loaded; <answers_dir>/<benchmark>.jsonl (LLaVA's model_vqa_loader answer
    # lines: question_id, prompt, text, ...; e.g. a previous <workdir>/answers, or the official PyTorch
    # scripts' answer files renamed to the benchmark names) are scored against benchmark_dir's files.
    c.score_only = False
    c.answers_dir = ml_collections.config_dict.placeholder(str)

    if arg in ("demo", "tiny"):
        c.checkpoint = "/tmp/qtl_demo/stage2"
        c.benchmarks = _benchmarks(SHAPES_BENCHMARKS)
        c.shapes_benchmarks.enabled = True
        c.generation = "requantized"  # the demo model was trained from scratch through the quantizers
        c.batch_size = 16
        c.max_new_tokens = 8
        c.max_examples = 32
        c.sweep.enabled = True
    if arg == "tiny":
        c.checkpoint = None
        c.model = common.demo_model()
        c.model.max_length = 256
        c.model.vision = ml_collections.ConfigDict(dict(
            kind="siglip", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8))
        c.model.llm = ml_collections.ConfigDict(dict(
            family="llama", vocab_size=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
            intermediate_size=64, head_dim=16, tie_word_embeddings=True))
        c.shapes_benchmarks.update(dict(image_size=32, n_mme=2, n_pope=2, n_scienceqa=6, n_vqa=4))
        c.max_examples = 0
        c.max_new_tokens = 3
        c.batch_size = 8
        c.progress = False
        c.sweep.levels = (2, 4)
        c.sweep.bytes_samples = 3
    elif arg not in (None, "", "demo"):
        raise ValueError(f"unknown config variant {arg!r}; use configs/eval.py, :demo or :tiny")
    return c
