"""BlipImageProcessor: images -> pixel_values (B, 3, H, W), the reference's PIL/NumPy pipeline (transformers 5.24's
BlipImageProcessorPil: convert to RGB, resize with PIL, rescale, normalise)."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .features import BatchFeature, dump_json, load_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# one image or a list: PIL, (H, W[, C]) / (C, H, W) arrays or tensors
Images = Image.Image | np.ndarray | torch.Tensor | Sequence["Images"]


def convert_to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8, compositing transparency onto white (transformers 5.24)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"))


def _channels_first(array, do_convert_rgb):
    """(H, W), (H, W, C) or (C, H, W) array -> (C, H, W); C is found like the reference does (first axis wins)."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    if array.shape[0] not in (1, 3, 4):
        if array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"cannot find the channel axis of an image of shape {array.shape} (1, 3 or 4 channels)")
        array = np.moveaxis(array, -1, 0)
    if do_convert_rgb and array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    elif do_convert_rgb and array.shape[0] == 4:  # blend onto white, rounding integer images
        if np.issubdtype(array.dtype, np.floating) and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"an RGBA float image must lie in [0, 1], got [{array.min()}, {array.max()}]")
        white = 255 if np.issubdtype(array.dtype, np.integer) else 1.0
        alpha = array[3:4] / white
        rgb = alpha * array[:3] + (1 - alpha) * white
        array = (np.round(rgb) if white == 255 else rgb).astype(array.dtype)
    return array


def _rescale(array, factor):
    return (array.astype(np.float64) * factor).astype(np.float32)


def _resize(array, height, width, resample):
    """Resize a (C, H, W) array with PIL. Floats in [0, 1] go through uint8 and come back /255, as in the reference."""
    hwc = np.moveaxis(array, 0, -1)
    hwc = hwc[..., 0] if hwc.shape[-1] == 1 else hwc
    if array.dtype == np.uint8:
        scaled = False
    elif np.allclose(hwc, hwc.astype(int)):
        if hwc.min() < 0 or hwc.max() > 255:
            raise ValueError(f"cannot resize an integer-valued image outside [0, 255]: [{hwc.min()}, {hwc.max()}]")
        scaled = False
    elif hwc.min() >= 0 and hwc.max() <= 1:
        scaled = True
        hwc = _rescale(hwc, 255)
    else:
        raise ValueError(f"a float image must lie in [0, 1] (or hold integers in [0, 255]), "
                         f"got [{hwc.min()}, {hwc.max()}]")
    out = np.array(Image.fromarray(hwc.astype(np.uint8)).resize((width, height), resample=resample))
    out = np.moveaxis(out[..., None] if out.ndim == 2 else out, -1, 0)
    return _rescale(out, 1 / 255) if scaled else out


def _size_dict(size):
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    if isinstance(size, dict) and (set(size) == {"height", "width"} or set(size) == {"shortest_edge"}):
        return dict(size)
    raise ValueError(f"size must be an int, (height, width), {{'height', 'width'}} or {{'shortest_edge'}}, "
                     f"got {size!r}")


def _output_size(height, width, size):
    if "height" in size:
        return size["height"], size["width"]
    short, long = sorted((height, width))
    other = int(size["shortest_edge"] * long / short)
    return (other, size["shortest_edge"]) if width <= height else (size["shortest_edge"], other)


def _flat_images(images):
    """One image, a 4-D batch, or a (nested) list of those -> a flat list of single images."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        if images.ndim not in (2, 3):
            raise ValueError(f"an image array must have 2, 3 (one image) or 4 (a batch) dimensions, "
                             f"got shape {tuple(images.shape)}")
        return [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        flat = []
        for i, image in enumerate(images):
            try:
                flat += _flat_images(image)
            except (TypeError, ValueError) as e:
                raise type(e)(f"images[{i}]: {e}") from None
        return flat
    raise TypeError(f"expected a PIL.Image.Image, numpy.ndarray, torch.Tensor or a list of them, "
                    f"got {type(images).__name__}")


class BlipImageProcessor:
    """convert_to_rgb -> resize to `size` with PIL -> rescale -> normalise -> (3, H, W) float32, like
    transformers' BlipImageProcessorPil (what BlipImageProcessor resolves to without torchvision)."""

    KEYS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "do_convert_rgb")

    def __init__(self, do_resize: bool = True, size: int | dict | None = None, resample: int = 3,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: float | Sequence[float] = OPENAI_CLIP_STD, do_convert_rgb: bool = True):
        self.do_resize = do_resize
        self.size = _size_dict(384 if size is None else size)
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if isinstance(image_mean, (list, tuple)) else image_mean
        self.image_std = list(image_std) if isinstance(image_std, (list, tuple)) else image_std
        self.do_convert_rgb = do_convert_rgb

    @classmethod
    def from_dict(cls, config: dict) -> "BlipImageProcessor":
        """From a preprocessor_config.json dict, ignoring keys the pipeline does not use (image_processor_type...)."""
        return cls(**{k: v for k, v in config.items() if k in cls.KEYS and v is not None})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "BlipImageProcessor":
        path = os.path.join(directory, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found")
        return cls.from_dict(load_json(path))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS} | {"image_processor_type": "BlipImageProcessor"}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        dump_json(os.path.join(directory, "preprocessor_config.json"), self.to_dict())

    def __call__(self, images: Images, return_tensors: str | None = None, **overrides: Any) -> BatchFeature:
        unknown = set(overrides) - set(self.KEYS)
        if unknown:
            raise TypeError(f"unknown image processor argument(s): {sorted(unknown)}; valid: {list(self.KEYS)}")
        p = self.to_dict() | overrides
        size = _size_dict(p["size"])
        pixel_values = []
        for i, image in enumerate(_flat_images(images)):
            try:
                pixel_values.append(self._process(image, p, size))
            except ValueError as e:
                raise ValueError(f"images[{i}]: {e}") from e
        return BatchFeature(pixel_values=pixel_values).convert(return_tensors)

    def _process(self, image, p, size):
        if isinstance(image, Image.Image):
            array = convert_to_rgb(image) if p["do_convert_rgb"] else np.array(image)
            array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        else:
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            array = _channels_first(array, p["do_convert_rgb"])
        if p["do_resize"]:
            array = _resize(array, *_output_size(*array.shape[1:], size), p["resample"])
        if p["do_rescale"]:
            array = _rescale(array, p["rescale_factor"])
        if p["do_normalize"]:
            array = array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float32)
            mean, std = (np.array(p[k], dtype=array.dtype).reshape(-1, 1, 1) for k in ("image_mean", "image_std"))
            if mean.size not in (1, len(array)) or std.size not in (1, len(array)):
                raise ValueError(f"image_mean and image_std need 1 or {len(array)} values (one per channel)")
            array = (array - mean) / std
        return array
