"""``TokenZooSimpleFPN``: the simple feature pyramid of ViTDet for a plain (single-scale) ViT backbone.

Paper: "Exploring Plain Vision Transformer Backbones for Object Detection", Yanghao Li et al., ECCV 2022 -
https://arxiv.org/abs/2203.16527 (Sec. 3, Fig. 2c). From the last stride-16 map alone it builds strides 4, 8, 16
and 32 with transposed convolutions (x4, x2), identity and max pooling (/2); each level then gets a 1x1 and a 3x3
convolution, both followed by LayerNorm over channels. Further levels (P6 for the RPN) are max-pooled with stride 2
from the last one, as ViTDet's ``LastLevelMaxPool``.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["TokenZooSimpleFPN"]

# Channel LayerNorm for the heads' norm_cfg (ViTDet normalizes its RPN/RoI head convs this way); mmdet 3.3 has no
# such norm outside its projects/ folder.
MODELS.register_module(name="TokenZooLN2d", module=LayerNorm2d)

_SCALES = (4.0, 2.0, 1.0, 0.5)  # relative to the stride-16 input: strides 4, 8, 16, 32


def _conv_ln(in_channels: int, out_channels: int, kernel_size: int, eps: float) -> nn.Sequential:
    # No conv bias: the LayerNorm that follows has its own.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(out_channels, eps=eps))


@MODELS.register_module()
class TokenZooSimpleFPN(BaseModule):
    """ViTDet simple feature pyramid: one stride-16 map in, ``num_outs`` maps at strides 4, 8, 16, 32, 64, ... out."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int = 256,
            num_outs: int = 5,
            eps: float = 1e-6,
            init_cfg: Optional[Union[dict, List[dict]]] = None,
    ) -> None:
        """
        Args:
            in_channels: Channels of the backbone map (the ViT width).
            out_channels: Channels of every pyramid level.
            num_outs: Levels returned, at least 4 (strides 4-32); each extra one halves the last.
            eps: LayerNorm epsilon.
            init_cfg: mmengine init config; by default convolutions get Caffe2's Xavier fill, as in ViTDet.

        Raises:
            ValueError: A channel count < 1, or num_outs < 4.
        """
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if isinstance(num_outs, bool) or not isinstance(num_outs, int) or num_outs < len(_SCALES):
            raise ValueError(f"num_outs must be an int >= {len(_SCALES)} (strides 4, 8, 16, 32 and extra levels), "
                             f"got {num_outs!r}")
        if init_cfg is None:
            # Caffe2's XavierFill is kaiming_uniform with a=1; ViTDet initializes its pyramid convs that way.
            init_cfg = dict(type="Kaiming", layer=["Conv2d", "ConvTranspose2d"], a=1, mode="fan_in",
                            nonlinearity="leaky_relu", distribution="uniform")
        super().__init__(init_cfg=init_cfg)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        half, quarter = in_channels // 2, in_channels // 4
        self.rescale = nn.ModuleList([
            nn.Sequential(
                nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2),
                LayerNorm2d(half, eps=eps),
                nn.GELU(),
                nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2)),
            nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ])
        level_channels = (quarter, half, in_channels, in_channels)
        self.lateral_convs = nn.ModuleList([_conv_ln(c, out_channels, 1, eps) for c in level_channels])
        self.fpn_convs = nn.ModuleList([_conv_ln(out_channels, out_channels, 3, eps) for _ in level_channels])

    def forward(self, inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Tuple[torch.Tensor, ...]:
        """Backbone output (a map or a tuple of maps; the last is used), (B, C, H, W) -> ``num_outs`` maps."""
        x = inputs if isinstance(inputs, torch.Tensor) else inputs[-1]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"TokenZooSimpleFPN expects (B, {self.in_channels}, H, W) maps, got {tuple(x.shape)}")
        outs = [fpn(lateral(rescale(x)))
                for rescale, lateral, fpn in zip(self.rescale, self.lateral_convs, self.fpn_convs)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
