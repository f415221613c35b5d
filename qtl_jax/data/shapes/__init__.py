"""The built-in "shapes" vision-language corpus: procedural scenes, captions, instructions and benchmarks.

This machine (and CI) cannot download LLaVA data, so the demo model trains on scenes drawn here. One
module per concern, each importing only the ones listed before it:

* ``scene``: the scene vocabulary, :class:`ShapesConfig`, random scenes and their rendering;
* ``text``: caption/question/answer templates and LLaVA conversations about a scene;
* ``samples``: sample addresses ``(seed, stream, index)``, their random streams and LLaVA records;
* ``benchmarks``: held-out MME / POPE / ScienceQA / VQA files in the official kits' layouts;
* ``corpus``: :func:`write_corpus`, the training files plus the benchmarks;
* ``tokenizer``: the word-level tokenizer covering every word ``text`` and ``benchmarks`` can emit;
* ``preview`` (a picture of samples) and ``cli`` (``python -m qtl_jax.data.shapes --out=DIR``).

The names below are the corpus API other packages use; everything else is imported from its module.
"""

from qtl_jax.data.shapes.corpus import write_corpus
from qtl_jax.data.shapes.samples import (STREAMS, Sample, instruct_sample, parse_probe_formats, pretrain_sample,
                                         scene_and_image)
from qtl_jax.data.shapes.scene import Scene, ShapeObject, ShapesConfig
from qtl_jax.data.shapes.text import PROBE_FORMATS

__all__ = ["PROBE_FORMATS", "STREAMS", "Sample", "Scene", "ShapeObject", "ShapesConfig", "instruct_sample",
           "parse_probe_formats", "pretrain_sample", "scene_and_image", "write_corpus"]
