"""Expedit: token clustering and token reconstruction, training-free, for dense prediction.

Paper: "Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning", Weicong Liang et al.,
NeurIPS 2022 - https://arxiv.org/abs/2210.01035
Official code: https://github.com/Expedit-LargeScale-Vision-Transformer (Expedit-Segmenter: ``mmseg/ops/cluster.py``,
``mmseg/ops/reconstruction.py``, ``mmseg/models/backbones/hourglass_vit.py``; Expedit-SWAG for classification;
Expedit-DPT, Expedit-SAM).

The blocks up to ``cluster_loc`` run as in the ViT. After block ``cluster_loc`` (0-indexed, the official
``location``: the Segmenter backbone clusters after layer ``location``) the token clustering layer (Sec. 3, see
``layers.cluster``) turns the H x W patch tokens into h x w cluster tokens by local soft k-means: centres initialized
by adaptive average pooling, ``cluster_iters`` rounds, each token choosing among the centres of a ``cluster_window``
x ``cluster_window`` window of cells around its own, softmax(-``cluster_temperature`` * squared distance). The CLS
token stays in front, untouched; the later blocks run on CLS + h * w tokens with plain attention, as in the official
code. The layer runs at the start of block ``cluster_loc + 1``, so block ``cluster_loc``'s output is the full token
set. There are no new weights: every size loads its ViT's checkpoint as it is.

* Classification (``forward``): that is all, as in the paper's classification experiments (Expedit-SWAG).
* Dense maps (``forward_intermediates``, ``features_only`` and so the OpenMMLab backbone): blocks up to
  ``cluster_loc`` give their maps as the ViT does; the token reconstruction layer (Sec. 3) rebuilds every later
  requested block on the full grid: each position is the weighted sum of the refined cluster tokens of its
  ``recon_k`` nearest centres, with weights exp(-``recon_temperature`` * squared distance), L2-normalized, computed
  once at the clustering layer between the tokens entering clustering and the centres
  (``layers.reconstruction_weights``) and carried in the ``TokenRecord``, whose ``restore`` rebuilds each map.

Defaults are the paper's ADE20K Segmenter setting (ViT-L/16 at 640x640, a 40x40 grid: clustering after block 9 of
24, 28x28 clusters, 5 iterations, window 5, temperature 0.02, k = 20, reconstruction temperature 0.02), scaled to the
other sizes by two rules:

* ``cluster_loc``: the same share of blocks at full resolution (10 of 24): block round(10 * depth / 24) - 1, so 4 for
  the 12-block DeiTs and 9 for ViT-L;
* ``num_clusters``: the same fraction of each grid side, 0.7 (28 / 40), rounded half up, so any input size and aspect
  gets its grid: 10x10 at 224x224, 22x22 at 512x512, 28x28 at 640x640, 45x45 at 1024x1024.

The iterations, window, k and both temperatures are the paper's for every size. The temperatures multiply squared
distances, so they depend on the scale of the features they were tuned on (ViT-L): measured on the project's digits
reference model (width 96, ``tools/results/tradeoff_digits.json``), the official 0.02 makes the assignment nearly
uniform over the 5x5 window (the clusters become window averages) and top-1 falls from 93.6% to 41.8% at 0.7, while
``cluster_temperature=1.0`` keeps 92.5% and skipping the iterations (``cluster_iters=0``, the pooled centres) 91.1%.
Retune ``cluster_temperature`` for a narrow model; the defaults stay the paper's.

Differences from the official code, and why:

* Reconstruction is applied to the backbone's maps of every requested block after clustering, as the official DPT
  code does with the block outputs its head reads; the official Segmenter instead reconstructs the decode head's
  logits (its mask transformer runs on the cluster tokens). The heads here (UperNet, Mask R-CNN) need full-resolution
  maps.
* ``num_clusters`` may be a fraction of each grid side (the default), so every input size and aspect ratio gets its
  cluster grid; the official code takes a square count (784: a 28x28 grid whatever the input).
* Clustering runs after block ``cluster_loc`` for classification too; Expedit-SWAG clusters before its ``location``
  (``cluster_after_output=False``), i.e. its location l is ``cluster_loc = l - 1`` here. One meaning for both paths.
* The cost of clustering follows its window (O(N * window^2 * C)), not the grid, with the official result; the
  reconstruction keeps exactly ``recon_k`` centres per token and computes its weights without underflow; no
  hard-coded ``.cuda()``. See ``layers.cluster`` for these.
"""
from numbers import Integral, Real
from typing import Any, NamedTuple, Optional, Tuple

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from .layers import (NumClusters, TokenRecord, check_num_clusters, cluster_grid_size, reconstruction_weights,
                     token_clustering)
from .token_vit import TokenVisionTransformer, build_token_vit, deit_weights_cfg

__all__ = ["ClusterSettings", "Expedit", "ExpeditBlock", "paper_cluster_loc"]


class ClusterSettings(NamedTuple):
    """What the clustering layer does (immutable; see ``Expedit`` for the meaning of each field)."""

    num_clusters: NumClusters = 0.7
    iters: int = 5
    window: int = 5
    temperature: float = 0.02
    recon_k: int = 20
    recon_temperature: float = 0.02

    def cluster_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """The (h, w) cluster grid for an input's (H, W) patch grid, or ValueError when it cannot be built."""
        return cluster_grid_size(grid, self.num_clusters)

    def num_sources(self, num_clusters: int) -> int:
        """Cluster tokens each position is rebuilt from: ``recon_k``, at most the clusters there are (a fractional
        cluster grid on a small input can have fewer than ``recon_k``; DESIGN contract 8: any input size runs)."""
        return min(self.recon_k, num_clusters)


class ExpeditBlock(Block):
    """timm ``Block`` (same state-dict keys) that, as the first block after the clustering layer, clusters the patch
    tokens it receives before running on them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clustering: Optional[ClusterSettings] = None  # set on block cluster_loc + 1 by Expedit

    def num_patch_tokens_out(self, num_patch_tokens: int, grid: Tuple[int, int]) -> int:
        """Patch tokens after this block; a clustering block makes the cluster grid of the input's patch grid."""
        if self.clustering is None:
            return num_patch_tokens
        h, w = self.clustering.cluster_grid(grid)
        return h * w

    def cluster(self, x: torch.Tensor, record: TokenRecord) -> Tuple[torch.Tensor, TokenRecord]:
        """The token clustering layer: tokens (B, prefix + H * W, C) -> (B, prefix + h * w, C), prefix untouched.

        When the record tracks sources (dense maps), the reconstruction weights between the tokens entering
        clustering and the centres are computed here, once, and composed into the record, so every later map is
        rebuilt on the full grid by ``record.restore``.
        """
        settings = self.clustering
        if record.grid is None:
            raise ValueError("the clustering block needs the patch grid in its TokenRecord (TokenRecord.start)")
        num_prefix = record.num_prefix
        cluster_grid = settings.cluster_grid(record.grid)
        patches = x[:, num_prefix:]
        centres = token_clustering(patches, record.grid, cluster_grid, settings.iters, settings.window,
                                   settings.temperature)
        if record.sources is not None:
            recon_k = settings.num_sources(centres.shape[1])
            index, weights = reconstruction_weights(patches, centres, recon_k, settings.recon_temperature)
            # one centre per token is a hard source (weight 1), the record's k = 1 case
            record = record.follow(index, centres.shape[1], weights if recon_k > 1 else None)
        return torch.cat([x[:, :num_prefix], centres], dim=1), record

    def forward(self, x: torch.Tensor, record: TokenRecord = TokenRecord()) -> Tuple[torch.Tensor, TokenRecord]:
        """Tokens (B, prefix + N, C) -> (B, prefix + N_out, C), N_out = h * w when this block clusters, and the
        record followed through the block."""
        if self.clustering is not None:
            x, record = self.cluster(x, record)
        return super().forward(x), record


def paper_cluster_loc(depth: int) -> int:
    """The paper's clustering location (after block 9 of ViT-L's 24) scaled to ``depth``: round(10 * depth / 24) - 1,
    at least 0."""
    return max(0, int(10 * depth / 24 + 0.5) - 1)


def _check_int(name: str, value: Any, low: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _check_temperature(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number (it multiplies the squared distances; the paper uses "
                         f"0.02), got {value!r}")
    return float(value)


class Expedit(TokenVisionTransformer):
    """Vision Transformer with Expedit's token clustering after ``cluster_loc`` and token reconstruction for dense
    maps; see the module docstring."""

    zero_reduction = dict(cluster_loc=-1)  # not None: timm.create_model drops None kwargs
    adds_parameters = False
    reduces_tokens = True

    def __init__(
            self,
            cluster_loc: Optional[int] = 4,
            num_clusters: NumClusters = 0.7,
            cluster_iters: int = 5,
            cluster_window: int = 5,
            cluster_temperature: float = 0.02,
            recon_k: int = 20,
            recon_temperature: float = 0.02,
            **kwargs,
    ) -> None:
        """
        Args:
            cluster_loc: 0-indexed block after which clustering runs (the official ``location``), negative from the
                end. After the last block (-1) no block runs on the clusters, and the model is its ViT, as with None
                (``timm.create_model`` drops None keyword arguments: use -1 there).
            num_clusters: Cluster grid: a fraction in (0, 1] of each side of the patch grid (rounded half up), or
                (h, w), which must fit every input's grid.
            cluster_iters: Rounds of soft k-means (0 keeps the average-pooled centres).
            cluster_window: Odd side of the window of cells whose centres a token may join (5: +-2 cells).
            cluster_temperature: Multiplies the squared distances in the assignment softmax (small = soft).
            recon_k: Nearest centres each position is rebuilt from in dense maps, at least 1 and at most a fixed
                (h, w) cluster grid's h * w; with a fractional grid, capped at the clusters of each input.
            recon_temperature: Multiplies the squared distances in the reconstruction weights.
            **kwargs: timm ``VisionTransformer`` arguments.
        """
        depth = kwargs.get("depth", 12)
        if cluster_loc is not None:
            allowed = (f"None or a block index in [{-depth}, {depth - 1}] (depth {depth}; negative counts from the "
                       f"end, and the last block, -1, leaves no block to run on the clusters: no clustering)")
            if isinstance(cluster_loc, bool) or not isinstance(cluster_loc, Integral) or \
                    not -depth <= cluster_loc < depth:
                raise ValueError(f"cluster_loc must be {allowed}, got {cluster_loc!r}")
            cluster_loc = int(cluster_loc) % depth
        settings = ClusterSettings(
            num_clusters=check_num_clusters(num_clusters),
            iters=_check_int("cluster_iters", cluster_iters, 0, "an int >= 0"),
            window=_check_int("cluster_window", cluster_window, 1, "an odd int >= 1 (5: +-2 cells)"),
            temperature=_check_temperature("cluster_temperature", cluster_temperature),
            recon_k=_check_int("recon_k", recon_k, 1, "an int >= 1 (and at most the number of clusters)"),
            recon_temperature=_check_temperature("recon_temperature", recon_temperature),
        )
        if settings.window % 2 == 0:
            raise ValueError(f"cluster_window must be an odd int >= 1 (5: +-2 cells), got {cluster_window}")
        if isinstance(settings.num_clusters, tuple) and settings.recon_k > settings.num_clusters[0] * \
                settings.num_clusters[1]:
            raise ValueError(f"recon_k={recon_k} is larger than the {settings.num_clusters} clusters: recon_k must be "
                             f"in [1, {settings.num_clusters[0] * settings.num_clusters[1]}]")
        super().__init__(block_fn=ExpeditBlock, **kwargs)
        self.cluster_loc = cluster_loc
        self.cluster_settings = settings
        if cluster_loc is not None and cluster_loc + 1 < depth:
            self.blocks[cluster_loc + 1].clustering = settings  # the layer between block cluster_loc and the next


def _large_weights_cfg() -> dict:
    """timm's ViT-L/16 AugReg ImageNet-21k -> 1k weights at 384, the ViT-L the official Segmenter starts from."""
    return {
        # the hub's state dict (a local copy loads with pretrained_cfg_overlay=dict(file=...)); the original JAX .npz
        # loads with model.load_pretrained(path), timm's ViT npz reader
        "hf_hub_id": "timm/vit_large_patch16_384.augreg_in21k_ft_in1k",
        "num_classes": 1000, "input_size": (3, 384, 384), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2210.01035", "paper_name": "Expedit",
        "origin_url": "https://github.com/google-research/vision_transformer",
        "notes": ("ViT-L/16 AugReg weights (ImageNet-21k, fine-tuned on ImageNet-1k at 384) used as they are: the "
                  "checkpoint the official Expedit-Segmenter ViT-L configs load (L_16-i21k-300ep-...-res_384.npz).",),
    }


default_cfgs = generate_default_cfgs({
    **{f"expedit_{size}.deit_in1k": deit_weights_cfg(size, paper_ids="arXiv:2210.01035", paper_name="Expedit")
       for size in ("tiny", "small", "base")},
    "expedit_large.augreg_in21k_ft_in1k": _large_weights_cfg(),
})


def _create_expedit(variant: str, pretrained: bool = False, **kwargs) -> Expedit:
    return build_token_vit(Expedit, variant, pretrained, **kwargs)


@register_model
def expedit_tiny(pretrained: bool = False, **kwargs) -> Expedit:
    """Expedit on DeiT-Ti (192 dim, 3 heads): clustering after block 4 into 0.7 of each grid side."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, cluster_loc=paper_cluster_loc(12))
    return _create_expedit("expedit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def expedit_small(pretrained: bool = False, **kwargs) -> Expedit:
    """Expedit on DeiT-S (384 dim, 6 heads): clustering after block 4 into 0.7 of each grid side."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, cluster_loc=paper_cluster_loc(12))
    return _create_expedit("expedit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def expedit_base(pretrained: bool = False, **kwargs) -> Expedit:
    """Expedit on DeiT-B (768 dim, 12 heads): clustering after block 4 into 0.7 of each grid side."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, cluster_loc=paper_cluster_loc(12))
    return _create_expedit("expedit_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def expedit_large(pretrained: bool = False, **kwargs) -> Expedit:
    """Expedit on ViT-L/16 (1024 dim, 24 blocks, 16 heads, 384 px): the paper's setting, clustering after block 9
    into 0.7 of each grid side (28x28 of 40x40 at 640)."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, img_size=384,
                      cluster_loc=paper_cluster_loc(24))
    return _create_expedit("expedit_large", pretrained=pretrained, **dict(model_args, **kwargs))
