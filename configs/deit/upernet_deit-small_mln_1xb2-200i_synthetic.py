# The DeiT-S UperNet of the ADE20K config, on the synthetic set of tools/make_synthetic_data.py (4 classes, 128x128
# images), for a short run on one machine. Trained from scratch: no weights to download.
_base_ = [
    "../_base_/models/upernet_vit-s16_mln.py",
    "../_base_/datasets/synthetic_ade.py",
    "../_base_/schedules/schedule_synthetic-200i.py",
    "../_base_/default_runtime.py",
]
model = dict(
    data_preprocessor=dict(size=(128, 128)),
    backbone=dict(img_size=128, init_cfg=None),
    decode_head=dict(num_classes=4),
    auxiliary_head=dict(num_classes=4),
    test_cfg=dict(mode="whole"),
)
