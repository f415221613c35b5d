r"""Stage 2 (visual instruction tuning): connector + quantizers + the full LLM train; tower frozen.

    python train.py --config=configs/stage2.py --workdir=/runs/stage2 \
        --config.init.from_workdir=/runs/stage1 \
        --config.data.dataset_dir=$TFDS/llava_json/llava_mix665k/1.0.0 \
        --config.eval.dataset_dir=$TFDS/llava_json/<held-out>/1.0.0

The paper's recipe (method.md §5.1): LLaVA-1.5 mix-665k with the ``llama`` template, initialised from the
stage-1 checkpoint, AdamW lr 2e-5, no weight decay, 3% warmup then cosine, global batch 16, 1 epoch. From
a converted Hugging Face checkpoint (TinyLLaVA Factory / llava-hf / official Quantized-TinyLLaVA layouts;
the latter's quantizer projections are loaded too) pass ``--config.init.checkpoint=/ckpt/dir`` instead of
``init.from_workdir``. Presets (``configs/common.py``)::

    python train.py --config=configs/stage2.py:demo --workdir=/tmp/qtl_demo/stage2
    python train.py --config=configs/stage2.py:tiny --workdir=/tmp/qtl_tiny/stage2
    python train.py --config=configs/stage2.py:paper_random --workdir=/tmp/qtl_paper/stage2 \
        --config.init.from_workdir=/tmp/qtl_paper/stage1

``demo`` continues the stage-1 demo (``init.from_workdir`` defaults to ``/tmp/qtl_demo/stage1``) on shapes
instructions, then evaluates answer exact match on held-out questions. ``paper_random`` starts from random
weights unless ``init.from_workdir`` names a stage-1 run. Measured results are in docs/training.md and
README.md.
"""

import ml_collections

from configs import common


def _demo(c: ml_collections.ConfigDict) -> None:
    c.init.from_workdir = "/tmp/qtl_demo/stage1"
    c.optimizer.lr = 2e-3
    c.total_steps = 300


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.stage = 2
    c.data.template = c.eval.template = "llama"
    c.data.shapes.stream = c.eval.shapes_stream = "instruct"
    c.optimizer.param_groups = common.STAGE2_GROUPS
    c.optimizer.lr = 2e-5
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_ratio = 0.03
    c.global_batch_size = 16
    return common.apply_preset(c, arg, common.train_presets(demo=_demo))
