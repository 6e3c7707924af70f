"""The timm ``VisionTransformer`` every token-reduction family subclasses.

What changes against timm's class is only what token reduction forces:

* blocks take and return ``(x, record)``: a ``TokenRecord`` (see ``layers.record``) of the prefix-token count, the
  patch grid, token sizes and which current tokens carry each position of the grid. Sources are tracked only when
  dense maps are asked for
  (``forward_intermediates``, ``features_only``), so the classification path pays nothing for them;
* ``forward_intermediates`` restores every requested block's tokens onto the full patch grid (DESIGN contract 5);
* ``token_counts`` asks each block how many patch tokens it outputs, the same function the block's forward uses, so
  the reported counts cannot drift from what runs;
* any input size that is a multiple of the patch size works: the position embedding is resampled when the grid
  differs from the one it was trained at, and used as is otherwise (timm resamples even at equal size while
  exporting, which would put a needless Resize into every ONNX graph; our graphs are specialized to one input size
  anyway, because token counts depend on it).

A block used with this class implements::

    forward(x: Tensor, record: TokenRecord) -> Tuple[Tensor, TokenRecord]
    num_patch_tokens_out(num_patch_tokens: int, grid: Tuple[int, int]) -> int   # grid: the input's patch grid
"""
from typing import Any, ClassVar, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer, build_model_with_cfg, checkpoint
from timm.models.vision_transformer import checkpoint_filter_fn, feature_take_indices

from .layers import RSchedule, TokenRecord, check_merge_window, reduction_schedule

__all__ = [
    "TokenPicture", "TokenVisionTransformer", "build_token_vit", "check_one_cls_token", "deit_weights_cfg",
    "set_merge_schedule", "to_2tuple_size",
]

DEIT_FILES = {
    "tiny": "deit_tiny_patch16_224-a1311bcf",
    "small": "deit_small_patch16_224-cd65a155",
    "base": "deit_base_patch16_224-b5f2ef4d",
}


def to_2tuple_size(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(H, W) from an int or a pair, with a clear error for anything else.

    0-d integer tensors count as ints: ``torch.jit.trace`` and the TorchScript ONNX exporter hand the input's shape
    over as tensors; the token counts depend on the size, so a traced graph is specialized to it anyway.
    """
    size = (img_size, img_size) if not isinstance(img_size, (tuple, list, torch.Size)) else tuple(img_size)
    if len(size) == 2 and all(_is_int(s) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"img_size must be an int or a pair of ints (H, W), got {img_size!r}")


def _is_int(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex()
    return isinstance(value, int) and not isinstance(value, bool)


def check_one_cls_token(family: str, global_pool: str, class_token: bool, reg_tokens: int) -> None:
    """Merging families protect exactly one leading CLS token: no register tokens, CLS pooling (or none)."""
    if not class_token or reg_tokens or global_pool not in ("token", ""):
        raise ValueError(f"{family} models here protect exactly one CLS token and pool with it: class_token must be "
                         f"True, reg_tokens 0 and global_pool 'token' (or '' for no pooling); got class_token="
                         f"{class_token}, reg_tokens={reg_tokens}, global_pool={global_pool!r}")


def _check_no_attn_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask and is_causal are not supported by token-reduction models: the token set changes "
                         "from block to block, so a mask fixed for the input tokens cannot follow it; pass neither")


def set_merge_schedule(
        blocks: Sequence[torch.nn.Module], r: RSchedule, reduction_loc: Optional[Sequence[int]],
        merge_window: Optional[int],
) -> None:
    """Give merging blocks their amounts (``blk.r``, see ``reduction_schedule``) and the windowed split
    (``blk.merge_window``) to the first block that merges: the only one whose tokens are still the full grid."""
    amounts = reduction_schedule(r, len(blocks), reduction_loc)
    merge_window = check_merge_window(merge_window)
    first = next((i for i, amount in enumerate(amounts) if amount), None)
    for i, (blk, amount) in enumerate(zip(blocks, amounts)):
        blk.r = amount
        blk.merge_window = merge_window if i == first else None


class TokenPicture(NamedTuple):
    """What one block did to the tokens, on the input's patch grid (``TokenVisionTransformer.token_pictures``).

    Attributes:
        kind: 'groups': ``values`` (B, H, W) int64, the current token that carries each grid position (the heaviest
            one where several do), -1 where none does: positions with the same value were merged, fused or clustered
            into one token, a kept token is a group of one. 'attention': ``values`` (B, H, W) float in [0, 1], how
            much ``query`` attends to (or selects) each position.
        values: See ``kind``.
        label: A short line saying what the picture shows (e.g. '71 patch tokens').
        query: (row, col) of the query position of an 'attention' picture, None for 'groups'.
    """

    kind: str
    values: torch.Tensor
    label: str
    query: Optional[Tuple[int, int]] = None


class TokenVisionTransformer(VisionTransformer):
    """timm ViT whose blocks reduce tokens; see the module docstring for what differs.

    Each family declares what generic code (the registry-wide tests, tools) may rely on, as class attributes:

    * ``zero_reduction``: the keyword arguments that switch its reduction off, under which a model loaded with a
      timm DeiT/ViT state dict computes exactly what that timm model computes (DESIGN contract 2); None for a family
      that is a different architecture and has no such setting;
    * ``adds_parameters``: the family has parameters a DeiT/ViT checkpoint lacks (they keep their initialization
      when such a checkpoint is loaded, and the checkpoint filter lists them);
    * ``reduces_tokens``: its default setting reduces the patch tokens from block to block.
    """

    zero_reduction: ClassVar[Optional[Dict[str, Any]]] = None
    adds_parameters: ClassVar[bool] = False
    reduces_tokens: ClassVar[bool] = True

    def __init__(self, **kwargs) -> None:
        if kwargs.get("patch_drop_rate", 0.0):
            raise ValueError("patch_drop_rate must be 0 for token-reduction models: patch dropout and token "
                             "reduction both decide which tokens survive and would undo each other's bookkeeping")
        if kwargs.get("dynamic_img_pad", False):
            raise ValueError("dynamic_img_pad is not supported: inputs must be multiples of the patch size")
        # timm's dynamic_img_size is always on here (any multiple of the patch size works); True is accepted as the
        # no-op it is, False cannot be honoured.
        if not kwargs.pop("dynamic_img_size", True):
            raise ValueError("dynamic_img_size=False is not supported: tokenzoo models always take any input size "
                             "that is a multiple of the patch size (leave dynamic_img_size out or pass True)")
        type(self).check_pooling(kwargs.get("global_pool", "token"), kwargs.get("class_token", True),
                                 kwargs.get("reg_tokens", 0))
        super().__init__(dynamic_img_size=True, **kwargs)

    @classmethod
    def check_pooling(cls, global_pool: str, class_token: bool, reg_tokens: int) -> None:
        """Raise ValueError for prefix tokens or a global pooling the family cannot honour.

        Called by the constructor and by ``reset_classifier``, so a head reset cannot bypass it. Families that score
        or protect tokens through the CLS token override it; this default accepts what timm accepts.
        """

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier``, with the family's pooling rule applied to a new ``global_pool``."""
        if global_pool is not None:
            type(self).check_pooling(global_pool, self.has_class_token, self.num_reg_tokens)
        super().reset_classifier(num_classes, global_pool)

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Adapt a checkpoint to this model (used by timm's pretrained loading and the OpenMMLab backbone).

        The parameter-free families take DeiT checkpoints (and those of the papers' official code, which keep timm's
        key names, weights under 'model') through timm's ViT filter, which also resamples the position embedding to
        this model's grid. A family that adds parameters overrides this.
        """
        return checkpoint_filter_fn(state_dict, self, adapt_layer_scale=True)

    def grid_size(self, img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
        """Patch grid for an input size, or ValueError when the size is not a multiple of the patch size."""
        height, width = to_2tuple_size(img_size)
        ph, pw = self.patch_embed.patch_size
        if height <= 0 or width <= 0 or height % ph or width % pw:
            raise ValueError(f"input size {height}x{width} is not allowed: height and width must be positive "
                             f"multiples of the patch size {ph}x{pw} (e.g. {ph * 14}x{pw * 14})")
        return height // ph, width // pw

    def token_counts(self, img_size: Optional[Union[int, Sequence[int]]] = None) -> List[int]:
        """Patch tokens in each block's output for an input size, without running the model.

        Prefix (CLS) tokens are not counted; a fused or merged token counts once.

        Args:
            img_size: Input size; the model's default input size when None.
        """
        grid = self.grid_size(self.patch_embed.img_size if img_size is None else img_size)
        counts, num_tokens = [], grid[0] * grid[1]
        for blk in self.blocks:
            num_tokens = blk.num_patch_tokens_out(num_tokens, grid)
            counts.append(num_tokens)
        return counts

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) patch embeddings -> (B, prefix + H * W, C) tokens with position embedding."""
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is None:
            return self.pos_drop(torch.cat(prefix + [x], dim=1))
        pos_embed = self.pos_embed
        if (H, W) != tuple(self.patch_embed.grid_size):
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.token_counts(tuple(x.shape[-2:]))  # input size and the family's schedule checked before any compute
        x = self.patch_embed(x)
        return self.norm_pre(self._pos_embed(x))

    def _run_block(
            self, blk: torch.nn.Module, x: torch.Tensor, record: TokenRecord,
    ) -> Tuple[torch.Tensor, TokenRecord]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, record)
        return blk(x, record)

    def _start(self, x: torch.Tensor, track_sources: bool) -> Tuple[torch.Tensor, TokenRecord]:
        """Embedded tokens of images x and their record (grid and prefix count; sources if ``track_sources``)."""
        grid = self.grid_size(tuple(x.shape[-2:]))
        x = self._embed(x)
        return x, TokenRecord.start(x, self.num_prefix_tokens, grid, track_sources, self.num_reg_tokens)

    @property
    def pools_positions(self) -> bool:
        """Whether the head pools over patch positions (average, max, attention pooling) instead of taking the CLS
        token. Then ``forward_features`` returns the final tokens restored onto the full patch grid, so the pooling
        sees every position as the base model does: a merged token counts as many times as it has parts (the
        size-weighted average ToMe uses for MAE models), a reconstructed position as its reconstruction."""
        return self.global_pool not in ("token", "")

    def _final_features(self, x: torch.Tensor, record: TokenRecord,
                        last_carried: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward_features``' output from the last block's tokens and record: the final norm of the tokens, on the
        full grid when the head pools over positions (``pools_positions``; ``last_carried`` then gives positions no
        token carries their last value).

        A family whose record carries a second token stream (``record.side_tokens``) overrides this to include it.
        """
        if self.pools_positions:
            x = torch.cat([x[:, :record.num_prefix], record.restore(x, previous=last_carried)], dim=1)
        return self.norm(x)

    def _blocks(
            self, x: torch.Tensor, record: TokenRecord, blocks: Sequence[torch.nn.Module],
    ) -> Iterator[Tuple[torch.Tensor, TokenRecord, Optional[torch.Tensor]]]:
        """Run ``blocks``, yielding after each its tokens, record and, when sources are tracked, the map of what
        positions no current token carries hold: the value they had in the input of the block that dropped them
        (restored, cheaply, only at the blocks that reduce)."""
        last_carried = None
        for blk in blocks:
            x_in, record_in = x, record
            x, record = self._run_block(blk, x, record)
            if record.sources is not record_in.sources:
                last_carried = record_in.restore(x_in, previous=last_carried)
            yield x, record, last_carried

    def forward_features(
            self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
    ) -> torch.Tensor:
        """Tokens after the last block and the final norm (B, prefix + N_last, C).

        ``attn_mask`` and ``is_causal`` are timm's signature; token reduction changes the token set from block to
        block, so no fixed mask can follow it and only their defaults are accepted.
        """
        _check_no_attn_mask(attn_mask, is_causal)
        x, record = self._start(x, track_sources=self.pools_positions)
        last_carried = None
        for x, record, last_carried in self._blocks(x, record, self.blocks):
            pass
        return self._final_features(x, record, last_carried)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask, is_causal))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Forward that also returns full-resolution maps of the requested blocks.

        Each map has one entry per patch-grid position: a kept token at its own position, a merged or fused token at
        every position it carries, a position rebuilt from several tokens (reconstruction) at their weighted sum, and
        a position no current token carries at the value it had in the last block output that still carried it.

        Args:
            x: Images, (B, 3, H, W) with H and W multiples of the patch size.
            indices: Last n blocks if an int, all if None, those listed if a sequence (negative from the end).
            return_prefix_tokens: Also return each block's prefix (CLS) tokens, as (map, prefix) pairs.
            norm: Apply the final norm to the maps.
            stop_early: Stop after the last requested block.
            output_fmt: 'NCHW' for (B, C, H/p, W/p) maps, 'NLC' for (B, H/p * W/p, C).
            intermediates_only: Return only the maps.
            output_dict: Return a dict as timm does: 'image_intermediates' (the maps), 'image_intermediates_prefix'
                (with ``return_prefix_tokens``) and 'image_features' (unless ``intermediates_only``).
            attn_mask: timm's argument; only None is accepted (see ``forward_features``).
            is_causal: timm's argument; only False is accepted.

        Returns:
            The maps, or (final features, maps), or the dict; the final features are those of ``forward_features``.
        """
        _check_no_attn_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        gh, gw = self.grid_size((height, width))
        num_prefix = self.num_prefix_tokens

        x, record = self._start(x, track_sources=True)
        last_carried = None
        maps, prefixes = [], []
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        for i, (x, record, last_carried) in enumerate(self._blocks(x, record, blocks)):
            if i in take_indices:
                grid = record.restore(x, previous=last_carried)
                maps.append(self.norm(grid) if norm else grid)
                prefixes.append(x[:, :num_prefix])

        if output_fmt == "NCHW":
            maps = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in maps]
        if output_dict:
            result: Dict[str, Any] = dict(image_intermediates=maps)
            if return_prefix_tokens and num_prefix:
                result["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                result["image_features"] = self._final_features(x, record, last_carried)
            return result
        if return_prefix_tokens and num_prefix:
            maps = list(zip(maps, prefixes))
        if intermediates_only:
            return maps
        return self._final_features(x, record, last_carried), maps


    @torch.no_grad()
    def token_pictures(
            self, x: torch.Tensor, indices: Union[int, Sequence[int]], query: Optional[Tuple[int, int]] = None,
    ) -> List[TokenPicture]:
        """What the model did to the tokens of images x at the blocks ``indices`` (``tools/visualize_tokens.py``).

        Runs the blocks with sources tracked (the machinery of ``forward_intermediates``) and asks
        ``token_picture`` at every requested block, so a family describes its pictures by overriding that one method.

        Args:
            x: Images (B, 3, H, W).
            indices: Blocks (negative from the end), or an int n for the last n blocks.
            query: (row, col) of a patch-grid position for families whose picture is an attention (default: the
                centre of the grid).

        Returns:
            One picture per requested block, in block order.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        grid = self.grid_size(tuple(x.shape[-2:]))
        query = (grid[0] // 2, grid[1] // 2) if query is None else tuple(query)
        if not (0 <= query[0] < grid[0] and 0 <= query[1] < grid[1]):
            raise ValueError(f"query {query} is outside the {grid[0]}x{grid[1]} patch grid: allowed rows "
                             f"0..{grid[0] - 1}, columns 0..{grid[1] - 1}")
        was_training = self.training
        self.eval()
        try:
            x, record = self._start(x, track_sources=True)
            pictures = []
            for i, blk in enumerate(self.blocks[:max_index + 1]):
                x_in, record_in = x, record
                x, record = self._run_block(blk, x, record)
                if i in take_indices:
                    pictures.append(self.token_picture(i, x_in, record_in, x, record, query))
        finally:
            self.train(was_training)
        return pictures

    def token_picture(
            self, index: int, x_in: torch.Tensor, record_in: TokenRecord, x_out: torch.Tensor,
            record_out: TokenRecord, query: Tuple[int, int],
    ) -> TokenPicture:
        """The picture of block ``index`` from its input and output tokens and records (see ``token_pictures``).

        This default serves every family that reduces tokens through the record: the groups of grid positions each
        output token carries (kept, merged, fused, clustered). A family whose work is not a grouping (sparse
        attention, a second token stream) overrides it.
        """
        num_patch = x_out.shape[1] - record_out.num_prefix
        sources, weights = record_out.sources, record_out.source_weights
        carrier = sources[..., 0] if weights is None else sources.gather(-1, weights.argmax(-1, keepdim=True))[..., 0]
        carrier = torch.where(carrier < num_patch, carrier, torch.full_like(carrier, -1))
        return TokenPicture("groups", carrier.reshape(-1, *record_out.grid), f"{num_patch} patch tokens")


def deit_weights_cfg(size: str, paper_ids: str, paper_name: str, **kwargs) -> Dict[str, Any]:
    """Pretrained cfg of a parameter-free family that reuses the DeiT ImageNet-1k weights of ``size`` as they are."""
    name = DEIT_FILES[size]
    return {
        "hf_hub_id": f"timm/{name.rsplit('-', 1)[0]}.fb_in1k",
        "url": f"https://dl.fbaipublicfiles.com/deit/{name}.pth",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": paper_ids, "paper_name": paper_name,
        "origin_url": "https://github.com/facebookresearch/deit",
        "notes": (f"DeiT-{size} ImageNet-1k weights used as they are ({paper_name} adds no parameters); the paper's "
                  "accuracy figures are for its own training or fine-tuning, not for these weights.",),
        **kwargs,
    }


def build_token_vit(
        model_cls: Type[TokenVisionTransformer], variant: str, pretrained: bool = False, **kwargs,
) -> TokenVisionTransformer:
    """``build_model_with_cfg`` for a family: pretrained loading through timm, ``features_only`` through
    ``forward_intermediates`` (timm's 'getter' feature wrapper)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=lambda state_dict, model: model.checkpoint_filter(state_dict),
        pretrained_strict=not model_cls.adds_parameters,  # the new parameters keep their initialization
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
