r"""Evaluation: the paper's benchmarks on local files in the LLaVA / TinyLLaVA eval-kit layout.

    python eval.py --config=configs/eval.py --workdir=/runs/eval \
        --config.checkpoint=/runs/stage2 --config.benchmark_dir=/data/llava_eval

The paper's setting (method.md §6): greedy decoding, one question at a time (batch_size=1: with the paper's
scaling='batch' quantizer the scaling statistics come from the one example), the ``llama`` template.
``benchmark_dir`` holds LLaVA's ``playground/data/eval`` folders (MME, pope, scienceqa, textvqa, vqav2, gqa,
mm-vet, MMMU); each benchmark's files are configurable under ``--config.benchmarks.<name>.*``. Presets::

    python eval.py --config=configs/eval.py:demo --workdir=/tmp/qtl_demo/eval
    python eval.py --config=configs/eval.py:tiny --workdir=/tmp/qtl_tiny/eval
    python eval.py --config=configs/eval.py:paper_random --workdir=/tmp/qtl_paper/eval

``demo``: the stage-2 demo model (``/tmp/qtl_demo/stage2``, from ``configs/stage2.py:demo``) on the
built-in shapes benchmarks (MME, POPE, ScienceQA-IMG, VQAv2, TextVQA layouts; 32 questions each, generated
tokens re-quantized as the from-scratch demo model was trained), then the bits sweep L = 2..32 + the 16-bit
baseline. ``tiny``: the same path with a random tiny model (tests). ``paper_random``: the paper's shapes
with random weights on a few shapes questions at 384 px (cost, not scores). Measured results are in
docs/evaluation.md and README.md.
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


def _demo(c: ml_collections.ConfigDict) -> None:
    c.checkpoint = "/tmp/qtl_demo/stage2"
    c.benchmarks = _benchmarks(SHAPES_BENCHMARKS)
    c.shapes_benchmarks.enabled = True
    c.generation = "requantized"  # the demo model was trained from scratch through the quantizers
    c.batch_size = 16
    c.max_new_tokens = 8
    c.max_examples = 32
    c.sweep.enabled = True


def _tiny(c: ml_collections.ConfigDict) -> None:
    _demo(c)
    c.checkpoint = None
    c.model = common.tiny_model()
    c.model.max_length = 256  # prompts of the shapes benchmarks plus the answer
    c.shapes_benchmarks.update(dict(image_size=32, n_mme=2, n_pope=2, n_scienceqa=6, n_vqa=4))
    c.max_examples = 0
    c.max_new_tokens = 3
    c.batch_size = 8
    c.progress = False
    c.sweep.levels = (2, 4)
    c.sweep.bytes_samples = 3


def _paper_random(c: ml_collections.ConfigDict) -> None:
    # The paper's decoding (kv_cache, one question at a time) at its shapes, with random weights.
    c.model = common.paper_model()
    c.model.source = "random"
    c.benchmarks = _benchmarks(SHAPES_BENCHMARKS)
    c.shapes_benchmarks.update(dict(enabled=True, image_size=384, n_mme=1, n_pope=3, n_scienceqa=4, n_vqa=2))
    c.max_examples = 4
    c.max_new_tokens = 8


PRESETS = {"demo": _demo, "tiny": _tiny, "paper_random": _paper_random}


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
    c.quantizer = common.paper_quantizer()
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

    return common.apply_preset(c, arg, PRESETS)
