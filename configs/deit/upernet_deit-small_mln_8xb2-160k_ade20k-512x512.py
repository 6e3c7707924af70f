# The DeiT-S baseline: UperNet with a multi-level neck, ADE20K 512x512, 160k iterations at 8x2 images.
# Every family's UperNet config inherits this one and changes only the backbone, so the comparison is like for like.
_base_ = [
    "../_base_/models/upernet_vit-s16_mln.py",  # backbone: deit_small_patch16_224, DeiT-S ImageNet-1k weights
    "../_base_/datasets/ade20k_512x512.py",
    "../_base_/schedules/schedule_160k.py",
    "../_base_/default_runtime.py",
]
