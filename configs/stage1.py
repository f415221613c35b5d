r"""Stage 1 (feature alignment): connector + both quantizers train; vision tower and LLM frozen.

    python train.py --config=configs/stage1.py --workdir=/runs/stage1 \
        --config.model.vision_dir=/ckpt/siglip-so400m-patch14-384 \
        --config.model.llm_dir=/ckpt/OpenELM-270M-Instruct \
        --config.model.tokenizer_dir=/ckpt/llama-2-tokenizer \
        --config.data.dataset_dir=$TFDS/llava_json/llava_pretrain/1.0.0 \
        --config.eval.dataset_dir=$TFDS/llava_json/<held-out>/1.0.0

The paper's recipe (method.md §5.1): LLaVA-Pretrain captions with the ``pretrain`` template, AdamW lr 5e-4,
weight decay 0.1 (not on biases/norms), 2% warmup then cosine, global batch 64, 1 epoch, L=4 levels for
both modalities, OpenELM-270M-Instruct + SigLIP-so400m, max length 2048. A missing path stops with an
error naming the option to set. Presets (``configs/common.py``)::

    python train.py --config=configs/stage1.py:demo --workdir=/tmp/qtl_demo/stage1
    python train.py --config=configs/stage1.py:tiny --workdir=/tmp/qtl_tiny/stage1
    python train.py --config=configs/stage1.py:paper_random --workdir=/tmp/qtl_paper/stage1

``demo`` trains a tiny model from random initialisation on the built-in shapes corpus (captions), prepared
on the fly under ``<workdir>/data``; because nothing is pretrained it also trains the vision tower and the
LLM. Measured results are in docs/training.md and README.md.
"""

import ml_collections

from configs import common


def _demo(c: ml_collections.ConfigDict) -> None:
    # Random init: a higher learning rate, little decay and a longer warmup; 150 steps of 32.
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_ratio = 0.05
    c.total_steps = 150


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # The skeleton's defaults are this stage's paper recipe.
    return common.apply_preset(common.base_config(), arg, common.train_presets(demo=_demo))
