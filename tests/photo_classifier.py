"""A small ViT trained in a few seconds on real images, for tests whose figures mean nothing on random weights.

The task: which of scikit-image's 15 bundled photographs a crop comes from (``tokenzoo.export.images.photographs``:
image i is a crop of photograph i % 15). Training crops and evaluation crops are disjoint (different offsets: other
positions, scales and mirrorings). A trained model has confident, well-separated logits, so agreement figures of its
INT8/FP16 files measure what quantization does to a real decision, unlike random weights (near-flat logits whose
top-1 any perturbation flips).
"""
from typing import Tuple

import timm
import torch
import torch.nn.functional as F

from tokenzoo.export.images import PHOTOGRAPHS, ImageSet, photographs

NUM_CLASSES = len(PHOTOGRAPHS)
IMG_SIZE = 64
TRAIN_IMAGES = 300
EVAL_OFFSET = 300


def labels(count: int, offset: int = 0) -> torch.Tensor:
    """Class (photograph index) of images offset..offset + count - 1."""
    return torch.arange(offset, offset + count) % NUM_CLASSES


def train_photograph_classifier(name: str = "vit_tiny_patch16_224", steps: int = 150, seed: int = 0,
                                **kwargs) -> Tuple[torch.nn.Module, float]:
    """Train a small model (``name`` with ``kwargs``, 64 px, 15 classes) on photograph crops.

    Returns:
        The model in eval mode and its top-1 accuracy on 60 held-out crops.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, img_size=IMG_SIZE, num_classes=NUM_CLASSES, **kwargs)
    train = torch.stack(photographs(IMG_SIZE, TRAIN_IMAGES).images)
    targets = labels(TRAIN_IMAGES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, TRAIN_IMAGES, (32,), generator=generator)
        loss = F.cross_entropy(model(train[index]), targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = evaluation_images()
    with torch.no_grad():
        accuracy = (model(torch.stack(held_out.images)).argmax(-1) == labels(60, EVAL_OFFSET)).float().mean()
    return model, float(accuracy)


def evaluation_images(count: int = 60) -> ImageSet:
    """Held-out crops (disjoint from the training crops)."""
    return photographs(IMG_SIZE, count, offset=EVAL_OFFSET)
