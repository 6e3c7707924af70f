"""``TokenZooViT``: any tokenzoo family or timm ViT as an mmdet / mmseg backbone, chosen by name.

The backbone is a thin adapter over the timm contract every tokenzoo model implements (DESIGN contracts 1 and 5):
it builds the model with ``timm.create_model(model_name, **model_kwargs)`` and returns
``forward_intermediates(x, out_indices, output_fmt="NCHW", intermediates_only=True)`` as a tuple of full-resolution
maps, stride = patch size (16). Nothing here knows a family: a new family is a new ``model_name`` in a config.

Pretrained weights (``init_cfg=dict(type="Pretrained", checkpoint=..., prefix=...)``) are loaded here rather than by
mmengine's ``PretrainedInit`` because they need the model's checkpoint filter: a DeiT/ViT state dict trained at 224
carries a 14x14 position embedding that is resampled to this backbone's ``img_size`` grid.
"""
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import timm
import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from mmengine.runner import CheckpointLoader
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

import tokenzoo

__all__ = ["TokenZooViT", "check_model_name"]

_OWN_PREFIX = "vit."  # keys of this backbone's own state dict (e.g. a Runner checkpoint under 'backbone.')


def check_model_name(model_name: Any) -> str:
    """Check that ``model_name`` is a timm architecture (tokenzoo families included) without building it.

    Raises:
        ValueError: Not a string, or not registered with timm.
    """
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise ValueError(
            f"unknown backbone model_name {model_name!r}: tokenzoo models are {', '.join(tokenzoo.list_models())}; "
            f"plain timm ViTs (e.g. 'deit_small_patch16_224') work too, list them with "
            f"`python -c \"import timm; print(timm.list_models('*vit*'))\"`")
    return model_name


def _pretrained_checkpoint(init_cfg: Any) -> Optional[Dict[str, Any]]:
    """The Pretrained entry of an mmengine ``init_cfg`` (a dict or a list of dicts), checked, or None."""
    entries = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    pretrained = [cfg for cfg in entries if isinstance(cfg, dict) and cfg.get("type") == "Pretrained"]
    if not pretrained:
        return None
    if len(pretrained) > 1 or len(entries) > 1:
        raise ValueError(f"init_cfg with a Pretrained entry must be that entry alone, got {init_cfg!r}")
    cfg = dict(pretrained[0])
    unknown = set(cfg) - {"type", "checkpoint", "prefix", "map_location"}
    if unknown:
        raise ValueError(f"init_cfg Pretrained takes checkpoint, prefix and map_location; unknown keys "
                         f"{sorted(unknown)}")
    checkpoint = cfg.get("checkpoint")
    if not isinstance(checkpoint, (str, Path)) or not str(checkpoint):
        raise ValueError(f"init_cfg Pretrained needs checkpoint=<path or URL>, got {checkpoint!r}")
    checkpoint = str(checkpoint)
    # URLs (http(s)://, and mmengine's open-mmlab:// style schemes) are fetched by mmengine when weights are loaded.
    if "://" not in checkpoint and not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"init_cfg Pretrained checkpoint {checkpoint!r} does not exist (relative paths are "
                                f"resolved from the working directory {str(Path.cwd())!r})")
    return dict(checkpoint=checkpoint, prefix=cfg.get("prefix"), map_location=cfg.get("map_location", "cpu"))


def _checkpoint_filter(model: nn.Module, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The model's own checkpoint filter (every tokenzoo family has one); timm's ViT filter for timm's ViTs."""
    if hasattr(model, "checkpoint_filter"):
        return model.checkpoint_filter(state_dict)
    return checkpoint_filter_fn(state_dict, model)


def _strip_prefix(state_dict: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


@MODELS.register_module()
class TokenZooViT(BaseModule):
    """A tokenzoo family or timm ViT, built by name, returning stride-16 NCHW maps of the blocks in ``out_indices``.

    Example config::

        backbone=dict(type="TokenZooViT", model_name="evit_small", model_kwargs=dict(keep_rate=0.7),
                      out_indices=(3, 5, 7, 11), img_size=512, drop_path_rate=0.1,
                      init_cfg=dict(type="Pretrained", checkpoint="deit_small_patch16_224-cd65a155.pth"))
    """

    def __init__(
            self,
            model_name: str,
            model_kwargs: Optional[Dict[str, Any]] = None,
            out_indices: Sequence[int] = (-1,),
            img_size: Optional[Any] = None,
            drop_path_rate: float = 0.0,
            final_norm: bool = False,
            with_cp: bool = False,
            family: Optional[str] = None,
            family_kwargs: Optional[Dict[str, Any]] = None,
            init_cfg: Optional[Any] = None,
    ) -> None:
        """
        Args:
            model_name: timm architecture name, e.g. ``evit_small`` or ``deit_small_patch16_224``.
            model_kwargs: Extra ``timm.create_model`` arguments (family settings such as ``keep_rate``).
            out_indices: Blocks whose outputs are returned, in increasing order; negative counts from the end.
            img_size: Size the position embedding is built (and pretrained weights resampled) for, an int or
                (H, W); the model default when None. Other inputs (multiples of 16) resample it on the fly.
            drop_path_rate: Stochastic depth rate of the last block (timm's linear rule).
            final_norm: Apply the model's final norm to every returned map (off like ViTDet: the necks normalize).
            with_cp: Gradient checkpointing of the blocks (saves memory at 1024x1024).
            family: Apply a parameter-free tokenzoo family to a timm ViT ``model_name`` (``tokenzoo.accelerate``):
                'evit', 'tome', 'mctf', 'mctf_fast' or 'expedit'; None uses ``model_name`` as it is.
            family_kwargs: The family's settings (e.g. ``dict(r=0.35, reduction_loc=(3, 6, 9))``).
            init_cfg: mmengine init config; ``dict(type="Pretrained", checkpoint=..., prefix=...)`` loads a timm/DeiT
                state dict, or a Runner checkpoint's backbone with ``prefix="backbone."``.

        Raises:
            ValueError: Unknown model name, out_indices out of range or unsorted, bad init_cfg or model_kwargs.
            FileNotFoundError: The Pretrained checkpoint is a local path that does not exist.
        """
        # Everything a config can get wrong is checked before the model is built.
        check_model_name(model_name)
        pretrained = _pretrained_checkpoint(init_cfg)
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict, got {model_kwargs!r}")
        if family is not None and family not in tokenzoo.accelerate_families():
            raise ValueError(f"unknown family {family!r}: allowed are {tokenzoo.accelerate_families()} (or None)")
        if family_kwargs is not None and (family is None or not isinstance(family_kwargs, dict)):
            raise ValueError(f"family_kwargs must be a dict and needs a family, got family={family!r}, "
                             f"family_kwargs={family_kwargs!r}")
        if isinstance(out_indices, int) or not out_indices or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty sequence of block indices, got {out_indices!r}")
        super().__init__(init_cfg=None if pretrained else init_cfg)
        self.pretrained = pretrained

        kwargs = dict(model_kwargs or {})
        reserved = {"num_classes", "features_only", "pretrained"} & set(kwargs)
        if reserved:
            raise ValueError(f"model_kwargs must not set {sorted(reserved)}: the backbone returns maps, and weights "
                             f"come from init_cfg=dict(type='Pretrained', checkpoint=...)")
        kwargs.setdefault("drop_path_rate", drop_path_rate)
        if img_size is not None:
            kwargs.setdefault("img_size", img_size)
        if model_name.split(".", 1)[0] not in tokenzoo.list_models():
            # tokenzoo models always take any size; a timm ViT needs to be told (and resamples its pos embed).
            kwargs.setdefault("dynamic_img_size", True)
        try:
            self.vit = timm.create_model(model_name, num_classes=0, **kwargs)
        except TypeError as e:  # an unexpected keyword reaches the model constructor as a TypeError
            raise ValueError(f"backbone {model_name!r} does not accept model_kwargs {sorted(kwargs)}: {e}") from e
        if family is not None:
            self.vit = tokenzoo.accelerate(self.vit, family, **(family_kwargs or {}))
        if not (hasattr(self.vit, "forward_intermediates") and hasattr(self.vit, "blocks")):
            raise ValueError(f"backbone {model_name!r} is not a ViT-style timm model (needs blocks and "
                             f"forward_intermediates)")

        if hasattr(self.vit, "token_counts"):  # the family's settings checked at the size the config trains at
            self.vit.token_counts(self.vit.patch_embed.img_size)
        depth = len(self.vit.blocks)
        if not all(-depth <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} out of range for {model_name!r} with {depth} blocks: "
                             f"allowed are 0..{depth - 1} (or -{depth}..-1 from the end)")
        self.out_indices = tuple(i % depth for i in out_indices)
        if list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f"out_indices must name distinct blocks in increasing order, got {tuple(out_indices)}")
        self.final_norm = final_norm
        # Blocks after the last requested one, the head and (unless used) the final norm would get no gradient, which
        # DDP rejects; timm's own pruning removes them.
        self.vit.prune_intermediate_layers(list(self.out_indices), prune_norm=not final_norm, prune_head=True)
        self.vit.set_grad_checkpointing(with_cp)
        self.model_name = model_name
        self.embed_dim = self.vit.embed_dim
        self.patch_size = tuple(self.vit.patch_embed.patch_size)
        self.img_size = tuple(self.vit.patch_embed.img_size)

    @property
    def out_channels(self) -> List[int]:
        """Channels of each returned map."""
        return [self.embed_dim] * len(self.out_indices)

    @property
    def out_strides(self) -> List[int]:
        """Stride of each returned map (the patch size)."""
        return [self.patch_size[0]] * len(self.out_indices)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Images (B, 3, H, W), H and W multiples of 16 -> one (B, C, H/16, W/16) map per entry of out_indices."""
        height, width = x.shape[-2:]
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {ph}x{pw}; pad the "
                             f"batch (e.g. the data preprocessor's pad_size_divisor=32)")
        maps = self.vit.forward_intermediates(x, indices=list(self.out_indices), norm=self.final_norm,
                                              output_fmt="NCHW", intermediates_only=True)
        return tuple(maps)

    def layer_groups(self) -> Dict[str, int]:
        """Depth group of each parameter, from the model's timm ``group_matcher`` (used by layer-wise lr decay).

        For a ViT: embeddings 0, block i -> i + 1, the final norm (if kept) after the last block.
        """
        groups = timm.models.group_parameters(self.vit, self.vit.group_matcher(coarse=False), reverse=True)
        return {_OWN_PREFIX + name: group for name, group in groups.items()}

    def no_weight_decay(self) -> Iterable[str]:
        """Parameter names (relative to this module) that weight decay should skip: position/prefix embeddings."""
        skip = getattr(self.vit, "no_weight_decay", lambda: set())()
        return {_OWN_PREFIX + name for name in skip}

    def init_weights(self) -> None:
        """Load the Pretrained checkpoint if one is configured, else run mmengine's init (timm's own init stays)."""
        if self.pretrained is None:
            super().init_weights()
            return
        self.load_pretrained(**self.pretrained)
        self._is_init = True

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None, map_location: str = "cpu") -> None:
        """Load weights into the ViT from a timm/DeiT state dict or a checkpoint holding this backbone's weights.

        Args:
            checkpoint: Local path or URL.
            prefix: Keep only keys starting with it, and strip it (e.g. ``backbone.`` for a Runner checkpoint).
            map_location: Where tensors are loaded.

        Raises:
            ValueError: No key has the prefix, or nothing in the checkpoint matches the model.
        """
        # Local files go through torch.load with weights_only=True (torch's default): see tokenzoo.mm.checkpoint.
        ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location)
        state_dict = ckpt
        for key in ("state_dict", "model", "module"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
                break
        if prefix:
            state_dict = _strip_prefix(state_dict, prefix)
            if not state_dict:
                raise ValueError(f"no key of checkpoint {checkpoint!r} starts with prefix {prefix!r}")
        if state_dict and all(key.startswith(_OWN_PREFIX) for key in state_dict):
            state_dict = _strip_prefix(state_dict, _OWN_PREFIX)
        state_dict = _checkpoint_filter(self.vit, state_dict)
        missing, unexpected = self.vit.load_state_dict(state_dict, strict=False)
        if len(missing) == len(self.vit.state_dict()):
            raise ValueError(f"checkpoint {checkpoint!r} has no weights for {self.model_name!r} (first keys: "
                             f"{list(state_dict)[:5]}); set init_cfg prefix= to the key prefix of the backbone")
        print_log(f"TokenZooViT: loaded {checkpoint} into {self.model_name}; missing keys {missing or 'none'}; "
                  f"unused keys {unexpected or 'none'}", logger="current")
