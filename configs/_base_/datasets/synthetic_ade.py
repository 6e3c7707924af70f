# The synthetic ADE20K-format set of tools/make_synthetic_data.py: 128x128 images, label 0 unlabelled (ignored),
# then background, square, circle, triangle.
# The one data location: every loader and evaluator below uses it; the tools' --data-root DIR moves them all.
data_root = "data/synthetic/ade/"
synthetic_ade_meta = dict(classes=("background", "square", "circle", "triangle"),
                          palette=[(120, 120, 120), (220, 60, 60), (60, 200, 80), (70, 90, 230)])
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type="BaseSegDataset",
        data_root=data_root,
        metainfo=synthetic_ade_meta,
        img_suffix=".jpg",
        seg_map_suffix=".png",
        reduce_zero_label=True,
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", reduce_zero_label=True),
            dict(type="RandomFlip", prob=0.5),
            dict(type="PackSegInputs"),
        ],
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="BaseSegDataset",
        data_root=data_root,
        metainfo=synthetic_ade_meta,
        img_suffix=".jpg",
        seg_map_suffix=".png",
        reduce_zero_label=True,
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="Resize", scale=(128, 128), keep_ratio=True),  # a no-op on the set; sizes other images
            dict(type="LoadAnnotations", reduce_zero_label=True),  # after Resize: metrics use the original labels
            dict(type="PackSegInputs"),
        ],
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator
