# The DeiT-S baseline: Mask R-CNN, ViTDet simple feature pyramid, COCO with LSJ, 100 epochs at 8x2 images.
# Every family's Mask R-CNN config inherits this one and changes only the backbone, so the comparison is like for like.
_base_ = [
    "../_base_/models/mask-rcnn_vit-s16_sfp.py",  # backbone: deit_small_patch16_224, DeiT-S ImageNet-1k weights
    "../_base_/datasets/coco_instance_lsj-1024.py",
    "../_base_/schedules/schedule_lsj-100e.py",
    "../_base_/default_runtime.py",
]
