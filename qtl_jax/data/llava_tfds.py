"""A TFDS builder for LLaVA-format JSON data read from a local folder, without TensorFlow.

LLaVA data is a JSON list of ``{"id", "image" (path relative to an image root, absent for text-only
rows), "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``. Pretrain files
(``blip_laion_cc_sbu_558k.json``) hold one ``<image>`` question and a caption per row; instruction
files (``llava_v1_5_mix665k.json``) hold multi-turn chats, some of them text-only.

The build writes ``array_record`` files (the only TFDS format that needs no TensorFlow) that are read
back with random access through ``tfds.builder_from_directory(...).as_data_source()`` and grain.

Stored features, one example per valid row:

- ``id``: the row's ``id`` as text (``<json stem>-<row index>`` when the row has none).
- ``image``: the image file's bytes. JPEG and PNG files are stored byte-for-byte, so preprocessing
  at training time sees exactly the file a PyTorch LLaVA loader would; other formats (and images
  shrunk by ``max_image_side``) are re-encoded. ``b""`` for a text-only row.
- ``has_image``: whether the row has an image.
- ``image_path``: the path as written in the JSON (``""`` for text-only rows).
- ``conversations``: the turns as one JSON string, ``[{"from": ..., "value": ...}, ...]``. One string
  rather than TFDS sequences because it decodes back to exactly the structure chat templates take,
  with no ragged-array or bytes/str conversions on the way.
- ``source``: ``<json file name>#<row index>``, to find a row in the original file.

Bad rows never stop a build and are never silent: each is skipped with one of ``SKIP_REASONS``,
logged (the first few of each reason with their row and detail), and counted in the dataset's
metadata (``metadata.json`` next to the records, ``builder.info.metadata``). ``max_bad_rows`` and
``max_bad_fraction`` turn a flood of bad rows -- usually a wrong ``image_root`` -- into an error. A row
cannot make the build read a file outside ``image_root``: an absolute ``image``, one whose ``..`` parts
climb out of the root and one that a symlink leads out of it are skipped as ``image_outside_root``.

Each split's JSON files are loaded with ``json.load`` (no streaming JSON parser is installed): the
558k/665k LLaVA files are about 1 GB and take a few GB of RAM while a split is built. Image checks can
run on a thread pool (``num_workers``); output order and content do not depend on it.

Command line::

    python -m qtl_jax.data.llava_tfds --json=blip_laion_cc_sbu_558k.json --image_root=images \\
        --data_dir=~/tensorflow_datasets --name=llava_pretrain --kind=pretrain

An input error (a missing JSON file or image folder, broken JSON, bad settings, too many bad rows)
prints one ``error: ...`` line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import io
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from qtl_jax import cli
from qtl_jax.data.constants import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

DATASET_NAME = "llava_json"
KINDS = ("pretrain", "instruct")
ROLES = ("human", "gpt")

# Why a row was skipped; every reason appears (with its count, possibly 0) in the metadata.
MALFORMED_ROW = "malformed_row"  # not an object, no conversation list, a turn without text fields
EMPTY_CONVERSATION = "empty_conversation"  # no turns, or a turn whose text is blank
UNKNOWN_ROLE = "unknown_role"  # a turn "from" someone other than human/gpt
BAD_TURN_ORDER = "bad_turn_order"  # turns not human, gpt, human, gpt, ..., ending on gpt
MISSING_IMAGE = "missing_image"  # a pretrain row without an "image" key
MISSING_IMAGE_TAG = "missing_image_tag"  # a row with an image but no <image> in a human turn
MULTIPLE_IMAGE_TAGS = "multiple_image_tags"  # more than one <image> in the conversation
UNEXPECTED_IMAGE_TAG = "unexpected_image_tag"  # <image> in a text-only row or in an answer
IMAGE_OUTSIDE_ROOT = "image_outside_root"  # an absolute path, or one that leads out of image_root ('..', symlink)
MISSING_IMAGE_FILE = "missing_image_file"  # the image path does not exist under image_root
CORRUPT_IMAGE = "corrupt_image"  # the file exists but does not decode as an image
SKIP_REASONS = (
    MALFORMED_ROW,
    EMPTY_CONVERSATION,
    UNKNOWN_ROLE,
    BAD_TURN_ORDER,
    MISSING_IMAGE,
    MISSING_IMAGE_TAG,
    MULTIPLE_IMAGE_TAGS,
    UNEXPECTED_IMAGE_TAG,
    IMAGE_OUTSIDE_ROOT,
    MISSING_IMAGE_FILE,
    CORRUPT_IMAGE,
)

# JPEG and PNG are what LLaVA data ships; keeping their bytes keeps preprocessing bit-identical to a
# PyTorch loader opening the same file. Anything else is re-encoded as lossless PNG.
_KEPT_FORMATS = ("JPEG", "PNG")
_JPEG_MODES = ("RGB", "L", "CMYK")
_CHUNK_ROWS = 256  # rows handed to the thread pool at once; bounds memory held in flight


class TooManyBadRowsError(ValueError):
    """The build saw more bad rows than ``max_bad_rows`` / ``max_bad_fraction`` allow."""


@dataclasses.dataclass(eq=False)
class LlavaJsonConfig(tfds.core.BuilderConfig):
    """Where a LLaVA-format dataset lives and how strictly to build it.

    Attributes:
        splits: split name -> JSON files whose rows make up that split.
        image_root: folder the rows' ``image`` paths are relative to.
        kind: ``"pretrain"`` (every row must have exactly one image and one ``<image>``) or
            ``"instruct"`` (text-only rows allowed).
        max_image_side: if set, images whose longer side exceeds it are shrunk (aspect kept, bicubic)
            and re-encoded before storing; ``None`` stores files as they are.
        max_bad_rows: fail a split once more than this many rows were skipped; ``None``: no limit.
        max_bad_fraction: fail a split once skipped rows exceed this fraction of its rows; ``None``:
            no limit. The default catches a wrong ``image_root`` (every image row missing) early.
        num_workers: threads that read, check and re-encode images.
        log_examples: how many skipped rows per reason are logged and kept in the metadata.
    """

    splits: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    image_root: str = ""
    kind: str = "instruct"
    max_image_side: int | None = None
    max_bad_rows: int | None = None
    max_bad_fraction: float | None = 0.5
    num_workers: int = 1
    log_examples: int = 5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}.")
        if not self.splits:
            raise ValueError(
                "splits is empty: pass e.g. splits={'train': ['llava_v1_5_mix665k.json']}."
            )
        for split, paths in self.splits.items():
            if isinstance(paths, str) or not paths:
                raise ValueError(
                    f"splits[{split!r}] must be a non-empty list of JSON paths, got {paths!r}."
                )
        if self.max_image_side is not None and self.max_image_side < 1:
            raise ValueError(f"max_image_side must be >= 1 or None, got {self.max_image_side}.")
        if self.max_bad_rows is not None and self.max_bad_rows < 0:
            raise ValueError(f"max_bad_rows must be >= 0 or None, got {self.max_bad_rows}.")
        if self.max_bad_fraction is not None and not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(
                f"max_bad_fraction must be in [0, 1] or None, got {self.max_bad_fraction}."
            )
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}.")

    def to_json(self) -> dict[str, Any]:
        """The build settings, recorded in the dataset metadata for provenance."""
        return {
            "splits": {k: [os.path.abspath(p) for p in v] for k, v in self.splits.items()},
            "image_root": os.path.abspath(self.image_root) if self.image_root else "",
            "kind": self.kind,
            "max_image_side": self.max_image_side,
            "max_bad_rows": self.max_bad_rows,
            "max_bad_fraction": self.max_bad_fraction,
        }


def check_inputs(config: LlavaJsonConfig) -> None:
    """Raises FileNotFoundError for a missing JSON file or image_root, before anything is built."""
    for paths in config.splits.values():
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"LLaVA JSON file {path!r} does not exist; check the split's json paths.")
    if config.image_root and not os.path.isdir(config.image_root):
        raise FileNotFoundError(
            f"image_root {config.image_root!r} is not a directory; point it at the folder the "
            "rows' 'image' paths are relative to."
        )


@dataclasses.dataclass(frozen=True)
class _Skip:
    reason: str
    detail: str


def check_row(row: Any, kind: str) -> _Skip | None:
    """Returns why a parsed JSON row is unusable (ignoring its image file), or None if it is fine.

    Checks run from structural to semantic so each row gets the most basic reason that applies.
    """
    if not isinstance(row, dict):
        return _Skip(MALFORMED_ROW, f"row is a {type(row).__name__}, not an object")
    conv = row.get("conversations")
    if not isinstance(conv, list):
        return _Skip(MALFORMED_ROW, "'conversations' is missing or not a list")
    for i, turn in enumerate(conv):
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("from"), str)
            and isinstance(turn.get("value"), str)
        ):
            return _Skip(MALFORMED_ROW, f"turn {i} is not {{'from': str, 'value': str}}: {turn!r}")
    image = row.get("image")
    if "image" in row and not (isinstance(image, str) and image.strip()):
        return _Skip(MALFORMED_ROW, f"'image' must be a non-empty path string, got {image!r}")
    if not conv:
        return _Skip(EMPTY_CONVERSATION, "no turns")
    for i, turn in enumerate(conv):
        if not turn["value"].strip():
            return _Skip(EMPTY_CONVERSATION, f"turn {i} has blank text")
    for i, turn in enumerate(conv):
        if turn["from"] not in ROLES:
            return _Skip(UNKNOWN_ROLE, f"turn {i} is from {turn['from']!r}, expected one of {ROLES}")
    roles = [turn["from"] for turn in conv]
    expected = [ROLES[i % 2] for i in range(len(conv))]
    if roles != expected or len(conv) % 2:
        return _Skip(BAD_TURN_ORDER, f"roles {roles}; expected human/gpt pairs starting with human")
    has_image = "image" in row
    if kind == "pretrain" and not has_image:
        return _Skip(MISSING_IMAGE, "pretrain rows need an 'image'")
    tags = [turn["value"].count(IMAGE_PLACEHOLDER) for turn in conv]
    if sum(tags) > 1:
        return _Skip(MULTIPLE_IMAGE_TAGS, f"{sum(tags)} {IMAGE_PLACEHOLDER} tags; exactly 1 allowed")
    if any(n for n, role in zip(tags, roles) if role == "gpt"):
        return _Skip(UNEXPECTED_IMAGE_TAG, f"{IMAGE_PLACEHOLDER} in an answer turn")
    if has_image and not sum(tags):
        return _Skip(MISSING_IMAGE_TAG, f"row has an image but no {IMAGE_PLACEHOLDER} tag")
    if not has_image and sum(tags):
        return _Skip(UNEXPECTED_IMAGE_TAG, f"{IMAGE_PLACEHOLDER} tag in a row without an image")
    return None


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image(image_root: str, image: str) -> str | _Skip:
    """The real path of a row's ``image`` under ``image_root``, or why it is refused.

    A row must not make the build read (and store in the dataset) a file outside the image root: an
    absolute path, a path whose ``..`` parts climb out of the root, and a path that a symlink (anywhere
    along it) leads out of the root are all refused. The file is then read through the returned real
    path, so what was checked is what is read.
    """
    if os.path.isabs(image):
        return _Skip(IMAGE_OUTSIDE_ROOT, f"{image!r} is an absolute path; image paths are relative to image_root")
    root = os.path.realpath(image_root or os.curdir)
    joined = os.path.normpath(os.path.join(root, image))
    if not _inside(joined, root):
        return _Skip(IMAGE_OUTSIDE_ROOT, f"{image!r} climbs out of image_root {root} through '..'")
    real = os.path.realpath(joined)
    if not _inside(real, root):
        return _Skip(IMAGE_OUTSIDE_ROOT, f"{image!r} is a symlink (or lies under one) leading to {real}, outside "
                                         f"image_root {root}")
    return real


def load_image_bytes(path: str, max_image_side: int | None) -> bytes | _Skip:
    """Returns the bytes to store for one image file, or why it cannot be used.

    The image is fully decoded here so that truncated or corrupt files are caught at build time rather
    than crashing (or being silently replaced) in the middle of training.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return _Skip(MISSING_IMAGE_FILE, f"{path} does not exist")
    except IsADirectoryError:
        return _Skip(MISSING_IMAGE_FILE, f"{path} is a directory")
    except OSError as e:
        return _Skip(MISSING_IMAGE_FILE, f"{path} cannot be read: {e}")
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode, (w, h) = im.format, im.mode, im.size
            if w < 1 or h < 1:
                return _Skip(CORRUPT_IMAGE, f"{path} has size {w}x{h}")
            too_big = max_image_side is not None and max(w, h) > max_image_side
            if not too_big and fmt in _KEPT_FORMATS:
                return data
            if too_big:
                scale = max_image_side / max(w, h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                im = im.resize(size, PIL.Image.Resampling.BICUBIC)
            out = io.BytesIO()
            if fmt == "JPEG" and mode in _JPEG_MODES:
                im.save(out, format="JPEG", quality=95)
            else:
                im.save(out, format="PNG")
            return out.getvalue()
    except PIL.UnidentifiedImageError:
        return _Skip(CORRUPT_IMAGE, f"{path} is not in an image format PIL can read")
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        # PIL reports unknown formats and truncated data as OSError, some bad headers as
        # SyntaxError/ValueError.
        return _Skip(CORRUPT_IMAGE, f"{path}: {type(e).__name__}: {e}")


def _example(
    row: dict[str, Any], key_source: str, default_id: str, image_root: str, config: LlavaJsonConfig
) -> dict[str, Any] | _Skip:
    skip = check_row(row, config.kind)
    if skip is not None:
        return skip
    image = b""
    if "image" in row:
        path = resolve_image(image_root, row["image"])
        if isinstance(path, _Skip):
            return path
        image = load_image_bytes(path, config.max_image_side)
        if isinstance(image, _Skip):
            return image
    conversations = [{"from": t["from"], "value": t["value"]} for t in row["conversations"]]
    return {
        "id": str(row.get("id", default_id)),
        "image": image,
        "has_image": "image" in row,
        "image_path": row.get("image", ""),
        "conversations": json.dumps(conversations, ensure_ascii=False),
        "source": key_source,
    }


@dataclasses.dataclass
class SplitReport:
    """What a split's build did with its rows; stored in the dataset metadata."""

    json_files: list[str]
    rows: int = 0
    examples: int = 0
    skipped: dict[str, int] = dataclasses.field(
        default_factory=lambda: {reason: 0 for reason in SKIP_REASONS}
    )
    skipped_examples: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "json_files": self.json_files,
            "rows": self.rows,
            "examples": self.examples,
            "skipped_total": self.num_skipped,
            "skipped": dict(self.skipped),
            "skipped_examples": {k: list(v) for k, v in self.skipped_examples.items() if v},
        }


class LlavaJson(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """LLaVA JSON + image folder -> TFDS ``array_record`` dataset. Build with a ``LlavaJsonConfig``.

    Registration is skipped so that ``tfds.builder('llava_json/...')`` never tries to instantiate
    this class for a config it does not know; built datasets are opened from their directory.
    """

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "LLaVA JSON rows with original image bytes and counted skips."}
    # Nothing is downloaded, so there is no checksums file to find next to the code; TFDS's search
    # for one imports `importlib_resources`, which is not installed, when the builder is in a package.
    code_path = None

    def __init__(self, *, config: LlavaJsonConfig, **kwargs):
        if not isinstance(config, LlavaJsonConfig):
            raise TypeError(f"config must be a LlavaJsonConfig, got {type(config).__name__}.")
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self) rather than dataset_info_from_configs: the latter needs the
        # builder to live in a TFDS-layout package.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "LLaVA-format conversations with their image bytes, built from local JSON files."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "has_image": tfds.features.Scalar(dtype=np.bool_),
                    "image_path": tfds.features.Text(),
                    "conversations": tfds.features.Text(),
                    "source": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        config: LlavaJsonConfig = self.builder_config
        check_inputs(config)
        self.info.metadata["config"] = config.to_json()
        self.info.metadata["skip_reasons"] = list(SKIP_REASONS)
        self.info.metadata.setdefault("splits", {})
        return {split: self._generate_examples(split, list(paths)) for split, paths in config.splits.items()}

    def _generate_examples(self, split: str, paths: list[str]) -> Iterator[tuple[str, dict]]:
        config: LlavaJsonConfig = self.builder_config
        files = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON ({e}); expected a LLaVA JSON list.")
            if not isinstance(rows, list):
                raise ValueError(f"{path} holds a {type(rows).__name__}; expected a JSON list of rows.")
            files.append((path, rows))
        report = SplitReport(json_files=[os.path.abspath(p) for p in paths])
        total = sum(len(rows) for _, rows in files)

        def jobs():
            for file_index, (path, rows) in enumerate(files):
                name, stem = os.path.basename(path), os.path.splitext(os.path.basename(path))[0]
                for row_index, row in enumerate(rows):
                    yield f"{file_index}:{row_index}", f"{name}#{row_index}", f"{stem}-{row_index}", row

        def run(job):
            key, where, default_id, row = job
            return key, where, _example(row, where, default_id, config.image_root, config)

        pool = (
            concurrent.futures.ThreadPoolExecutor(config.num_workers)
            if config.num_workers > 1
            else None
        )
        try:
            job_iter = jobs()
            while chunk := list(itertools.islice(job_iter, _CHUNK_ROWS)):
                results = pool.map(run, chunk) if pool else map(run, chunk)
                for key, where, result in results:
                    report.rows += 1
                    if isinstance(result, _Skip):
                        self._count_skip(report, split, where, result, total)
                        continue
                    report.examples += 1
                    yield key, result
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
        if report.examples == 0:
            raise TooManyBadRowsError(
                f"split {split!r}: none of its {report.rows} rows is usable "
                f"({_summary(report.skipped)}); first problems: {dict(report.skipped_examples)}."
            )
        if report.num_skipped:
            logger.warning(
                "split %r: kept %d of %d rows, skipped %d (%s)",
                split, report.examples, report.rows, report.num_skipped, _summary(report.skipped),
            )
        else:
            logger.info("split %r: kept all %d rows", split, report.rows)
        self.info.metadata["splits"][split] = report.to_json()

    def _count_skip(self, report: SplitReport, split: str, where: str, skip: _Skip, total: int):
        report.skipped[skip.reason] += 1
        n = report.skipped[skip.reason]
        if n <= self.builder_config.log_examples:
            report.skipped_examples[skip.reason].append(f"{where}: {skip.detail}")
            logger.warning("split %r: skipping %s (%s): %s", split, where, skip.reason, skip.detail)
        config: LlavaJsonConfig = self.builder_config
        bad = report.num_skipped
        too_many = []
        if config.max_bad_rows is not None and bad > config.max_bad_rows:
            too_many.append(f"more than max_bad_rows={config.max_bad_rows}")
        if config.max_bad_fraction is not None and bad > config.max_bad_fraction * total:
            too_many.append(
                f"more than max_bad_fraction={config.max_bad_fraction} of the split's {total} rows"
            )
        if too_many:
            raise TooManyBadRowsError(
                f"split {split!r}: {bad} bad rows after reading {report.rows} of {total}, "
                f"{' and '.join(too_many)} ({_summary(report.skipped)}). First problems: "
                f"{dict(report.skipped_examples)}. Fix the data or image_root, or raise the limit."
            )


def _summary(skipped: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "none"


def build(
    data_dir: str,
    name: str,
    splits: Mapping[str, Sequence[str]],
    *,
    image_root: str = "",
    kind: str = "instruct",
    max_image_side: int | None = None,
    max_bad_rows: int | None = None,
    max_bad_fraction: float | None = 0.5,
    num_workers: int = 1,
) -> str:
    """Builds (or reuses) a LLaVA dataset under ``data_dir`` and returns its directory.

    The returned directory, ``<data_dir>/llava_json/<name>/1.0.0``, is what ``open_split`` and the
    input pipeline take. An existing build of the same ``name`` and settings is reused as is; one with
    other settings is an error (delete the directory to rebuild).
    """
    config = LlavaJsonConfig(
        name=name,
        splits=splits,
        image_root=image_root,
        kind=kind,
        max_image_side=max_image_side,
        max_bad_rows=max_bad_rows,
        max_bad_fraction=max_bad_fraction,
        num_workers=num_workers,
    )
    check_inputs(config)
    builder = LlavaJson(config=config, data_dir=os.path.expanduser(data_dir))
    existing = os.path.join(builder.data_dir, "metadata.json")
    if os.path.isfile(existing):
        with open(existing, encoding="utf-8") as f:
            before = json.load(f).get("config")
        if before != config.to_json():
            raise ValueError(
                f"a dataset named {name!r} already exists at {builder.data_dir}, built with other "
                f"settings ({before}); choose another name or delete that directory to rebuild."
            )
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)


def prepare_shapes_tfds(
    data_dir: str,
    *,
    seed: int = 0,
    n_pretrain: int = 2000,
    n_instruct: int = 2000,
    image_size: int = 64,
    text_only_fraction: float = 0.1,
    probe_fraction: float = 0.0,
    probe_turns: int = 1,
    probe_formats: str = "",
    blank: bool = False,
    corpus_dir: str | None = None,
    num_workers: int = 1,
) -> dict[str, str]:
    """Writes the built-in shapes corpus as LLaVA JSON + PNGs and builds it with this builder.

    Going through the files (rather than generating records in memory) runs the demo on exactly the
    code path real LLaVA data takes. Both builds use the strictest limits (``max_bad_rows=0``): the
    generated corpus has no bad rows, so any skip is a bug.

    Args:
        data_dir: TFDS data directory to build into.
        seed, n_pretrain, n_instruct, image_size, text_only_fraction, probe_fraction, probe_turns, probe_formats
            (comma-separated, '' for the default mix): the corpus
            (``qtl_jax.data.shapes.write_corpus``); they are part of the dataset names, so different
            corpora never reuse each other's build.
        blank: every image flat grey (``ShapesConfig.blank``), the text unchanged: the image-blind
            control's corpus (``_blank`` in both names).
        corpus_dir: where the JSON and images go; default ``<data_dir>/downloads/<pretrain name>``.
        num_workers: image-checking threads of the build.

    Returns:
        ``{"pretrain": dataset_dir, "instruct": dataset_dir}``, the directories to open.
    """
    from qtl_jax.data import shapes

    formats = shapes.parse_probe_formats(probe_formats)
    tag = f"s{seed}_{image_size}px" + ("_blank" if blank else "")
    names = {
        "pretrain": f"shapes_pretrain_{tag}_n{n_pretrain}",
        "instruct": f"shapes_instruct_{tag}_n{n_instruct}_text{round(100 * text_only_fraction)}pct"
                    + (f"_probe{round(100 * probe_fraction)}pct" if probe_fraction else "")
                    + (f"x{probe_turns}" if probe_fraction and probe_turns != 1 else "")
                    + (f"_{'-'.join(formats)}" if probe_fraction and formats != shapes.PROBE_FORMATS else ""),
    }
    out = {k: os.path.join(data_dir, DATASET_NAME, v, "1.0.0") for k, v in names.items()}
    # The pretrain stream depends only on its own name's settings: a stage 2 with other instruct settings
    # (probes, text-only share) in the same data_dir reuses stage 1's pretrain build instead of rebuilding
    # it from another corpus folder (which the builder refuses as a name clash).
    missing = {k: n for k, n in names.items() if not os.path.isfile(os.path.join(out[k], "dataset_info.json"))}
    if not missing:
        return out
    corpus_dir = corpus_dir or os.path.join(data_dir, "downloads", f"{names['pretrain']}_{names['instruct']}")
    shapes.write_corpus(
        corpus_dir,
        seed=seed,
        n_pretrain=n_pretrain,
        n_instruct=n_instruct,
        image_size=image_size,
        cfg=shapes.ShapesConfig(image_size=image_size, blank=blank),
        text_only_fraction=text_only_fraction,
        probe_fraction=probe_fraction,
        probe_turns=probe_turns,
        probe_formats=formats,
        benchmarks=False,
    )
    for kind, name in missing.items():
        out[kind] = build(
            data_dir,
            name,
            {"train": [os.path.join(corpus_dir, f"{kind}.json")]},
            image_root=os.path.join(corpus_dir, "images"),
            kind=kind,
            max_bad_rows=0,
            max_bad_fraction=0.0,
            num_workers=num_workers,
        )
    return out


def open_split(dataset_dir: str, split: str):
    """Returns a random-access data source (``len`` and ``[i]``) over one split of a built dataset."""
    if not os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
        raise FileNotFoundError(
            f"{dataset_dir!r} is not a built TFDS dataset directory (no dataset_info.json); pass the "
            "directory that `build` / the CLI printed, e.g. <data_dir>/llava_json/<name>/1.0.0."
        )
    builder = tfds.builder_from_directory(dataset_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"split {split!r} not in {dataset_dir}; it has {sorted(builder.info.splits.keys())}."
        )
    return builder.as_data_source(split=split)


def read_metadata(dataset_dir: str) -> dict[str, Any]:
    """The build's metadata: settings, and per split the row/example counts and skips by reason."""
    with open(os.path.join(dataset_dir, "metadata.json"), encoding="utf-8") as f:
        return json.load(f)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored record with text fields as ``str`` and ``conversations`` as a list of turns."""

    def text(v):
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    return {
        "id": text(record["id"]),
        "image": bytes(record["image"]),
        "has_image": bool(record["has_image"]),
        "image_path": text(record["image_path"]),
        "conversations": json.loads(text(record["conversations"])),
        "source": text(record["source"]),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qtl_jax.data.llava_tfds",
        description="Build a LLaVA-format JSON + image folder into a TFDS array_record dataset.",
    )
    parser.add_argument("--json", action="append", required=True, help="LLaVA JSON file (repeatable)")
    parser.add_argument("--image_root", default="", help="folder the rows' image paths are relative to")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--name", required=True, help="dataset config name, e.g. llava_pretrain")
    parser.add_argument("--split", default="train", help="split the JSON files form (default: train)")
    parser.add_argument("--kind", choices=KINDS, default="instruct")
    parser.add_argument("--max_image_side", type=int, default=None)
    parser.add_argument("--max_bad_rows", type=int, default=None)
    parser.add_argument(
        "--max_bad_fraction", type=float, default=0.5, help="fail above this fraction; -1: no limit"
    )
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = build(
            args.data_dir,
            args.name,
            {args.split: args.json},
            image_root=args.image_root,
            kind=args.kind,
            max_image_side=args.max_image_side,
            max_bad_rows=args.max_bad_rows,
            max_bad_fraction=None if args.max_bad_fraction < 0 else args.max_bad_fraction,
            num_workers=args.num_workers,
        )
    except (OSError, ValueError) as e:
        # Input errors (a missing or unreadable file or folder, broken JSON, bad settings, too many bad
        # rows): one line, no traceback, and argparse's exit status for bad input.
        cli.print_error(e)
        raise SystemExit(2) from None
    meta = read_metadata(out)
    print(f"dataset: {out}")
    for split, report in meta["splits"].items():
        print(
            f"split {split}: {report['examples']} examples from {report['rows']} rows, "
            f"{report['skipped_total']} skipped"
        )
        for reason, count in report["skipped"].items():
            if count:
                print(f"  {reason}: {count}")


if __name__ == "__main__":
    cli.run(main, prog="python -m qtl_jax.data.llava_tfds")  # bad input: one line and a non-zero exit
