# The DeiT-S Mask R-CNN of the COCO config, on the synthetic set of tools/make_synthetic_data.py (3 shape classes,
# 128x128 images), for a short run on one machine. Trained from scratch: no weights to download.
_base_ = [
    "../_base_/models/mask-rcnn_vit-s16_sfp.py",
    "../_base_/datasets/synthetic_instance.py",
    "../_base_/schedules/schedule_synthetic-200i.py",
    "../_base_/default_runtime.py",
]
model = dict(
    data_preprocessor=dict(batch_augments=[dict(type="BatchFixedSizePad", size=(128, 128), pad_mask=True)]),
    backbone=dict(img_size=128, init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)),
)
