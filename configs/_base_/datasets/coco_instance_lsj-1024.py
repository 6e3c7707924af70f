# COCO 2017 instance segmentation with large-scale jitter (resize 0.1-2.0 of 1024, crop 1024), as ViTDet.
# Batches are padded to 1024x1024 by the model's data preprocessor.
# The one data location: every loader and evaluator below uses it; the tools' --data-root DIR moves them all.
data_root = "data/coco/"
coco_test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1024, 1024), keep_ratio=True),
    dict(type="Pad", size=(1024, 1024), pad_val=dict(img=(114, 114, 114))),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type="CocoDataset",
        data_root=data_root,
        ann_file="annotations/instances_train2017.json",
        data_prefix=dict(img="train2017/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
            dict(type="RandomFlip", prob=0.5),
            dict(type="RandomResize", scale=(1024, 1024), ratio_range=(0.1, 2.0), keep_ratio=True),
            dict(type="RandomCrop", crop_type="absolute_range", crop_size=(1024, 1024), recompute_bbox=True,
                 allow_negative_crop=True),
            dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
            dict(type="PackDetInputs"),
        ],
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="CocoDataset",
        data_root=data_root,
        ann_file="annotations/instances_val2017.json",
        data_prefix=dict(img="val2017/"),
        test_mode=True,
        pipeline=coco_test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", ann_file=data_root + "annotations/instances_val2017.json",
                     metric=["bbox", "segm"], format_only=False)
test_evaluator = val_evaluator
