"""What an experiment's models train and are evaluated on: datasets, tokenizer and benchmark files.

Both presets end in the same :class:`Inputs`, so everything after this module runs one code path:

* ``paper``: the ``paths`` section names existing local directories (TFDS datasets built by
  ``python -m qtl_jax.data.llava_tfds``, the component checkpoints, the tokenizer, LLaVA's
  ``playground/data/eval``). :func:`check_paths` reports the first missing one, with the key to set,
  before anything slow runs.
* ``builtin`` (and its ``half`` / ``tiny`` sizes): :func:`prepare_builtin` writes the shapes corpus as
  LLaVA JSON + PNG, builds both training splits through the ordinary LLaVA TFDS builder, writes the
  five benchmarks in their official layouts and saves the word-level tokenizer. With ``blank=True`` it
  writes the same corpus and benchmarks again with every image a flat grey (``ShapesConfig.blank``: the
  scenes and every word stay the same), the inputs of the image-blind control.

Layout (built-in)::

    <data>/tokenizer/
    <data>/<variant>/corpus/          pretrain.json, instruct.json, images/    (variant: images | blank)
    <data>/<variant>/corpus_probes/   instruct.json, images/   (with a curriculum: probe-only stage 2)
    <data>/images/corpus_pretrain_probes/   the same for the pretraining's probe phase, where its formats differ
    <data>/images/corpus_pretrain_probes2/  the same for the pretraining's second probe phase (if it has one)
    <data>/<variant>/tfds/llava_json/shapes_<variant>_{pretrain,instruct[,probes][,pretrain_probes][,pretrain_probes2]}/1.0.0/
    <data>/<variant>/benchmarks/      mme/ pope/ scienceqa/ vqa/
    <data>/inputs.json                the settings they were written with (a rerun with the same ones reuses them)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

PATH_KEYS = ("vision_dir", "llm_dir", "tokenizer_dir", "stage1_data", "stage2_data", "benchmark_dir")
_PATH_HELP = {
    "vision_dir": "the SigLIP checkpoint directory (safetensors + config.json)",
    "llm_dir": "the OpenELM checkpoint directory",
    "tokenizer_dir": "the tokenizer files (the Llama-2 tokenizer)",
    "stage1_data": "the stage-1 dataset (llava_json/<name>/1.0.0 built by python -m qtl_jax.data.llava_tfds)",
    "stage2_data": "the stage-2 dataset (llava_json/<name>/1.0.0 built by python -m qtl_jax.data.llava_tfds)",
    "benchmark_dir": "LLaVA's playground/data/eval folder",
}
MARKER = "inputs.json"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Datasets, tokenizer and benchmark folder of one set of models (images, or blanked images)."""

    stage1_data: str
    stage2_data: str
    tokenizer_dir: str
    benchmark_dir: str
    vision_dir: str | None = None  # paper: component checkpoints; built-in: None (random init)
    llm_dir: str | None = None
    probe_data: str | None = None  # built-in with a curriculum: the probe-only stage-2 dataset
    pretrain_probe_data: str | None = None  # the pretraining's probe-only dataset where it is another one
    pretrain_probe2_data: str | None = None  # the pretraining's second probe phase (other formats)


def check_paths(paths: Mapping[str, Any]) -> Inputs:
    """The ``paper`` inputs from ``paths``; the first unset or missing one is a FileNotFoundError naming its key."""
    for key in PATH_KEYS:
        value = paths.get(key)
        if not value:
            raise FileNotFoundError(f"figure3 (paper): paths.{key} is not set; pass --config.paths.{key}=/local/dir "
                                    f"({_PATH_HELP[key]}).")
        if not os.path.isdir(value):
            raise FileNotFoundError(f"figure3 (paper): paths.{key}={value!r} is not a directory ({_PATH_HELP[key]}).")
    return Inputs(paths["stage1_data"], paths["stage2_data"], paths["tokenizer_dir"], paths["benchmark_dir"],
                  paths["vision_dir"], paths["llm_dir"])


def _variant(data_dir: str, variant: str, corpus: Mapping[str, Any], image_size: int,
             probes: Mapping[str, Any] | None, pretrain_probes: Mapping[str, Any] | None,
             pretrain_probes2: Mapping[str, Any] | None, workers: int) -> Inputs:
    from qtl_jax.data import llava_tfds
    from qtl_jax.data.shapes import ShapesConfig, write_corpus
    from qtl_jax.data.shapes.benchmarks import write_benchmarks
    from qtl_jax.data.shapes.samples import parse_probe_formats

    root = os.path.join(data_dir, variant)
    cfg = ShapesConfig(image_size=image_size, blank=variant == "blank")
    corpus_dir = os.path.join(root, "corpus")
    write_corpus(corpus_dir, seed=int(corpus["seed"]), n_pretrain=int(corpus["n_pretrain"]),
                 n_instruct=int(corpus["n_instruct"]), image_size=image_size, cfg=cfg,
                 text_only_fraction=float(corpus["text_only_fraction"]),
                 probe_fraction=float(corpus.get("probe_fraction", 0.0)),
                 probe_turns=int(corpus.get("probe_turns", 1)),
                 probe_formats=parse_probe_formats(str(corpus.get("probe_formats", ""))), benchmarks=False,
                 with_scenes=False, workers=workers)
    built = {}
    for split in ("pretrain", "instruct"):
        # The generated corpus has no bad row: any skip is a bug, so none is allowed.
        built[split] = llava_tfds.build(os.path.join(root, "tfds"), f"shapes_{variant}_{split}",
                                        {"train": [os.path.join(corpus_dir, f"{split}.json")]},
                                        image_root=os.path.join(corpus_dir, "images"), kind=split, max_bad_rows=0,
                                        max_bad_fraction=0.0, num_workers=workers)
    # The pretraining (16-bit, never blind) has its own probe corpus only where its formats differ.
    wanted = {"probes": probes, "pretrain_probes": pretrain_probes if variant == "images" else None,
              "pretrain_probes2": pretrain_probes2 if variant == "images" else None}
    for name, spec in wanted.items():
        if not spec:
            continue
        # The same seed, so the same stage-2 images as the mix, each with probe questions only.
        probe_dir = os.path.join(root, f"corpus_{name}")
        write_corpus(probe_dir, seed=int(corpus["seed"]), n_pretrain=0, n_instruct=int(spec["n_instruct"]),
                     image_size=image_size, cfg=cfg, text_only_fraction=float(corpus["text_only_fraction"]),
                     probe_fraction=float(spec["probe_fraction"]), probe_turns=int(spec["probe_turns"]),
                     probe_formats=parse_probe_formats(str(spec["probe_formats"])), benchmarks=False,
                     with_scenes=False, workers=workers)
        built[name] = llava_tfds.build(os.path.join(root, "tfds"), f"shapes_{variant}_{name}",
                                       {"train": [os.path.join(probe_dir, "instruct.json")]},
                                       image_root=os.path.join(probe_dir, "images"), kind="instruct",
                                       max_bad_rows=0, max_bad_fraction=0.0, num_workers=workers)
    bench = os.path.join(root, "benchmarks")
    write_benchmarks(bench, seed=int(corpus["seed"]), cfg=cfg, n_mme=int(corpus["n_mme"]), n_pope=int(corpus["n_pope"]),
                     n_scienceqa=int(corpus["n_scienceqa"]), n_vqa=int(corpus["n_vqa"]))
    return Inputs(built["pretrain"], built["instruct"], os.path.join(data_dir, "tokenizer"), bench,
                  probe_data=built.get("probes"), pretrain_probe_data=built.get("pretrain_probes"),
                  pretrain_probe2_data=built.get("pretrain_probes2"))


def prepare_builtin(data_dir: str, corpus: Mapping[str, Any], image_size: int, blank: bool,
                    probes: Mapping[str, Any] | None = None,
                    pretrain_probes: Mapping[str, Any] | None = None,
                    pretrain_probes2: Mapping[str, Any] | None = None, workers: int = 1) -> dict[str, Inputs]:
    """``{'images': Inputs, 'blank': Inputs}`` (``blank`` only if asked) for the built-in corpus, written once.

    ``probes`` (``n_instruct``, ``probe_fraction``, ``probe_turns``, ``probe_formats``; None: none) adds a
    second stage-2 dataset from the same images, ``Inputs.probe_data`` (a curriculum's first phase);
    ``pretrain_probes`` (the same keys) a third, ``Inputs.pretrain_probe_data`` (images variant only), for a
    pretraining whose probe phase asks other questions; ``pretrain_probes2`` a fourth,
    ``Inputs.pretrain_probe2_data``, for the pretraining's second probe phase. ``workers`` processes render
    the images and threads check them (``write_corpus``: the files do not depend on it).

    A rerun with the same settings (or without ``blank`` where the files have it) finds ``inputs.json`` and
    reuses the files; other settings need an empty ``data_dir`` (ValueError), so models are never trained on
    a mix of two corpora.
    """
    from qtl_jax.data.shapes.tokenizer import build_shapes_tokenizer

    settings = {"corpus": dict(corpus), "image_size": int(image_size), "blank": bool(blank),
                "probes": dict(probes) if probes else None,
                "pretrain_probes": dict(pretrain_probes) if pretrain_probes else None,
                "pretrain_probes2": dict(pretrain_probes2) if pretrain_probes2 else None}
    marker = os.path.join(data_dir, MARKER)
    variants = ("images", "blank") if blank else ("images",)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        # A corpus written with its blank twin also serves a run without the blind control.
        done["settings"].setdefault("probes", None)  # written before the curriculum existed
        done["settings"].setdefault("pretrain_probes", None)  # written before the pretraining had its own
        done["settings"].setdefault("pretrain_probes2", None)  # written before its second probe phase existed
        done["settings"]["corpus"].setdefault("probe_formats", "")  # written before the mix's were a setting
        same = {k: v for k, v in done["settings"].items() if k != "blank"} == \
            {k: v for k, v in settings.items() if k != "blank"}
        if not same or (blank and not done["settings"]["blank"]):
            raise ValueError(f"{data_dir} holds a corpus written with other settings ({done['settings']}); use a new "
                             f"--workdir, or delete {data_dir} to write the corpus for {settings}.")
        return {v: Inputs(**done["inputs"][v]) for v in variants}
    os.makedirs(data_dir, exist_ok=True)
    build_shapes_tokenizer(os.path.join(data_dir, "tokenizer"))
    out = {v: _variant(data_dir, v, corpus, image_size, probes, pretrain_probes, pretrain_probes2, workers)
           for v in variants}
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "inputs": {v: dataclasses.asdict(i) for v, i in out.items()}}, f, indent=1)
    return out
