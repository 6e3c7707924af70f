"""Picture what a token-reduction model did to a real photograph's tokens at chosen blocks.

For each model (one row) and block (one panel), the model's own ``token_pictures`` (``tokenzoo.TokenVisionTransformer``;
a family overrides ``token_picture`` to describe itself, so a new family needs no change here) gives either

* groups: the grid positions each current token carries. A token that carries one position (kept) shows its patch
  as it is; a token that carries several (fused by EViT, merged by ToMe / MCTF, a cluster of Expedit) fills all of
  them with their average colour, with a line between different tokens, as in the ToMe paper's figures;
* attention: the share of heads whose sparse connectivity selects each key for a query (Sparsifiner), or the
  attention a compressed token pays to the lookup tokens (LookupViT), drawn over the photograph, the query marked.

The photograph is one of scikit-image's bundled ones (``--image astronaut``, the default) or a file. Weights are
random unless ``--checkpoint`` names a file; the figure's title says which.

Usage::

    python tools/visualize_tokens.py evit_small tome_small mctf_small expedit_small sparsifiner_small \\
        lookupvit_small --blocks 3 6 9 11 --image astronaut --out tokens.png
"""
import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tokenzoo.cli import user_errors
from tokenzoo.export.files import atomic_output
from tokenzoo.export.images import load_picture, model_normalization, normalize
from tokenzoo.export.files import check_out_path
from tokenzoo.export.onnx_export import parse_model_kwargs
from tokenzoo.profiling import build_model, to_img_size, validate_model_name

__all__ = ['draw_attention', 'draw_groups', 'main', 'token_figure']


def _pixels(values: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A (H, W) per-position map blown up to the image's pixels (each position covers one patch)."""
    grid_h, grid_w = values.shape
    return np.repeat(np.repeat(values, image.shape[0] // grid_h, axis=0), image.shape[1] // grid_w, axis=1)


def draw_groups(groups: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Fill every group of more than one position with its mean colour and outline the groups.

    Args:
        groups: (H, W) int token per grid position, -1 for none.
        image: (H * p, W * p, 3) uint8 picture.

    Returns:
        (H * p, W * p, 3) uint8.
    """
    labels = _pixels(groups, image)
    flat = labels.reshape(-1) + 1  # -1 (no token) becomes its own group 0
    counts = np.bincount(flat)
    means = np.stack([np.bincount(flat, weights=image[..., c].reshape(-1)) for c in range(3)], axis=1)
    means = means / np.maximum(counts, 1)[:, None]
    positions = np.bincount(groups.reshape(-1) + 1)
    shared = (positions[flat] > 1).reshape(labels.shape)
    out = np.where(shared[..., None], means[flat].reshape(image.shape), image)
    out = np.where((labels == -1)[..., None], 0, out)  # dropped without a token: black
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    out[edge] = 255
    return out.astype(np.uint8)


def draw_attention(values: np.ndarray, query: tuple[int, int], image: np.ndarray) -> np.ndarray:
    """The photograph dimmed, a heat map of ``values`` (H, W) in [0, 1] over it, the query's patch outlined."""
    from matplotlib import colormaps

    heat = colormaps['inferno'](np.clip(_pixels(values, image), 0, 1))[..., :3] * 255
    out = 0.35 * image + 0.65 * heat
    patch_h, patch_w = image.shape[0] // values.shape[0], image.shape[1] // values.shape[1]
    top, left = query[0] * patch_h, query[1] * patch_w
    box = out[top:top + patch_h, left:left + patch_w]
    box[[0, -1], :] = (0, 255, 0)
    box[:, [0, -1]] = (0, 255, 0)
    return out.astype(np.uint8)


def token_figure(
        rows: Sequence[tuple[str, torch.nn.Module]],
        image_source: str,
        blocks: Sequence[int],
        img_size: tuple[int, int],
        query: tuple[int, int] | None,
        weights: str,
):
    """A matplotlib figure: one row per (name, model), the photograph and one panel per block."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    picture = load_picture(image_source, img_size)
    image = np.asarray(picture, dtype=np.float64)
    cols = 1 + len(blocks)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.4 * len(rows)), squeeze=False, dpi=100)
    for r, (name, model) in enumerate(rows):
        x = normalize(picture, *model_normalization(model)).unsqueeze(0)
        pictures = model.token_pictures(x, list(blocks), query)
        axes[r, 0].imshow(image.astype(np.uint8))
        axes[r, 0].set_title(name, fontsize=8)
        for c, (block, pic) in enumerate(zip(blocks, pictures), 1):
            values = pic.values[0].cpu().numpy()
            panel = draw_groups(values, image) if pic.kind == 'groups' else \
                draw_attention(values, pic.query, image)
            axes[r, c].imshow(panel)
            axes[r, c].set_title(f"block {block}: {pic.label}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{image_source} at {img_size[0]}x{img_size[1]}; weights: {weights}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description='Picture what token-reduction models did to a photograph\'s tokens '
                                                 'at chosen blocks (one row per model).')
    parser.add_argument('models', nargs='+', metavar='MODEL', help='tokenzoo model names, e.g. evit_small')
    parser.add_argument('--blocks', type=int, nargs='+', default=[3, 6, 9, 11], help='blocks to show (0-indexed)')
    parser.add_argument('--image', default='astronaut',
                        help="one of scikit-image's bundled photographs (astronaut, chelsea, coffee, ...) or an "
                             "image file (default: astronaut)")
    parser.add_argument('--img-size', type=int, default=224, help='input size (default: 224)')
    parser.add_argument('--query', type=int, nargs=2, metavar=('ROW', 'COL'),
                        help='patch-grid position of the query for attention pictures (default: the centre)')
    parser.add_argument('--checkpoint', action='append', default=[], metavar='MODEL=PATH',
                        help='local weights for MODEL (repeatable); random weights otherwise')
    parser.add_argument('--model-kwargs', nargs='+', metavar='KWARGS', help='constructor arguments for every model')
    parser.add_argument('--out', type=Path, required=True, help='the PNG to write')
    parser.add_argument('--force', action='store_true', help='overwrite --out')
    args = parser.parse_args(argv)
    with user_errors(parser):
        img_size = to_img_size(args.img_size)
        check_out_path(args.out, args.force)
        kwargs = parse_model_kwargs(args.model_kwargs)
        checkpoints = {}
        for item in args.checkpoint:
            name, sep, path = item.partition('=')
            if not sep or name not in args.models:
                raise ValueError(f"--checkpoint {item!r}: write MODEL=PATH with MODEL one of {args.models}")
            if not Path(path).is_file():
                raise FileNotFoundError(f"--checkpoint {item!r}: {path} is not a file")
            checkpoints[name] = path
        rows = []
        for name in args.models:
            validate_model_name(name)
            model = build_model(name, img_size=img_size, checkpoint=checkpoints.get(name), **kwargs)
            if not hasattr(model, 'token_pictures'):
                raise ValueError(f"{name} is not a tokenzoo model (it has no token_pictures); list them with "
                                 f"`python -c \"import tokenzoo; print(tokenzoo.list_models())\"`")
            depth = len(model.blocks)
            bad = [b for b in args.blocks if not -depth <= b < depth]
            if bad:
                raise ValueError(f"--blocks {bad}: {name} has blocks 0..{depth - 1}")
            rows.append((name, model))
        load_picture(args.image, img_size)  # a missing file or unknown name fails here, before any model runs
    weights = ', '.join(f'{n}: {p}' for n, p in checkpoints.items()) if checkpoints else 'random (no --checkpoint)'
    fig = token_figure(rows, args.image, args.blocks, img_size, tuple(args.query) if args.query else None, weights)
    with atomic_output(args.out, args.force) as tmp:  # written whole or not at all
        fig.savefig(tmp, format='png', metadata={'Software': None})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
