# ADE20K at 640x640: the 512x512 fragment with random 640x640 crops of images rescaled to short side 320-1280, and
# test images at short side 640 (the official Expedit-Segmenter ade20k_640 pipeline).
_base_ = "./ade20k_512x512.py"
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=(2560, 640), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=(640, 640), cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]))
val_dataloader = dict(dataset=dict(pipeline=[
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2560, 640), keep_ratio=True),
    dict(type="LoadAnnotations", reduce_zero_label=True),  # after Resize: metrics use the original labels
    dict(type="PackSegInputs"),
]))
test_dataloader = val_dataloader
