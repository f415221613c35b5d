"""A picture of the shapes corpus: a grid of instruction samples with their caption and first exchange."""

from __future__ import annotations

import os
import textwrap

import numpy as np

from qtl_jax.data.shapes.samples import instruct_sample
from qtl_jax.data.shapes.scene import ShapesConfig
from qtl_jax.data.shapes.text import IMAGE_TOKEN, caption


def preview_grid(path: str, *, seed: int = 0, n: int = 8, cfg: ShapesConfig = ShapesConfig(),
                 columns: int = 4) -> None:
    """Saves a PNG of ``n`` instruction samples (image, caption, first QA) to look at what the corpus is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 5.2 * rows))
    shown, index = 0, 0
    for ax in np.asarray(axes).reshape(-1):
        ax.axis("off")
    while shown < n:
        sample = instruct_sample(seed, index, cfg)
        index += 1
        if sample.image is None:
            continue
        # A caption of the same scene, so the picture shows both training stages' text.
        cap = caption(sample.scene, np.random.default_rng([seed, index]))
        ax = np.asarray(axes).reshape(-1)[shown]
        ax.imshow(sample.image, interpolation="nearest")
        conv = sample.record["conversations"]
        q = conv[0]["value"].replace(IMAGE_TOKEN, "").strip().replace("\n", " ")
        text = (textwrap.fill("caption: " + cap, 44) + "\n" + textwrap.fill("Q: " + q, 44) + "\n"
                + textwrap.fill("A: " + conv[1]["value"], 44))
        ax.set_title(sample.record["id"], fontsize=8)
        ax.text(0, 1.02 * cfg.image_size, text, fontsize=6.5, va="top", ha="left", family="monospace",
                transform=ax.transData)
        shown += 1
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
