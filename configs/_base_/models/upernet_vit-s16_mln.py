# UperNet with a plain ViT-S/16 backbone and a multi-level neck (blocks 2, 5, 8, 11 rescaled to strides 4/8/16/32),
# at 512x512, as mmseg's ViT/DeiT UperNet configs.
# The backbone is DeiT-S; a family's leaf config swaps model_name/model_kwargs and keeps everything else.
default_scope = "mmseg"
seg_norm_cfg = dict(type="SyncBN", requires_grad=True)  # plain BN in a single process (mmengine reverts SyncBN)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=(512, 512),
        test_cfg=dict(size_divisor=32),  # the backbone takes multiples of 16; the padding is cropped off again
    ),
    backbone=dict(
        type="TokenZooViT",
        model_name="deit_small_patch16_224",
        model_kwargs=dict(),
        img_size=512,
        out_indices=(2, 5, 8, 11),
        drop_path_rate=0.1,
        init_cfg=dict(type="Pretrained",
                      checkpoint="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"),
    ),
    neck=dict(type="MultiLevelNeck", in_channels=[384, 384, 384, 384], out_channels=384, scales=[4, 2, 1, 0.5]),
    decode_head=dict(
        type="UPerHead",
        in_channels=[384, 384, 384, 384],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=seg_norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=384,
        in_index=3,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=seg_norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=(512, 512), stride=(341, 341)),
)
# No fixed name: each Runner gets its own visualizer (a shared "visualizer" instance would mix runs in one process).
visualizer = dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")])
