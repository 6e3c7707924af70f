"""Real images for calibration, agreement figures and token pictures: never noise.

Two sources, each described in words that go into every figure measured on it:

* ``photographs``: scikit-image's bundled photographs (``skimage.data``, the ones that ship inside the wheel and load
  offline), for ImageNet-style weights. 15 natural photographs (astronaut, cat, coffee, rocket, motorcycle, Hubble
  deep field, retina, immunohistochemistry slide, camera man, coins, moon, brick, grass, gravel, cells; the
  grayscale ones repeated over three channels). More images than photographs are made as deterministic crops: the
  k-th image of a photograph is a square crop of side 100% / 80% / 64% ... of its short side at one of five
  positions, every other one mirrored, resized to the input size with bicubic interpolation.
* ``image_folder``: every PNG/JPEG/BMP in a folder (sorted by name), resized and centre-cropped the same way, for any
  other data (the digits validation split of a reference model, a user's own photographs).

Images are returned as float32 tensors (3, H, W), normalized with the model's mean and std (its pretrained cfg:
ImageNet's for DeiT, Inception's for the AugReg ViT-L), ready to stack into a batch.
"""
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from tokenzoo.profiling import ImgSize, to_img_size

__all__ = ['IMAGE_SUFFIXES', 'ImageSet', 'PHOTOGRAPHS', 'image_folder', 'images_from', 'load_picture',
           'model_normalization', 'normalize', 'photographs']

# skimage.data loaders whose files ship in the scikit-image wheel (checked in 0.26: no download on first use)
PHOTOGRAPHS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'stereo_motorcycle', 'hubble_deep_field', 'retina',
               'immunohistochemistry', 'camera', 'coins', 'moon', 'brick', 'grass', 'gravel', 'cell')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp')
_CROP_SCALES = (1.0, 0.8, 0.64, 0.5)
_CROP_POSITIONS = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))  # centre, then the four corners


class ImageSet(NamedTuple):
    """Images ready for a model and the words that say what they are (recorded beside every figure)."""

    images: list[torch.Tensor]
    description: str

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """The images stacked into batches of at most ``batch_size``."""
        return [torch.stack(self.images[i:i + batch_size]) for i in range(0, len(self.images), batch_size)]


def model_normalization(model: torch.nn.Module | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a timm model's pretrained cfg, ImageNet's when it has none."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('mean', IMAGENET_DEFAULT_MEAN)), tuple(cfg.get('std', IMAGENET_DEFAULT_STD))


def _to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    array = np.asarray(image.convert('RGB'), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _crop(image: Image.Image, img_size: tuple[int, int], scale: float, position: tuple[float, float],
          mirror: bool) -> Image.Image:
    """A crop of the input's aspect ratio, ``scale`` of the largest one that fits, at ``position``, resized."""
    width, height = image.size
    aspect = img_size[1] / img_size[0]
    crop_h = min(height, width / aspect) * scale
    crop_w = crop_h * aspect
    left = position[0] * (width - crop_w)
    top = position[1] * (height - crop_h)
    crop = image.resize((img_size[1], img_size[0]), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if mirror else crop


def _load_photograph(name: str) -> Image.Image:
    import skimage.data  # scikit-image: the export extra

    array = getattr(skimage.data, name)()
    if name == 'stereo_motorcycle':
        array = array[0]  # (left view, right view, disparity)
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-12)).astype(np.uint8)
    return Image.fromarray(array).convert('RGB')


def load_picture(source: str | os.PathLike, img_size: ImgSize = 224) -> Image.Image:
    """One picture as the model sees it (before normalization): the largest centred crop of the input's aspect,
    resized.

    Args:
        source: The name of one of scikit-image's ``PHOTOGRAPHS`` (e.g. 'astronaut') or an image file.
        img_size: Output size, one int or ``(height, width)``.

    Raises:
        FileNotFoundError: If ``source`` is neither a photograph's name nor an existing file.
    """
    size = to_img_size(img_size)
    if str(source) in PHOTOGRAPHS:
        image = _load_photograph(str(source))
    elif Path(source).is_file():
        with Image.open(source) as opened:
            image = opened.convert('RGB')
    else:
        raise FileNotFoundError(f"image {str(source)!r} is neither an image file nor one of scikit-image's "
                                f"photographs ({', '.join(PHOTOGRAPHS)})")
    return _crop(image, size, 1.0, (0.5, 0.5), False)


def normalize(image: Image.Image, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """A PIL image as a normalized float32 tensor (3, H, W)."""
    return _to_tensor(image, mean, std)


def photographs(
        img_size: ImgSize = 224,
        count: int = len(PHOTOGRAPHS),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        offset: int = 0,
) -> ImageSet:
    """``count`` images made from scikit-image's bundled photographs (see the module docstring).

    Image i is crop number (offset + i) // 15 of photograph (offset + i) % 15, so the first 15 are the whole
    photographs (largest centred crop) and two calls with disjoint ``offset`` ranges give disjoint crops (e.g.
    calibration and evaluation).

    Args:
        img_size: Output size, one int or ``(height, width)``.
        count: Number of images, >= 1.
        mean, std: Normalization (``model_normalization(model)``).
        offset: Index of the first image.

    Returns:
        The images and their description.

    Raises:
        ValueError: On a count < 1 or a negative offset.
        ImportError: If scikit-image is not installed (the ``export`` extra).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 or offset < 0:
        raise ValueError(f"count must be an int >= 1 and offset >= 0, got count={count!r}, offset={offset!r}")
    size = to_img_size(img_size)
    loaded = {}
    images = []
    for index in range(offset, offset + count):
        name, crop = PHOTOGRAPHS[index % len(PHOTOGRAPHS)], index // len(PHOTOGRAPHS)
        if name not in loaded:
            loaded[name] = _load_photograph(name)
        scale = _CROP_SCALES[crop // len(_CROP_POSITIONS) % len(_CROP_SCALES)]
        scale *= 0.8 ** (crop // (len(_CROP_POSITIONS) * len(_CROP_SCALES)))
        position = _CROP_POSITIONS[crop % len(_CROP_POSITIONS)]
        images.append(_to_tensor(_crop(loaded[name], size, scale, position, mirror=crop % 2 == 1), mean, std))
    description = (f"{count} crops of scikit-image's {len(PHOTOGRAPHS)} bundled photographs (images {offset}.."
                   f"{offset + count - 1}), {size[0]}x{size[1]}")
    return ImageSet(images, description)


def image_folder(
        folder: str | os.PathLike,
        img_size: ImgSize = 224,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        limit: int | None = None,
) -> ImageSet:
    """Every image file of a folder (``IMAGE_SUFFIXES``, sorted by name), resized and centre-cropped.

    Args:
        folder: The folder.
        img_size: Output size, one int or ``(height, width)``.
        mean, std: Normalization.
        limit: Take at most this many (the first by name).

    Raises:
        FileNotFoundError: If the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    size = to_img_size(img_size)
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(_to_tensor(_crop(image.convert('RGB'), size, 1.0, (0.5, 0.5), False), mean, std))
    return ImageSet(images, f"{len(images)} images of {folder}, {size[0]}x{size[1]}")


def images_from(
        source: ImageSet | Sequence[torch.Tensor] | str | os.PathLike | None,
        img_size: ImgSize,
        count: int,
        model: torch.nn.Module | None = None,
        description: str | None = None,
        offset: int = 0,
) -> ImageSet:
    """One entry point for the forms callers hand over: an ImageSet, a list of (3, H, W) tensors (with
    ``description``), a folder, or None for ``count`` photographs normalized for ``model``."""
    mean, std = model_normalization(model)
    if source is None:
        return photographs(img_size, count, mean, std, offset)
    if isinstance(source, ImageSet):
        return source
    if isinstance(source, (str, os.PathLike)):
        return image_folder(source, img_size, mean, std, limit=count)
    images = list(source)
    if not images or not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in images):
        raise ValueError("images must be an ImageSet, a folder, or a non-empty list of (3, H, W) tensors")
    if not description:
        raise ValueError("a list of image tensors needs a description (what the images are), recorded with every "
                         "figure measured on them")
    return ImageSet(images, description)
