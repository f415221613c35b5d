"""ImageProcessor against transformers' PIL-backed SigLIP / CLIP processors (bit-exact expected)."""

import json

import matplotlib.cbook
import numpy as np
import PIL.Image
import pytest
import skimage.data
from hypothesis import given, settings
import transformers
from hypothesis import strategies as st

from qtl_jax.data.image_processing import (
    ImageProcessor,
    center_crop,
    expand_to_square,
    to_rgb,
)

# The configs shipped with google/siglip-so400m-patch14-384 (TinyLLaVA's tower) and
# openai/clip-vit-large-patch14-336 (LLaVA-1.5's), written out so no download is needed.
SIGLIP_CONFIG = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
CLIP_CONFIG = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
}
# Small versions for the property test so each example stays cheap.
SMALL_CONFIGS = {
    "siglip": dict(SIGLIP_CONFIG, size={"height": 16, "width": 16}),
    "clip": dict(CLIP_CONFIG, size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12}),
}


def _write_config(directory, config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """(ours, transformers') per family, both loaded from the same directory."""
    root = tmp_path_factory.mktemp("processors")
    out = {}
    configs = {"siglip": SIGLIP_CONFIG, "clip": CLIP_CONFIG}
    configs.update({f"small_{k}": v for k, v in SMALL_CONFIGS.items()})
    for name, config in configs.items():
        directory = _write_config(root / name, config)
        hf = transformers.AutoImageProcessor.from_pretrained(str(directory))
        out[name] = (ImageProcessor.from_hf(directory), hf)
    return out


def _hf(processor, image):
    # transformers returns channels-first; ours is channels-last.
    return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _photos():
    photos = {
        name: PIL.Image.fromarray(getattr(skimage.data, name)())
        for name in ("astronaut", "coffee", "chelsea", "camera")
    }
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        with PIL.Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as image:
            image.load()
            photos[name] = image.copy()
    return photos


PHOTOS = _photos()


def test_auto_image_processor_is_the_pil_backend(processors):
    # Without torchvision, transformers 5.x falls back to the PIL classes; those are the reference.
    assert type(processors["siglip"][1]).__name__ == "SiglipImageProcessorPil"
    assert type(processors["clip"][1]).__name__ == "CLIPImageProcessorPil"


def test_from_hf_reads_the_configs(processors):
    siglip, clip = processors["siglip"][0], processors["clip"][0]
    assert siglip == ImageProcessor(
        size=(384, 384), rescale_factor=0.00392156862745098, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
    )
    assert clip.size is None and clip.shortest_edge == 336
    assert clip.do_center_crop and clip.crop_size == (336, 336)
    assert clip.output_size == (336, 336) and siglip.output_size == (384, 384)
    assert clip.image_mean == (0.48145466, 0.4578275, 0.40821073)


@pytest.mark.parametrize("family", ["siglip", "clip"])
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_photos_match_transformers_bit_exactly(processors, family, photo):
    ours, hf = processors[family]
    expected = _hf(hf, PHOTOS[photo])
    got = ours(PHOTOS[photo])
    assert got.dtype == np.float32 and got.shape == expected.shape == ours.output_size + (3,)
    np.testing.assert_array_equal(got, expected)


def _noise(height, width, channels=3, dtype=np.uint8, high=256, seed=0):
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def _odd_images():
    rgb = _noise(23, 37)
    palette = PIL.Image.fromarray(rgb).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    return {
        "17x301": PIL.Image.fromarray(_noise(17, 301)),
        "301x17": PIL.Image.fromarray(_noise(301, 17)),
        "1x1": PIL.Image.fromarray(_noise(1, 1)),
        "2x3": PIL.Image.fromarray(_noise(2, 3)),
        "L": PIL.Image.fromarray(_noise(40, 29, channels=None)),
        "LA": PIL.Image.fromarray(_noise(19, 31, channels=2)),
        "RGBA": PIL.Image.fromarray(_noise(31, 19, channels=4)),
        "P": palette,
        "P+transparency": palette_transparent,
        "I;16": PIL.Image.fromarray(_noise(33, 21, channels=None, dtype=np.uint16, high=65536)),
        "I;16 low values": PIL.Image.fromarray(_noise(21, 33, channels=None, dtype=np.uint16, high=300)),
        "1 (bilevel)": PIL.Image.fromarray(_noise(25, 30, channels=None) > 127),
        "CMYK": PIL.Image.fromarray(rgb).convert("CMYK"),
    }


ODD_IMAGES = _odd_images()


@pytest.mark.parametrize("family", ["siglip", "clip"])
@pytest.mark.parametrize("case", sorted(ODD_IMAGES))
def test_odd_sizes_and_modes_match_transformers(processors, family, case):
    ours, hf = processors[family]
    np.testing.assert_array_equal(ours(ODD_IMAGES[case]), _hf(hf, ODD_IMAGES[case]))


@pytest.mark.parametrize("family", ["siglip", "clip"])
@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_uint8_arrays_match_transformers(processors, family, channels):
    ours, hf = processors[family]
    # 20x30 cannot be mistaken for channels-first by transformers' layout inference.
    array = _noise(20, 30, channels=channels, seed=1)
    reference_input = array[:, :, None] if channels is None else array
    np.testing.assert_array_equal(ours(array), _hf(hf, reference_input))


def test_rgba_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (10, 20, 30, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white
    expected = np.array(
        [[[10, 20, 30], [255, 255, 255]], [[127, 127, 127], [255, 255, 255]]], dtype=np.uint8
    )
    np.testing.assert_array_equal(to_rgb(rgba), expected)
    np.testing.assert_array_equal(to_rgb(PIL.Image.fromarray(rgba, mode="RGBA")), expected)


@pytest.mark.parametrize("family", ["siglip", "clip"])
@pytest.mark.parametrize("photo", ["chelsea", "logo2.png", "camera"])
def test_pad_aspect_matches_llava_expand2square(processors, family, photo):
    ours_square, hf = processors[family]
    ours = ImageProcessor.from_hf(SIGLIP_CONFIG if family == "siglip" else CLIP_CONFIG, aspect="pad")
    assert ours == ImageProcessor(**{**vars(ours_square), "aspect": "pad"})
    # LLaVA's recipe: RGB image -> square canvas of the mean colour (int(m * 255)) -> paste centred.
    image = PIL.Image.fromarray(to_rgb(PHOTOS[photo]))
    width, height = image.size
    side = max(width, height)
    canvas = PIL.Image.new("RGB", (side, side), tuple(int(m * 255) for m in hf.image_mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    np.testing.assert_array_equal(ours(PHOTOS[photo]), _hf(hf, canvas))


def test_expand_to_square_exact():
    rgb = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    out = expand_to_square(rgb, (7, 8, 9))
    assert out.shape == (5, 5, 3)
    # (5 - 2) // 2 = 1 row of fill above, 2 below.
    np.testing.assert_array_equal(out[1:3], rgb)
    for row in (0, 3, 4):
        np.testing.assert_array_equal(out[row], np.tile([7, 8, 9], (5, 1)))
    tall = expand_to_square(rgb.transpose(1, 0, 2), (0, 0, 0))
    np.testing.assert_array_equal(tall[:, 1:3], rgb.transpose(1, 0, 2))
    square = rgb[:, :2]
    assert expand_to_square(square, (1, 1, 1)) is square


def test_center_crop_offsets_and_padding_exact():
    image = np.arange(5 * 7).reshape(5, 7, 1)
    # top = (5 - 2) // 2 = 1, left = (7 - 3) // 2 = 2
    np.testing.assert_array_equal(center_crop(image, (2, 3))[..., 0], [[9, 10, 11], [16, 17, 18]])
    small = np.array([[1, 2], [3, 4]]).reshape(2, 2, 1)
    # Padding puts ceil(excess / 2) zeros first: 1 row on top, 1 column on the left.
    np.testing.assert_array_equal(
        center_crop(small, (3, 4))[..., 0], [[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0]]
    )


def test_crop_larger_than_resize_matches_transformers(tmp_path):
    config = dict(CLIP_CONFIG, size={"shortest_edge": 20}, crop_size={"height": 25, "width": 23})
    directory = _write_config(tmp_path, config)
    hf = transformers.AutoImageProcessor.from_pretrained(str(directory))
    ours = ImageProcessor.from_hf(directory)
    for image in (PHOTOS["chelsea"], ODD_IMAGES["17x301"], ODD_IMAGES["1x1"]):
        np.testing.assert_array_equal(ours(image), _hf(hf, image))


@settings(max_examples=40, deadline=None)
@given(
    family=st.sampled_from(["small_siglip", "small_clip"]),
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    mode=st.sampled_from(["RGB", "L", "RGBA", "LA", "P"]),
    seed=st.integers(0, 2**16),
)
def test_property_any_size_and_mode_matches_transformers(processors, family, height, width, mode, seed):
    ours, hf = processors[family]
    image = PIL.Image.fromarray(_noise(height, width, seed=seed, channels=4)).convert(mode)
    np.testing.assert_array_equal(ours(image), _hf(hf, image))


def test_bad_inputs_raise_clear_errors(tmp_path):
    processor = ImageProcessor()
    with pytest.raises(ValueError, match="must be uint8"):
        processor(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"C in \(1, 3, 4\)"):
        processor(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty image"):
        processor(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="PIL.Image.Image or a numpy uint8 array"):
        processor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="exactly one of size"):
        ImageProcessor(size=(4, 4), shortest_edge=4)
    with pytest.raises(ValueError, match="crop_size"):
        ImageProcessor(do_center_crop=True)
    with pytest.raises(ValueError, match="aspect"):
        ImageProcessor(aspect="anyres")
    with pytest.raises(ValueError, match="Pillow filter"):
        ImageProcessor(resample=17)
    with pytest.raises(ValueError, match="Unsupported image processor type 'DINOv2"):
        ImageProcessor.from_hf(dict(SIGLIP_CONFIG, image_processor_type="DINOv2ImageProcessor"))
    with pytest.raises(ValueError, match="Unsupported 'size'"):
        ImageProcessor.from_hf(dict(SIGLIP_CONFIG, size={"longest_edge": 3}))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_hf(tmp_path)
