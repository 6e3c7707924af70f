"""Image-folder data for classification: the scikit-learn digits written as an ImageFolder, checks, transforms, loaders.

The digits (``sklearn.datasets.load_digits``: 1,797 real handwritten digits, 8x8 pixels with 17 grey levels, read from
a file inside the scikit-learn wheel, so they work offline) are the project's real data set for measured accuracy.
``write_digits`` upsamples them to ``DIGITS_IMG_SIZE`` = 56 px and writes ``train/`` and ``val/`` class folders with
a fixed stratified split: with the reference model's patch 4 the patch grid is 14 x 14 = 196 tokens, the grid of a
DeiT at 224 px with patch 16, so every family's schedule (EViT's keep rate at blocks 3/6/9, ToMe's r = 13 per block,
MCTF's r = 16 at blocks 1-11, Expedit's 10 x 10 clusters after block 4) does what it does on ImageNet.

Loaders are plain ``torch.utils.data.DataLoader`` over timm's ``ImageDataset`` with timm's transforms. Training order
is a ``DistributedSampler`` (one replica when not distributed) whose permutation depends only on (seed, epoch), so a
resumed run sees the same batches as an uninterrupted one.
"""
import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform
from torch.utils.data import DataLoader, DistributedSampler, Subset

__all__ = [
    "DIGITS_DATA_CONFIG", "DIGITS_IMG_SIZE", "DIGITS_VAL_FRACTION", "IMAGE_EXTENSIONS", "build_eval_loader",
    "build_train_loader", "check_image_folder", "load_split", "steps_per_epoch", "stratified_split", "write_digits",
]

PathLike = Union[str, Path]

DIGITS_IMG_SIZE = 56  # 8 x 8 digits upsampled 7x; patch 4 gives DeiT's 14 x 14 grid
DIGITS_VAL_FRACTION = 0.2
# How the digits are fed to a model: the images are already at the input size, so evaluation neither resizes nor
# crops (crop_pct 1); timm's ImageNet normalization, as the DeiT-derived models expect.
DIGITS_DATA_CONFIG = dict(input_size=(3, DIGITS_IMG_SIZE, DIGITS_IMG_SIZE), interpolation="bilinear", crop_pct=1.0,
                          mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/validation split: each class gives round(val_fraction * its count) images to
    validation, chosen by a seeded permutation of that class.

    Returns:
        (train indices, val indices), each sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        val.append(rng.permutation(members)[:int(round(val_fraction * len(members)))])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError("writing the digits needs scikit-learn (its wheel ships the data): pip install -e '.[cls]'"
                         ) from e
    digits = load_digits()
    return digits.images, digits.target


def write_digits(
        out_dir: PathLike,
        img_size: int = DIGITS_IMG_SIZE,
        val_fraction: float = DIGITS_VAL_FRACTION,
        seed: int = 0,
        force: bool = False,
) -> Dict[str, Any]:
    """Write scikit-learn's digits as an ImageFolder: ``out_dir/{train,val}/<digit>/<index>.png`` and
    ``out_dir/digits.json`` (what was written: source, sizes, split, counts).

    Each 8 x 8 image (grey levels 0-16, ink high) becomes an 8-bit greyscale PNG (level * 255 / 16) upsampled
    bilinearly to ``img_size``; file names are the image's index in ``load_digits()``.

    Args:
        out_dir: Output folder; must be new or empty unless ``force`` (which replaces ``train/`` and ``val/``).
        img_size: Side of the written images (56: a 14 x 14 grid with patch 4).
        val_fraction: Share of each class in the validation split.
        seed: Seed of the split.
        force: Replace an existing data set.

    Returns:
        The metadata written to ``digits.json``.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8 (the digits are 8 x 8), got {img_size!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{str(out)!r} is not empty; choose a new folder or pass --force to replace the digits")
    images, labels = _load_digits()
    train, val = stratified_split(labels, val_fraction, seed)
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
    counts: Dict[str, Dict[str, int]] = {}
    for split, indices in (("train", train), ("val", val)):
        counts[split] = {}
        for index in indices:
            label = str(int(labels[index]))
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(images[index] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((img_size, img_size), Image.BILINEAR).save(
                folder / f"{index:04d}.png")
            counts[split][label] = counts[split].get(label, 0) + 1
    meta = dict(dataset="scikit-learn digits", source="sklearn.datasets.load_digits", num_images=len(labels),
                original_size=[8, 8], img_size=img_size, resize="bilinear", val_fraction=val_fraction, seed=seed,
                split="stratified per class, seeded permutation",
                counts={split: dict(sorted(per_class.items())) for split, per_class in counts.items()},
                val_indices=[int(i) for i in val])
    (out / "digits.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def check_image_folder(data_dir: PathLike, splits: Sequence[str]) -> Dict[str, Path]:
    """Check that ``data_dir/<split>/<class>/<image>`` exists for each split, with the same classes in each.

    Returns:
        The folder of each split.

    Raises:
        FileNotFoundError: A missing data folder or split.
        ValueError: A split without class folders or images, or splits with different classes.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist (expected {root}/<split>/<class>/<image>; "
                                f"tools/make_digits.py writes the digits)")
    folders = {split: root / split for split in splits}
    for folder in folders.values():  # every split present before looking inside any
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(f"split folder {str(folder)!r} does not exist (folders in {root}: {found})")
    classes = {}
    for split, folder in folders.items():
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not names:
            raise ValueError(f"{folder} has no class folders: expected {folder}/<class>/<image>")
        if not any(f.suffix in IMAGE_EXTENSIONS for name in names for f in (folder / name).iterdir()):
            raise ValueError(f"{folder} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        classes[split] = names
    first = splits[0]
    for split in splits[1:]:
        if classes[split] != classes[first]:
            raise ValueError(f"splits {first!r} and {split!r} have different classes: {classes[first]} vs "
                             f"{classes[split]}")
    return folders


def load_split(folder: PathLike, data_config: Dict[str, Any], is_training: bool,
               augment: Optional[Dict[str, Any]] = None) -> ImageDataset:
    """timm ``ImageDataset`` of one split folder with timm's train or eval transform.

    Args:
        folder: ``<data_dir>/<split>``.
        data_config: timm data config (``input_size``, ``interpolation``, ``crop_pct``, ``mean``, ``std``).
        is_training: Training transform (random resized crop and the ``augment`` settings) or eval transform
            (resize to input / crop_pct, centre crop).
        augment: ``create_transform`` training arguments (``scale``, ``ratio``, ``hflip``, ``color_jitter``,
            ``auto_augment``, ``re_prob``, ...).
    """
    kwargs = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"])
    transform = create_transform(is_training=is_training, **kwargs, **((augment or {}) if is_training else {}))
    return ImageDataset(str(folder), transform=transform)


def build_train_loader(
        dataset: ImageDataset, batch_size: int, seed: int, num_workers: int = 0, world_size: int = 1, rank: int = 0,
        pin_memory: bool = False,
) -> DataLoader:
    """Training loader: a seeded ``DistributedSampler`` (call ``loader.sampler.set_epoch(epoch)`` each epoch) and
    ``drop_last``, so every epoch has the same number of steps on every rank."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"the training split has {len(dataset)} images ({len(sampler)} per process): fewer than one "
                         f"batch of {batch_size}; lower --batch-size")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=pin_memory, persistent_workers=False, worker_init_fn=_seed_worker)


def build_eval_loader(dataset: ImageDataset, batch_size: int, num_workers: int = 0, world_size: int = 1,
                      rank: int = 0, pin_memory: bool = False) -> DataLoader:
    """Evaluation loader over this rank's share of the images (every world_size-th one, no padding, so summed
    counts over ranks are exact)."""
    part = Subset(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (and Python's random) from the loader's base seed; numpy is seeded from it here
    np.random.seed(torch.initial_seed() % 2 ** 32)


def steps_per_epoch(loader: DataLoader) -> int:
    """Optimizer steps per epoch (the loader drops the last incomplete batch)."""
    return math.floor(len(loader.sampler) / loader.batch_size)
