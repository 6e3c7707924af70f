"""OpenMMLab integration: tokenzoo models as mmdet / mmseg backbones.

Importing ``tokenzoo.mm`` (configs do it with ``custom_imports=dict(imports=["tokenzoo.mm"])``) registers, in
mmengine's root registries so that both mmdet and mmseg find them:

* ``TokenZooViT`` (MODELS): any tokenzoo family or timm ViT by name -> tuple of stride-16 NCHW maps;
* ``TokenZooSimpleFPN`` (MODELS): ViTDet's simple feature pyramid, strides 4/8/16/32(+);
* ``TokenZooLN2d`` (MODELS): channel LayerNorm for NCHW maps (timm's ``LayerNorm2d``), for the heads' ``norm_cfg``;
* ``TokenZooLayerDecayOptimizerConstructor`` (OPTIM_WRAPPER_CONSTRUCTORS): layer-wise lr decay over the backbone.

It also lets torch's safe loader (``weights_only=True``) read mmengine Runner checkpoints, so ``resume`` and
``load_from`` work on torch >= 2.6 (see ``tokenzoo.mm.checkpoint``). It imports mmengine, not mmdet or mmseg.
"""
from .backbone import TokenZooViT, check_model_name
from .checkpoint import allow_runner_checkpoints
from .layer_decay import TokenZooLayerDecayOptimizerConstructor
from .neck import TokenZooSimpleFPN
from .runner import (LAUNCHERS, TASKS, build_backbone, build_model, build_runner, check_data, load_config, read_config,
                     set_data_root)

__all__ = ["LAUNCHERS", "TASKS", "TokenZooLayerDecayOptimizerConstructor", "TokenZooSimpleFPN", "TokenZooViT",
           "allow_runner_checkpoints", "build_backbone", "build_model", "build_runner", "check_data", "check_model_name",
           "load_config", "read_config", "set_data_root"]

allow_runner_checkpoints()
