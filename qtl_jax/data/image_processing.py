"""Image preprocessing that reproduces the Hugging Face SigLIP and CLIP image processors.

The vision towers were trained on pixels produced by ``transformers``' image processors, so any drift
here (a different resampler, crop offset or float order of operations) shifts every feature the tower
produces. The steps below follow the PIL/numpy path of ``transformers`` (``SiglipImageProcessorPil`` /
``CLIPImageProcessorPil``; in transformers 5.x the classes without the ``Pil`` suffix are the
torchvision-backed ones, and ``AutoImageProcessor`` picks torchvision only when it is installed):

1. convert to RGB (transparency composited onto white, grey replicated to three channels),
2. optionally expand to a square filled with the mean colour (LLaVA / TinyLLaVA ``pad`` aspect),
3. resize with Pillow (bicubic for both families) to a fixed size or by the shortest edge,
4. center crop (CLIP), with the same integer offsets and zero padding for too-small images,
5. rescale in float64 then cast to float32, and normalise in float32.

The output is channels-last ``float32 [H, W, 3]``, the layout Flax convolutions expect.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import PIL.Image

# Pillow's resampling filter ids, which is also what ``preprocessor_config.json`` stores.
_RESAMPLE_NAMES = {
    int(PIL.Image.Resampling.NEAREST): "nearest",
    int(PIL.Image.Resampling.LANCZOS): "lanczos",
    int(PIL.Image.Resampling.BILINEAR): "bilinear",
    int(PIL.Image.Resampling.BICUBIC): "bicubic",
    int(PIL.Image.Resampling.BOX): "box",
    int(PIL.Image.Resampling.HAMMING): "hamming",
}

_IMAGENET_STANDARD = (0.5, 0.5, 0.5)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Class defaults of the two supported transformers processors; a preprocessor_config.json only
# stores what differs from (or repeats) these.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "siglip": dict(
        size={"height": 224, "width": 224},
        resample=int(PIL.Image.Resampling.BICUBIC),
        do_resize=True,
        do_center_crop=False,
        crop_size=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=_IMAGENET_STANDARD,
        image_std=_IMAGENET_STANDARD,
    ),
    "clip": dict(
        size={"shortest_edge": 224},
        resample=int(PIL.Image.Resampling.BICUBIC),
        do_resize=True,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=_OPENAI_CLIP_MEAN,
        image_std=_OPENAI_CLIP_STD,
    ),
}

_PROCESSOR_TYPES = {
    "SiglipImageProcessor": "siglip",
    "SiglipImageProcessorFast": "siglip",
    "SiglipImageProcessorPil": "siglip",
    "CLIPImageProcessor": "clip",
    "CLIPImageProcessorFast": "clip",
    "CLIPImageProcessorPil": "clip",
    "CLIPFeatureExtractor": "clip",
}

Aspect = Literal["square", "pad"]


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Turns a PIL image or a uint8 array into normalised ``float32 [H, W, 3]`` pixels.

    Attributes:
      size: exact output ``(height, width)`` of the resize; exclusive with ``shortest_edge``.
      shortest_edge: resize so that the shorter side has this length, keeping the aspect ratio (CLIP).
      resample: Pillow resampling filter id (3 = bicubic, what SigLIP and CLIP use).
      do_resize: whether to resize at all.
      do_center_crop: whether to center-crop to ``crop_size`` after resizing.
      crop_size: ``(height, width)`` of the center crop.
      do_rescale: whether to multiply by ``rescale_factor``.
      rescale_factor: usually 1/255.
      do_normalize: whether to apply ``(x - image_mean) / image_std``.
      image_mean: per-channel mean, RGB order.
      image_std: per-channel standard deviation, RGB order.
      aspect: ``'square'`` resizes the image as it is (distorting non-square images when ``size`` is
        square); ``'pad'`` first expands it to a square filled with the mean colour, like LLaVA's
        ``image_aspect_ratio='pad'``.
    """

    size: tuple[int, int] | None = (384, 384)
    shortest_edge: int | None = None
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _IMAGENET_STANDARD
    image_std: tuple[float, float, float] = _IMAGENET_STANDARD
    aspect: Aspect = "square"

    def __post_init__(self):
        if self.do_resize and (self.size is None) == (self.shortest_edge is None):
            raise ValueError(
                f"ImageProcessor needs exactly one of size=(height, width) or shortest_edge=N when "
                f"do_resize=True; got size={self.size}, shortest_edge={self.shortest_edge}."
            )
        if self.size is not None:
            _check_hw("size", self.size)
        if self.shortest_edge is not None and (
            not isinstance(self.shortest_edge, int) or self.shortest_edge <= 0
        ):
            raise ValueError(f"shortest_edge must be a positive int, got {self.shortest_edge!r}.")
        if self.do_center_crop:
            if self.crop_size is None:
                raise ValueError("do_center_crop=True needs crop_size=(height, width).")
            _check_hw("crop_size", self.crop_size)
        if int(self.resample) not in _RESAMPLE_NAMES:
            raise ValueError(
                f"resample={self.resample!r} is not a Pillow filter id; use one of "
                f"{ {v: k for k, v in _RESAMPLE_NAMES.items()} }."
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"{name} needs one value per RGB channel, got {value!r}.")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain zeros, got {self.image_std!r}.")
        if self.aspect not in ("square", "pad"):
            raise ValueError(f"aspect must be 'square' or 'pad', got {self.aspect!r}.")

    @classmethod
    def from_hf(
        cls, path_or_dict: str | os.PathLike | Mapping[str, Any], *, aspect: Aspect = "square"
    ) -> ImageProcessor:
        """Builds the processor described by a ``preprocessor_config.json``.

        Args:
          path_or_dict: a checkpoint directory holding ``preprocessor_config.json``, the json file
            itself, or its parsed contents.
          aspect: ``'square'`` or ``'pad'``; not part of the HF config (TinyLLaVA keeps it in its
            data arguments as ``image_aspect_ratio``).

        Raises:
          FileNotFoundError: the directory has no ``preprocessor_config.json``.
          ValueError: the config names a processor other than SigLIP or CLIP, or has a malformed size.
        """
        if isinstance(path_or_dict, Mapping):
            config = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "preprocessor_config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"No image processor config at {path}; pass a checkpoint directory that holds "
                    f"preprocessor_config.json, the json file, or a dict."
                )
            with open(path) as f:
                config = json.load(f)

        type_name = config.get("image_processor_type") or config.get("feature_extractor_type")
        if type_name not in _PROCESSOR_TYPES:
            raise ValueError(
                f"Unsupported image processor type {type_name!r}; supported: "
                f"{sorted(_PROCESSOR_TYPES)}. Set 'image_processor_type' in the config."
            )
        merged = dict(_FAMILY_DEFAULTS[_PROCESSOR_TYPES[type_name]])
        merged.update({k: v for k, v in config.items() if k in merged})

        size, shortest_edge = _parse_size(merged["size"])
        crop_size = None
        if merged["crop_size"] is not None:
            crop_size = _parse_crop_size(merged["crop_size"])
        return cls(
            size=size,
            shortest_edge=shortest_edge,
            resample=int(merged["resample"]),
            do_resize=bool(merged["do_resize"]),
            do_center_crop=bool(merged["do_center_crop"]),
            crop_size=crop_size,
            do_rescale=bool(merged["do_rescale"]),
            rescale_factor=float(merged["rescale_factor"]),
            do_normalize=bool(merged["do_normalize"]),
            image_mean=tuple(float(m) for m in merged["image_mean"]),
            image_std=tuple(float(s) for s in merged["image_std"]),
            aspect=aspect,
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output, or None when it depends on the input."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.size is not None:
            return self.size
        return None

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """The uint8 background of the ``pad`` aspect: the mean colour, truncated like LLaVA does."""
        return tuple(int(m * 255) for m in self.image_mean)

    def __call__(self, image: PIL.Image.Image | np.ndarray) -> np.ndarray:
        """Preprocesses one image.

        Args:
          image: a PIL image of any mode, or a uint8 array ``[H, W]`` / ``[H, W, C]`` with C in
            {1, 3, 4} (channels last).

        Returns:
          ``float32 [H, W, 3]``.
        """
        rgb = to_rgb(image)
        if self.aspect == "pad":
            rgb = expand_to_square(rgb, self.fill_color)
        if self.do_resize:
            height, width = self._resize_target(rgb.shape[0], rgb.shape[1])
            resized = PIL.Image.fromarray(rgb).resize((width, height), resample=int(self.resample))
            rgb = np.asarray(resized)
        if self.do_center_crop:
            rgb = center_crop(rgb, self.crop_size)
        # float64 then float32 mirrors transformers' rescale; the normalisation then runs in float32.
        if self.do_rescale:
            pixels = (rgb.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = rgb.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return pixels

    def _resize_target(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        # transformers' shortest-edge rule: the long side is truncated, not rounded.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def to_rgb(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """Converts an image to ``uint8 [H, W, 3]`` the way transformers' ``convert_to_rgb`` does.

    Transparency (an alpha band or a palette/greyscale ``transparency`` entry) is composited onto
    white; other modes (L, P, I;16, CMYK, ...) go through Pillow's own ``convert('RGB')``. Arrays
    must be uint8 and channels-last; 1 channel is replicated and 4 channels are alpha-blended onto
    white with rounding.
    """
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"Cannot preprocess an empty image of size {image.size}.")
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"Array images must be uint8 [H, W] or [H, W, C], got dtype {image.dtype}; scale to "
                f"0..255 and cast, or pass a PIL image (e.g. mode 'I;16' for 16-bit data)."
            )
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"Array images must be [H, W] or channels-last [H, W, C] with C in (1, 3, 4), got "
                f"shape {image.shape}."
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"Cannot preprocess an empty image of shape {image.shape}.")
        channels = image.shape[-1]
        if channels == 1:
            return np.repeat(image, 3, axis=-1)
        if channels == 4:
            alpha = image[..., 3:4] / 255
            blended = alpha * image[..., :3] + (1 - alpha) * 255
            return np.round(blended).astype(np.uint8)
        return image

    raise TypeError(f"Expected a PIL.Image.Image or a numpy uint8 array, got {type(image).__name__}.")


def expand_to_square(rgb: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """Pads ``uint8 [H, W, 3]`` to a square of side ``max(H, W)``, centred, filled with ``fill``.

    The offset of the original is ``(side - short) // 2`` on the short axis, as in LLaVA's
    ``expand2square``.
    """
    height, width = rgb.shape[:2]
    if height == width:
        return rgb
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[...] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = rgb
    return out


def center_crop(rgb: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """Center-crops ``[H, W, C]`` to ``crop_size``, zero-padding first where the image is smaller.

    Offsets follow transformers: ``top = (H - crop_h) // 2`` (floor, so an odd excess drops the extra
    row at the bottom), and padding puts ``ceil(excess / 2)`` zeros before the image.
    """
    crop_h, crop_w = crop_size
    height, width = rgb.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return rgb[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded = np.zeros((new_h, new_w) + rgb.shape[2:], dtype=rgb.dtype)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = rgb
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def _check_hw(name: str, value: Any) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a (height, width) tuple of positive ints, got {value!r}.")


def _parse_size(size: Any) -> tuple[tuple[int, int] | None, int | None]:
    # Old configs store a bare int, which both SigLIP and CLIP read as the shortest edge.
    if isinstance(size, int):
        return None, size
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return (int(size["height"]), int(size["width"])), None
        if set(size) == {"shortest_edge"}:
            return None, int(size["shortest_edge"])
    raise ValueError(
        f"Unsupported 'size' {size!r} in the image processor config; expected "
        f"{{'height': H, 'width': W}}, {{'shortest_edge': N}} or an int."
    )


def _parse_crop_size(crop_size: Any) -> tuple[int, int]:
    if isinstance(crop_size, int):
        return (crop_size, crop_size)
    if isinstance(crop_size, Mapping) and "height" in crop_size and "width" in crop_size:
        return (int(crop_size["height"]), int(crop_size["width"]))
    raise ValueError(
        f"Unsupported 'crop_size' {crop_size!r}; expected {{'height': H, 'width': W}} or an int."
    )
