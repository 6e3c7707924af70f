"""Small synthetic data sets in the COCO instance format and the ADE20K segmentation format.

They stand in for COCO and ADE20K where those cannot be downloaded (tests, smoke runs of the ``*_synthetic.py``
configs): coloured squares, circles and triangles on a noisy background. Shapes never overlap, so a polygon is
exactly its instance mask and boxes, areas and label maps agree with each other.

Layouts (the same as the real data sets, so the same dataset classes read them)::

    <coco root>/annotations/instances_{train,val}.json    <ade root>/images/{training,validation}/<id>.jpg
    <coco root>/{train,val}/<id>.jpg                      <ade root>/annotations/{training,validation}/<id>.png

In the ADE set label 0 is "unlabelled" as in ADE20K (the configs use ``reduce_zero_label=True``), here a one-pixel
outline around each shape; 1 is the background and 2.. are the shapes.
"""
import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SEG_CLASSES", "SHAPE_CLASSES", "check_output_dir", "random_shapes", "write_instance_set",
           "write_segmentation_set"]

SHAPE_CLASSES = ("square", "circle", "triangle")
SEG_CLASSES = ("background",) + SHAPE_CLASSES
# One hue per class keeps the sets learnable within a few iterations; brightness is jittered per shape.
_CLASS_COLORS = np.array([(220, 60, 60), (60, 200, 80), (70, 90, 230)], dtype=np.float64)
_GRID = 2  # shapes are placed in the cells of a GRID x GRID layout, at most one per cell, so they never overlap

PathLike = Union[str, Path]
Polygon = List[Tuple[float, float]]


def _check_sizes(num_train: int, num_val: int, img_size: int) -> None:
    for key, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("img_size", img_size, 32)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an int >= {low}, got {value!r}")


def check_output_dir(root: PathLike, force: bool = False) -> Path:
    """Refuse to write into a non-empty folder unless ``force``.

    Args:
        root: Folder that will receive a data set.
        force: Write even if the folder has files in it.

    Returns:
        The folder as a Path.

    Raises:
        FileExistsError: ``root`` exists, is not empty, and ``force`` is False.
        NotADirectoryError: ``root`` exists and is a file.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise FileExistsError(f"{str(root)!r} is not empty; choose an empty or new folder, or pass --force "
                              f"(force=True) to replace the synthetic data sets in it")
    return root


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> Polygon:
    """Vertices of a shape centred at (cx, cy) whose circumscribed circle has ``radius``."""
    num_vertices = {"square": 4, "triangle": 3, "circle": 32}[kind]
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / num_vertices),
             cy + radius * math.sin(angle + 2 * math.pi * k / num_vertices)) for k in range(num_vertices)]


def _polygon_area(polygon: Polygon) -> float:
    xs, ys = np.array(polygon).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def random_shapes(rng: np.random.Generator, img_size: int) -> Tuple[np.ndarray, List[Tuple[int, Polygon]]]:
    """Draw one image of 1 to 4 non-overlapping shapes.

    Args:
        rng: Random generator (the only source of randomness, so a seed fixes the image).
        img_size: Height and width in pixels.

    Returns:
        The image, uint8 (img_size, img_size, 3) RGB, and the shapes as (class index into ``SHAPE_CLASSES``, polygon
        in pixel coordinates) pairs.
    """
    # A smooth random gradient plus noise: a background a network must learn to ignore, unlike a flat colour.
    ramp = np.linspace(0.0, 1.0, img_size)
    low, high = rng.uniform(40, 120, size=3), rng.uniform(120, 200, size=3)
    mix = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    background = low + (high - low) * mix + rng.normal(0, 8, size=(img_size, img_size, 3))
    image = Image.fromarray(np.broadcast_to(background, (img_size, img_size, 3)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    cell = img_size / _GRID
    cells = rng.permutation(_GRID * _GRID)[:rng.integers(1, _GRID * _GRID + 1)]
    shapes = []
    for cell_index in cells:
        row, col = divmod(int(cell_index), _GRID)
        label = int(rng.integers(len(SHAPE_CLASSES)))
        radius = rng.uniform(0.25, 0.45) * cell
        margin = radius + 1
        cx = col * cell + rng.uniform(margin, cell - margin)
        cy = row * cell + rng.uniform(margin, cell - margin)
        polygon = _shape_polygon(SHAPE_CLASSES[label], cx, cy, radius, rng.uniform(0, 2 * math.pi))
        color = tuple(int(c) for c in (_CLASS_COLORS[label] * rng.uniform(0.75, 1.1)).clip(0, 255))
        draw.polygon(polygon, fill=color)
        shapes.append((label, polygon))
    return np.asarray(image), shapes


def _bbox(polygon: Polygon) -> List[float]:
    xs, ys = np.array(polygon).T
    x0, y0 = float(xs.min()), float(ys.min())
    return [round(x0, 2), round(y0, 2), round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)]


def _write_coco_split(root: Path, split: str, num_images: int, img_size: int, rng: np.random.Generator) -> Path:
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels, shapes = random_shapes(rng, img_size)
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(root / split / file_name, quality=95)
        images.append(dict(id=image_id, file_name=file_name, height=img_size, width=img_size))
        for label, polygon in shapes:
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=label + 1, iscrowd=0,
                segmentation=[[round(v, 2) for point in polygon for v in point]],
                bbox=_bbox(polygon), area=round(_polygon_area(polygon), 2)))
    categories = [dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(SHAPE_CLASSES)]
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return ann_file


def write_instance_set(root: PathLike, num_train: int = 16, num_val: int = 4, img_size: int = 128, seed: int = 0,
                       force: bool = False) -> Dict[str, Path]:
    """Write a COCO-format instance segmentation set (polygon masks) into ``root``.

    Args:
        root: Output folder; created if missing.
        num_train: Training images.
        num_val: Validation images (also used as the test split by the configs).
        img_size: Height and width of every image.
        seed: Seed of the generator; the same seed writes the same files.
        force: Replace the ``train``, ``val`` and ``annotations`` folders if ``root`` is not empty.

    Returns:
        Paths of the ``train`` and ``val`` annotation files.
    """
    _check_sizes(num_train, num_val, img_size)
    root = check_output_dir(root, force)
    for sub in ("train", "val", "annotations"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    return {split: _write_coco_split(root, split, num, img_size, rng)
            for split, num in (("train", num_train), ("val", num_val))}


def _label_map(shapes: Sequence[Tuple[int, Polygon]], img_size: int) -> np.ndarray:
    labels = Image.new("L", (img_size, img_size), color=1)  # 1: background
    draw = ImageDraw.Draw(labels)
    for label, polygon in shapes:
        draw.polygon(polygon, fill=label + 2, outline=0)  # 0: the unlabelled outline, as ADE20K's boundaries
    return np.asarray(labels)


def write_segmentation_set(root: PathLike, num_train: int = 16, num_val: int = 4, img_size: int = 128, seed: int = 0,
                           force: bool = False) -> Dict[str, Path]:
    """Write an ADE20K-format semantic segmentation set into ``root``.

    Labels: 0 unlabelled (ignored with ``reduce_zero_label=True``), then ``SEG_CLASSES`` from 1.

    Args:
        root: Output folder; created if missing.
        num_train: Training images.
        num_val: Validation images.
        img_size: Height and width of every image.
        seed: Seed of the generator; the same seed writes the same files.
        force: Replace the ``images`` and ``annotations`` folders if ``root`` is not empty.

    Returns:
        The ``training`` and ``validation`` image folders.
    """
    _check_sizes(num_train, num_val, img_size)
    root = check_output_dir(root, force)
    for sub in ("images", "annotations"):
        shutil.rmtree(root / sub, ignore_errors=True)
    rng = np.random.default_rng(seed)
    folders = {}
    for split, num in (("training", num_train), ("validation", num_val)):
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for index in range(1, num + 1):
            pixels, shapes = random_shapes(rng, img_size)
            Image.fromarray(pixels).save(image_dir / f"{index:06d}.jpg", quality=95)
            Image.fromarray(_label_map(shapes, img_size)).save(label_dir / f"{index:06d}.png")
        folders[split] = image_dir
    return folders
