# UperNet with a plain ViT-L/16 backbone at 640x640: the ViT-S/16 fragment with 1024 channels and the blocks 5, 11,
# 17, 23 of 24 in the multi-level neck (as the official Expedit-Segmenter upernet_vit-l16_ln_mln.py). The weights are
# timm's ViT-L/16 AugReg ImageNet-21k -> 1k at 384 (vit_large_patch16_384.augreg_in21k_ft_in1k, the checkpoint the
# paper's Segmenter ViT-L starts from), which expect inputs normalized with mean and std 0.5. A leaf config swaps
# model_name and model_kwargs and keeps everything else.
_base_ = "./upernet_vit-s16_mln.py"
model = dict(
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], size=(640, 640)),
    backbone=dict(
        model_name="vit_large_patch16_384",
        img_size=640,
        out_indices=(5, 11, 17, 23),
        init_cfg=dict(type="Pretrained", checkpoint="https://huggingface.co/timm/vit_large_patch16_384."
                                                    "augreg_in21k_ft_in1k/resolve/main/pytorch_model.bin"),
    ),
    neck=dict(in_channels=[1024, 1024, 1024, 1024], out_channels=1024),
    decode_head=dict(in_channels=[1024, 1024, 1024, 1024]),
    auxiliary_head=dict(in_channels=1024),
    test_cfg=dict(crop_size=(640, 640), stride=(426, 426)),
)
